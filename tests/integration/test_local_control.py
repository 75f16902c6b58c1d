"""The same-host control lane (``local_control``) against ZeroMQ, across real
processes: which one peers use, that rooms succeed over either, and that a
closed lane ends the other side's rooms at once instead of after missed
heartbeats."""

import time

import pytest

from embedlink import BufferSchema, EncoderEndpoint, LanguageEndpoint, Status
from embedlink._runtime.lane import SUPPORTED
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not SUPPORTED, reason="lanes need Linux abstract sockets"),
]

SCHEMA = BufferSchema(hidden_size=64)
# heartbeats far slower than the tests' waits: whatever fails a room here,
# it is not a missed heartbeat
SLOW_HB = dict(heartbeat_interval=30.0, heartbeat_misses=3)


@pytest.mark.parametrize(
    "enc_local, lang_local, used",
    [(True, True, "unix"), (True, False, "zmq"), (False, True, "zmq"), (False, False, "zmq")],
)
def test_same_host_peers_use_the_lane_when_both_allow_it(enc_local, lang_local, used):
    with (
        EncoderEndpoint(SCHEMA, num_blocks=32, local_control=enc_local) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32, local_control=lang_local) as lang,
    ):
        for room, n in ((1, 100), (2, 3000)):  # 3000 tokens resume twice
            tx = enc.sender(room)
            tx.send(make_embedding(SCHEMA, n, 0, room))
            rx = lang.receiver(encoder=enc.address, room=room)
            assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, n, 0, room))
            assert tx.wait(10) is Status.Success
            rx.clear()
            tx.clear()
        (peer,) = lang.status()["peers"]
        assert peer["control"] == used and peer["alive"]
        (session,) = enc.status()["peers"]
        assert session["control"] == used and session["alive"]
        assert lang.dropped_messages == 0 and enc.stats.dropped_messages == 0


def test_language_closing_ends_its_rooms_on_the_encoder_at_once():
    with EncoderEndpoint(SCHEMA, num_blocks=32, **SLOW_HB) as enc:
        tx = enc.sender(5)  # requested below, never sent: the room waits
        with LanguageEndpoint(SCHEMA, num_blocks=32, **SLOW_HB) as lang:
            rx = lang.receiver(encoder=enc.address, room=5)
            # the request has arrived once the encoder's room waits for input
            for _ in range(100):
                if tx.poll() is Status.WaitingForInput:
                    break
                tx.wait(0.05)
            assert tx.poll() is Status.WaitingForInput
            assert rx.poll() is Status.WaitingForInput
        assert tx.wait(10) is Status.Failed
        # told by the closing endpoint; its lane's end then ends the session
        assert "aborted by peer: language endpoint closed" in (tx.failure_reason or "")
        for _ in range(500):  # the lane's end reaches the encoder's loop a moment later
            if enc.stats.dead_sessions:
                break
            time.sleep(0.01)
        assert enc.stats.dead_sessions == 1
        tx.clear()
        assert enc.allocator.wait_all_free(10)


def test_over_a_lane_the_request_leaves_before_receiver_returns():
    """With the lane up and blocks free, receiver() reserves and sends the
    request on the caller's thread: the room is WaitingForInput on return."""
    with (
        EncoderEndpoint(SCHEMA, num_blocks=32) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32) as lang,
    ):
        first = lang.receiver(encoder=enc.address, room=1)  # connects, on the loop
        enc.sender(1).send(make_embedding(SCHEMA, 10, 0, 1))
        first.wait(timeout=30)
        for room in range(2, 12):
            rx = lang.receiver(encoder=enc.address, room=room)
            assert rx.poll() is Status.WaitingForInput
            assert rx.history == [(Status.Bootstrapping, 0), (Status.WaitingForInput, 0)]
            enc.sender(room).send(make_embedding(SCHEMA, 200, 0, room))
            assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 200, 0, room))
            rx.clear()


