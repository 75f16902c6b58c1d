"""The engine-independent half of a serving-engine adapter.

A serving engine such as vLLM runs one *scheduler* process and one *worker*
process per tensor-parallel rank. The embeddings land in the workers (where
the model is); the scheduler decides when a request may run. The scheduler
must never touch the network, and in vLLM's V1 model runner the workers hear
from the scheduler only on steps that schedule tokens, so a request deferred
until its embedding arrives would never let the workers learn that they
should fetch it. The two therefore talk over a same-host side channel
(:class:`Mailbox`, Unix datagrams, never blocking either side):

* consumer (language side): :class:`ConsumerScheduler` tells every worker
  which rooms a request needs (``open``) and when to let go (``close``);
  each :class:`ConsumerWorker` receives them with its own
  :class:`~embedlink.LanguageEndpoint` and answers ``arrived`` or ``failed``;
  the scheduler admits the request once every rank has every item it still
  needs, and fails it with the reason otherwise;
* producer (encoder side): :class:`ProducerScheduler` learns each request's
  rooms and puts them in the step's metadata; :class:`ProducerWorker` sends
  each encoder output into its rooms from a thread of its own, so the model
  runner never waits for the pool.

Room ids come from whoever routes requests to both instances (the proxy): the
same image in two requests, or one producer serving two consumers, get
distinct rooms. Nothing here imports an engine.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import secrets
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from ..embedding import Embedding
from ..endpoints.encoder import EncoderEndpoint, Sender
from ..endpoints.language import LanguageEndpoint, Receiver
from ..protocol import BufferSchema, FieldSpec, Status, TransferError

log = logging.getLogger(__name__)

__all__ = [
    "ConsumerScheduler",
    "ConsumerWorker",
    "Item",
    "Mailbox",
    "ParamsError",
    "ProducerScheduler",
    "ProducerWorker",
    "embedding_schema",
    "parse_params",
]

#: the key under which embedlink's part of a request's transfer params lives
PARAMS_KEY = "embedlink"
_MAX_OUTBOX = 1 << 16
_MAX_DATAGRAM = 1 << 16
_KEEP_FAILURES = 1024


def embedding_schema(width: int, dtype: str) -> BufferSchema:
    """The schema of an engine's encoder cache: one ``[width]`` row of
    ``dtype`` per embedding token, nothing else."""
    return BufferSchema(fields=[FieldSpec("embedding", (width,), dtype)])


class ParamsError(ValueError):
    """A request's transfer params do not say what embedlink needs."""


@dataclass(frozen=True)
class Item:
    """One multimodal item of a request: its cache key, how many embedding
    rows it has, and where its placeholder ends in the prompt."""

    identifier: str
    num_embeds: int
    end: int = 0


@dataclass(frozen=True)
class Params:
    rooms: tuple[int, ...]
    bootstrap: str | None
    dp_group: int | None


def parse_params(
    params: Mapping[str, Any] | None, n_items: int, *, assign: bool = False
) -> Params | None:
    """embedlink's part of a request's transfer params, or None when the
    request has none (it is not one of ours). ``assign``: without ``rooms``,
    give each item a fresh room id (a producer does: whoever routes the
    request then need not count its items). Raises :class:`ParamsError`."""
    if not params:
        return None
    mine = params.get(PARAMS_KEY)
    if mine is None:
        return None
    if not isinstance(mine, Mapping):
        raise ParamsError(f"transfer params[{PARAMS_KEY!r}] must be an object, got {mine!r}")
    rooms = mine.get("rooms")
    if rooms is None and assign:
        # private randomness, as for epochs: ids no two requests share
        base = secrets.randbits(61) << 1
        rooms = [base + i for i in range(n_items)]
    if not isinstance(rooms, list | tuple) or not all(
        isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 63 for r in rooms
    ):
        raise ParamsError(
            f"transfer params[{PARAMS_KEY!r}]['rooms'] must be a list of room ids "
            f"(integers from 0 to 2**63-1), got {rooms!r}"
        )
    if len(rooms) != n_items:
        raise ParamsError(
            f"transfer params[{PARAMS_KEY!r}] has {len(rooms)} rooms for the request's "
            f"{n_items} multimodal items"
        )
    boot = mine.get("bootstrap")
    if boot is not None and not isinstance(boot, str):
        raise ParamsError(f"transfer params[{PARAMS_KEY!r}]['bootstrap'] must be host:port")
    dp = mine.get("dp_group")
    if dp is not None and (not isinstance(dp, int) or isinstance(dp, bool) or dp < 0):
        raise ParamsError(f"transfer params[{PARAMS_KEY!r}]['dp_group'] must be an integer >= 0")
    return Params(tuple(rooms), boot, dp)


