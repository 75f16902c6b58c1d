"""What a serving engine needs from embedlink (docs/reliability.md, "For
serving engines"): abort() means Failed at once, no public call waits on the
network, restarted peers are followed, lifecycles are clean, the process is
left as it was, and hostile traffic is counted without flooding the log.

Real endpoints, real sockets on loopback (port 0), real processes where a
peer dies or restarts; every wait is bounded.
"""

import logging
import os
import random
import signal
import socket
import threading
import time

import pytest
import zmq

from embedlink import (
    BootstrapServer,
    BufferSchema,
    EncoderEndpoint,
    LanguageEndpoint,
    Status,
    TransferError,
)
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HIDDEN = 64
SCHEMA = BufferSchema(hidden_size=HIDDEN)
HB = dict(heartbeat_interval=0.3, heartbeat_misses=3)


def until(cond, timeout=30.0, what="condition"):
    """Wait for ``cond()`` to hold, looking every few milliseconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        threading.Event().wait(0.01)


# -- abort() ---------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_receiver_abort_is_failed_before_it_returns(spawn_encoder, transport):
    """abort() right after receiver(), 200 times, racing the loop that starts
    each room: poll() is Failed with the reason the moment abort() returns,
    wait() raises it, the encoder is told (every tenth room has a sender
    waiting there: each ends Failed, "aborted by peer"), and every block
    comes back."""
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        enc = spawn_encoder(
            bootstrap=boot.address, hidden_size=HIDDEN, num_blocks=64, transports=(transport,)
        )
        with LanguageEndpoint(SCHEMA, num_blocks=32, transports=(transport,)) as lang:
            for room in range(0, 200, 10):
                enc.call("open", room)
            for room in range(200):
                rx = lang.receiver(bootstrap=boot.address, room=room)
                rx.abort(f"engine gave up on {room}")
                assert rx.poll() is Status.Failed
                assert rx.failure_reason == f"engine gave up on {room}"
                with pytest.raises(TransferError, match=f"engine gave up on {room}"):
                    rx.wait(timeout=0)
                assert rx.history[-1] == (Status.Failed, 0)
                rx.abort("again")  # an ended room: a no-op
                assert rx.failure_reason == f"engine gave up on {room}"
                rx.clear()
            _, statuses, _ = enc.call("wait_idle", 30)
            assert statuses == {
                r: (int(Status.Failed), f"aborted by peer: engine gave up on {r}")
                for r in range(0, 200, 10)
            }
            assert lang.allocator.wait_all_free(30)
            assert lang.status()["loop_errors"] == 0


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_abort_mid_transfer_keeps_blocks_until_the_encoder_answers(spawn_encoder, transport):
    """A room aborted while it resumes (a 40,000-token embedding through a
    pool of 512 tokens: about eighty chunks) is Failed at once; every block on
    both sides comes back once the encoder has answered; the next room is
    unharmed."""
    big = BufferSchema(hidden_size=1024)
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        enc = spawn_encoder(
            bootstrap=boot.address, hidden_size=1024, num_blocks=400, transports=(transport,)
        )
        with LanguageEndpoint(
            big, num_blocks=4, default_tokens=512, transports=(transport,)
        ) as lang:
            rx = lang.receiver(bootstrap=boot.address, room=1)
            enc.call("send", 1, 40_000)
            deadline = time.monotonic() + 60
            while rx.poll() is not Status.Transferring:  # look without sleeping
                assert rx.poll() is not Status.Success, "ended before it could be aborted"
                assert time.monotonic() < deadline, f"still {rx.poll()}"
            rx.abort("request cancelled")
            assert rx.poll() is Status.Failed and rx.failure_reason == "request cancelled"
            assert Status.Success not in [st for st, _ in rx.history]
            rx.clear()
            assert lang.allocator.wait_all_free(30)
            _, statuses, usage = enc.call("wait_idle", 30)
            assert statuses == {1: (int(Status.Failed), "aborted by peer: request cancelled")}
            assert usage == (0, 400)
            ok = lang.receiver(bootstrap=boot.address, room=2)
            enc.call("send", 2, 1500)
            assert same_embedding(ok.wait(30), make_embedding(big, 1500, 0, 2))
            _, statuses, usage = enc.call("wait_idle", 30)
            assert statuses == {2: (int(Status.Success), None)} and usage == (0, 400)


def test_sender_abort_is_failed_before_it_returns():
    with (
        EncoderEndpoint(SCHEMA, num_blocks=32, transports=("tcp",)) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32, transports=("tcp",)) as lang,
    ):
        for room in range(50):
            tx = enc.sender(room)
            rx = lang.receiver(encoder=enc.address, room=room)
            tx.abort("vision tower failed")
            assert tx.poll() is Status.Failed
            assert tx.failure_reason == "vision tower failed"
            assert tx.wait(0) is Status.Failed
            # told by an Abort, or refused: the room had ended when it asked
            with pytest.raises(TransferError, match="vision tower failed"):
                rx.wait(30)
            tx.clear()
            rx.clear()
        assert enc.allocator.wait_all_free(10) and lang.allocator.wait_all_free(10)


# -- nothing blocks on the network ----------------------------------------------


class BlackHole:
    """A TCP server that accepts connections and reads, but never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = []
        self.requests = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            c.settimeout(5)
            try:
                if c.recv(4096):  # the HTTP request; never answered
                    self.requests += 1
            except OSError:
                pass
            self.conns.append(c)

    def open_unanswered(self):
        """Connections that sent a request and are still open (nobody gave up)."""
        n = 0
        for c in self.conns:
            c.setblocking(False)
            try:
                if c.recv(1, socket.MSG_PEEK) == b"":
                    continue  # the client closed it
            except BlockingIOError:
                pass
            n += 1
        return n

    def close(self):
        self._stop = True
        self._thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_receiver_does_not_wait_for_a_bootstrap_server_that_never_answers():
    """The lookup is made off the caller's thread: receiver() returns while
    the bootstrap server still holds the request unanswered; poll(), abort()
    and clear() too; the room then fails at bootstrap_timeout with a reason
    naming the server."""
    hole = BlackHole()
    try:
        with LanguageEndpoint(
            SCHEMA, num_blocks=16, transports=("tcp",), bootstrap_timeout=1.0
        ) as lang:
            rx = lang.receiver(bootstrap=hole.address, room=1)
            until(lambda: hole.requests >= 1, what="the lookup reached the server")
            # the request is still open and unanswered, yet we are here
            assert hole.open_unanswered() >= 1
            assert rx.poll() is Status.Bootstrapping
            other = lang.receiver(bootstrap=hole.address, room=2)
            other.abort("not needed")
            assert other.poll() is Status.Failed
            other.clear()
            with pytest.raises(TransferError) as ei:
                rx.wait(timeout=30)
            assert hole.address in ei.value.reason
            assert "within 1s" in ei.value.reason
            assert rx.history == [(Status.Bootstrapping, 0), (Status.Failed, 0)]
            assert hole.requests == 1  # one lookup in flight per key, not one per room
            assert lang.allocator.num_free == 16
    finally:
        hole.close()


