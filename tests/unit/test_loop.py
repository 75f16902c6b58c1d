"""The endpoint loop: work run on another thread while it sleeps
(``try_run_here``), and a descriptor lent to a waiting thread (``serve_here``).
Real threads and real sockets, no mocks."""

import os
import socket
import threading
import time

import pytest

from embedlink._runtime import loop as _loop
from embedlink._runtime.loop import Loop

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not hasattr(os, "eventfd"), reason="serve_here needs Linux eventfd"),
]


@pytest.fixture
def loop():
    lp = Loop("test-loop", tick=lambda now: None, tick_interval=0.05)
    lp.start()
    yield lp
    lp.stop()


def idle(lp):
    """Until the loop sleeps with nothing queued (it holds its state otherwise)."""
    for _ in range(500):
        if lp.state.acquire(timeout=0.01):
            empty = lp._calls.empty()
            lp.state.release()
            if empty:
                return
        time.sleep(0.01)
    raise AssertionError("the loop never went idle")


def reader(lp, sock, seen):
    """An fd handler that records which thread served each message."""

    def handler():
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        seen.append((threading.get_ident(), data, lp.holds_state()))

    return handler


def watched(lp):
    """A socket pair whose second end ``lp`` watches with :func:`reader`; the
    first end (to write to), the second, what the reader saw, and an eventfd."""
    a, b = socket.socketpair()
    b.setblocking(False)
    seen = []
    lp.call(lp.add_fd, b.fileno(), reader(lp, b, seen))
    idle(lp)
    return a, b, seen, os.eventfd(0, os.EFD_NONBLOCK)


def test_try_run_here_runs_on_the_callers_thread_holding_the_state(loop):
    idle(loop)
    ran = []
    assert loop.try_run_here(lambda: ran.append((threading.get_ident(), loop.holds_state())))
    assert ran == [(threading.get_ident(), True)]
    assert not loop.holds_state()


def test_try_run_here_refuses_while_calls_wait_or_the_loop_works(loop):
    idle(loop)
    gate = threading.Event()
    loop.call(gate.wait, 5)  # the loop is busy with this call, holding its state
    time.sleep(0.05)
    assert not loop.try_run_here(lambda: None)
    gate.set()
    idle(loop)
    with loop.state:  # e.g. another thread runs loop work
        loop.call_lazy(lambda: None)  # queued: it must run before anything else
    assert not loop.try_run_here(lambda: None)


def test_serve_here_runs_the_handler_on_the_waiting_thread_then_gives_the_fd_back(loop):
    a, b, seen, waker = watched(loop)
    threading.Timer(0.1, a.send, (b"one",)).start()
    done = loop.serve_here(b.fileno(), lambda: bool(seen), time.monotonic() + 10, waker)
    assert done is True
    assert seen == [(threading.get_ident(), b"one", True)]
    # the loop watches it again: the next message is served on the loop thread
    a.send(b"two")
    for _ in range(200):
        if len(seen) == 2:
            break
        time.sleep(0.01)
    assert seen[1][1] == b"two" and seen[1][0] == loop._thread.ident
    os.close(waker)


def test_serve_here_stops_at_its_deadline_and_when_woken(loop, monkeypatch):
    monkeypatch.setattr(_loop, "SERVE_SLICE_S", 60.0)  # only the waker can end the wait early
    _a, b, seen, waker = watched(loop)
    assert loop.serve_here(b.fileno(), lambda: False, time.monotonic() + 0.2, waker) is False
    flag = threading.Event()

    def end_elsewhere():
        flag.set()
        os.eventfd_write(waker, 1)

    threading.Timer(0.2, end_elsewhere).start()
    # without the waker this would sleep for the 60 s slice and the test time out
    assert loop.serve_here(b.fileno(), flag.is_set, None, waker) is True
    assert seen == []
    os.close(waker)


def test_serve_here_declines_an_fd_it_cannot_take(loop):
    _a, b = socket.socketpair()
    b.setblocking(False)
    waker = os.eventfd(0, os.EFD_NONBLOCK)
    idle(loop)
    assert loop.serve_here(b.fileno(), lambda: False, None, waker) is None  # not watched
    loop.call(loop.add_fd, b.fileno(), reader(loop, b, []))
    loop.call(loop.watch_writable, b.fileno(), True)
    idle(loop)
    assert loop.serve_here(b.fileno(), lambda: False, None, waker) is None  # output pending
    loop.call(loop.watch_writable, b.fileno(), False)
    idle(loop)
    # one thread at a time: a second waiter is declined while the first serves
    first_in = threading.Event()
    release = threading.Event()

    def first():
        first_in.set()
        loop.serve_here(b.fileno(), release.is_set, time.monotonic() + 10, waker)

    t = threading.Thread(target=first)
    t.start()
    first_in.wait()
    for _ in range(200):
        if b.fileno() in loop._lent:
            break
        time.sleep(0.01)
    other = os.eventfd(0, os.EFD_NONBLOCK)
    assert loop.serve_here(b.fileno(), lambda: False, None, other) is None
    release.set()
    os.eventfd_write(waker, 1)
    t.join(10)
    assert not t.is_alive()
    os.close(waker)
    os.close(other)


