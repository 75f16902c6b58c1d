"""Rate-limited reports of input an endpoint drops: malformed, unauthenticated
or stale control messages.

A peer that sends thousands of bad messages must not turn the log into a
flood (one line each would cost more than dropping them). Every message is
still counted exactly, in the endpoint's metrics and counters; the log gets
at most one line per peer per ``interval``: the first one at once, with what
was wrong, then one per interval with how many of each kind came since the
last line. :meth:`NoiseLog.flush` (called on the endpoint's tick) reports
what is left once the interval has passed, so a burst that stops is still
summed up.

Used by whoever runs the endpoint's loop work (one thread at a time).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["NOISE_INTERVAL_S", "NoiseLog"]

#: the default interval between two lines about one peer
NOISE_INTERVAL_S = 10.0

#: peers remembered at most (a peer may make up a new identity per message)
MAX_PEERS = 1024


@dataclass
class _Peer:
    logged: float
    counts: Counter[str] = field(default_factory=Counter)
    latest: str = ""


class NoiseLog:
    """One endpoint's reports of dropped input (see the module docstring)."""

    def __init__(
        self,
        logger: logging.Logger,
        prefix: str,
        *,
        interval: float = NOISE_INTERVAL_S,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._prefix = prefix
        self.interval = interval
        self.level = level
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        #: lines written (for tests and the curious)
        self.lines = 0

    def note(self, peer: str, kind: str, detail: str) -> None:
        """One message of ``kind`` (e.g. ``"malformed"``) from ``peer`` was
        dropped because of ``detail``."""
        now = self._clock()
        p = self._peers.get(peer)
        if p is None:
            if len(self._peers) >= MAX_PEERS:
                self._flush_oldest()
            self._peers[peer] = _Peer(now)
            self.lines += 1
            self._log.log(
                self.level,
                "%s: dropped a %s control message from %s: %s "
                "(more from this peer are summed up every %gs)",
                self._prefix,
                kind,
                peer,
                detail,
                self.interval,
            )
            return
        p.counts[kind] += 1
        p.latest = detail
        if now - p.logged >= self.interval:
            self._report(peer, p, now)

    def flush(self, now: float | None = None) -> None:
        """Report every peer whose interval has passed with drops not yet
        reported; forget peers quiet for a whole interval."""
        now = self._clock() if now is None else now
        for peer, p in list(self._peers.items()):
            if now - p.logged < self.interval:
                continue
            if p.counts:
                self._report(peer, p, now)
            else:
                del self._peers[peer]

    def _report(self, peer: str, p: _Peer, now: float) -> None:
        total = sum(p.counts.values())
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(p.counts.items()))
        self.lines += 1
        self._log.log(
            self.level,
            "%s: dropped %d more control messages from %s in the last %.0fs (%s); latest: %s",
            self._prefix,
            total,
            peer,
            now - p.logged,
            kinds,
            p.latest,
        )
        p.logged = now
        p.counts.clear()

    def _flush_oldest(self) -> None:
        peer = next(iter(self._peers))
        p = self._peers.pop(peer)
        if p.counts:
            self._report(peer, p, self._clock())
