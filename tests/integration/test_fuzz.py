"""20,000 random and mutated inputs into live endpoints' control sockets and
the bootstrap server's HTTP routes: no thread dies, no room changes except
through valid messages, and valid traffic afterwards succeeds 100%."""

import json
import random
import time
import urllib.error
import urllib.request

import msgspec
import pytest
import zmq

from embedlink import BufferSchema, EncoderEndpoint, LanguageEndpoint, Status
from embedlink.protocol import (
    Abort,
    Heartbeat,
    Resume,
    StatusUpdate,
    TransferRequest,
    encode,
)
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SCHEMA = BufferSchema(hidden_size=16)
LIVE = range(1, 6)  # rooms with real traffic; fuzz never names them


def _valid_like(rng, session):
    room = rng.randrange(1000, 1 << 40)
    epoch = rng.randrange(0, 1 << 62)
    blocks = rng.sample(range(0, 1 << 20), rng.randint(0, 5))
    pick = rng.randrange(5)
    if pick == 0:
        return TransferRequest(
            session=session,
            room=room,
            epoch=epoch,
            dst_blocks=blocks,
            dst_tokens=rng.randint(1, 1 << 20),
        )
    if pick == 1:
        return Resume(
            session=session,
            room=room,
            epoch=epoch,
            sent_tokens=rng.randint(1, 10**6),
            dst_blocks=blocks,
            dst_tokens=rng.randint(1, 99),
        )
    if pick == 2:
        total = rng.randint(0, 10**6)
        st = rng.choice(list(Status))
        return StatusUpdate(
            room=room,
            epoch=epoch,
            status=st,
            sent_tokens=rng.randint(0, total),
            total_tokens=total,
            reason="x" if st is Status.Failed else None,
        )
    if pick == 3:
        return Abort(session=session, room=room, epoch=epoch, reason="fuzz")
    return Heartbeat(session=session, seq=rng.randrange(1 << 62), reply=rng.random() < 0.5)


def _mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)) :]
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        else:
            d = msgspec.msgpack.decode(data)
            d[rng.choice(list(d))] = rng.choice(
                [None, -1, "x" * 300, [1] * 70000, 2**64 - 1, {"a": 1}]
            )
            b = bytearray(msgspec.msgpack.encode(d))
    return bytes(b)


def _fuzz_payloads(rng, n, session):
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 200)))
        elif kind == 1:
            out.append(encode(_valid_like(rng, session)))
        else:
            out.append(_mutate(rng, encode(_valid_like(rng, session))))
    return out


def _http(addr, method, path, body):
    req = urllib.request.Request(f"http://{addr}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_fuzz_control_planes_and_bootstrap(boot):
    rng = random.Random(1234)
    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=("tcp",), room_timeout=120
        ) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=64, transports=("tcp",), room_timeout=120) as lang,
    ):
        # live rooms waiting on each other while the fuzz runs
        rxs = {r: lang.receiver(bootstrap=boot.address, room=r) for r in LIVE}
        deadline = time.monotonic() + 10
        while any(rx.poll() is Status.Bootstrapping for rx in rxs.values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before = {r: rx.history for r, rx in rxs.items()}

        ctx = zmq.Context()
        # 1. the encoder's ROUTER, from a stranger and under the language's own session id
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://{enc.address}")
        payloads = _fuzz_payloads(rng, 5000, "stranger") + _fuzz_payloads(rng, 5000, lang.session)
        for p in payloads:
            dealer.send(p)
        # 2. the language side: a fake encoder it connects to, which answers with fuzz
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        decoy = lang.receiver(encoder=f"127.0.0.1:{port}", room=999_999)
        assert router.poll(10_000), "the language side did not register with the fake encoder"
        identity, _ = router.recv_multipart()
        for p in _fuzz_payloads(rng, 8000, lang.session):
            router.send_multipart([identity, p])
        # 3. the bootstrap server's routes
        codes = set()
        for _ in range(2000):
            if rng.random() < 0.5:
                body = rng.choice(
                    [
                        rng.randbytes(rng.randint(0, 64)),
                        json.dumps(
                            {
                                "role": rng.choice(["encoder", 7, None]),
                                "tp_size": rng.choice([1, 0, -3, "x", 2**40]),
                                "dp_size": 1,
                                "rank_ip": "h",
                                "rank_port": rng.randint(-5, 70000),
                                "engine_rank": rng.randint(-2, 3),
                            }
                        ).encode(),
                    ]
                )
                codes.add(_http(boot.address, "PUT", "/route", body))
            else:
                q = f"/route?engine_rank={rng.choice(['0', '-1', 'x', '', '9' * 30])}"
                q += rng.choice(
                    ["", "&target_dp_group=0", "&target_dp_group=-1", "&target_dp_group=%ff"]
                )
                codes.add(_http(boot.address, "GET", q, None))
        assert 500 not in codes and all(c < 500 for c in codes), codes

        # drain: the loops process the backlog, nothing dies
        time.sleep(1.0)
        assert enc.running and lang.running
        assert enc.loop_errors == 0 and lang.loop_errors == 0
        assert enc.stats.dropped_messages > 1000 and lang.dropped_messages > 1000
        # no live room changed because of the fuzz
        assert {r: rx.history for r, rx in rxs.items()} == before
        assert decoy.poll() in (Status.WaitingForInput, Status.Failed, Status.Bootstrapping)
        decoy.abort()
        router.close()
        dealer.close()
        ctx.term()

        # valid traffic afterwards: 100%
        for r in LIVE:
            enc.sender(r).send(make_embedding(SCHEMA, 100 * r + 7, 0, r))
        for r, rx in rxs.items():
            assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 100 * r + 7, 0, r))
        assert enc.allocator.wait_all_free(10)
        assert _http(boot.address, "GET", "/health", None) == 200