def test_an_fd_closed_while_lent_is_dropped_not_given_back(loop):
    a, b = socket.socketpair()
    b.setblocking(False)
    fd = b.fileno()
    closed = []

    def handler():
        if not b.recv(4096):  # end of stream: the owner stops watching and closes
            loop.remove_fd(fd)
            closed.append(True)

    loop.call(loop.add_fd, fd, handler)
    idle(loop)
    waker = os.eventfd(0, os.EFD_NONBLOCK)
    threading.Timer(0.1, a.close).start()
    assert loop.serve_here(fd, lambda: bool(closed), time.monotonic() + 10, waker) is True
    assert fd not in loop._fd_handlers and fd not in loop._lent
    b.close()
    os.close(waker)


# -- busy polling: look for the next event without sleeping, for a bounded time


def loop_cpu_s(lp):
    """CPU seconds the loop's thread has used so far."""
    return time.clock_gettime(time.pthread_getcpuclockid(lp._thread.ident))


def cpu_after_one_call(lp, over_s):
    """CPU the loop's thread uses in the ``over_s`` seconds after it handled one call."""
    idle(lp)
    before = loop_cpu_s(lp)
    lp.call(lambda: None)
    time.sleep(over_s)
    return loop_cpu_s(lp) - before


@pytest.mark.parametrize(
    ("busy_poll", "may_spin", "spins"),
    [(0.3, None, True), (0.3, lambda: False, False), (0.0, None, False)],
    ids=["spins", "may_spin-says-no", "off"],
)
def test_busy_poll_keeps_the_loop_looking_for_a_bounded_time_after_activity(
    busy_poll, may_spin, spins
):
    lp = Loop("test-spin", tick=lambda now: None, busy_poll=busy_poll, may_spin=may_spin)
    lp.start()
    try:
        # idle, with only its ticks (every 0.1 s), a loop does not spin
        idle(lp)
        before = loop_cpu_s(lp)
        time.sleep(0.5)
        assert loop_cpu_s(lp) - before < 0.05
        used = cpu_after_one_call(lp, 1.0)
        if spins:
            # it looked for about 0.3 s after the call (it yields to others, so
            # on a busy machine it gets less), then slept for the rest
            assert 0.02 < used < 0.8
        else:
            assert used < 0.05
    finally:
        lp.stop()


def test_a_spinning_loop_lets_other_threads_run_its_work_and_still_serves_events():
    lp = Loop("test-spin", tick=lambda now: None, busy_poll=1.0)
    lp.start()
    a, _b, seen, waker = watched(lp)
    try:
        lp.call(lambda: None)  # activity: the loop then spins for a second
        idle(lp)  # the call ran
        # it holds no state while it looks, so a caller may run loop work
        ran = []
        assert lp.try_run_here(lambda: ran.append(lp.holds_state()))
        assert ran == [True]
        a.send(b"one")  # and what arrives meanwhile is served by the loop
        for _ in range(300):
            if seen:
                break
            time.sleep(0.01)
        assert seen and seen[0][:2] == (lp._thread.ident, b"one")
    finally:
        lp.stop()
        os.close(waker)


def test_serve_here_busy_polls_then_sleeps():
    lp = Loop("test-spin", tick=lambda now: None, busy_poll=0.2)
    lp.start()
    a, b, seen, waker = watched(lp)
    try:
        # nothing comes: about 0.2 s of looking, then sleep until the deadline
        before = time.thread_time()
        assert lp.serve_here(b.fileno(), lambda: False, time.monotonic() + 1.0, waker) is False
        assert time.thread_time() - before < 0.8
        # a message is handled by the serving thread, as without busy polling
        threading.Timer(0.05, a.send, (b"one",)).start()
        assert lp.serve_here(b.fileno(), lambda: bool(seen), time.monotonic() + 10, waker)
        assert seen == [(threading.get_ident(), b"one", True)]
    finally:
        lp.stop()
        os.close(waker)


def test_busy_poll_must_not_be_negative():
    with pytest.raises(ValueError, match="busy_poll"):
        Loop("test", tick=lambda now: None, busy_poll=-1)
