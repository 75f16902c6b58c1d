"""The I/O thread each endpoint runs: one owner for its ZeroMQ sockets and rooms.

ZeroMQ sockets are not thread-safe, and the room state machines are not
either, so one loop owns both (after pyzmq's guidance and httpcore's "small
loop around a state machine"). Other threads (the user's, transport workers)
:meth:`Loop.call` a function, which is queued and run on the loop thread, or
run loop work themselves under the loop's lock while it sleeps (below). A pipe wakes the poller so queued calls run at once instead of
at the next poll timeout; while a wake-up is already pending no further byte is
written (one syscall and one poller wake-up per burst of calls, not per call).
Calls that need not run promptly (:meth:`Loop.call_lazy`) wake nothing: they
run with the next wake-up or tick.

The loop runs its handlers holding :attr:`Loop.state`, a lock it lets go of
only while it sleeps. Another thread may take it to run loop work itself
(:meth:`Loop.try_run_here`, :meth:`Loop.serve_here`) when that saves waking
the loop, provided the work touches no ZeroMQ socket: ``zmq_poll`` inspects
those sockets while the loop sleeps. Plain descriptors (same-host lanes)
are watched through an epoll set, which another thread may change while the
loop sleeps, so a thread can take one over for a while (:meth:`serve_here`).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from .lane import Lane

log = logging.getLogger(__name__)

__all__ = ["BUSY_POLL_S", "CLOSE_LINGER_MS", "Loop", "check_endpoint_knobs"]

#: how long closing an endpoint lets ZeroMQ deliver the aborts it just sent
#: to its peers (only a peer that is connected but not reading makes it wait)
CLOSE_LINGER_MS = 200

#: how long serve_here() sleeps at most before it looks whether the loop is stopping
SERVE_SLICE_S = 1.0

#: the default of the ``busy_poll_us`` setting, in seconds
BUSY_POLL_S = 400e-6

_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: time.sleep(0))

SocketHandler = Callable[[zmq.Socket[bytes]], None]
FdHandler = Callable[[], None]


class Loop:
    """A thread running a zmq poller, queued calls and a periodic tick.

    ``busy_poll`` (seconds): after handling anything, keep looking for the
    next event without sleeping for that long, yielding the CPU to any other
    runnable thread between looks, as long as ``may_spin()`` (when given)
    says so. Same for a thread in :meth:`serve_here`. Why: on a machine
    whose idle CPUs halt, waking a sleeping thread costs tens of
    microseconds, and in a conversation of small messages the next one
    usually comes within a few hundred (docs/performance.md). 0: always
    sleep."""

    def __init__(
        self,
        name: str,
        *,
        tick: Callable[[float], None],
        tick_interval: float = 0.1,
        busy_poll: float = 0.0,
        may_spin: Callable[[], bool] | None = None,
    ) -> None:
        if busy_poll < 0:
            raise ValueError(f"busy_poll must be >= 0 seconds, got {busy_poll}")
        self.name = name
        self._tick = tick
        self._tick_interval = tick_interval
        self.busy_poll = busy_poll
        self._may_spin = may_spin
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        # The wake-up pipe and the epoll set are opened by open() (or
        # start()), not here: an endpoint constructed and dropped, or closed
        # without being started, holds no descriptor.
        self._rfd = self._wfd = -1
        self._poller = zmq.Poller()
        self._epoll: select.epoll | None = None
        self._opened = False
        self._handlers: dict[zmq.Socket[bytes], SocketHandler] = {}
        self._fd_handlers: dict[int, FdHandler] = {}
        self._fd_writable: set[int] = set()
        self._lent: dict[int, FdHandler] = {}  # fds a serve_here() thread watches
        #: held by whoever runs loop work: the loop thread, except while it
        #: sleeps, or a thread in try_run_here()/serve_here()
        self.state = threading.Lock()
        self._holder: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = threading.Event()
        # True from a caller's pipe write until the loop starts draining calls:
        # callers in between need not write again (their call is already queued
        # before the loop drains, see call()).
        self._wake_pending = False
        self.errors = 0  # exceptions caught by the loop (a bug if ever non-zero)

    # -- any thread

    def open(self) -> None:
        """Open the loop's descriptors (a wake-up pipe, an epoll set), so
        sockets and descriptors can be added before :meth:`start`. Called by
        :meth:`start` when not done yet; once only (RuntimeError after
        :meth:`stop`)."""
        if self._opened:
            if self._rfd < 0:
                raise RuntimeError(f"{self.name}: the loop was stopped; make a new one")
            return
        self._opened = True
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._poller.register(self._rfd, zmq.POLLIN)
        # Plain descriptors wait in an epoll set (itself polled as one fd):
        # unlike the zmq poller, it may be changed from another thread while
        # the loop sleeps (serve_here). Without epoll, in the zmq poller.
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        if self._epoll is not None:
            self._poller.register(self._epoll.fileno(), zmq.POLLIN)

    def start(self) -> None:
        """Start the loop thread (opening the loop first if needed). Once:
        RuntimeError when started before or stopped."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: the loop is already started")
        self.open()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread, in submission order."""
        self._calls.put((fn, args))
        # The put comes first: if the flag is still set, the loop has not yet
        # started draining, so it will see this call.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            os.write(self._wfd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already awake
        except OSError:
            pass  # closed: the loop is gone

    def call_lazy(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` without waking the loop: it runs, in order with
        the other calls, at the next wake-up or tick (at most one tick
        interval later). For bookkeeping nobody waits on."""
        self._calls.put((fn, args))

    def call_wait(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run ``fn(*args)`` on the loop thread and return its result."""
        if self.on_loop_thread():
            return fn(*args)
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:
                box.append((False, exc))
            finally:
                done.set()

        self.call(run)
        if not done.wait(timeout):
            raise TimeoutError(f"{self.name}: loop did not answer within {timeout}s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def holds_state(self) -> bool:
        """This thread runs loop work now (the loop thread in a handler, or a
        thread in :meth:`try_run_here`/:meth:`serve_here`)."""
        return self._holder == threading.get_ident()

    def try_run_here(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on this thread, as the loop would, if the loop is
        asleep with no calls queued (they must run first); True if it ran.
        Saves waking the loop for work nobody else is doing. ``fn`` must not
        touch a ZeroMQ socket (the loop's poller may be inspecting it)."""
        if self._thread is None or self._stopping or not self.state.acquire(blocking=False):
            return False
        try:
            if not self._calls.empty() or self._stopping:
                return False
            self._holder = threading.get_ident()
            self._guard(fn, *args)
            return True
        finally:
            self._holder = None
            self.state.release()

    def serve_here(
        self, fd: int, until: Callable[[], bool], deadline: float | None, waker: int
    ) -> bool | None:
        """Wait on this thread until ``until()`` holds or ``deadline`` (a
        ``time.monotonic()`` value) passes, and meanwhile be the one that
        serves ``fd``: the loop stops watching it, this thread polls it (and
        ``waker``, a descriptor others write to when ``until()`` may have
        changed) and runs its handler when it is readable, as the loop would.

        Why: a thread waiting for an answer on a same-host lane then wakes
        for it itself, instead of the loop waking first and then waking it
        (one cross-CPU wake-up less, docs/performance.md). The handler must
        not touch a ZeroMQ socket. Returns ``until()`` at the end, or None
        when ``fd`` cannot be lent now (not watched, waiting to be writable,
        already lent, or the loop stopping): wait some other way."""
        if self._epoll is None or self.on_loop_thread() or self.holds_state():
            return None
        with self.state:
            handler = self._fd_handlers.get(fd)
            if handler is None or fd in self._fd_writable or fd in self._lent or self._stopping:
                return None
            self._epoll.unregister(fd)
            self._lent[fd] = handler
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            p.register(waker, select.POLLIN)
            spin_until = time.monotonic() + self.busy_poll if self.busy_poll else 0.0
            while not until():
                now = time.monotonic()
                left = None if deadline is None else deadline - now
                if left is not None and left <= 0:
                    break
                if now < spin_until:
                    if not p.poll(0):
                        _yield()
                        continue
                else:
                    # slices, so a stopping loop is noticed even if nobody wakes us
                    most = int(SERVE_SLICE_S * 1000)
                    slice_ms = most if left is None else min(most, int(left * 1000) + 1)
                    if not p.poll(slice_ms):
                        if self._stopping:
                            break
                        continue
                with self.state:
                    if self._stopping or self._fd_handlers.get(fd) is not handler:
                        break  # the fd was closed (and maybe reused) meanwhile
                    self._holder = threading.get_ident()
                    try:
                        self._guard(handler)
                    finally:
                        self._holder = None
                    if fd in self._fd_writable or self._fd_handlers.get(fd) is not handler:
                        break  # it now waits for output (the loop watches that), or closed
                if self.busy_poll:
                    spin_until = time.monotonic() + self.busy_poll
        finally:
            with self.state:
                lent = self._lent.pop(fd, None)
                if lent is handler and self._fd_handlers.get(fd) is handler and not self._stopping:
                    mask = select.EPOLLIN | (select.EPOLLOUT if fd in self._fd_writable else 0)
                    self._epoll.register(fd, mask)  # level-triggered: bytes that wait wake it
        return until()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (if started), join it and close the loop's
        descriptors. Idempotent; safe on a loop never started or opened."""
        if self._thread is not None:
            self.call(self._set_stopping)
            if not self.on_loop_thread():
                self._thread.join(timeout)
        self._close_pipe()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- loop thread

    def add_socket(self, sock: zmq.Socket[bytes], handler: SocketHandler) -> None:
        self._handlers[sock] = handler
        self._poller.register(sock, zmq.POLLIN)

    def remove_socket(self, sock: zmq.Socket[bytes]) -> None:
        if self._handlers.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def add_fd(self, fd: int, handler: FdHandler) -> None:
        """Call ``handler()`` whenever ``fd`` is readable (or writable, while
        :meth:`watch_writable` says so). Holding the state, or before :meth:`start`."""
        self.open()
        self._fd_handlers[fd] = handler
        self._lent.pop(fd, None)  # a number reused after a lent fd was closed
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            self._poller.register(fd, zmq.POLLIN)

    def watch_writable(self, fd: int, on: bool) -> None:
        """Also wake for ``fd`` becoming writable (``on``), or stop. Cheap when
        nothing changes, so callers may say it after every send. Holding the state."""
        if on == (fd in self._fd_writable) or fd not in self._fd_handlers:
            return
        if on:
            self._fd_writable.add(fd)
        else:
            self._fd_writable.discard(fd)
        if fd in self._lent:
            return  # serve_here() hands it back with the right mask
        if self._epoll is not None:
            self._epoll.modify(fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))
        else:
            self._poller.modify(fd, zmq.POLLIN | (zmq.POLLOUT if on else 0))

    def add_lane(
        self, lane: Lane, on_payload: Callable[[bytes], None], on_closed: Callable[[str], None]
    ) -> None:
        """Serve a same-host control lane: flush what waits to go out, hand
        each message that arrived to ``on_payload``, and ``on_closed(why)``
        once it ends (which must :meth:`remove_fd` it and close it)."""

        def ready() -> None:
            lane.flush()
            payloads, closed = lane.receive()
            for payload in payloads:
                on_payload(payload)
            if closed is not None:
                on_closed(closed)
            elif not lane.closed:
                self.watch_writable(lane.fileno(), lane.wants_write)

        self.add_fd(lane.fileno(), ready)

    def remove_fd(self, fd: int) -> None:
        """Stop watching ``fd``; call it before closing the descriptor. Holding the state."""
        if self._fd_handlers.pop(fd, None) is not None:
            self._fd_writable.discard(fd)
            if self._lent.pop(fd, None) is not None:
                return  # not in the set while lent
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                self._poller.unregister(fd)

    def _set_stopping(self) -> None:
        self._stopping = True

    def _close_pipe(self) -> None:
        self._stopping = True
        for fd in (self._rfd, self._wfd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self._rfd = self._wfd = -1
        if self._epoll is not None and (self._thread is None or not self._thread.is_alive()):
            self._epoll.close()

    def _run(self) -> None:
        next_tick = time.monotonic() + self._tick_interval
        me = threading.get_ident()
        spin_until = 0.0
        self.state.acquire()
        self._holder = me
        while not self._stopping:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000) + 1)
            self._holder = None
            self.state.release()  # asleep: others may run loop work meanwhile
            try:
                ready = self._spin(spin_until) if spin_until else {}
                if not ready:
                    ready = dict(self._poller.poll(timeout_ms))
            except zmq.ZMQError as exc:
                log.error("%s: poll failed: %s", self.name, exc)
                self.state.acquire()
                break
            self.state.acquire()
            self._holder = me
            if self._rfd in ready:
                try:
                    while os.read(self._rfd, 4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            # Clear before draining: a call queued after this point writes the
            # pipe again, so none is left waiting for the next tick.
            self._wake_pending = False
            self._run_calls()
            for sock, handler in list(self._handlers.items()):
                if sock in ready:
                    self._guard(handler, sock)
            if self._fd_handlers:
                if self._epoll is not None:
                    # level-triggered: whatever is not read now is reported again
                    fds = (
                        [fd for fd, _ in self._epoll.poll(0)]
                        if self._epoll.fileno() in ready
                        else []
                    )
                else:
                    fds = [fd for fd in self._fd_handlers if fd in ready]
                for fd in fds:
                    # a handler may have removed a later fd (a lane it closed)
                    fd_handler = self._fd_handlers.get(fd)
                    if fd_handler is not None and fd not in self._lent:
                        self._guard(fd_handler)
            now = time.monotonic()
            if now >= next_tick:
                self._guard(self._tick, now)
                next_tick = now + self._tick_interval
            spin_until = 0.0
            if ready and self.busy_poll and self._spin_wanted():
                spin_until = now + self.busy_poll
        self._run_calls()
        self._holder = None
        self.state.release()
        self._stopped.set()

    def _spin_wanted(self) -> bool:
        try:
            return self._may_spin is None or self._may_spin()
        except Exception:
            self.errors += 1
            log.exception("%s: error in may_spin", self.name)
            return False

    def _spin(self, until: float) -> dict[Any, int]:
        """Look for events without sleeping until ``until`` (monotonic);
        what is ready, or nothing. Not holding the state."""
        poll = self._poller.poll
        while True:
            ready = poll(0)
            if ready:
                return dict(ready)
            if self._stopping or time.monotonic() >= until:
                return {}
            _yield()  # any other runnable thread on this CPU goes first

    def _run_calls(self) -> None:
        while True:
            try:
                fn, args = self._calls.get_nowait()
            except queue.Empty:
                return
            self._guard(fn, *args)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        # The loop must outlive any one bad input or bug: log, count, continue.
        try:
            fn(*args)
        except Exception:
            self.errors += 1
            log.exception("%s: error in %s", self.name, getattr(fn, "__name__", fn))


def check_endpoint_knobs(
    *,
    tp_rank: int,
    tp_size: int,
    room_timeout: float,
    heartbeat_interval: float,
    bootstrap_timeout: float | None = None,
    heartbeat_misses: int,
    busy_poll_us: float = 0.0,
) -> None:
    """The checks both endpoints make at construction: ValueError naming the setting."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, tp_size={tp_size})")
    if room_timeout <= 0:
        raise ValueError(f"room_timeout must be positive, got {room_timeout}")
    if bootstrap_timeout is not None and bootstrap_timeout <= 0:
        raise ValueError(f"bootstrap_timeout must be positive, got {bootstrap_timeout}")
    if heartbeat_interval <= 0 or heartbeat_misses < 1:
        raise ValueError(
            f"heartbeat_interval={heartbeat_interval} must be positive and "
            f"heartbeat_misses={heartbeat_misses} at least 1"
        )
    if not 0 <= busy_poll_us <= 1e6:
        raise ValueError(f"busy_poll_us must be in [0, 1000000] microseconds, got {busy_poll_us}")
