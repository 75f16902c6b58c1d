"""The language endpoint's parts, each alone: the reservation queue on a
BlockAllocator, assembly on a real pool, route waiting, fences. No sockets,
no threads of their own."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from embedlink import BlockAllocator, BufferPool, BufferSchema
from embedlink.endpoints.language.assembly import Assembler
from embedlink.endpoints.language.links import EncoderLink, Fences
from embedlink.endpoints.language.receiver import LiveRoom
from embedlink.endpoints.language.reservations import ReservationQueue
from embedlink.endpoints.language.routing import RouteWaiters
from embedlink.observability.metrics import EndpointMetrics
from embedlink.protocol import Harvest, ReceiverRoom
from embedlink.transports import TransportServer

BS = 4  # tokens per block


def queue(
    num_blocks: int = 8, headroom: int = 2, *, zero_copy: bool = False, handed: int = 0
) -> tuple[ReservationQueue[str], BlockAllocator]:
    alloc = BlockAllocator(num_blocks)
    q: ReservationQueue[str] = ReservationQueue(
        alloc, BS, headroom, lock=threading.Lock(), zero_copy=zero_copy, handed=lambda: handed
    )
    return q, alloc


class Grants:
    """Records what the queue grants, by room name."""

    def __init__(self) -> None:
        self.got: dict[str, list[int]] = {}
        self.order: list[str] = []

    def __call__(self, item: str, blocks: list[int], tokens: int) -> None:
        assert len(blocks) * BS >= min(tokens, len(blocks) * BS)
        self.got[item] = blocks
        self.order.append(item)


# -- the reservation queue


def test_a_first_reservation_leaves_the_headroom() -> None:
    q, alloc = queue(8, 2)
    grants = Grants()
    assert q.request("a", 100, resume=False, grant=grants)
    assert len(grants.got["a"]) == 6  # 8 blocks less 2 of headroom, though 25 were wanted
    assert alloc.num_free == 2
    # nothing beyond the headroom is left: the next first reservation queues
    assert not q.request("b", 4, resume=False, grant=grants)
    assert q.queued("b") and len(q) == 1 and "b" not in grants.got


def test_a_resume_may_take_the_headroom() -> None:
    q, alloc = queue(8, 2)
    grants = Grants()
    q.request("a", 24, resume=False, grant=grants)
    assert q.request("a-rest", 8, resume=True, grant=grants)
    assert len(grants.got["a-rest"]) == 2 and alloc.num_free == 0


def test_resumes_are_served_before_first_reservations() -> None:
    q, alloc = queue(8, 1)
    grants = Grants()
    q.request("a", 28, resume=False, grant=grants)  # 7 blocks
    q.request("b", 4, resume=True, grant=grants)  # the last block
    assert alloc.num_free == 0
    assert not q.request("first", 4, resume=False, grant=grants)
    assert not q.request("resume", 4, resume=True, grant=grants)
    alloc.free(grants.got["b"])  # one block back
    q.retry(grants, done=lambda item: False)
    # the resume got it though the first reservation asked earlier
    assert grants.order[-1] == "resume" and q.queued("first") and not q.queued("resume")


def test_a_first_reservation_queues_behind_a_waiting_resume() -> None:
    q, alloc = queue(8, 1)
    grants = Grants()
    q.request("a", 32, resume=False, grant=grants)  # 7 blocks, headroom left
    q.request("r1", 8, resume=True, grant=grants)  # takes the headroom block
    assert not q.request("r2", 4, resume=True, grant=grants)
    alloc.free(grants.got["a"][:3])
    # blocks are free, but a resume waits: the first reservation must not overtake it
    assert not q.request("f", 4, resume=False, grant=grants)
    q.retry(grants, done=lambda item: False)
    assert grants.order[-2:] == ["r2", "f"]


def test_retry_keeps_first_come_first_served_and_stops_at_the_first_that_does_not_fit() -> None:
    q, alloc = queue(8, 0)
    grants = Grants()
    q.request("hog", 32, resume=False, grant=grants)
    for name, tokens in (("big", 16), ("small", 4)):
        q.request(name, tokens, resume=False, grant=grants)
    alloc.free(grants.got["hog"][:1])
    q.retry(grants, done=lambda item: False)
    # "big" gets what there is (1 block: a first reservation takes fewer) and
    # "small" waits behind it rather than overtaking
    assert grants.order == ["hog", "big"] and len(grants.got["big"]) == 1
    assert q.queued("small")


def test_retry_drops_rooms_that_ended_and_remove_takes_one_out() -> None:
    q, alloc = queue(4, 0)
    grants = Grants()
    q.request("hog", 16, resume=False, grant=grants)
    for name in ("gone", "removed", "next"):
        q.request(name, 4, resume=False, grant=grants)
    q.remove("removed")
    assert not q.queued("removed") and len(q) == 2
    alloc.free(grants.got["hog"])
    q.retry(grants, done=lambda item: item == "gone")
    assert grants.order == ["hog", "next"] and len(q) == 0


def test_take_only_if_idle_refuses_while_rooms_queue_or_were_handed_to_the_loop() -> None:
    q, _ = queue(8, 1, handed=1)
    assert q.take(4, resume=False, only_if_idle=True) is None  # a room handed earlier
    assert q.take(4, resume=False) is not None  # the loop itself may
    q2, alloc2 = queue(2, 1)
    grants = Grants()
    q2.request("a", 4, resume=False, grant=grants)
    q2.request("b", 4, resume=False, grant=grants)  # queued: only the headroom is left
    alloc2.free(grants.got["a"])
    assert q2.take(4, resume=False, only_if_idle=True) is None


def test_a_zero_copy_first_reservation_leaves_room_to_grow_in_place() -> None:
    q, alloc = queue(16, 1, zero_copy=True)
    grants = Grants()
    q.request("a", 8, resume=False, grant=grants)  # 2 blocks, 2 spare after them
    q.request("b", 4, resume=False, grant=grants)
    a, b = grants.got["a"], grants.got["b"]
    assert b[0] >= a[-1] + 1 + 2  # b starts after a's spare
    assert alloc.alloc_at(a[-1] + 1, 2) is not None  # a can grow in place


def test_a_headroom_outside_the_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="resume_headroom=8"):
        queue(8, 8)


# -- assembly


SCHEMA = BufferSchema(hidden_size=8)


def assembler(
    num_blocks: int = 8, *, zero_copy: bool
) -> tuple[Assembler, BufferPool, BlockAllocator]:
    pool = BufferPool(SCHEMA, num_blocks, BS)
    alloc = BlockAllocator(num_blocks)
    metrics = EndpointMetrics("language", lambda: alloc.num_free, lambda: alloc.num_used)
    return Assembler(SCHEMA, pool, alloc, BS, metrics, zero_copy=zero_copy), pool, alloc


def live_room() -> LiveRoom:
    room = ReceiverRoom(
        1, session="s", epoch=1, block_size=BS, now=0.0, timeout=10.0, default_tokens=BS
    )
    return LiveRoom(room, None)


def fill(pool: BufferPool, start: int, values: np.ndarray[Any, Any]) -> None:
    pool.view("embedding", start, len(values))[...] = values.astype(
        pool.view("embedding", start, 1).dtype
    )


def tokens(n: int, offset: float = 0.0) -> np.ndarray[Any, Any]:
    return np.arange(n * 8, dtype=np.float32).reshape(n, 8) + offset


def test_a_chunk_is_copied_out_so_its_blocks_can_go_back() -> None:
    asm, pool, alloc = assembler(zero_copy=False)
    live = live_room()
    blocks = alloc.alloc(2)
    assert blocks is not None
    start = blocks[0] * BS
    fill(pool, start, tokens(6))
    asm.harvest(live, Harvest(0, 6, 10, ((start, 6),), True, blocks[0], tuple(blocks)))
    fill(pool, start, tokens(6, 100.0))  # the blocks are reused: the result keeps its copy
    np.testing.assert_array_equal(live.result["embedding"][:6].astype(np.float32), tokens(6))
    assert live.pinned is None and live.aux is not None


def test_zero_copy_hands_out_views_of_a_whole_contiguous_chunk() -> None:
    asm, pool, alloc = assembler(zero_copy=True)
    live = live_room()
    blocks = alloc.alloc(2)
    assert blocks is not None
    start = blocks[0] * BS
    fill(pool, start, tokens(7))
    asm.harvest(live, Harvest(0, 7, 7, ((start, 7),), True, blocks[0], tuple(blocks)))
    assert live.pinned == tuple(blocks)
    fill(pool, start, tokens(7, 5.0))  # a view: it sees the pool
    np.testing.assert_array_equal(live.result["embedding"].astype(np.float32), tokens(7, 5.0))


def test_zero_copy_grows_a_resuming_room_in_place() -> None:
    asm, pool, alloc = assembler(zero_copy=True)
    live = live_room()
    first = alloc.alloc(1)
    assert first is not None
    start = first[0] * BS
    fill(pool, start, tokens(4))
    asm.harvest(live, Harvest(0, 4, 10, ((start, 4),), True, first[0], tuple(first)))
    # the rest (6 tokens, 2 blocks) is reserved right after the first chunk
    assert live.extension == [first[0] + 1, first[0] + 2]
    assert live.area_start == start and live.pinned == (first[0], first[0] + 1, first[0] + 2)
    fill(pool, start + 4, tokens(6, 40.0))
    asm.harvest(live, Harvest(4, 6, 10, ((start + 4, 6),), False, first[0], tuple(live.extension)))
    expect = np.concatenate([tokens(4), tokens(6, 40.0)])
    np.testing.assert_array_equal(live.result["embedding"].astype(np.float32), expect)


def test_zero_copy_moves_a_first_chunk_whose_neighbours_are_taken() -> None:
    asm, pool, alloc = assembler(zero_copy=True)
    live = live_room()
    first = alloc.alloc(1)
    neighbour = alloc.alloc(1)
    assert first is not None and neighbour is not None and neighbour[0] == first[0] + 1
    fill(pool, first[0] * BS, tokens(4))
    asm.harvest(live, Harvest(0, 4, 8, ((first[0] * BS, 4),), True, first[0], tuple(first)))
    assert live.area_start is not None and live.area_start != first[0] * BS
    assert live.pinned is not None and len(live.pinned) == 2
    moved = pool.view("embedding", live.area_start, 4).astype(np.float32)
    np.testing.assert_array_equal(moved, tokens(4))


# -- route waiting


class StandInResolver:
    """Stands in for the Resolver, whose answers come from a bootstrap server
    over HTTP: RouteWaiters reads only get, get_many and last_error."""

    def __init__(self) -> None:
        self.routes: dict[int, tuple[str, int]] = {}

    def get(self, bootstrap: str, room: int, dp_group: int | None) -> tuple[str, int] | None:
        return self.routes.get(room)

    def get_many(
        self, bootstrap: str, wanted: list[tuple[int, int | None]]
    ) -> list[tuple[str, int] | None]:
        return [self.routes.get(room) for room, _ in wanted]

    def last_error(self, bootstrap: str) -> str | None:
        return "connection refused"


def waiting_room(room: int, deadline_in: float = 10.0) -> LiveRoom:
    r = ReceiverRoom(
        room, session="s", epoch=1, block_size=BS, now=0.0, timeout=deadline_in, default_tokens=BS
    )
    return LiveRoom(r, None, route=("boot:1", None))


def waiters() -> tuple[RouteWaiters, StandInResolver, dict[str, list[Any]]]:
    seen: dict[str, list[Any]] = {"start": [], "tell": [], "fail": [], "unhand": []}
    resolver = StandInResolver()

    def record(kind: str) -> Callable[..., None]:
        return lambda *args: seen[kind].append(args)

    w = RouteWaiters(
        resolver,  # type: ignore[arg-type]
        start=record("start"),
        tell=record("tell"),
        unhand=record("unhand"),
        fail=record("fail"),
        timeout=10.0,
    )
    return w, resolver, seen


def test_rooms_start_in_the_order_they_were_asked_for_once_routes_are_known() -> None:
    w, resolver, seen = waiters()
    rooms = [waiting_room(i) for i in (1, 2, 3)]
    for live in rooms:
        w.add(live)
    assert len(w) == 3 and not seen["start"]
    resolver.routes = {3: ("enc:3", 1), 1: ("enc:1", 1)}
    w.route("boot:1")
    assert [args[0].room.room for args in seen["start"]] == [1, 3]
    assert len(w) == 1 and rooms[1].route is not None


def test_a_room_aborted_while_waiting_tells_its_encoder_once_found() -> None:
    w, resolver, seen = waiters()
    live = waiting_room(7)
    w.add(live)
    live.room.abort(0.0)
    resolver.routes = {7: ("enc:7", 1)}
    w.route(None)
    assert seen["tell"] == [(live, "enc:7")] and not seen["start"]


def test_a_room_without_a_route_at_its_deadline_fails_naming_the_bootstrap_server() -> None:
    w, _, seen = waiters()
    live = waiting_room(5, deadline_in=1.0)
    w.add(live)
    w.route(None, now=0.5)
    assert not seen["fail"]
    w.route(None, now=1.5)
    ((failed, reason),) = seen["fail"]
    assert failed is live and "boot:1" in reason and "connection refused" in reason
    assert len(w) == 0


# -- fences


class CannotFence(TransportServer):
    """A real TransportServer subclass that keeps the base's answer: it cannot fence."""

    name = "test"


