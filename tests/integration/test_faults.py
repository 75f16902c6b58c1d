"""Peers die or hang mid-transfer: affected rooms end Failed with a reason
(through heartbeats, well before their deadlines), nothing hangs, the
survivor's pool comes back. Real processes, SIGKILL and SIGSTOP."""

import os
import signal
import time

import pytest

from embedlink import BufferSchema, LanguageEndpoint, Status, TransferError
from embedlink._runtime import loop as _loop
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
HIDDEN = 256
SCHEMA = BufferSchema(hidden_size=HIDDEN)
HB = dict(heartbeat_interval=0.2, heartbeat_misses=3)  # dead after 0.6 s of silence
TRANSPORTS = ["tcp", "shm", "mooncake", "nixl"]


# "zmq": no same-host lane, so the encoder learns of the death from heartbeats
# (or the data plane), as it would across hosts
@pytest.mark.parametrize(
    ("transport", "control"), [*((t, "unix") for t in TRANSPORTS), ("shm", "zmq")]
)
def test_language_killed_mid_transfer(boot, spawn_encoder, spawn_language, transport, control):
    jobs = [(i, 2000 + 50 * i) for i in range(60)]
    # rooms the dead language never asked for can only end by their deadline (5 s)
    enc = spawn_encoder(
        local_control=control == "unix",
        bootstrap=boot.address,
        hidden_size=HIDDEN,
        num_blocks=512,
        transports=(transport,),
        room_timeout=5.0,
        **HB,
    )
    lang = spawn_language(
        dict(
            bootstrap=boot.address,
            hidden_size=HIDDEN,
            num_blocks=16,
            default_tokens=1024,
            transports=(transport,),
            window=60,
            local_control=control == "unix",
            **HB,
        ),
        jobs,
    )
    enc.call("send_many", jobs)
    got = lang.out.get(timeout=60)  # at least one room finished: transfers are under way
    assert got.ok
    os.kill(lang.proc.pid, signal.SIGKILL)
    lang.proc.join(10)
    _, statuses, usage = enc.call("wait_idle", 30.0, timeout=60)
    failed = {r: why for r, (st, why) in statuses.items() if st == int(Status.Failed)}
    assert failed, statuses
    assert all(why for why in failed.values())
    # rooms with the dead peer as destination: caught by heartbeat or the data
    # plane, not by their deadline; only never-requested rooms time out
    detected = [w for w in failed.values() if "timed out after" not in w]
    assert detected, failed
    assert all("Bootstrapping" in w for w in failed.values() if "timed out after" in w), failed
    assert all(st in (int(Status.Success), int(Status.Failed)) for st, _ in statuses.values()), [
        x for x in statuses.items() if x[1][0] not in (3, 4)
    ]
    assert usage[0] == 0, "encoder pool not free after its peer died"
    stats = enc.call("stats")
    assert stats[4]["dead_sessions"] >= 1 or any("write" in w for w in failed.values())


GRACE = 5.0  # stale_write_grace of the language side


