"""A language rank's rooms: the per-room record the endpoint keeps
(:class:`LiveRoom`) and the user's handle on it (:class:`Receiver`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ...embedding import Embedding, from_pool_arrays
from ...protocol import ReceiverRoom, RoomId, Status, TransferError
from .links import EncoderLink

if TYPE_CHECKING:
    from . import LanguageEndpoint

__all__ = ["LiveRoom", "Receiver"]


@dataclass(eq=False)
class LiveRoom:
    """One live room: its state machine and what the endpoint keeps beside it.

    Compared by identity: a room id can be reused once the room is cleared,
    and the loop may still hold the old record.
    """

    room: ReceiverRoom
    encoder: EncoderLink | None
    done: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    # -- the result (assembly.py)
    result: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    aux: Any = None
    cleared: bool = False  # the user called clear(): wait() has nothing to return
    pinned: tuple[int, ...] | None = None  # blocks a zero-copy result lives in
    #: zero-copy rooms that resume: the first pool token of the contiguous run
    #: the whole embedding is assembled in (``pinned`` holds its blocks) ...
    area_start: int | None = None
    #: ... and the part of it the next chunk is to land in (its reservation)
    extension: list[int] | None = None
    # -- the caller-thread fast path
    #: the caller's thread is still starting the room (``receiver``'s fast
    #: path): the loop queues what it would do to it in ``deferred`` instead
    starting: bool = False
    deferred: list[Callable[[], None]] = field(default_factory=list)
    #: an eventfd the thread in wait() polls while it serves the room's lane
    #: itself (``Loop.serve_here``): written when the room ends some other
    #: way. Set and cleared holding the loop's state.
    waker: int | None = None
    waker_thread: int | None = None  # the thread polling ``waker``
    # -- routing (routing.py)
    #: ``(bootstrap, dp_group)`` while the room waits for its encoder's
    #: address (the resolver looks it up off the caller's thread)
    route: tuple[str, int | None] | None = None
    #: counted in ``FastPath.handed`` (until it starts or ends)
    handed: bool = False
    on_done: Callable[[RoomId], None] | None = None
    #: an ended room still holding blocks its encoder was offered: when its
    #: Abort goes out again if no acknowledgement came (``_ask_again``)
    ask_again_at: float | None = None


class Receiver:
    """One room on the language side. Obtain from :meth:`LanguageEndpoint.receiver`."""

    def __init__(self, endpoint: LanguageEndpoint, live: LiveRoom) -> None:
        self._ep = endpoint
        self._live = live
        self.room: RoomId = live.room.room

    def poll(self) -> Status:
        """The room's status now. Never blocks; safe from any thread."""
        return self._live.room.status

    @property
    def failure_reason(self) -> str | None:
        return self._live.room.failure_reason

    @property
    def meta(self) -> bytes | None:
        """What the encoder attached to the embedding (``Sender.send(...,
        meta=)``), once the first chunk arrived; None when it attached nothing."""
        return self._live.room.meta

    @property
    def history(self) -> list[tuple[Status, int]]:
        """``(status, sent_tokens)`` in the order observed."""
        return self._live.room.history

    @property
    def epoch(self) -> int:
        return self._live.room.epoch

    def wait(self, timeout: float | None = None) -> Embedding:
        """Block until the room ends and return the reassembled embedding.

        Raises :class:`TransferError` (room ``Failed``) with the reason, or
        ``TimeoutError`` when ``timeout`` passes first (the room is untouched).
        With ``zero_copy=True`` on the endpoint, the result is views into the
        pool where the whole embedding lies in one contiguous run (resumed
        rooms included: assembly.py), valid until :meth:`clear`.
        Where the room's encoder is on this host, the calling thread reads the
        answer itself, looking for it without sleeping for the endpoint's
        ``busy_poll_us`` after it starts and after each message (yielding the
        CPU to other runnable threads meanwhile); the rest of the wait sleeps.
        """
        if self._live.cleared:
            raise RuntimeError(f"room {self.room} was cleared: its result is gone")
        if not self._live.done.is_set():
            t0 = time.monotonic()
            self._ep._serve_until_done(self._live, timeout)
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - t0))
        if not self._live.done.wait(timeout):
            raise TimeoutError(f"room {self.room} still {self.poll()} after {timeout}s")
        room = self._live.room
        if room.status is not Status.Success:
            raise TransferError(self.room, room.failure_reason or "failed")
        delta = int(self._live.aux["mrope_position_delta"]) if self._live.aux is not None else 0
        return from_pool_arrays(self._live.result, delta)

    @property
    def in_pool(self) -> bool:
        """What :meth:`wait` returns is views into the pool (a ``zero_copy``
        endpoint), valid until :meth:`clear`, which gives the blocks back;
        False for arrays of their own."""
        return self._live.pinned is not None

    @property
    def aux(self) -> Any:
        """The aux record (total_tokens, mrope_position_delta, checksum, flags) once known."""
        return self._live.aux

    def abort(self, reason: str = "aborted by receiver") -> None:
        """Give up on the room. When this returns, :meth:`poll` is ``Failed``
        and :attr:`failure_reason` is ``reason`` (and :meth:`wait` raises);
        the encoder is told afterwards, off this thread. Blocks the encoder
        may still write into stay reserved until it acknowledges (or is
        declared dead). No-op once the room has ended. Never blocks."""
        self._ep._abort_now(self._live, reason)

    def clear(self) -> None:
        """Forget the room; an unfinished room is aborted first (as
        :meth:`abort`). Blocks the encoder may still write into stay reserved
        until it acknowledges. Never blocks."""
        self._ep._clear_now(self._live)