class Fencing(TransportServer):
    name = "test"

    def __init__(self, pool: BufferPool) -> None:
        super().__init__(pool, host="127.0.0.1")
        self.pending: list[Callable[[], None]] = []

    def fence(self, peer: str, done: Callable[[], None], *, gone: bool = False) -> bool:
        self.pending.append(done)
        return True


def test_a_fence_holds_blocks_until_every_transport_fenced_the_link() -> None:
    pool = BufferPool(SCHEMA, 4, BS)
    settled: list[LiveRoom] = []
    fences = Fences(30.0, settled.append, lambda *a: None)
    a, b = Fencing(pool), Fencing(pool)
    fence = fences.raise_for(EncoderLink("enc:1", None))
    live = live_room()
    fences.hold(fence, live)
    fences.ask(fence, [a, b], fences.one_done, gone=False)
    fences.settle(0.0)
    assert not settled and fences
    a.pending.pop()()
    assert not settled
    b.pending.pop()()
    assert settled == [live] and not fences
    later = live_room()
    fences.hold(fence, later)  # a room that joins after it settled is let go at once
    assert settled == [live, later]


def test_a_transport_that_cannot_fence_lets_the_blocks_go_after_the_grace() -> None:
    pool = BufferPool(SCHEMA, 4, BS)
    settled: list[LiveRoom] = []
    logged: list[tuple[Any, ...]] = []
    fences = Fences(30.0, settled.append, lambda *a: logged.append(a))
    fence = fences.raise_for(EncoderLink("enc:1", None))
    live = live_room()
    fences.hold(fence, live)
    fences.ask(fence, [CannotFence(pool, host="127.0.0.1")], fences.one_done, gone=True)
    assert fence.graced
    fences.settle(fence.release_at - 1.0)
    assert not settled
    fences.settle(fence.release_at)
    assert settled == [live] and logged and "enc:1" in logged[0]