def test_rooms_wait_for_an_encoder_that_registers_later(spawn_encoder):
    """A room asked for before any encoder registered stays Bootstrapping
    (the lookup is retried) and succeeds once one does."""
    with (
        BootstrapServer(host="127.0.0.1", port=0) as boot,
        LanguageEndpoint(SCHEMA, num_blocks=16, transports=("tcp",)) as lang,
    ):
        rx = lang.receiver(bootstrap=boot.address, room=7)
        until(lambda: lang._resolver.lookups >= 2, what="a lookup failed and was retried")
        assert rx.poll() is Status.Bootstrapping
        assert "no encoder rank has registered yet" in (
            lang._resolver.last_error(boot.address) or ""
        )
        enc = spawn_encoder(
            bootstrap=boot.address, hidden_size=HIDDEN, num_blocks=32, transports=("tcp",)
        )
        enc.call("send", 7, 1500)
        assert same_embedding(rx.wait(30), make_embedding(SCHEMA, 1500, 0, 7))


@pytest.mark.parametrize("local_control", [True, False])
def test_first_reservations_follow_receiver_order_when_the_route_comes_midway(local_control):
    """Rooms asked for before the encoder's route is known wait for it; rooms
    asked for once it is cached must not take the pool ahead of them. (When
    they did, a later room could hold the language pool while the encoder's
    pool was full of earlier rooms waiting for it: both sides stood still
    until a deadline; seen as the 500-room pipeline test's "no free encoder
    blocks" and the load test's room 0 "still Bootstrapping".) The loop
    thread is held while the route arrives, which is the window where the
    order used to break: each room's own lookup, the resolver's change
    notice and the cached-route rooms are then all queued behind it."""
    bs = 128
    with (
        BootstrapServer(host="127.0.0.1", port=0) as boot,
        # 8 blocks for first reservations, 2 per room: 4 rooms at a time
        LanguageEndpoint(
            SCHEMA,
            num_blocks=9,
            block_size=bs,
            default_tokens=2 * bs,
            resume_headroom=1,
            transports=("tcp",),
            local_control=local_control,
        ) as lang,
    ):
        rxs = [lang.receiver(bootstrap=boot.address, room=r) for r in range(5)]
        until(lambda: lang.status()["rooms_waiting_for_route"] == 5, what="rooms 0-4 unrouted")
        held, release = threading.Event(), threading.Event()

        def hold():
            held.set()
            release.wait(30)

        lang._loop.call(hold)  # the loop thread waits here until released
        assert held.wait(10)
        try:
            rxs += [lang.receiver(bootstrap=boot.address, room=r) for r in range(5, 10)]
            with EncoderEndpoint(
                SCHEMA,
                bootstrap=boot.address,
                num_blocks=16,
                block_size=bs,
                transports=("tcp",),
                local_control=local_control,
            ) as enc:
                until(
                    lambda: lang._resolver.get(boot.address, 0, None) is not None,
                    what="the route cached",
                )
                rxs += [lang.receiver(bootstrap=boot.address, room=r) for r in range(10, 15)]
                release.set()
                until(
                    lambda: sum(rx.poll() is Status.WaitingForInput for rx in rxs) == 4,
                    what="four rooms reserved",
                )
                assert [rx.poll() for rx in rxs[:4]] == [Status.WaitingForInput] * 4
                assert all(rx.poll() is Status.Bootstrapping for rx in rxs[4:])
                # and the rest follow in order as blocks come back
                for r in range(15):
                    tx = enc.sender(r)
                    tx.send(make_embedding(SCHEMA, bs, 0, r))
                    assert same_embedding(rxs[r].wait(30), make_embedding(SCHEMA, bs, 0, r))
                    rxs[r].clear()
                    assert tx.wait(30) is Status.Success
                    tx.clear()
        finally:
            release.set()
        assert lang.allocator.wait_all_free(10)