def test_rooms_started_from_many_threads_with_a_short_pool_all_arrive():
    """Caller threads starting rooms themselves race the loop, which connects
    to the encoder (the first rooms start while it does) and starts the rooms
    that had to queue for blocks: every room still arrives whole and both
    pools end empty. Four fresh language endpoints, so four connections race."""
    import threading

    per_thread, threads = 10, 4
    failures: list[str] = []
    with EncoderEndpoint(SCHEMA, num_blocks=64) as enc:
        for attempt in range(4):
            base = 1 + attempt * per_thread * threads
            rooms = range(base, base + per_thread * threads)

            def size(room: int) -> int:
                return 1 + (room * 97) % 700  # some rooms resume

            def encoder_side(rooms: range = rooms) -> None:
                for room in rooms:
                    try:
                        enc.sender(room).send(
                            make_embedding(SCHEMA, size(room), 0, room), timeout=60
                        )
                    except Exception as exc:
                        failures.append(f"send {room}: {exc}")

            def language_side(mine: range, lang: LanguageEndpoint) -> None:
                for room in mine:
                    try:
                        rx = lang.receiver(encoder=enc.address, room=room)
                        got = rx.wait(timeout=60)
                        if not same_embedding(got, make_embedding(SCHEMA, size(room), 0, room)):
                            failures.append(f"room {room} differs")
                        rx.clear()
                    except Exception as exc:
                        failures.append(f"room {room}: {exc}")

            with LanguageEndpoint(SCHEMA, num_blocks=12, default_tokens=256) as lang:
                workers = [
                    threading.Thread(target=language_side, args=(rooms[k::threads], lang))
                    for k in range(threads)
                ]
                workers.append(threading.Thread(target=encoder_side))
                for w in workers:
                    w.start()
                for w in workers:
                    w.join(60)
                assert not any(w.is_alive() for w in workers), "a thread hung"
                assert failures == []
                assert lang.allocator.wait_all_free(10)
                assert lang.loop_errors == 0
        assert enc.allocator.wait_all_free(10)
        assert enc.loop_errors == 0


def test_a_request_from_a_callers_thread_never_overtakes_the_registration(monkeypatch):
    """While the loop connects to an encoder, other threads start rooms; the
    registration is slow to build here (as it is when a pool has many
    regions). No request may reach the encoder before the registration."""
    import threading
    import time

    slow = LanguageEndpoint._register

    def register(self, enc):
        time.sleep(0.05)  # lets the callers' threads run, holding no lock
        return slow(self, enc)

    monkeypatch.setattr(LanguageEndpoint, "_register", register)
    with (
        EncoderEndpoint(SCHEMA, num_blocks=64) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32) as lang,
    ):
        started: list = []

        def start(room: int) -> None:
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:  # keep starting rooms meanwhile
                started.append(lang.receiver(encoder=enc.address, room=room))
                room += 1000
                time.sleep(0.01)

        threads = [threading.Thread(target=start, args=(k,)) for k in range(1, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for rx in started:
            enc.sender(rx.room).send(make_embedding(SCHEMA, 3, 0, rx.room))
        for rx in started:
            assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 3, 0, rx.room))
        assert enc.stats.dropped_messages == 0


def test_the_thread_in_wait_reads_its_answer_off_the_lane_itself():
    """While a thread waits for a room whose encoder it reaches over a lane,
    that thread serves the lane (the loop does not watch it meanwhile): the
    answer wakes it directly, not the loop first. Once its room is done, the
    loop serves the lane again."""
    import threading

    with (
        EncoderEndpoint(SCHEMA, num_blocks=32) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32) as lang,
    ):
        handled: list[tuple[int, int]] = []  # (thread, room) of each status handled
        real = lang._on_payload

        def on_payload(encoder, payload):
            from embedlink.protocol import StatusUpdate, decode

            msg = decode(lang._auth.open(payload))
            if isinstance(msg, StatusUpdate):
                handled.append((threading.get_ident(), msg.room))
            real(encoder, payload)

        lang._on_payload = on_payload  # bound into the lane's handler when it connects
        # a first room connects (the loop starts it; the caller's thread starts
        # rooms only for encoders it already reaches over a lane)
        enc.sender(0).send(make_embedding(SCHEMA, 10, 0, 0))
        lang.receiver(encoder=enc.address, room=0).wait(timeout=30)
        handled.clear()
        rx = lang.receiver(encoder=enc.address, room=1)

        def send_once_a_thread_serves_the_lane():
            for _ in range(1000):
                if lang._loop._lent:
                    break
                threading.Event().wait(0.01)
            enc.sender(1).send(make_embedding(SCHEMA, 200, 0, 1))

        sender = threading.Thread(target=send_once_a_thread_serves_the_lane)
        sender.start()
        assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 200, 0, 1))
        sender.join(30)
        assert handled == [(threading.get_ident(), 1)]
        assert not lang._loop._lent
        # afterwards the loop serves the lane again
        handled.clear()
        enc.sender(3).send(make_embedding(SCHEMA, 50, 0, 3))
        rx3 = lang.receiver(encoder=enc.address, room=3)
        for _ in range(500):
            if rx3.poll().is_terminal:
                break
            threading.Event().wait(0.01)
        assert rx3.poll() is Status.Success
        assert handled == [(lang._loop._thread.ident, 3)]
        assert lang.loop_errors == 0


