"""Peers die mid-transfer: rooms end Failed with a reason, nothing hangs, the
survivor's pool comes back. (Heartbeat-based detection is the reliability
issue's; here the survivor notices through its data plane or its deadline.)"""

import os
import signal
import time

import pytest

from embedlink import Status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
HIDDEN = 256


@pytest.mark.parametrize("transport", ["tcp", "shm", "mooncake"])
def test_language_killed_mid_transfer(boot, spawn_encoder, spawn_language, transport):
    jobs = [(i, 2000 + 50 * i) for i in range(60)]
    enc = spawn_encoder(
        bootstrap=boot.address,
        hidden_size=HIDDEN,
        num_blocks=512,
        transports=(transport,),
        room_timeout=5.0,
    )
    lang = spawn_language(
        dict(
            bootstrap=boot.address,
            hidden_size=HIDDEN,
            num_blocks=16,
            default_tokens=1024,
            transports=(transport,),
            window=60,
        ),
        jobs,
    )
    enc.call("send_many", jobs)
    got = lang.out.get(timeout=60)  # at least one room finished: transfers are under way
    assert got.ok
    os.kill(lang.proc.pid, signal.SIGKILL)
    lang.proc.join(10)
    t0 = time.monotonic()
    _, statuses, usage = enc.call("wait_idle", 60.0, timeout=90)
    assert time.monotonic() - t0 < 30, "the encoder took too long to notice"
    assert len(statuses) > 0
    failed = {r: why for r, (st, why) in statuses.items() if st == int(Status.Failed)}
    assert failed, statuses
    assert all(why for why in failed.values())
    assert all(st in (int(Status.Success), int(Status.Failed)) for st, _ in statuses.values())
    assert usage[0] == 0, "encoder pool not free after its peer died"
