"""The caller-thread fast path: starting a room, and waiting for it, without
waking the endpoint's loop thread (docs/performance.md).

Where a room's encoder is on this host and its lane is open, ``receiver()``
reserves the first blocks and sends the request itself; ``Receiver.wait()``
then reads the answer off the lane itself (``Loop.serve_here``). Each saves
a thread wake-up on every room's path.

Two rules keep this safe:

- While the caller's thread starts a room (``LiveRoom.starting``), the loop
  defers what it would do to it (:meth:`FastPath.defer`) and does it
  afterwards, in order (:meth:`FastPath.end`).
- First reservations are granted in the order ``receiver()`` was called. A
  room handed to the loop to start is counted (``handed``) until it reaches
  its first reservation; while any is, later rooms must not take blocks
  from the caller's thread (:meth:`ReservationQueue.take`'s ``only_if_idle``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ..._runtime.loop import Loop
from ...protocol import Action, Message, Reserve, Send, StatusChanged
from .links import EncoderLink
from .receiver import LiveRoom
from .reservations import ReservationQueue

__all__ = ["FastPath"]


class FastPath:
    """The fast path of one endpoint. ``lock`` is the endpoint's lock (the
    reservation queue's too); ``step(event, *args)`` feeds a room's state
    machine under the step lock; ``send(link, msg)`` and ``run(room,
    actions)`` are the endpoint's; ``tell_aborted(room, link)`` tells an
    encoder about a room aborted before it started; ``lost(room, link)`` fails
    a room whose lane closed as it started (loop thread)."""

    def __init__(
        self,
        loop: Loop,
        lock: threading.Lock,
        reservations: ReservationQueue[LiveRoom],
        block_size: int,
        *,
        step: Callable[..., list[Action]],
        send: Callable[[EncoderLink, Message], bool],
        run: Callable[[LiveRoom, list[Action]], None],
        tell_aborted: Callable[[LiveRoom, EncoderLink], None],
        lost: Callable[[LiveRoom, EncoderLink], None],
    ) -> None:
        self._loop = loop
        self._lock = lock
        self._reservations = reservations
        self.block_size = block_size
        self._step = step
        self._send = send
        self._run = run
        self._tell_aborted = tell_aborted
        self._lost = lost
        # Rooms handed to the loop to start that have not reached their first
        # reservation yet (waiting for a route, or for the loop to run): while
        # any has, a later room must not take blocks from the caller's thread
        # (``start_here``). First reservations are granted in the order
        # ``receiver()`` was called; see LanguageEndpoint._start_room. Under
        # ``lock``.
        self.handed = 0

    def choose(self, live: LiveRoom, enc: EncoderLink | None) -> None:
        """Under ``lock``, as ``receiver()`` files the room: start it here
        (``live.starting``) when its encoder's lane is open and no room
        before it is still on its way to the loop; else count it as handed."""
        if enc is not None and enc.lane is not None and not enc.lane.closed and not self.handed:
            live.starting = True
        else:
            live.handed = True
            self.handed += 1

    def unhand(self, live: LiveRoom) -> None:
        """``live`` reached its first reservation, or ended."""
        with self._lock:
            if live.handed:
                live.handed = False
                self.handed -= 1

    def start_here(self, live: LiveRoom, enc: EncoderLink | None) -> bool:
        """Reserve the first blocks and send the request from the caller's
        thread, over a same-host lane: the loop thread is not woken for it,
        which saves a wake-up on every room's path (docs/performance.md).
        False, with nothing done, when the loop must do it (the pool is short
        or other rooms queue for blocks). The loop defers what it would do to
        the room meanwhile (``LiveRoom.starting``) and does it afterwards."""
        assert enc is not None
        now = time.monotonic()
        acts = self._step(live.room.start, now)
        if not acts:  # aborted meanwhile by another thread: tell the encoder instead
            self._tell_aborted(live, enc)
            self.end(live)
            return True
        (reserve,) = acts
        assert isinstance(reserve, Reserve)
        blocks = self._reservations.take(reserve.tokens, resume=False, only_if_idle=True)
        if blocks is None:
            with self._lock:  # the loop starts it: later rooms wait behind it
                live.handed = True
                self.handed += 1
            self.end(live)
            return False
        live.encoder = enc
        tokens = min(reserve.tokens, len(blocks) * self.block_size)
        later: list[Action] = []
        sent = True
        for a in self._step(live.room.reserved, blocks, tokens, now):
            if isinstance(a, Send):
                sent = self._send(enc, a.msg) and sent
            elif not (isinstance(a, StatusChanged) and not a.new.is_terminal):
                later.append(a)  # nothing else is expected; the loop handles it
        if later:
            self._loop.call(self._run, live, later)
        self.end(live)
        if not sent:
            # the lane closed under us: its encoder is being declared dead
            self._loop.call(self._lost, live, enc)
        return True

    def end(self, live: LiveRoom) -> None:
        """The caller's thread is done with ``live``: hand the loop what it
        deferred meanwhile, in order."""
        with self._lock:
            live.starting = False
            deferred, live.deferred = live.deferred, []
        for fn in deferred:
            self._loop.call(fn)

    def defer(self, live: LiveRoom, fn: Callable[[], None]) -> bool:
        """Queue ``fn`` for after a room's fast start; False when it is not
        starting (run ``fn`` now). Loop thread."""
        if not live.starting:
            return False
        with self._lock:
            if live.starting:
                live.deferred.append(fn)
                return True
        return False

    def serve_until_done(self, live: LiveRoom, timeout: float | None) -> None:
        """Wait for ``live`` to end by serving its encoder's lane on this thread
        (``Loop.serve_here``): the answer then wakes this thread directly
        instead of the loop, which would then wake this thread. Returns at
        once, having done nothing, where that cannot be done (no lane, another
        thread already serves it, no eventfd): the caller then waits for the
        room's event as before."""
        enc = live.encoder
        if enc is None or enc.lane is None or enc.lane.closed or not hasattr(os, "eventfd"):
            return
        if timeout is not None and timeout <= 0:
            return  # a look, not a wait: not worth taking the lane over
        if self._loop.holds_state() or self._loop.on_loop_thread():
            return
        with self._loop.state:
            if live.waker is not None or live.done.is_set():
                return
            live.waker = waker = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            live.waker_thread = threading.get_ident()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            self._loop.serve_here(enc.lane.fileno(), live.done.is_set, deadline, waker)
        finally:
            with self._loop.state:  # nobody writes it once it is None
                live.waker = live.waker_thread = None
            os.close(waker)