@pytest.mark.timeout(30)
def test_an_abort_from_another_thread_ends_a_wait_that_serves_the_lane(monkeypatch):
    """The thread in wait() sleeps on the lane it serves; abort() from another
    thread (run by the loop) still ends its wait at once, not at the end of a
    sleep slice (set to a minute here). The loop-side wake-up of a serving
    thread (its eventfd, for rooms that end with no message on the lane) is
    tested with a hung encoder in test_faults.py."""
    import threading

    from embedlink import TransferError
    from embedlink._runtime import loop as _loop

    monkeypatch.setattr(_loop, "SERVE_SLICE_S", 60.0)
    with (
        EncoderEndpoint(SCHEMA, num_blocks=32, **SLOW_HB) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=32, **SLOW_HB) as lang,
    ):
        # a first room connects, so the next starts on this thread and its
        # wait() serves the lane
        enc.sender(1).send(make_embedding(SCHEMA, 10, 0, 1))
        lang.receiver(encoder=enc.address, room=1).wait(timeout=20)
        enc.sender(7)  # opened, never sent
        rx = lang.receiver(encoder=enc.address, room=7)

        def abort_once_served() -> None:
            for _ in range(1000):
                if lang._loop._lent:
                    break
                time.sleep(0.01)
            served.append(bool(lang._loop._lent))
            rx.abort("given up by another thread")

        served: list[bool] = []
        threading.Thread(target=abort_once_served).start()
        with pytest.raises(TransferError, match="given up by another thread"):
            rx.wait(timeout=25)
        assert served == [True]
        rx.clear()
        assert lang.allocator.wait_all_free(10)


@pytest.mark.parametrize("local", [True, False], ids=["unix", "zmq"])
@pytest.mark.timeout(60)
def test_closing_an_endpoint_ends_its_open_rooms_and_releases_waiting_threads(local):
    """Threads waiting on rooms return when their endpoint closes, with a
    reason, instead of at their own timeouts (or never); the peer is told and
    fails its side of those rooms at once."""
    import threading

    from embedlink import TransferError

    kw = dict(num_blocks=32, local_control=local, **SLOW_HB)
    # the language side closes
    with EncoderEndpoint(SCHEMA, **kw) as enc:
        with LanguageEndpoint(SCHEMA, **kw) as lang:
            # a first room connects, so the next one's waiter may serve the lane
            enc.sender(1).send(make_embedding(SCHEMA, 10, 0, 1))
            lang.receiver(encoder=enc.address, room=1).wait(timeout=30)
            tx = enc.sender(2)  # opened, never sent
            rx = lang.receiver(encoder=enc.address, room=2)
            errors: list[BaseException] = []

            def wait_forever() -> None:
                try:
                    rx.wait()  # no timeout: only the room's end returns
                except BaseException as exc:
                    errors.append(exc)

            waiter = threading.Thread(target=wait_forever)
            waiter.start()
            for _ in range(100):
                if tx.poll() is Status.WaitingForInput:
                    break
                tx.wait(0.05)
        waiter.join(20)
        assert not waiter.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], TransferError)
        assert "language endpoint closed" in str(errors[0])
        assert tx.wait(20) is Status.Failed
        assert "language endpoint closed" in (tx.failure_reason or "")
    # the encoder side closes
    with LanguageEndpoint(SCHEMA, **kw) as lang:
        enc = EncoderEndpoint(SCHEMA, **kw).start()
        try:
            tx = enc.sender(3)
            rx = lang.receiver(encoder=enc.address, room=3)
            for _ in range(100):
                if tx.poll() is Status.WaitingForInput:
                    break
                tx.wait(0.05)
            outcome: list[Status] = []
            waiter = threading.Thread(target=lambda: outcome.append(tx.wait()))
            waiter.start()
        finally:
            enc.close()
        waiter.join(20)
        assert outcome == [Status.Failed]
        assert "encoder endpoint closed" in (tx.failure_reason or "")
        with pytest.raises(TransferError, match="encoder endpoint closed"):
            rx.wait(timeout=20)
