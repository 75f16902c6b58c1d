"""The I/O thread each endpoint runs: one owner for its ZeroMQ sockets and rooms.

ZeroMQ sockets are not thread-safe, and the room state machines are not
either, so one thread owns both (after pyzmq's guidance and httpcore's "small
loop around a state machine"). Other threads (the user's, transport workers)
never touch them: they :meth:`Loop.call` a function, which is queued and run on
the loop thread. A pipe wakes the poller so queued calls run at once instead of
at the next poll timeout; while a wake-up is already pending no further byte is
written (one syscall and one poller wake-up per burst of calls, not per call).
Calls that need not run promptly (:meth:`Loop.call_lazy`) wake nothing: they
run with the next wake-up or tick.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ._lane import Lane

log = logging.getLogger(__name__)

__all__ = ["Loop", "check_endpoint_knobs"]

SocketHandler = Callable[[zmq.Socket[bytes]], None]
FdHandler = Callable[[], None]


class Loop:
    """A thread running a zmq poller, queued calls and a periodic tick."""

    def __init__(
        self, name: str, *, tick: Callable[[float], None], tick_interval: float = 0.1
    ) -> None:
        self.name = name
        self._tick = tick
        self._tick_interval = tick_interval
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._poller = zmq.Poller()
        self._poller.register(self._rfd, zmq.POLLIN)
        self._handlers: dict[zmq.Socket[bytes], SocketHandler] = {}
        self._fd_handlers: dict[int, FdHandler] = {}
        self._fd_writable: set[int] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = threading.Event()
        # True from a caller's pipe write until the loop starts draining calls:
        # callers in between need not write again (their call is already queued
        # before the loop drains, see call()).
        self._wake_pending = False
        self.errors = 0  # exceptions caught by the loop (a bug if ever non-zero)

    # -- any thread

    def start(self) -> None:
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

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
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
        :meth:`watch_writable` says so). Loop thread, or before :meth:`start`."""
        self._fd_handlers[fd] = handler
        self._poller.register(fd, zmq.POLLIN)

    def watch_writable(self, fd: int, on: bool) -> None:
        """Also wake for ``fd`` becoming writable (``on``), or stop. Cheap when
        nothing changes, so callers may say it after every send."""
        if on == (fd in self._fd_writable) or fd not in self._fd_handlers:
            return
        if on:
            self._fd_writable.add(fd)
            self._poller.modify(fd, zmq.POLLIN | zmq.POLLOUT)
        else:
            self._fd_writable.discard(fd)
            self._poller.modify(fd, zmq.POLLIN)

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
        """Stop watching ``fd``; call it before closing the descriptor."""
        if self._fd_handlers.pop(fd, None) is not None:
            self._fd_writable.discard(fd)
            self._poller.unregister(fd)

    def _set_stopping(self) -> None:
        self._stopping = True

    def _close_pipe(self) -> None:
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._rfd = self._wfd = -1

    def _run(self) -> None:
        next_tick = time.monotonic() + self._tick_interval
        while not self._stopping:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000) + 1)
            try:
                ready = dict(self._poller.poll(timeout_ms))
            except zmq.ZMQError as exc:
                log.error("%s: poll failed: %s", self.name, exc)
                break
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
                for fd, fd_handler in list(self._fd_handlers.items()):
                    # a handler may have removed a later fd (a lane it closed)
                    if fd in ready and fd in self._fd_handlers:
                        self._guard(fd_handler)
            now = time.monotonic()
            if now >= next_tick:
                self._guard(self._tick, now)
                next_tick = now + self._tick_interval
        self._run_calls()
        self._stopped.set()

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
