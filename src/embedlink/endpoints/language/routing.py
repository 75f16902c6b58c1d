"""Rooms waiting for their encoder's address.

``receiver()`` never blocks on the network: when the bootstrap server's
answer for a room is not cached, the room waits here (``Bootstrapping``)
while the :class:`~embedlink.bootstrap.resolver.Resolver` looks it up on its
own thread, and starts as soon as the route is known. Rooms start in the
order ``receiver()`` was called, so first reservations follow that order (the
deadlock argument in :mod:`embedlink.endpoints.language`). A room whose route
is still unknown at its deadline fails naming the bootstrap server and what it
last answered.

Loop thread only.
"""

from __future__ import annotations

from collections.abc import Callable

from ...bootstrap.resolver import Resolver
from .receiver import LiveRoom

__all__ = ["RouteWaiters"]


class RouteWaiters:
    """The rooms waiting for a route, oldest first.

    ``start(room, address, required)`` starts a room whose encoder is now
    known; ``tell(room, address)`` tells that encoder about a room aborted
    before its route was known (it may hold the embedding for it);
    ``unhand(room)`` marks a room as no longer on its way to a first
    reservation; ``fail(room, reason)`` ends one whose deadline passed.
    ``timeout`` is the bootstrap timeout the failure reason names.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        start: Callable[[LiveRoom, str, int], None],
        tell: Callable[[LiveRoom, str], None],
        unhand: Callable[[LiveRoom], None],
        fail: Callable[[LiveRoom, str], None],
        timeout: float,
    ) -> None:
        self._resolver = resolver
        self._start = start
        self._tell = tell
        self._unhand = unhand
        self._fail = fail
        self.timeout = timeout
        self.waiting: dict[int, LiveRoom] = {}  # by id(live), in the order they came

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, live: LiveRoom) -> None:
        """A room whose encoder address was not cached: start it as soon as
        the resolver has it (:meth:`route`, or a later tick). One aborted
        meanwhile still waits, until its deadline, so that the encoder can be
        told (it may hold the embedding for it)."""
        if live.route is None:
            self._unhand(live)
            return
        self.waiting[id(live)] = live
        if len(self.waiting) == 1:
            self._try(live)
        elif self._resolver.get(live.route[0], live.room.room, live.route[1]) is not None:
            # its route just became known: the rooms before it start first
            self.route(live.route[0])

    def _try(self, live: LiveRoom, found: tuple[str, int] | None = None) -> bool:
        """Start ``live`` if its route is known (``found``: already looked up)."""
        assert live.route is not None
        if found is None:
            bootstrap, dp_group = live.route
            found = self._resolver.get(bootstrap, live.room.room, dp_group)
        if found is None:
            return False
        del self.waiting[id(live)]
        live.route = None
        if live.room.done:
            # aborted before its encoder was known: tell it now
            self._unhand(live)
            self._tell(live, found[0])
        else:
            self._start(live, *found)
        return True

    def route(self, bootstrap: str | None, now: float | None = None) -> None:
        """Start the rooms waiting for a route from ``bootstrap`` (None: any)
        that the resolver now knows; with ``now``, fail those whose deadline
        has passed, naming the bootstrap server and its last answer. In the
        order the rooms were asked for, each bootstrap server's routes read
        from one view of the resolver's cache (``get_many``)."""
        order: list[tuple[LiveRoom, str, int | None]] = []
        for live in list(self.waiting.values()):
            if live.route is None:
                self.waiting.pop(id(live), None)
                self._unhand(live)
            elif bootstrap is None or live.route[0] == bootstrap:
                order.append((live, *live.route))
        found: dict[int, tuple[str, int] | None] = {}
        for boot in dict.fromkeys(b for _, b, _ in order):
            mine = [(live, group) for live, b, group in order if b == boot]
            routes = self._resolver.get_many(boot, [(x.room.room, g) for x, g in mine])
            found.update(zip((id(x) for x, _ in mine), routes, strict=True))
        for live, boot, _ in order:
            if self.waiting.get(id(live)) is not live:
                continue  # routed or ended by what the rooms before it did
            hit = found[id(live)]
            if hit is not None:
                self._try(live, hit)
                continue
            if now is None or now < live.room.deadline:
                continue
            del self.waiting[id(live)]
            self._unhand(live)
            if live.room.done:
                continue  # aborted, and its encoder never found: nobody to tell
            why = self._resolver.last_error(boot) or "no answer yet"
            self._fail(
                live,
                f"no route to the encoder of room {live.room.room} from bootstrap server "
                f"{boot} within {self.timeout:g}s: {why}",
            )
