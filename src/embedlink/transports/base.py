"""The data-plane interface, after httpx's ``BaseTransport``: small on purpose.

A transport has two halves:

* :class:`TransportServer` lives on the **receiving** (language) side. It is
  given the pool, makes that memory writable by peers in its own way (a socket
  listener, a shared-memory segment, a registration with a native engine) and
  describes itself as a :class:`~embedlink.protocol.TransportOffer` that travels
  in ``Register``.
* :class:`PeerWriter` lives on the **sending** (encoder) side, one per peer: it
  is built from the peer's offer and writes batches of
  :class:`~embedlink.protocol.Copy` from the local pool into the peer's pool.

Every backend refuses a copy outside the peer's registered regions with
:class:`WriteOutOfBounds` before any byte moves. Failures are
:class:`DataPlaneError` (a subclass of ``EmbedlinkError``; ``TransportError`` is
its old name); the caller fails the room that asked, and only that room.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..memory import BufferPool
from ..protocol import Copy, EmbedlinkError, TransportOffer

__all__ = [
    "DataPlaneError",
    "PeerWriter",
    "TransportError",
    "TransportServer",
    "TransportUnavailable",
    "WriteOutOfBounds",
    "check_bounds",
    "field_ids",
    "regions_of",
]


class DataPlaneError(EmbedlinkError):
    """A data-plane write failed; the room that asked for it fails (with a
    :class:`~embedlink.protocol.TransferError` naming this one's message).
    Not to be confused with that one: a ``TransferError`` is a *room* that
    failed, for any reason; this is a *write* that failed."""


#: the old name of :class:`DataPlaneError`, kept for code that catches it
TransportError = DataPlaneError


class TransportUnavailable(DataPlaneError):
    """A backend cannot be used here (missing library, other host); carries a hint."""


class WriteOutOfBounds(DataPlaneError):
    """A copy would fall outside the destination's registered regions."""


def field_ids(pool_layout: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Stable small integers for the fields of a pool layout (aux included)."""
    return {name: i for i, name in enumerate(pool_layout)}


def check_bounds(
    copies: Sequence[Copy], regions: Mapping[str, int], src: BufferPool | None = None
) -> None:
    """Raise :class:`WriteOutOfBounds` unless every copy fits the destination's
    ``regions`` (field -> byte length) and, when given, the source pool."""
    for c in copies:
        size = regions.get(c.field)
        if size is None:
            raise WriteOutOfBounds(f"field {c.field!r} is not registered at the destination")
        if c.length < 0 or c.dst_offset < 0 or c.dst_offset + c.length > size:
            raise WriteOutOfBounds(
                f"write of {c.length} bytes at offset {c.dst_offset} of {c.field!r} "
                f"exceeds the destination's {size}-byte region"
            )
        if src is not None:
            s_size = src.layout[c.field][1] if c.field in src.layout else -1
            if c.src_offset < 0 or c.src_offset + c.length > s_size:
                raise WriteOutOfBounds(
                    f"read of {c.length} bytes at {c.src_offset} of {c.field!r} "
                    "exceeds the source pool"
                )


class TransportServer:
    """Receiving half. ``start()`` before ``offer()``; ``close()`` is idempotent."""

    name: str = ""

    def __init__(self, pool: BufferPool, *, host: str) -> None:
        self.pool = pool
        self.host = host

    def start(self) -> TransportServer:
        return self

    def offer(self) -> TransportOffer:
        raise NotImplementedError

    def offer_for(self, peer: str) -> TransportOffer:
        """The offer for one sender link, named by ``peer`` (an unguessable
        token the receiver makes per control connection). A transport that can
        :meth:`fence` a link puts the token in the offer and admits its writes
        only until the fence; the default is :meth:`offer`."""
        return self.offer()

    def fence(self, peer: str, done: Callable[[], None], *, gone: bool = False) -> bool:
        """Stop every write of link ``peer``: once ``done()`` has been called
        (from any thread, possibly before this returns), nothing that link
        sent, or still sends, can land in the pool. ``gone``: the sender's
        endpoint closed or its process ended (its same-host control socket
        closed), rather than falling silent. False when this transport cannot
        fence (the receiver then keeps the link's blocks out of use for a grace
        period instead); ``done`` is then never called."""
        return False

    def close(self) -> None:
        """Stop accepting writes. No-op by default."""

    def __enter__(self) -> TransportServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class PeerWriter:
    """Sending half, one per destination session. Thread-safe: several rooms may
    write to the same peer at once."""

    name: str = ""
    #: Plans up to this many bytes are written on the endpoint's loop thread
    #: instead of a writer thread (local copies only; 0 for network transports).
    inline_max_bytes: int = 0
    #: At most this many writes to this peer run at once (None: as many as the
    #: endpoint has writer threads). An engine that parallelises one write
    #: internally loses throughput when several writes contend for it.
    max_concurrent_writes: int | None = None

    #: :meth:`write_from` works: the writer can read any host memory, not
    #: only a pool it registered
    reads_any_memory: bool = False

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        """Copy every ``copies`` entry from ``src`` into the peer's pool, and return
        only once the bytes are in the peer's memory. Raises DataPlaneError."""
        raise NotImplementedError

    def write_from(self, copies: Sequence[Copy], sources: Sequence[Any], timeout: float) -> None:
        """As :meth:`write`, reading copy ``i``'s bytes from ``sources[i]`` (a
        host buffer of exactly ``copies[i].length`` bytes) instead of a pool.
        Only where :attr:`reads_any_memory`."""
        raise NotImplementedError(f"{self.name}: writes only from a registered pool")

    def close(self) -> None:
        """Release connections or mappings. No-op by default."""


def regions_of(pool_layout: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """``{field: nbytes}`` of a pool layout (aux included)."""
    return {name: n for name, (_, n) in pool_layout.items()}