class Mailbox:
    """Unix datagrams between the processes of one engine instance, on one
    host, under Linux abstract names (nothing on disk to clean up). Sending
    never blocks: a datagram the peer cannot take yet (not bound yet, or its
    queue full) waits in an outbox, in order per peer, until :meth:`flush`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock: socket.socket | None = None
        self._outbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def open(self) -> Mailbox:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind("\0" + self.name)
        except OSError as exc:
            s.close()
            raise RuntimeError(
                f"embedlink: cannot bind the same-host mailbox {self.name!r}: {exc} "
                "(is another engine instance running with the same engine_id?)"
            ) from exc
        s.setblocking(False)
        self._sock = s
        return self

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def post(self, to: str, msg: Mapping[str, Any]) -> None:
        data = msgspec.json.encode(msg)
        if len(data) > _MAX_DATAGRAM:
            raise ValueError(f"mailbox message of {len(data)} bytes is too large")
        with self._lock:
            if len(self._outbox) >= _MAX_OUTBOX:
                self._outbox.popleft()
                self.dropped += 1
            self._outbox.append((to, data))
        self.flush()

    def flush(self) -> None:
        """Send what waits; a peer that cannot take more keeps the rest, in order."""
        if self._sock is None:
            return
        with self._lock:
            kept: collections.deque[tuple[str, bytes]] = collections.deque()
            blocked: set[str] = set()
            while self._outbox:
                to, data = self._outbox.popleft()
                if to in blocked:
                    kept.append((to, data))
                    continue
                try:
                    self._sock.sendto(data, "\0" + to)
                except (BlockingIOError, ConnectionRefusedError, FileNotFoundError, OSError):
                    blocked.add(to)
                    kept.append((to, data))
            self._outbox = kept

    @property
    def waiting(self) -> int:
        return len(self._outbox)

    def receive(self, timeout: float = 0.0, *, also: int | None = None) -> list[dict[str, Any]]:
        """What has arrived, waiting up to ``timeout`` seconds for the first
        (or for descriptor ``also`` to become readable)."""
        if self._sock is None:
            return []
        if timeout > 0:
            fds = [self._sock.fileno()] if also is None else [self._sock.fileno(), also]
            select.select(fds, [], [], timeout)
        out: list[dict[str, Any]] = []
        while True:
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, OSError):
                return out
            try:
                msg = msgspec.json.decode(data)
            except msgspec.DecodeError:
                log.warning("embedlink: %s: dropping a malformed datagram", self.name)
                continue
            if isinstance(msg, dict):
                out.append(msg)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- consumer (language side)


@dataclass
class _CItem:
    """One room on the consumer, shared by every request that names it
    (vLLM's samples of one ``n > 1`` request carry the same params)."""

    item: Item
    room: int
    arrived: set[int] = field(default_factory=set)
    #: the requests that wait on or hold this room; it closes with the last
    users: set[str] = field(default_factory=set)
    failed: str | None = None


@dataclass
class _CRequest:
    rid: str
    items: list[_CItem]
    deadline: float
    failed: str | None = None
    #: the request's own items, beside the (maybe shared) rooms: where each
    #: placeholder ends is the request's
    own: list[Item] = field(default_factory=list)


class ConsumerScheduler:
    """The scheduler-side bookkeeping of a consumer: which requests wait for
    which rooms, on how many worker ranks. Call from the scheduler's thread
    only; nothing here blocks or touches the network."""

    def __init__(
        self,
        *,
        mailbox: str,
        workers: Sequence[str],
        bootstrap: str | None,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._box = Mailbox(mailbox)
        self._workers = list(workers)
        self._bootstrap = bootstrap
        self._deadline = deadline
        self._clock = clock
        self._reqs: dict[str, _CRequest] = {}
        self._by_room: dict[int, _CItem] = {}
        self._ready: dict[str, set[int]] = {}  # identifier -> rooms arrived everywhere
        self._loads: dict[str, int] = {}  # identifier -> room, for this step's workers
        self._unavailable: dict[str, str] = {}
        self._failures: collections.OrderedDict[str, str] = collections.OrderedDict()

    def start(self) -> ConsumerScheduler:
        self._box.open()
        return self

    def close(self) -> None:
        self._box.close()

    @property
    def open_requests(self) -> int:
        return len(self._reqs)

    def ensure(
        self,
        rid: str,
        params: Mapping[str, Any] | None,
        items: Sequence[Item],
        num_computed: int,
    ) -> bool:
        """True when request ``rid`` may run: it is not ours, or every item
        whose placeholder ends after ``num_computed`` has arrived on every
        worker rank. The first call opens its rooms on the workers."""
        self._pump()
        req = self._reqs.get(rid)
        if req is None:
            try:
                p = parse_params(params, len(items))
            except ParamsError as exc:
                self._fail_new(rid, str(exc))
                return False
            if p is None:
                return True
            boot = p.bootstrap or self._bootstrap
            if boot is None:
                self._fail_new(
                    rid,
                    "no bootstrap server: give 'bootstrap' in the connector config "
                    "or in the request's transfer params",
                )
                return False
            # A room another live request opened already is shared (the
            # samples of one n > 1 request name the same rooms), if it
            # carries the same item: nothing is asked of the workers twice.
            for it, room in zip(items, p.rooms, strict=True):
                ci = self._by_room.get(room)
                if ci is not None and (ci.item.identifier, ci.item.num_embeds) != (
                    it.identifier,
                    it.num_embeds,
                ):
                    self._fail_new(
                        rid,
                        f"room {room} carries {ci.item.identifier!r} "
                        f"({ci.item.num_embeds} rows) for request(s) {sorted(ci.users)}, "
                        f"not {it.identifier!r} ({it.num_embeds} rows)",
                    )
                    return False
            shared: list[_CItem] = []
            new: list[_CItem] = []
            for it, room in zip(items, p.rooms, strict=True):
                ci = self._by_room.get(room)
                if ci is None:
                    ci = self._by_room[room] = _CItem(it, room)
                    new.append(ci)
                ci.users.add(rid)
                shared.append(ci)
            req = _CRequest(rid, shared, self._clock() + self._deadline, own=list(items))
            self._reqs[rid] = req
            gone = next((ci.failed for ci in shared if ci.failed is not None), None)
            if gone is not None:
                self._fail(req, gone)
            if new:
                msg = {
                    "op": "open",
                    "rooms": [[ci.room, ci.item.identifier, ci.item.num_embeds] for ci in new],
                    "bootstrap": boot,
                    "dp_group": p.dp_group,
                }
                for w in self._workers:
                    self._box.post(w, msg)
            return False
        if req.failed is not None:
            return False
        needed = [
            ci
            for ci, it in zip(req.items, req.own, strict=True)
            if it.end > num_computed or it.end == 0
        ]
        if all(len(ci.arrived) == len(self._workers) for ci in needed):
            return True
        if self._clock() > req.deadline:
            late = [ci.room for ci in needed if len(ci.arrived) < len(self._workers)]
            self._fail(
                req, f"rooms {late} did not arrive on every worker within {self._deadline:.0f}s"
            )
        return False

    def has_item(self, identifier: str) -> bool:
        """An item with this cache key has arrived on every rank (for a live request)."""
        return bool(self._ready.get(identifier))

    def allocated(self, rid: str, index: int, identifier: str) -> None:
        """The engine will read ``identifier`` from the cache this step:
        the workers load it from the request's own room, else from another
        request's room with the same key (the same content)."""
        req = self._reqs.get(rid)
        room = None
        if req is not None and index < len(req.items):
            ci = req.items[index]
            if ci.item.identifier == identifier and len(ci.arrived) == len(self._workers):
                room = ci.room
        if room is None:
            rooms = self._ready.get(identifier)
            if not rooms:
                return  # encoded locally
            room = next(iter(rooms))
        self._loads[identifier] = room

    def take_loads(self) -> dict[str, int]:
        """``{identifier: room}`` for the workers' next step; cleared."""
        self._pump()
        loads, self._loads = self._loads, {}
        return loads

    def finished(self, rid: str) -> None:
        """The request ended (finished, aborted, failed): its rooms close."""
        req = self._reqs.pop(rid, None)
        self._unavailable.pop(rid, None)
        if req is None:
            return
        closing = []
        for ci in req.items:
            ci.users.discard(rid)
            if ci.users:
                continue  # another sample of the same request still needs it
            closing.append(ci.room)
            self._by_room.pop(ci.room, None)
            rooms = self._ready.get(ci.item.identifier)
            if rooms is not None:
                rooms.discard(ci.room)
                if not rooms:
                    del self._ready[ci.item.identifier]
        if closing:
            msg = {"op": "close", "rooms": closing}
            for w in self._workers:
                self._box.post(w, msg)

    def take_unavailable(self) -> dict[str, str]:
        """Requests to fail, with the reason (each returned once)."""
        self._pump()
        out, self._unavailable = self._unavailable, {}
        return out

    def failure(self, rid: str) -> str | None:
        req = self._reqs.get(rid)
        return None if req is None else req.failed

    def last_failure(self, rid: str) -> str | None:
        """Why request ``rid`` failed, also after it ended (the last
        ``_KEEP_FAILURES`` failures are kept)."""
        return self._failures.get(rid)

    def _fail_new(self, rid: str, reason: str) -> None:
        self._reqs[rid] = _CRequest(rid, [], 0.0)
        self._fail(self._reqs[rid], reason)

    def _fail(self, req: _CRequest, reason: str) -> None:
        if req.failed is None:
            req.failed = reason
            self._unavailable[req.rid] = reason
            self._failures[req.rid] = reason
            while len(self._failures) > _KEEP_FAILURES:
                self._failures.popitem(last=False)
            log.warning("embedlink: request %s fails: %s", req.rid, reason)

    def _pump(self) -> None:
        self._box.flush()
        for msg in self._box.receive():
            op, room = msg.get("op"), msg.get("room")
            ci = self._by_room.get(room) if isinstance(room, int) else None
            if ci is None:
                continue  # its requests ended meanwhile
            if op == "arrived":
                ci.arrived.add(int(msg.get("rank", -1)))
                if len(ci.arrived) == len(self._workers):
                    self._ready.setdefault(ci.item.identifier, set()).add(ci.room)
            elif op == "failed":
                ci.failed = f"room {room} on rank {msg.get('rank')}: {msg.get('reason')}"
                for rid in sorted(ci.users):
                    self._fail(self._reqs[rid], ci.failed)


def lend(view: np.ndarray[Any, Any], on_free: Callable[[], None]) -> np.ndarray[Any, Any]:
    """An alias of the C-contiguous ``view`` (no copy) that calls ``on_free``
    once nothing refers to it any more: every array or tensor derived from
    the result (numpy views, ``torch.from_numpy``, slices of those) keeps the
    memoryview underneath alive, because numpy stops collapsing ``.base``
    chains at an object that is not an array. ``on_free`` runs on whichever
    thread lets go last, possibly inside garbage collection: it must only
    hand the news on (a ``SimpleQueue.put``)."""
    if not view.flags.c_contiguous:
        raise ValueError("only a C-contiguous array can be lent without a copy")
    raw: Any = view.reshape(-1).view(np.uint8)
    alias = np.frombuffer(memoryview(raw), dtype=np.uint8)
    out: np.ndarray[Any, Any] = alias.view(view.dtype).reshape(view.shape)
    anchor: Any = out
    while isinstance(anchor, np.ndarray):
        anchor = anchor.base
    weakref.finalize(anchor, on_free)
    return out


class ConsumerWorker:
    """One worker rank of a consumer: receives the rooms the scheduler opens
    with its own endpoint, on its own thread, keeps each arrived item as an
    engine tensor until the scheduler closes the room, and puts items into
    the engine's cache on :meth:`load` (the model runner's thread: only dict
    work there).

    With a ``zero_copy`` endpoint an item that arrived in the pool is handed
    to the engine as a view of the pool (:func:`lend`), not copied into fresh
    memory: its blocks come back when the engine's last reference to the
    tensor goes (its encoder cache evicts it), however long after the
    request that is. At most half the pool is lent at once; past that an
    item is copied out as without ``zero_copy``, so that an engine keeping
    many items cached cannot starve the transfers of the pool."""

    def __init__(
        self,
        endpoint: LanguageEndpoint,
        *,
        rank: int,
        mailbox: str,
        scheduler: str,
        to_tensor: Callable[[Any], Any],
    ) -> None:
        self.ep = endpoint
        self.rank = rank
        self._box = Mailbox(mailbox)
        self._scheduler = scheduler
        self._to_tensor = to_tensor
        self._rcvs: dict[int, tuple[Receiver, Item]] = {}
        self._ready: dict[int, Any] = {}
        self._done: queue.SimpleQueue[int] = queue.SimpleQueue()
        #: lent rooms whose tensors the engine let go of: (room, receiver, blocks)
        self._returns: queue.SimpleQueue[tuple[int, Receiver, int]] = queue.SimpleQueue()
        #: rooms whose pool blocks the engine holds (their receivers not cleared)
        self._lent: dict[int, int] = {}
        self.lent_blocks = 0
        self.lend_limit = endpoint.num_blocks // 2 if endpoint.zero_copy else 0
        #: an eventfd written when a room ends, so the thread wakes at once
        self._wake = -1
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0
        self.failed = 0

    def start(self) -> ConsumerWorker:
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.start()
        self._box.open()
        self._thread = threading.Thread(
            target=self._serve, name=f"embedlink-vllm-consumer-{self.rank}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._box.close()
        self.ep.close()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        self._ready.clear()

    def load(self, cache: dict[str, Any], loads: Mapping[str, int]) -> list[str]:
        """Put each ``identifier -> room`` of ``loads`` into ``cache`` (unless
        it is there); returns the identifiers that had no tensor here."""
        missing = []
        for identifier, room in loads.items():
            if identifier in cache:
                continue
            t = self._ready.get(room)
            if t is None:
                missing.append(identifier)
            else:
                cache[identifier] = t
        return missing

    @property
    def held(self) -> int:
        """Items received and not yet let go by the scheduler."""
        return len(self._ready)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                for msg in self._box.receive(timeout=0.1, also=self._wake):
                    self._handle(msg)
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                while True:
                    try:
                        room = self._done.get_nowait()
                    except queue.Empty:
                        break
                    self._finish(room)
                self._take_back()
                self._box.flush()
            except Exception:  # this thread must outlive any one bad message
                log.exception("embedlink: consumer worker %d", self.rank)

    def _handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "open":
            for room, identifier, num_embeds in msg.get("rooms", []):
                self._open(int(room), Item(str(identifier), int(num_embeds)), msg)
        elif op == "close":
            for room in msg.get("rooms", []):
                self._close(int(room))

    def _open(self, room: int, item: Item, msg: dict[str, Any]) -> None:
        if room in self._rcvs:
            return
        pool = self.ep.num_blocks * self.ep.block_size
        try:
            rcv = self.ep.receiver(
                room=room,
                bootstrap=msg.get("bootstrap"),
                dp_group=msg.get("dp_group"),
                tokens=max(1, min(item.num_embeds, pool)),
                on_done=self._ended,
            )
        except Exception as exc:
            self._report(room, f"cannot open the room: {exc}")
            return
        self._rcvs[room] = (rcv, item)

    def _ended(self, room: int) -> None:
        # the endpoint's loop thread: hand over and wake ours, nothing more
        self._done.put(room)
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # closed meanwhile

    def _finish(self, room: int) -> None:
        hit = self._rcvs.get(room)
        if hit is None:
            return
        rcv, item = hit
        try:
            emb = rcv.wait(0)
        except TransferError as exc:
            self._report(room, exc.reason)
            return
        except Exception as exc:
            self._report(room, str(exc))
            return
        rows = int(emb.embedding.shape[0])
        if rows != item.num_embeds:
            rcv.clear()
            self._report(
                room,
                f"the encoder sent {rows} embedding rows for {item.identifier!r}, "
                f"the request has {item.num_embeds} placeholders",
            )
            return
        arr = emb.embedding
        blocks = -(-rows // self.ep.block_size)
        if (
            rcv.in_pool
            and isinstance(arr, np.ndarray)
            and arr.flags.c_contiguous
            and self.lent_blocks + blocks <= self.lend_limit
        ):
            self._lent[room] = blocks
            self.lent_blocks += blocks
            back = self._returns.put
            tensor = self._to_tensor(lend(arr, lambda: back((room, rcv, blocks))))
        else:
            try:
                # a view of the pool must not outlive clear(): copy it first
                tensor = self._to_tensor(np.array(arr) if rcv.in_pool else arr)
            finally:
                rcv.clear()  # the pool's blocks go back at once: the tensor is a copy
        self._ready[room] = tensor
        self.received += 1
        self._box.post(self._scheduler, {"op": "arrived", "room": room, "rank": self.rank})

    def _report(self, room: int, reason: str) -> None:
        self.failed += 1
        self._box.post(
            self._scheduler, {"op": "failed", "room": room, "rank": self.rank, "reason": reason}
        )

    def _close(self, room: int) -> None:
        hit = self._rcvs.pop(room, None)
        if hit is not None and room not in self._lent:
            hit[0].clear()  # aborts it when unfinished
        # a lent item's blocks wait for the engine to let go of its tensor
        self._ready.pop(room, None)

    def _take_back(self) -> None:
        while True:
            try:
                room, rcv, blocks = self._returns.get_nowait()
            except queue.Empty:
                return
            if self._lent.pop(room, None) is not None:
                self.lent_blocks -= blocks
            rcv.clear()


# -- producer (encoder side)


@dataclass
class _PRequest:
    rooms: tuple[int, ...]


class ProducerScheduler:
    """The scheduler-side bookkeeping of a producer: which rooms each
    request's items go to, handed to the workers in the step's metadata."""

    def __init__(self, *, bootstrap: str | None, dp_rank: int) -> None:
        self._bootstrap = bootstrap
        self._dp_rank = dp_rank
        self._reqs: dict[str, _PRequest] = {}
        self._sends: list[tuple[int, str, int]] = []
        self._unavailable: dict[str, str] = {}

    def seen(self, rid: str, params: Mapping[str, Any] | None, items: Sequence[Item]) -> None:
        """A request the engine considers (each step; only the first counts)."""
        if rid in self._reqs or rid in self._unavailable:
            return
        try:
            p = parse_params(params, len(items), assign=True)
        except ParamsError as exc:
            self._unavailable[rid] = str(exc)
            log.warning("embedlink: request %s fails: %s", rid, exc)
            return
        if p is None:
            return
        self._reqs[rid] = _PRequest(p.rooms)
        self._sends.extend(
            (room, it.identifier, it.num_embeds) for room, it in zip(p.rooms, items, strict=True)
        )

    def take_sends(self) -> list[tuple[int, str, int]]:
        sends, self._sends = self._sends, []
        return sends

    def take_unavailable(self) -> dict[str, str]:
        out, self._unavailable = self._unavailable, {}
        return out

    def finished(self, rid: str) -> dict[str, Any] | None:
        """The params to give the consumer's request (the engine returns them
        with this request's response), or None for a request not ours."""
        req = self._reqs.pop(rid, None)
        if req is None:
            return None
        mine: dict[str, Any] = {"rooms": list(req.rooms), "dp_group": self._dp_rank}
        if self._bootstrap is not None:
            mine["bootstrap"] = self._bootstrap
        return {PARAMS_KEY: mine}


class ProducerWorker:
    """The sending rank of a producer. :meth:`plan`, :meth:`offer` and
    :meth:`saved` run on the model runner's thread and only queue work; a
    thread of this worker sends each tensor (waiting for free encoder blocks,
    never the runner; ``shm`` and ``tcp`` read the tensor in place, other
    transports copy it into the pool first). At most
    ``max_pending`` items wait for that thread; past it a room fails at once,
    with the reason, rather than holding the forward pass."""

    def __init__(
        self,
        endpoint: EncoderEndpoint,
        *,
        max_pending: int = 1024,
        to_embedding: Callable[[Any], Embedding] = lambda t: Embedding(embedding=t),
    ) -> None:
        self.ep = endpoint
        self.max_pending = max_pending
        self._to_embedding = to_embedding
        self._pending: dict[str, list[tuple[int, int]]] = {}  # identifier -> [(room, rows)]
        self._work: queue.Queue[tuple[str, int, int, Any] | None] = queue.Queue()
        self._senders: dict[int, Sender] = {}
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.refused = 0
        #: tensors for rooms that had ended before they came
        self.dropped = 0
        self._ended_at: dict[int, float] = {}

    def start(self) -> ProducerWorker:
        self.ep.start()
        self._thread = threading.Thread(
            target=self._serve, name="embedlink-vllm-producer", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._work.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.ep.close()

    def plan(self, sends: Iterable[tuple[int, str, int]]) -> None:
        """Rooms the scheduler assigned this step: ``(room, identifier, rows)``."""
        for room, identifier, rows in sends:
            self._pending.setdefault(identifier, []).append((room, rows))
            if room not in self._senders:
                # sender() never blocks; opening here keeps the work queue
                # to the copies, which is what max_pending bounds
                self._senders[room] = self.ep.sender(room)

    def offer(self, cache: Mapping[str, Any]) -> None:
        """Items already in the engine's cache (encoded in an earlier step)."""
        for identifier in [i for i in self._pending if i in cache]:
            self.saved(cache, identifier)

    def saved(self, cache: Mapping[str, Any], identifier: str) -> None:
        """The engine just put ``identifier`` into its cache."""
        waiting = self._pending.pop(identifier, None)
        if not waiting:
            return
        tensor = cache[identifier]
        for room, rows in waiting:
            self._put(("send", room, rows, tensor))

    def _put(self, job: tuple[str, int, int, Any]) -> None:
        if job[0] == "send" and self._work.qsize() >= self.max_pending:
            self.refused += 1
            self._work.put(("refuse", job[1], job[2], None))
            return
        self._work.put(job)

    def _serve(self) -> None:
        while True:
            try:
                job = self._work.get(timeout=0.5)
            except queue.Empty:
                self._sweep()
                continue
            if job is None or self._closed.is_set():
                return
            try:
                self._do(*job)
            except Exception:  # this thread must outlive any one bad item
                log.exception("embedlink: producer job %s", job[:3])
            if self._work.empty():
                self._sweep()

    def _do(self, op: str, room: int, rows: int, tensor: Any) -> None:
        s = self._senders.get(room)
        if s is None or s.poll().is_terminal:
            # Every room was opened before its tensor came ("open" is queued
            # first); one that is gone ended meanwhile (its receiver aborted,
            # its deadline passed) and was cleared: the tensor is not wanted.
            # A new sender for the id would hold it until its own deadline.
            self.dropped += 1
            return
        if op == "refuse":
            s.abort(f"the producer's backlog of {self.max_pending} items is full")
            return
        have = int(tensor.shape[0])
        if have != rows:
            s.abort(f"the encoder output has {have} rows, the request expects {rows}")
            return
        try:
            # the engine never writes into an encoder output it cached, and
            # the room's reference keeps the tensor alive: lend it in place
            s.send(self._to_embedding(tensor), borrow=True)
            self.sent += 1
        except ValueError as exc:  # a width or dtype mismatch names the field
            s.abort(f"the encoder output does not fit the transfer schema: {exc}")
        except TransferError:
            pass  # the room failed (timed out waiting for blocks); its peer is told

    def _sweep(self) -> None:
        # A room that ended before its receiver asked (refused, or failed
        # here) is kept for a room timeout: cleared at once, the receiver's
        # late request would find no room and wait out its own deadline
        # instead of hearing that it failed.
        now = time.monotonic()
        for room, s in list(self._senders.items()):
            if not s.poll().is_terminal:
                continue
            met = any(st is not Status.Bootstrapping for st, _ in s.history)
            ended = self._ended_at.setdefault(room, now)
            if met or now - ended > self.ep.room_timeout:
                s.clear()
                del self._senders[room]
                self._ended_at.pop(room, None)