def test_malformed_bootstrap_address_is_a_value_error():
    with (
        LanguageEndpoint(SCHEMA, num_blocks=16, transports=("tcp",)) as lang,
        pytest.raises(ValueError, match="must be host:port"),
    ):
        lang.receiver(bootstrap="no-port-here", room=1)


# -- restarted peers ------------------------------------------------------------


@pytest.mark.parametrize(
    "transport, local_control",
    [("tcp", True), ("shm", True), ("mooncake", True), ("nixl", True), ("tcp", False)],
)
def test_an_encoder_restarted_on_another_port_is_found_again(
    spawn_encoder, transport, local_control
):
    """SIGKILL the encoder rank; start another (port 0: another port) that
    registers in its place: once the first is declared dead, new rooms reach
    the new one, without restarting the language rank."""
    cfg = dict(hidden_size=HIDDEN, num_blocks=64, transports=(transport,), **HB)
    cfg["local_control"] = local_control
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        first = spawn_encoder(bootstrap=boot.address, **cfg)
        with LanguageEndpoint(
            SCHEMA, num_blocks=32, transports=(transport,), local_control=local_control, **HB
        ) as lang:
            rx = lang.receiver(bootstrap=boot.address, room=1)
            first.call("send", 1, 2000)
            assert same_embedding(rx.wait(30), make_embedding(SCHEMA, 2000, 0, 1))
            rx.clear()
            old = first.address
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.join(10)
            until(lambda: lang.dead_encoders >= 1, what="the encoder declared dead")
            assert old not in str(lang.status()["routes"])  # the route was dropped
            second = spawn_encoder(bootstrap=boot.address, **cfg)
            assert second.address != old
            for room in (2, 3):
                rx = lang.receiver(bootstrap=boot.address, room=room)
                second.call("send", room, 2500)
                assert same_embedding(rx.wait(30), make_embedding(SCHEMA, 2500, 0, room))
                rx.clear()
            assert {p["encoder"] for p in lang.status()["peers"]} == {second.address}
            assert lang.allocator.wait_all_free(10)


