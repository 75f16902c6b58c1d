"""A language endpoint's timers and failure detection: the tick (timeouts,
route deadlines, fences, collection of rooms never cleared), heartbeats to
its encoders, repeated aborts, and what follows when an encoder is declared
dead: every room that depends on it fails, and the blocks it was offered come
back once its data-plane link is fenced (links.py).

A mixin of :class:`~embedlink.endpoints.language.LanguageEndpoint`, over
:class:`~embedlink.endpoints.language.events.RoomEvents`. Loop thread.
"""

from __future__ import annotations

import functools
import logging
import time

from ...bootstrap.resolver import Resolver
from ...protocol import Abort, Heartbeat
from ...transports import TransportServer
from .events import RoomEvents
from .links import EncoderLink, Fence
from .receiver import LiveRoom

log = logging.getLogger("embedlink.endpoints.language")

__all__ = ["Liveness"]


class Liveness(RoomEvents):
    """Timers and failure detection (a mixin)."""

    _resolver: Resolver
    _servers: list[TransportServer]

    def _tick(self, now: float) -> None:
        if self._routes:
            # before the rooms' own deadlines: their reason names the bootstrap server
            self._routes.route(None, now)
        for live in list(self._rooms.values()):
            if not live.room.done and not live.starting:  # a starting room waits a tick
                self._run(live, self._step(live.room.tick, now))
        self._noise.flush(now)
        self._stale.flush(now)
        if self._fences:
            self._fences.settle(now)
        self._check_liveness(now)
        self._ask_again(now)
        expired = []
        for key, (ended, live) in self._ended.items():
            if now - ended <= self.room_ttl:
                break  # the rest ended later
            expired.append((key, live))
        for key, live in expired:
            del self._ended[key]
            if self._rooms.get(live.room.room) is live:
                self.collected_rooms += 1
                self._clear_room(live)

    def _ask_again(self, now: float) -> None:
        """Repeat the Abort of every ended room still holding blocks its
        (live) encoder was offered, once each ``heartbeat_interval`` until
        the encoder acknowledges. The first Abort, or its answer, may have been
        lost with a connection reset; without this the blocks would stay out
        of use for as long as the encoder lives. An encoder answers a repeat
        the same way (a status for that epoch once nothing is in flight)."""
        for live in [*self._rooms.values(), *self._zombies.values()]:
            room, enc = live.room, live.encoder
            if not (room.done and room.holds_blocks) or live.starting or enc is None:
                live.ask_again_at = None
                continue
            if self._links.get(enc.address) is not enc:
                continue  # declared dead: its fence gives the blocks back
            if live.ask_again_at is None:
                live.ask_again_at = now + self.heartbeat_interval
            elif now >= live.ask_again_at:
                live.ask_again_at = now + self.heartbeat_interval
                # counted before it is sent: whoever sees the repeat sees the count
                self.abort_repeats += 1
                self._links.send(
                    enc,
                    Abort(
                        session=self.session,
                        room=room.room,
                        epoch=room.epoch,
                        reason=room.failure_reason or "aborted by receiver",
                    ),
                )

    def _check_liveness(self, now: float) -> None:
        """Ping every encoder each ``heartbeat_interval``; one silent for
        ``heartbeat_interval * heartbeat_misses`` seconds is dead: every room
        that depends on it fails, its blocks come back (nothing more can land),
        and the next room for that address connects afresh."""
        limit = self.heartbeat_interval * self.heartbeat_misses
        for address, enc in list(self._links.by_address.items()):
            if now - enc.last_seen > limit:
                self._encoder_dead(
                    enc, f"no answer from encoder {address} for {now - enc.last_seen:.1f}s"
                )
                continue
            if now - enc.last_ping >= self.heartbeat_interval:
                if enc.last_ping and enc.last_seen < enc.last_ping:
                    # nothing heard since the previous ping: a miss
                    self.metrics.heartbeat_misses.labels("language").inc()
                enc.last_ping = now
                enc.seq += 1
                self._links.send(enc, Heartbeat(session=self.session, seq=enc.seq, reply=True))

    def _lane_closed(self, enc: EncoderLink, why: str) -> None:
        # The encoder's endpoint closed or its process died: nothing more can
        # come from it, so its rooms fail now rather than after the missed
        # heartbeats.
        if self._links.get(enc.address) is enc:
            self._encoder_dead(
                enc, f"control connection to encoder {enc.address}: {why}", closed=True
            )

    def _encoder_dead(self, enc: EncoderLink, reason: str, *, closed: bool = False) -> None:
        """Every room that depends on ``enc`` fails, its blocks come back
        (nothing more can land), and the next room for that address connects
        afresh."""
        # an encoder on this host that closes ends its lane: news only if rooms suffer
        busy = not closed or any(
            live.encoder is enc and not live.room.done
            for live in [*self._rooms.values(), *self._zombies.values()]
        )
        log.log(logging.WARNING if busy else logging.INFO, "language: %s", reason)
        self.dead_encoders += 1
        self.metrics.dead_peers.labels("language").inc()
        self._links.drop(enc)
        # it may come back elsewhere (restarted on another port): look it up afresh
        self._resolver.forget(enc.address)
        affected = [
            live
            for live in [*self._rooms.values(), *self._zombies.values()]
            if live.encoder is enc or (live.starting and live.encoder is None)
        ]
        # Out of the reservation queues first: blocks the first failures free
        # must not go to another room of the same dead encoder.
        for live in affected:
            if live.encoder is enc:
                self._reservations.remove(live)
        # The encoder may be alive behind a broken link, with writes held up in
        # the network: the blocks it was offered come back only once every
        # data plane has fenced its link (or, where one cannot, after a grace).
        fence = self._fences.raise_for(enc)
        for live in affected:
            # a room starting on the caller's thread may be about to use enc
            fail = functools.partial(self._fail_lost, live, enc, reason, fence)
            if not self._fast.defer(live, fail):
                fail()
        self._zombies = {k: v for k, v in self._zombies.items() if v.encoder is not enc}
        done = functools.partial(self._loop.call, self._fences.one_done)
        self._fences.ask(fence, self._servers, done, gone=closed)
        self._fences.settle(time.monotonic())

    def _fail_lost(self, live: LiveRoom, enc: EncoderLink, reason: str, fence: Fence) -> None:
        if live.encoder is enc and (not live.room.done or live.room.holds_blocks):
            self._reservations.remove(live)
            self._run(live, self._step(live.room.peer_lost, time.monotonic(), reason))
            if live.room.holds_blocks:
                self._fences.hold(fence, live)

    def _settled(self, live: LiveRoom) -> None:
        self._run(live, self._step(live.room.settled))
        key = (live.room.room, live.room.epoch)
        if self._zombies.get(key) is live:  # cleared meanwhile
            del self._zombies[key]