@pytest.mark.parametrize(
    ("transport", "how", "control"),
    [
        *((t, h, "unix") for t in TRANSPORTS for h in (signal.SIGKILL, signal.SIGSTOP)),
        ("shm", signal.SIGKILL, "zmq"),
    ],
)
def test_encoder_killed_or_hung_fails_its_rooms(
    boot, spawn_encoder, transport, how, control, monkeypatch
):
    # This thread serves the lane while it waits (Loop.serve_here). A hung
    # encoder sends nothing on it: only the eventfd the loop writes when the
    # heartbeats fail the room can wake the wait before this slice ends.
    monkeypatch.setattr(_loop, "SERVE_SLICE_S", 120.0)
    lane = control == "unix"
    enc = spawn_encoder(
        local_control=lane,
        bootstrap=boot.address,
        hidden_size=HIDDEN,
        num_blocks=64,
        transports=(transport,),
        room_timeout=60.0,
        **HB,
    )
    with LanguageEndpoint(
        SCHEMA,
        num_blocks=16,
        transports=(transport,),
        room_timeout=60.0,
        local_control=lane,
        stale_write_grace=GRACE,
        **HB,
    ) as lang:
        done = lang.receiver(bootstrap=boot.address, room=1)
        enc.call("send", 1, 700)
        assert same_embedding(done.wait(timeout=30), make_embedding(SCHEMA, 700, 0, 1))
        # rooms waiting for the encoder: one it never sends, one it sent half of
        waiting = lang.receiver(bootstrap=boot.address, room=2)
        enc.call("open", 2)
        half = lang.receiver(bootstrap=boot.address, room=3, tokens=512)
        try:
            os.kill(enc.proc.pid, how)
            t0 = time.monotonic()
            # a killed process's control socket closes with it (the same-host
            # lane): that is noticed at once, before any heartbeat is missed;
            # a stopped one keeps it open, and over ZeroMQ (as across hosts)
            # nothing closes: heartbeats catch both
            lane_closes = how == signal.SIGKILL and lane
            why = "control connection" if lane_closes else "no answer from encoder"
            for rx in (waiting, half):
                with pytest.raises(TransferError, match=f"encoder lost: .*{why}"):
                    rx.wait(timeout=30)
                assert rx.poll() is Status.Failed
            failed_at = time.monotonic()
            assert failed_at - t0 < 30  # well before the 60 s room deadline
            # tcp shuts the dead encoder's link; shm knows a process that is
            # gone writes no more; otherwise (a hung process, mooncake) a late
            # write may still land: the blocks it was offered wait out the grace
            fenced = transport == "tcp" or (transport == "shm" and lane_closes)
            if not fenced and time.monotonic() - failed_at < GRACE - 2:
                assert lang.pool_usage()[0] > 0, "blocks came back before the grace"
            assert (
                lang.allocator.wait_all_free(10) or done.clear() or lang.allocator.wait_all_free(5)
            )
            assert lang.dead_encoders == 1
        finally:
            if how == signal.SIGSTOP:
                os.kill(enc.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_bootstrap_server_stopped_mid_traffic(spawn_encoder, transport):
    from embedlink import BootstrapServer

    boot = BootstrapServer(host="127.0.0.1", port=0).start()
    # nobody dies here: heartbeats slow enough that a busy machine's pauses
    # are not taken for a dead peer
    calm = dict(heartbeat_interval=0.5, heartbeat_misses=10)
    enc = spawn_encoder(
        bootstrap=boot.address, hidden_size=HIDDEN, num_blocks=64, transports=(transport,), **calm
    )
    with LanguageEndpoint(SCHEMA, num_blocks=16, transports=(transport,), **calm) as lang:
        first = lang.receiver(bootstrap=boot.address, room=1)  # route looked up and cached
        in_flight = lang.receiver(bootstrap=boot.address, room=2)
        enc.call("send", 1, 900)
        assert same_embedding(first.wait(timeout=30), make_embedding(SCHEMA, 900, 0, 1))
        boot.close()
        # rooms already routed carry on without it
        enc.call("send", 2, 3000)
        assert same_embedding(in_flight.wait(timeout=30), make_embedding(SCHEMA, 3000, 0, 2))
        later = lang.receiver(bootstrap=boot.address, room=3)  # cached route: still fine
        enc.call("send", 3, 10)
        assert same_embedding(later.wait(timeout=30), make_embedding(SCHEMA, 10, 0, 3))
        # an endpoint that never looked the route up: receiver() does not
        # block, the room waits in Bootstrapping and then fails with a reason
        # naming the bootstrap server
        with LanguageEndpoint(
            SCHEMA, num_blocks=16, transports=(transport,), bootstrap_timeout=1.0
        ) as fresh:
            rx = fresh.receiver(bootstrap=boot.address, room=4)
            assert rx.poll() in (Status.Bootstrapping, Status.Failed)
            with pytest.raises(TransferError) as ei:
                rx.wait(timeout=30)
            assert boot.address in str(ei.value) and "unreachable" in str(ei.value)
            assert rx.history == [(Status.Bootstrapping, 0), (Status.Failed, 0)]
            assert fresh.allocator.num_free == 16
        assert lang.allocator.wait_all_free(10)