def test_a_new_address_at_the_bootstrap_server_is_followed(spawn_encoder):
    """The bootstrap server reports another address for the rank (a second
    encoder registered in its place while the first still runs): after
    route_refresh, new rooms go to the new one; the old one's rooms were
    unaffected."""
    cfg = dict(hidden_size=HIDDEN, num_blocks=64, transports=("tcp",))
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        first = spawn_encoder(bootstrap=boot.address, **cfg)
        with LanguageEndpoint(
            SCHEMA, num_blocks=32, transports=("tcp",), route_refresh=0.2
        ) as lang:
            rx = lang.receiver(bootstrap=boot.address, room=1)
            first.call("send", 1, 100)
            assert same_embedding(rx.wait(30), make_embedding(SCHEMA, 100, 0, 1))
            second = spawn_encoder(bootstrap=boot.address, **cfg)

            def follows():
                probe = lang.receiver(bootstrap=boot.address, room=999)  # asks again
                probe.clear()
                return second.address in str(lang.status()["routes"])

            until(follows, what="the new address followed")
            rx = lang.receiver(bootstrap=boot.address, room=2)
            second.call("send", 2, 1500)
            assert same_embedding(rx.wait(30), make_embedding(SCHEMA, 1500, 0, 2))


def test_an_encoder_serves_a_restarted_language_rank_at_once(spawn_language):
    """A language rank killed mid-traffic and started again (a new session,
    same rank) is served at once, while the encoder still counts the old
    session alive (over ZeroMQ, with long heartbeats, nothing tells it)."""
    slow_hb = dict(heartbeat_interval=10.0, heartbeat_misses=3)
    with (
        BootstrapServer(host="127.0.0.1", port=0) as boot,
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=("tcp",),
            local_control=False, **slow_hb,
        ) as enc,
    ):  # fmt: skip
        cfg = dict(
            bootstrap=boot.address, hidden_size=HIDDEN, num_blocks=32, transports=("tcp",),
            local_control=False, window=4, **slow_hb,
        )  # fmt: skip
        senders = {r: enc.sender(r) for r in range(4)}
        victim = spawn_language(cfg, [(r, 3000) for r in range(4)])
        until(lambda: len(enc.sessions()) == 1, what="the first language rank registered")
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.join(10)
        for tx in senders.values():
            tx.abort("its language rank went away")
            tx.clear()
        jobs = [(r, 1200 + 100 * (r - 10)) for r in range(10, 14)]
        for r, n in jobs:
            enc.sender(r).send(make_embedding(SCHEMA, n, 0, r))
        fresh = spawn_language(cfg, jobs)
        got, (_, usage, errors) = fresh.results(len(jobs), timeout=60)
        assert [(r.room, r.ok, r.reason) for r in got] == [(r, True, None) for r, _ in jobs]
        assert usage == (0, 32) and errors == 0
        alive = [p["session"] for p in enc.status()["peers"] if p["alive"]]
        assert len(alive) == 2  # the killed one is not declared dead yet


# -- lifecycle --------------------------------------------------------------------


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _embedlink_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("embedlink"))


