"""What both endpoints do alike, in one place: stepping a room's state
machine under the endpoint's step lock, and turning a control payload into a
message (authentication, decoding, and the counting and rate-limited logging
of whatever is dropped on the way).

Nothing here knows which side it serves: the side's label, its counters, its
metrics, its noise log and how it names a peer are passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from .._runtime.auth import Authenticator
from ..observability.metrics import EndpointMetrics
from ..observability.noise import NoiseLog
from ..protocol import Action, Message, RemoteProtocolError, decode

__all__ = ["DropCounters", "PayloadOpener", "StepLock"]

#: how an endpoint names the peer a payload came from (a ZeroMQ identity, a record)
PeerKey = TypeVar("PeerKey")


class StepLock:
    """Feeds one event to a room's state machine and returns its actions, under
    one lock per endpoint: the loop and a user's thread (an ``abort()``) may
    step the same room at once. The actions are carried out afterwards,
    outside the lock.

    ``step(room.tick, now)`` is ``room.tick(now)`` with the lock held.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, event: Callable[..., list[Action]], *args: Any) -> list[Action]:
        with self._lock:
            return event(*args)


class DropCounters(Protocol):
    """The plain counters a :class:`PayloadOpener` adds to (an endpoint's
    stats object, or the endpoint itself)."""

    dropped_messages: int
    unauthenticated_messages: int


class PayloadOpener(Generic[PeerKey]):
    """Opens and decodes the control payloads of one endpoint.

    A payload whose authentication tag is missing or wrong, or that does not
    decode, is dropped: counted exactly (``counters`` and the ``side``'s
    metrics, in that order) and then noted in ``noise``, which logs at most
    one line per peer per interval. ``name(peer)`` says how the log names
    the peer; it is called only for a payload that is dropped.

    Used on the endpoint's loop thread (one caller at a time), like the
    counters and the noise log it writes to.
    """

    def __init__(
        self,
        auth: Authenticator,
        *,
        side: str,
        counters: DropCounters,
        metrics: EndpointMetrics,
        noise: NoiseLog,
        name: Callable[[PeerKey], str],
    ) -> None:
        self._auth = auth
        self._side = side
        self._counters = counters
        self._metrics = metrics
        self._noise = noise
        self._name = name

    def open(self, payload: bytes, peer: PeerKey) -> Message | None:
        """The message in ``payload`` from ``peer``, or None when it was
        dropped (unauthenticated or malformed; counted and noted)."""
        opened = self._auth.open(payload)
        if opened is None:
            self._counters.unauthenticated_messages += 1
            self._metrics.unauthenticated.labels(self._side).inc()
            self._noise.note(
                self._name(peer), "unauthenticated", "missing or wrong authentication tag"
            )
            return None
        try:
            return decode(opened)
        except RemoteProtocolError as exc:
            self.drop(self._name(peer), "malformed", str(exc))
            return None

    def reject(self, peer: PeerKey, kind: str, detail: str) -> None:
        """Drop a message from ``peer`` that decoded but is not for this side
        (``kind``: e.g. ``"unexpected"``): counted as dropped, and noted."""
        self.drop(self._name(peer), kind, detail)

    def drop(self, name: str, kind: str, detail: str) -> None:
        """Count one dropped message (``dropped_messages`` and the ``side``'s
        ``dropped`` metric, in that order) and note it in the noise log
        against the peer called ``name``."""
        self._counters.dropped_messages += 1
        self._metrics.dropped.labels(self._side).inc()
        self._noise.note(name, kind, detail)