def test_constructing_closing_and_restarting_leaks_nothing():
    """100 construct/close and 20 start/close cycles of each endpoint and the
    bootstrap server: the file-descriptor and thread counts come back."""
    make = {
        "encoder": lambda: EncoderEndpoint(
            SCHEMA, num_blocks=8, transports=("tcp", "shm"), metrics_port=0
        ),
        "language": lambda: LanguageEndpoint(
            SCHEMA, num_blocks=8, default_tokens=128, transports=("shm", "tcp"), metrics_port=0
        ),
        "bootstrap": lambda: BootstrapServer(host="127.0.0.1", port=0),
        # the process's NIXL agent (and its UCX threads) outlive the endpoint
        # by design; its registrations and the notification thread do not
        "language over nixl": lambda: LanguageEndpoint(
            SCHEMA, num_blocks=8, default_tokens=128, transports=("nixl",)
        ),
    }
    for name, new in make.items():
        # one cycle first: lazily created process-wide things (imports, the
        # zmq library's own state) are not leaks
        new().start().close()
        fds, threads = _fds(), threading.active_count()
        for _ in range(100):
            new().close()
        assert _fds() <= fds, f"{name}: construct/close leaked descriptors"
        assert threading.active_count() == threads, f"{name}: construct/close left threads"
        for _ in range(20):
            x = new().start()
            with pytest.raises(RuntimeError, match="already started"):
                x.start()
            x.close()
            x.close()  # idempotent
            with pytest.raises(RuntimeError, match="closed"):
                x.start()
        assert _embedlink_threads() == [], f"{name}: threads alive after close()"
        until(lambda n=fds: _fds() <= n, timeout=10, what=f"{name}: descriptors back")
        assert threading.active_count() == threads


def test_a_restarted_bootstrap_server_learns_the_encoder_again():
    """A bootstrap server keeps its registry in memory. Restarted on its
    address, it learns the encoder again within register_interval (the
    failures while it was down are counted and named), and a language rank
    that never cached the route finds the encoder through it."""
    boot = BootstrapServer(host="127.0.0.1", port=0).start()
    enc = EncoderEndpoint(
        SCHEMA, num_blocks=16, bootstrap=boot.address, transports=("tcp",), register_interval=0.1
    ).start()
    address = boot.address
    try:
        boot.close()
        until(lambda: enc.status()["registration"]["failures"] >= 1, what="a failed registration")
        assert address in enc.status()["registration"]["last_error"]
        boot = BootstrapServer(host="127.0.0.1", port=int(address.rsplit(":", 1)[1])).start()
        assert boot.address == address
        until(lambda: enc.status()["registration"]["last_error"] is None, what="registered again")
        with LanguageEndpoint(SCHEMA, num_blocks=16, transports=("tcp",)) as lang:
            rx = lang.receiver(bootstrap=address, room=1)
            emb = make_embedding(SCHEMA, 40, 0, 1)
            enc.sender(1).send(emb)
            assert same_embedding(rx.wait(timeout=30), emb)
    finally:
        enc.close()
        boot.close()
    assert _embedlink_threads() == []


def test_an_encoder_port_in_use_fails_start_and_leaks_nothing():
    """A taken control port is an OSError from start() naming the address,
    not a hang in close() (an unclosed ZeroMQ socket blocks its context's
    term()); the endpoint leaves no thread or descriptor behind."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        EncoderEndpoint(SCHEMA, num_blocks=8, transports=("tcp",)).start().close()
        fds, threads = _fds(), threading.active_count()
        for _ in range(3):
            enc = EncoderEndpoint(SCHEMA, num_blocks=8, port=port, transports=("tcp",))
            with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
                enc.start()
            enc.close()
        assert _embedlink_threads() == []
        assert threading.active_count() == threads
        until(lambda: _fds() <= fds, timeout=10, what="descriptors back")
    finally:
        taken.close()


def test_rooms_after_close_are_refused_clearly():
    lang = LanguageEndpoint(SCHEMA, num_blocks=8, default_tokens=128, transports=("tcp",))
    with pytest.raises(RuntimeError, match="not running"):
        lang.receiver(encoder="127.0.0.1:1", room=1)
    lang.start().close()
    with pytest.raises(RuntimeError, match="not running"):
        lang.receiver(encoder="127.0.0.1:1", room=1)
    enc = EncoderEndpoint(SCHEMA, num_blocks=8, transports=("tcp",))
    with pytest.raises(RuntimeError, match="not running"):
        enc.sender(1)
    enc.close()


# -- process hygiene --------------------------------------------------------------


def test_epochs_do_not_follow_the_global_random_seed():
    with LanguageEndpoint(SCHEMA, num_blocks=8, default_tokens=128, transports=("tcp",)) as lang:
        epochs = []
        for room in range(3):
            random.seed(1234)
            rx = lang.receiver(encoder="127.0.0.1:9", room=room)
            epochs.append(rx.epoch)
            rx.clear()
        assert len(set(epochs)) == 3


@pytest.mark.parametrize("transport", ["tcp", "shm", "mooncake", "nixl"])
def test_endpoints_leave_the_environment_as_they_found_it(transport):
    before = dict(os.environ)
    with (
        EncoderEndpoint(SCHEMA, num_blocks=16, transports=(transport,), room_timeout=7) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=16, transports=(transport,)) as lang,
    ):
        tx = enc.sender(1)
        rx = lang.receiver(encoder=enc.address, room=1)
        tx.send(make_embedding(SCHEMA, 1500, 0, 1))
        assert same_embedding(rx.wait(30), make_embedding(SCHEMA, 1500, 0, 1))
    assert dict(os.environ) == before


def aux_bytes():
    from embedlink.protocol.layout import AUX_SIZE

    return AUX_SIZE


def test_counters_are_exact_with_writes_on_worker_threads():
    """bytes_written and chunks_written are counted by the loop alone: exact
    after many concurrent writes over tcp (four writer threads): as many
    chunks as the receivers saw arrive, every byte once."""
    n_rooms, n = 60, 1500
    with (
        EncoderEndpoint(SCHEMA, num_blocks=256, transports=("tcp",)) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=256, transports=("tcp",)) as lang,
    ):
        rxs = [lang.receiver(encoder=enc.address, room=r) for r in range(n_rooms)]
        for r in range(n_rooms):
            enc.sender(r).send(make_embedding(SCHEMA, n, 0, r))
        for rx in rxs:
            rx.wait(60)
        chunks = sum(
            1 for rx in rxs for st, _ in rx.history if st in (Status.Transferring, Status.Success)
        )
        assert chunks >= 2 * n_rooms  # 1500 > the 1024 default: every room resumed
        until(lambda: enc.stats.chunks_written == chunks, what="all chunks counted")
        # and each room's first chunk its aux record
        assert enc.stats.bytes_written == n_rooms * (n * SCHEMA.token_bytes + aux_bytes())
        assert enc.stats.write_failures == 0


# -- hostile traffic ----------------------------------------------------------------


def _warnings(caplog, name):
    return [r for r in caplog.records if r.name == name and r.levelno >= logging.WARNING]


def test_garbage_to_an_encoder_is_counted_exactly_and_logged_sparingly(caplog):
    """5,000 malformed and 500 unauthenticated messages from one peer, 50
    more from 50 peers: counted exactly, fewer than 100 warning lines (one
    per peer this interval), and the endpoint still serves a real room."""
    caplog.set_level(logging.INFO, logger="embedlink.endpoints.encoder")
    secret = "s3cret"
    ctx = zmq.Context()
    try:
        with (
            EncoderEndpoint(
                SCHEMA, num_blocks=16, transports=("tcp",), auth_secret=secret,
                local_control=False,
            ) as enc,
            LanguageEndpoint(
                SCHEMA, num_blocks=16, transports=("tcp",), auth_secret=secret,
                local_control=False,
            ) as lang,
        ):  # fmt: skip
            noisy = ctx.socket(zmq.DEALER)
            noisy.connect(f"tcp://{enc.address}")
            from embedlink._runtime.auth import Authenticator

            auth = Authenticator(secret)
            for i in range(5000):
                noisy.send(auth.seal(b"\xff not msgpack %d" % i))
            for i in range(500):
                noisy.send(b"unsealed %d" % i)
            others = []
            for _ in range(50):
                s = ctx.socket(zmq.DEALER)
                s.connect(f"tcp://{enc.address}")
                s.send(auth.seal(b"\x00junk"))
                others.append(s)
            until(
                lambda: (
                    enc.stats.dropped_messages == 5050 and enc.stats.unauthenticated_messages == 500
                ),
                what="every garbage message counted",
            )
            metrics = enc.metrics
            assert metrics.dropped.labels("encoder")._value.get() == 5050
            assert metrics.unauthenticated.labels("encoder")._value.get() == 500
            lines = _warnings(caplog, "embedlink.endpoints.encoder")
            # one per noisy peer, and for the loudest one a summary per 10 s
            # interval should the machine be slow enough for one to pass
            assert 51 <= len(lines) < 100
            firsts = [r for r in lines if "dropped a malformed control message" in r.getMessage()]
            assert len(firsts) == 51
            assert all("more control messages" in r.getMessage() for r in lines if r not in firsts)
            tx = enc.sender(1)
            rx = lang.receiver(encoder=enc.address, room=1)
            tx.send(make_embedding(SCHEMA, 1500, 0, 1))
            assert same_embedding(rx.wait(30), make_embedding(SCHEMA, 1500, 0, 1))
            assert enc.status()["loop_errors"] == 0
            for s in [noisy, *others]:
                s.close(0)
    finally:
        ctx.term()


def test_garbage_from_an_encoder_is_counted_exactly_and_logged_sparingly(caplog):
    """A rogue "encoder" (a ROUTER the language rank connects to) answers
    with 5,000 malformed messages: counted exactly, fewer than 100 warning
    lines, and no room changes."""
    caplog.set_level(logging.INFO, logger="embedlink.endpoints.language")
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.ROUTER)
    # wait at the peer's high-water mark instead of dropping (a busy machine
    # reads slowly): every message sent must arrive to be counted
    rogue.setsockopt(zmq.ROUTER_MANDATORY, 1)
    rogue.setsockopt(zmq.SNDTIMEO, 30_000)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    try:
        with LanguageEndpoint(
            SCHEMA,
            num_blocks=16,
            transports=("tcp",),
            local_control=False,
            room_timeout=60,
            heartbeat_interval=10.0,
        ) as lang:
            rx = lang.receiver(encoder=f"127.0.0.1:{port}", room=1)
            assert rogue.poll(10_000), "the language rank never registered"
            identity, _register = rogue.recv_multipart()
            for i in range(5000):
                rogue.send_multipart([identity, b"\xc1 garbage %d" % i])
            until(lambda: lang.dropped_messages >= 5000, what="every garbage message counted")
            assert lang.dropped_messages == 5000
            assert lang.metrics.dropped.labels("language")._value.get() == 5000
            assert len(_warnings(caplog, "embedlink.endpoints.language")) < 100
            assert rx.poll() is Status.WaitingForInput  # garbage changes no room
            rx.abort("done")
    finally:
        rogue.close(0)
        ctx.term()


def test_an_aborted_room_gets_its_blocks_back_when_its_hung_encoder_is_declared_dead(
    spawn_encoder,
):
    """A room aborted while its reservation is offered to an encoder that
    hangs (SIGSTOP) keeps the blocks (a write may still land) until the
    encoder is declared dead; then they come back, cleared or not."""
    hb = dict(heartbeat_interval=0.2, heartbeat_misses=3, local_control=False)
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        enc = spawn_encoder(
            bootstrap=boot.address, hidden_size=HIDDEN, num_blocks=64, transports=("tcp",), **hb
        )
        with LanguageEndpoint(SCHEMA, num_blocks=32, transports=("tcp",), **hb) as lang:
            enc.call("open", 5)
            rx = lang.receiver(bootstrap=boot.address, room=5)
            until(lambda: rx.poll() is Status.WaitingForInput, what="room 5 requested")
            os.kill(enc.proc.pid, signal.SIGSTOP)
            try:
                rx.abort("engine gave up while the encoder hung")
                assert rx.poll() is Status.Failed
                assert lang.pool_usage()[0] == 8  # kept: the encoder may still write
                until(lambda: lang.dead_encoders == 1, what="the encoder declared dead")
                rx.clear()
                assert lang.allocator.wait_all_free(10), lang.pool_usage()
            finally:
                os.kill(enc.proc.pid, signal.SIGCONT)
