"""Per-room state machines for the sending and the receiving side.

Theory of operation
-------------------
A room is one request's embedding. The encoder side holds a
:class:`SenderRoom`; each language rank that needs the embedding holds a
:class:`ReceiverRoom`. Both are sans-I/O, after h11: *events in, actions out*.
A method call reports something that happened (a message arrived, a write
finished, the clock moved, the user aborted) and returns a list of
:data:`Action` for the caller to carry out **in order** (send a message, write a
chunk, copy a chunk out, free or reserve blocks). "Now" is always passed in as a
number; nothing here reads a clock, touches memory or a socket.

Every input method starts the same way: it names its input (a
:class:`~.inputs.SenderInput` / :class:`~.inputs.ReceiverInput`, from the
room's fields and the input), looks up ``(status, input)`` in the side's input
table (``inputs.py``) and dispatches on the rule's effect. So what an input may
do is decided there, as data; the code here only carries it out. Our own
caller's misuse raises :class:`~.errors.IllegalInput` before anything changes;
the peer's never raises.

Conversation for one destination (default reservation 1024, 2000 tokens)::

    ReceiverRoom                                  SenderRoom
    Bootstrapping --Reserve(1024)-> reserved
    WaitingForInput  -- TransferRequest(blocks, 1024) -->  Bootstrapping -> WaitingForInput
                                                           WriteChunk(tokens 0..1024)
                     <-- StatusUpdate(Transferring, 1024, total=2000) --   -> Transferring
    Harvest(0..1024), FreeBlocks, Reserve(976)
    Transferring     -- Resume(sent_tokens=1024, blocks) -->
                                                           WriteChunk(tokens 1024..2000)
                     <-- StatusUpdate(Success, 2000, total=2000) --------   -> Success
    Harvest(1024..2000), FreeBlocks -> Success                             FreeBlocks(src)

Rules (DESIGN.md section 2), enforced here and in ``status.py``:

* A status never goes backwards; a resume never resets it (it stays
  ``Transferring`` and ``sent_tokens`` tells chunks apart).
* After a chunk is written: ``is_last`` gives ``Success``, else
  ``Transferring``; a failed write gives ``Failed``. With several destinations
  the sending room reports ``Transferring`` once every destination has its
  first chunk and ``Success`` only when every destination has every token.
* A resume is recognised by ``sent_tokens > 0``, never by the status. It must
  equal what was delivered to that destination (else ``Failed``); a resume
  already served is ignored.
* Every non-terminal status has a deadline (``room_timeout`` seconds from the
  last progress; ``bootstrap_timeout``, when given, while still
  ``Bootstrapping``); passing it fails the room.
* Blocks a peer may still be writing are never freed early: a sender frees its
  source blocks only when no write is in flight, and notifies an aborted
  destination only after its in-flight write ends; a receiver that gives up
  keeps its outstanding reservation until the sender acknowledges (any status
  for that epoch) or the peer is declared dead.
* Input carrying another epoch belongs to an older use of the room id and is
  dropped (:class:`Drop`), never applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import IllegalInput, IllegalTransition, InvalidArgument, PlanError
from .inputs import RECEIVER_INPUTS, SENDER_INPUTS, Effect, ReceiverInput, Rule, SenderInput
from .layout import BufferSchema
from .messages import MAX_META_BYTES, Abort, Message, Resume, StatusUpdate, TransferRequest
from .planner import Plan, plan_chunk
from .status import Status, transition
from .types import BlockId, Epoch, RoomId, SessionId

__all__ = [
    "Action",
    "Drop",
    "FreeBlocks",
    "Harvest",
    "ReceiverRoom",
    "Reserve",
    "Send",
    "SenderRoom",
    "StatusChanged",
    "WriteChunk",
    "block_runs",
]


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to ``to`` (a destination session on the sending side;
    ``None`` means "the encoder" on the receiving side)."""

    msg: Message
    to: SessionId | None = None


@dataclass(frozen=True, slots=True)
class WriteChunk:
    """Write ``plan`` into destination ``dst``'s memory, then report back with
    :meth:`SenderRoom.write_done` exactly once."""

    dst: SessionId
    epoch: Epoch
    plan: Plan


@dataclass(frozen=True, slots=True)
class FreeBlocks:
    """Return ``blocks`` to the local pool; nobody will touch them again."""

    blocks: tuple[BlockId, ...]


@dataclass(frozen=True, slots=True)
class Reserve:
    """Reserve up to ``tokens`` tokens of local blocks; report them with
    :meth:`ReceiverRoom.reserved`. When the pool is full, retry later (the room
    keeps its status); a partial grant is fine and leads to another resume."""

    tokens: int


@dataclass(frozen=True, slots=True)
class Harvest:
    """Copy tokens ``[start_token, start_token + count)`` of the embedding out of
    the local pool into the request's own memory. ``runs`` lists
    ``(pool_token, count)`` pieces in order; ``with_aux`` (the room's first
    chunk) when the aux record in the slot of ``aux_block`` belongs to the
    request too. ``blocks`` is the
    reservation the chunk arrived in (freed by the :class:`FreeBlocks` that
    follows)."""

    start_token: int
    count: int
    total_tokens: int
    runs: tuple[tuple[int, int], ...]
    with_aux: bool
    aux_block: BlockId
    blocks: tuple[BlockId, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """The room's status moved (for history, metrics and waking waiters)."""

    old: Status
    new: Status
    sent_tokens: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class Drop:
    """An input was ignored (stale epoch, duplicate, too late); count and log it."""

    reason: str


Action = Send | WriteChunk | FreeBlocks | Reserve | Harvest | StatusChanged | Drop


def block_runs(
    block_size: int, blocks: Sequence[BlockId], count: int
) -> tuple[tuple[int, int], ...]:
    """``(pool_token, n)`` runs holding the first ``count`` tokens of a
    reservation made of ``blocks``, adjacent blocks merged."""
    runs: list[tuple[int, int]] = []
    left = count
    for b in blocks:
        if left <= 0:
            break
        n = min(block_size, left)
        start = b * block_size
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((start, n))
        left -= n
    return tuple(runs)


class _Room:
    """What both sides share: status, reason, deadline, history."""

    def __init__(
        self, room: RoomId, now: float, timeout: float, bootstrap_timeout: float | None = None
    ) -> None:
        self.room = room
        self.status = Status.Bootstrapping
        self.failure_reason: str | None = None
        self.timeout = timeout
        #: how long the room may stay in Bootstrapping (SGLang's bootstrap
        #: timeout); ``None`` means ``timeout``
        self.bootstrap_timeout = bootstrap_timeout
        self.deadline = now + self._window()
        self._history: list[tuple[Status, int]] = [(Status.Bootstrapping, 0)]
        #: ``(status, input kind)`` of the last input taken, as looked up in the
        #: side's input table (not updated by an input refused with
        #: :class:`IllegalInput`); for logs and tests
        self.last_input: tuple[Status, SenderInput | ReceiverInput] | None = None

    @property
    def history(self) -> list[tuple[Status, int]]:
        """``(status, sent_tokens)`` pairs in the order they happened."""
        return list(self._history)

    @property
    def done(self) -> bool:
        return self.status.is_terminal

    def _progress_tokens(self) -> int:
        raise NotImplementedError

    def _look_up(self, rule: Rule, kind: SenderInput | ReceiverInput) -> Rule:
        """Refuse ``kind`` when its rule says so (before anything changes), else
        note it as the last input taken. Every input method starts here."""
        if rule.effect is Effect.RAISE_LOCAL:
            raise IllegalInput(self.status, kind, f"room {self.room}: {rule.why}")
        if rule.effect is Effect.UNREACHABLE:
            # Only our own bookkeeping can get here, so it is our error too.
            raise IllegalInput(self.status, kind, f"room {self.room}: unreachable: {rule.why}")
        self.last_input = (self.status, kind)
        return rule

    def _window(self) -> float:
        """The deadline's distance from the last progress in the current status."""
        if self.status is Status.Bootstrapping and self.bootstrap_timeout is not None:
            return self.bootstrap_timeout
        return self.timeout

    def _move(self, new: Status, now: float, out: list[Action], reason: str | None = None) -> bool:
        """Apply a status move. Returns False (and changes nothing) when the
        table rejects it; the seed's rule is that such updates are ignored."""
        old = self.status
        try:
            self.status = transition(old, new, reason)
        except IllegalTransition as exc:
            out.append(Drop(str(exc)))
            return False
        if new is Status.Failed:
            self.failure_reason = reason
        self.deadline = now + self._window()
        tokens = self._progress_tokens()
        if self.status is not old or self._history[-1] != (self.status, tokens):
            self._history.append((self.status, tokens))
            out.append(StatusChanged(old, self.status, tokens, self.failure_reason))
        return True

    def _timed_out(self, now: float) -> str | None:
        if self.done or now < self.deadline:
            return None
        return f"timed out after {self._window():g}s without progress in {self.status}"


# --------------------------------------------------------------------------- sender


@dataclass
class _Dst:
    epoch: Epoch
    num_blocks: int | None
    blocks: tuple[BlockId, ...] | None  # a reservation not yet written into
    tokens: int
    delivered: int = 0
    in_flight: Plan | None = None
    served: set[int] = field(default_factory=set)
    notify: StatusUpdate | Abort | None = None  # held back while a write is in flight


class SenderRoom(_Room):
    """The encoder's view of one room.

    Inputs: :meth:`request` and :meth:`resume` (from destinations),
    :meth:`data_ready` (the embedding is in the local pool), :meth:`write_done`
    (the transport's verdict on a :class:`WriteChunk`), :meth:`abort`,
    :meth:`peer_abort`, :meth:`peer_dead`, :meth:`tick` (the clock).
    """

    def __init__(
        self,
        room: RoomId,
        *,
        schema: BufferSchema,
        block_size: int,
        now: float,
        timeout: float,
        src_num_blocks: int | None = None,
        bootstrap_timeout: float | None = None,
    ) -> None:
        super().__init__(room, now, timeout, bootstrap_timeout)
        self.schema = schema
        self.block_size = block_size
        self.src_num_blocks = src_num_blocks
        self.required: int | None = None
        self.total_tokens: int | None = None
        self.src_blocks: tuple[BlockId, ...] | None = None
        self.dsts: dict[SessionId, _Dst] = {}
        #: bytes the sender attached to the embedding (the first chunk's
        #: status update carries them to each destination)
        self.meta: bytes | None = None
        self._src_freed = False

    def _progress_tokens(self) -> int:
        return min((d.delivered for d in self.dsts.values()), default=0)

    @property
    def sent_tokens(self) -> int:
        """Tokens every destination holds."""
        return self._progress_tokens()

    @property
    def in_flight(self) -> bool:
        return any(d.in_flight is not None for d in self.dsts.values())

    # -- inputs
    #
    # Each method names its input (a SenderInput, from the room's fields and
    # the input, never from the status), looks up (status, input) in
    # SENDER_INPUTS and dispatches on the rule's effect. What a rule allows is
    # documented there; the comments here say only how it is carried out.

    def _rule(self, kind: SenderInput) -> Rule:
        return self._look_up(SENDER_INPUTS[(self.status, kind)], kind)

    def _request_kind(self, req: TransferRequest) -> SenderInput:
        known = self.dsts.get(req.session)
        if known is not None:
            if known.epoch == req.epoch:
                return SenderInput.REQUEST_DUPLICATE
            return SenderInput.REQUEST_REUSED
        if self.required is not None and req.required_dst_info_num != self.required:
            return SenderInput.REQUEST_MISMATCH
        if self.required is not None and len(self.dsts) >= self.required:
            return SenderInput.REQUEST_SURPLUS
        return SenderInput.REQUEST

    def request(
        self, req: TransferRequest, now: float, *, dst_num_blocks: int | None = None
    ) -> list[Action]:
        """A destination offers its first reservation for this room.

        Never raises: a request the room cannot take is dropped (a duplicate)
        or refused with a ``Failed`` status to that destination only, and the
        room is unchanged."""
        kind = self._request_kind(req)
        rule = self._rule(kind)
        out: list[Action] = []
        if rule.effect is Effect.IGNORE:
            out.append(Drop(f"room {self.room}: duplicate request from {req.session}"))
            return out
        if rule.effect is Effect.REFUSE_REMOTE:
            out.append(self._refuse(req.session, req.epoch, self._refusal(kind, req)))
            return out
        self.required = req.required_dst_info_num
        self.dsts[req.session] = _Dst(
            req.epoch, dst_num_blocks, tuple(req.dst_blocks), req.dst_tokens
        )
        if len(self.dsts) == self.required:
            self._move(Status.WaitingForInput, now, out)
        self._pump(now, out)
        return out

    def _refusal(self, kind: SenderInput, req: TransferRequest) -> str:
        """Why ``req`` is refused (the reason its destination reads)."""
        if kind is SenderInput.REQUEST_REUSED:
            return (
                f"room {self.room} already has a reservation from this "
                f"session (epoch {self.dsts[req.session].epoch}); the id is still in use"
            )
        if self.done:
            return f"room {self.room} already ended {self.status}" + (
                f": {self.failure_reason}" if self.failure_reason else ""
            )
        if kind is SenderInput.REQUEST_MISMATCH:
            return (
                f"required_dst_info_num={req.required_dst_info_num} disagrees "
                f"with {self.required} from the other destinations"
            )
        return f"room {self.room} already has all {self.required} destinations"

    def data_ready(
        self,
        total_tokens: int,
        src_blocks: Sequence[BlockId],
        now: float,
        meta: bytes | None = None,
    ) -> list[Action]:
        """The embedding (``total_tokens`` tokens) now sits in ``src_blocks``;
        ``meta`` (at most :data:`MAX_META_BYTES`) goes with it.

        Called at most once: a second call raises :class:`IllegalInput`; a
        non-positive ``total_tokens`` or too much ``meta`` raises
        :class:`PlanError`. Either leaves the room unchanged and the blocks the
        caller's. After the room ended the blocks go back at once."""
        kind = (
            SenderInput.DATA_READY_AGAIN
            if self.total_tokens is not None
            else SenderInput.DATA_READY
        )
        rule = self._rule(kind)
        if total_tokens <= 0:
            raise PlanError(f"room {self.room}: an embedding needs at least one token")
        if meta is not None and len(meta) > MAX_META_BYTES:
            raise PlanError(f"room {self.room}: {len(meta)} bytes of meta exceed {MAX_META_BYTES}")
        out: list[Action] = []
        self.total_tokens = total_tokens
        self.src_blocks = tuple(src_blocks)
        self.meta = meta
        if rule.effect is Effect.IGNORE:
            self._free_src(out)
            return out
        self.deadline = now + self._window()
        self._pump(now, out)
        return out

    def _resume_kind(self, msg: Resume) -> SenderInput:
        d = self.dsts.get(msg.session)
        if d is None or d.epoch != msg.epoch:
            return SenderInput.RESUME_STALE
        if msg.sent_tokens in d.served:
            return SenderInput.RESUME_DUPLICATE
        # sent_tokens < 1 never decodes; a resume is recognised by sent_tokens > 0
        if d.in_flight is not None or msg.sent_tokens != d.delivered or msg.sent_tokens < 1:
            return SenderInput.RESUME_MISMATCH
        if self.total_tokens is not None and d.delivered >= self.total_tokens:
            return SenderInput.RESUME_EXHAUSTED
        return SenderInput.RESUME

    def resume(self, msg: Resume, now: float) -> list[Action]:
        """A destination holds ``msg.sent_tokens`` and offers fresh blocks.

        Never raises. A resume that does not match what was delivered to that
        destination fails the room (a protocol error); stale, repeated or
        late ones are dropped."""
        kind = self._resume_kind(msg)
        rule = self._rule(kind)
        out: list[Action] = []
        if rule.effect is Effect.IGNORE:
            if kind is SenderInput.RESUME_STALE:
                why = "resume for an unknown destination or old epoch"
            elif self.done:
                why = f"resume after the room ended {self.status}"
            elif kind is SenderInput.RESUME_DUPLICATE:
                why = f"duplicate resume at sent_tokens={msg.sent_tokens}"
            else:
                why = "resume with nothing left to send"
            out.append(Drop(f"room {self.room}: {why}"))
            return out
        d = self.dsts[msg.session]
        if rule.effect is Effect.REFUSE_REMOTE:
            self._fail(
                f"protocol error: resume at sent_tokens={msg.sent_tokens} but "
                f"{d.delivered} tokens were delivered to {msg.session}",
                now,
                out,
            )
            return out
        d.served.add(msg.sent_tokens)
        d.blocks = tuple(msg.dst_blocks)
        d.tokens = msg.dst_tokens
        self.deadline = now + self._window()
        self._pump(now, out)
        return out

    def write_done(
        self, dst: SessionId, ok: bool, now: float, reason: str | None = None
    ) -> list[Action]:
        """The transport finished the :class:`WriteChunk` for ``dst``.

        Report each write exactly once. A report for no write in flight (one
        :meth:`peer_dead` wrote off) is dropped."""
        d = self.dsts.get(dst)
        if d is None or d.in_flight is None:
            kind = SenderInput.WRITE_NONE
        else:
            kind = SenderInput.WRITE_OK if ok else SenderInput.WRITE_FAILED
        rule = self._rule(kind)
        out: list[Action] = []
        if d is None or d.in_flight is None:
            out.append(Drop(f"room {self.room}: completion for no write in flight to {dst}"))
            return out
        total = self.total_tokens
        if total is None:  # a write is only ever planned from the data
            raise IllegalInput(self.status, kind, f"room {self.room}: a write without data")
        plan, d.in_flight = d.in_flight, None
        if rule.effect is Effect.IGNORE:  # aborted or timed out meanwhile: now the blocks are quiet
            self._flush_notify(dst, d, out)
            self._free_src_if_quiet(out)
            return out
        if kind is SenderInput.WRITE_FAILED:
            self._fail(f"write to {dst} failed: {reason or 'unknown error'}", now, out)
            return out
        d.delivered = plan.end_token
        if all(x.delivered > 0 for x in self.dsts.values()):
            complete = all(x.delivered == total for x in self.dsts.values())
            self._move(Status.Success if complete else Status.Transferring, now, out)
        else:
            self.deadline = now + self._window()
        dst_status = Status.Success if plan.is_last else Status.Transferring
        out.append(
            Send(
                StatusUpdate(
                    room=self.room,
                    epoch=d.epoch,
                    status=dst_status,
                    sent_tokens=d.delivered,
                    total_tokens=total,
                    # with the first chunk, which every destination gets
                    meta=self.meta if plan.start_token == 0 else None,
                ),
                dst,
            )
        )
        if self.status is Status.Success:
            self._free_src_if_quiet(out)
        return out

    def abort(self, now: float, reason: str = "aborted by sender") -> list[Action]:
        """The local user gives up on the room; destinations are told.

        May be called any time; after the room ended it returns no actions
        (endpoints read that as "it had ended already")."""
        rule = self._rule(SenderInput.ABORT)
        out: list[Action] = []
        if rule.effect is Effect.HANDLE:
            self._fail(reason, now, out, notify=Abort)
        return out

    def _peer_abort_kind(self, msg: Abort) -> SenderInput:
        d = self.dsts.get(msg.session)
        if d is None:
            missing = self.required is None or len(self.dsts) < self.required
            return SenderInput.PEER_ABORT_EARLY if missing else SenderInput.PEER_ABORT_STRANGER
        if d.epoch != msg.epoch:
            return SenderInput.PEER_ABORT_STALE
        return SenderInput.PEER_ABORT

    def peer_abort(self, msg: Abort, now: float) -> list[Action]:
        """A destination gave up; the room fails and the others are told.

        A destination that gave up before its request arrived is not among
        ``dsts`` yet; its abort still fails the room while destinations are
        missing (nobody else could complete it). Never raises."""
        kind = self._peer_abort_kind(msg)
        rule = self._rule(kind)
        out: list[Action] = []
        if kind in (SenderInput.PEER_ABORT_EARLY, SenderInput.PEER_ABORT_STRANGER):
            if rule.effect is Effect.HANDLE:
                self._fail(f"aborted by peer: {msg.reason}", now, out)
            # Its request never reached us, so nothing of ours is in flight to
            # it: acknowledge, or it keeps the blocks it offered until this
            # room is collected (its abort may be a repeat, the first answer lost).
            out.append(
                Send(
                    StatusUpdate(
                        room=self.room,
                        epoch=msg.epoch,
                        status=Status.Failed,
                        sent_tokens=0,
                        total_tokens=0,
                        reason=self.failure_reason or f"aborted by peer: {msg.reason}",
                    ),
                    msg.session,
                )
            )
            return out
        if kind is SenderInput.PEER_ABORT_STALE:
            out.append(Drop(f"room {self.room}: abort for an old epoch"))
            return out
        d = self.dsts[msg.session]
        if rule.effect is Effect.HANDLE:
            self._fail(f"aborted by peer: {msg.reason}", now, out)
        elif d.in_flight is None:
            # Already ended: still acknowledge, so the destination can free its blocks.
            out.append(Send(self._status_for(d), msg.session))
        return out

    def peer_dead(self, session: SessionId, now: float, reason: str) -> list[Action]:
        """Destination ``session`` is gone; any write to it will never finish.

        Never raises; a session that is not a destination changes nothing."""
        d = self.dsts.get(session)
        rule = self._rule(SenderInput.PEER_DEAD_OTHER if d is None else SenderInput.PEER_DEAD)
        out: list[Action] = []
        if d is None:
            return out
        if d.in_flight is not None:
            d.in_flight = None  # the transport reports the failure too; nothing lands anymore
        d.notify = None
        if rule.effect is Effect.HANDLE:
            self._fail(f"destination {session} lost: {reason}", now, out, skip=session)
        self._free_src_if_quiet(out)
        return out

    def tick(self, now: float) -> list[Action]:
        """The clock moved; fail the room when its deadline has passed."""
        expired = now >= self.deadline
        rule = self._rule(SenderInput.TICK_EXPIRED if expired else SenderInput.TICK)
        out: list[Action] = []
        why = self._timed_out(now)
        if rule.effect is Effect.HANDLE and why is not None:
            self._fail(why, now, out)
        return out

    # -- internals

    def _refuse(self, session: SessionId, epoch: Epoch, reason: str) -> Send:
        return Send(
            StatusUpdate(
                room=self.room,
                epoch=epoch,
                status=Status.Failed,
                sent_tokens=0,
                total_tokens=0,
                reason=reason,
            ),
            session,
        )

    def _status_for(self, d: _Dst) -> StatusUpdate:
        total = self.total_tokens or 0
        if self.status is Status.Failed:
            return StatusUpdate(
                room=self.room,
                epoch=d.epoch,
                status=Status.Failed,
                sent_tokens=d.delivered,
                total_tokens=max(total, d.delivered),
                reason=self.failure_reason or "failed",
            )
        return StatusUpdate(
            room=self.room,
            epoch=d.epoch,
            status=Status.Success if d.delivered == total else Status.Transferring,
            sent_tokens=d.delivered,
            total_tokens=total,
        )

    def _pump(self, now: float, out: list[Action]) -> None:
        if self.status not in (Status.WaitingForInput, Status.Transferring):
            return
        if self.total_tokens is None or self.src_blocks is None:
            return
        for session, d in self.dsts.items():
            if d.blocks is None or d.in_flight is not None or d.delivered >= self.total_tokens:
                continue
            try:
                plan = plan_chunk(
                    schema=self.schema,
                    block_size=self.block_size,
                    total_tokens=self.total_tokens,
                    sent_tokens=d.delivered,
                    src_blocks=self.src_blocks,
                    dst_blocks=d.blocks,
                    dst_tokens=min(d.tokens, len(d.blocks) * self.block_size),
                    src_num_blocks=self.src_num_blocks,
                    dst_num_blocks=d.num_blocks,
                )
            except PlanError as exc:
                self._fail(f"bad reservation from {session}: {exc}", now, out)
                return
            d.blocks = None
            d.in_flight = plan
            out.append(WriteChunk(session, d.epoch, plan))

    def _fail(
        self,
        reason: str,
        now: float,
        out: list[Action],
        *,
        notify: type[Abort] | type[StatusUpdate] = StatusUpdate,
        skip: SessionId | None = None,
    ) -> None:
        if not self._move(Status.Failed, now, out, reason):
            return
        for session, d in self.dsts.items():
            if session == skip:
                continue
            if notify is Abort:
                d.notify = Abort(session=session, room=self.room, epoch=d.epoch, reason=reason)
            else:
                d.notify = self._status_for(d)
            if d.in_flight is None:
                self._flush_notify(session, d, out)
        self._free_src_if_quiet(out)

    def _flush_notify(self, session: SessionId, d: _Dst, out: list[Action]) -> None:
        if d.notify is not None:
            out.append(Send(d.notify, session))
            d.notify = None

    def _free_src_if_quiet(self, out: list[Action]) -> None:
        if not self.in_flight:
            self._free_src(out)

    def _free_src(self, out: list[Action]) -> None:
        if self.src_blocks is not None and not self._src_freed:
            self._src_freed = True
            out.append(FreeBlocks(self.src_blocks))

    @property
    def src_freed(self) -> bool:
        """True once the source blocks went back (or there never were any)."""
        return self._src_freed or self.src_blocks is None


# --------------------------------------------------------------------------- receiver


class ReceiverRoom(_Room):
    """One language rank's view of one room.

    Call :meth:`start` once, then feed :meth:`reserved` (blocks for a
    :class:`Reserve`), :meth:`status_update` and :meth:`peer_abort` (from the
    encoder), :meth:`abort`, :meth:`peer_dead` and :meth:`tick`.
    """

    def __init__(
        self,
        room: RoomId,
        *,
        session: SessionId,
        epoch: Epoch,
        block_size: int,
        now: float,
        timeout: float,
        default_tokens: int,
        required_dst_info_num: int = 1,
        bootstrap_timeout: float | None = None,
    ) -> None:
        super().__init__(room, now, timeout, bootstrap_timeout)
        if default_tokens <= 0:
            raise InvalidArgument(f"default_tokens must be positive, got {default_tokens}")
        self.session = session
        self.epoch = epoch
        self.block_size = block_size
        self.default_tokens = default_tokens
        self.required = required_dst_info_num
        self.total_tokens: int | None = None
        self.delivered = 0
        #: The reservation the sender may write into (or has been offered).
        self.blocks: tuple[BlockId, ...] | None = None
        self.tokens = 0
        self._offered = False  # the current blocks were sent to the encoder
        self._requested = False  # the encoder knows this room (a request went out)
        self._want: int | None = None  # a Reserve is outstanding
        self._aux_block: BlockId | None = None
        #: what the sender attached to the embedding (with its first chunk)
        self.meta: bytes | None = None

    def _progress_tokens(self) -> int:
        return self.delivered

    @property
    def sent_tokens(self) -> int:
        return self.delivered

    @property
    def waiting_for_blocks(self) -> int | None:
        """Tokens asked for by an outstanding :class:`Reserve`, if any."""
        return self._want

    @property
    def holds_blocks(self) -> bool:
        return self.blocks is not None

    # -- inputs
    #
    # As on the sending side: name the input (a ReceiverInput), look up
    # (status, input) in RECEIVER_INPUTS, dispatch on the rule's effect.

    def _rule(self, kind: ReceiverInput) -> Rule:
        return self._look_up(RECEIVER_INPUTS[(self.status, kind)], kind)

    def start(self, now: float, required_dst_info_num: int | None = None) -> list[Action]:
        """Ask for the first reservation (``default_tokens``). ``required_dst_info_num``,
        when given, replaces the constructor's (it may be known only once the
        encoder has been looked up); below 1 it raises :class:`InvalidArgument`.

        Called once, or again while its :class:`Reserve` is outstanding (which
        asks again). Once the reservation was granted it raises
        :class:`IllegalInput`; after the room ended it returns no actions."""
        if required_dst_info_num is not None and required_dst_info_num < 1:
            raise InvalidArgument(
                f"required_dst_info_num must be at least 1, got {required_dst_info_num}"
            )
        rule = self._rule(ReceiverInput.START)
        if required_dst_info_num is not None:
            self.required = required_dst_info_num
        if rule.effect is Effect.IGNORE:
            return []
        self._want = self.default_tokens
        return [Reserve(self.default_tokens)]

    def reserved(self, blocks: Sequence[BlockId], tokens: int, now: float) -> list[Action]:
        """The pool granted ``blocks`` holding up to ``tokens`` tokens, for the
        outstanding :class:`Reserve`.

        With no :class:`Reserve` outstanding it raises :class:`IllegalInput`
        and :class:`PlanError` when ``tokens`` do not fit the blocks (the blocks
        stay the caller's, the room unchanged). After the room ended the blocks
        go back (:class:`FreeBlocks`): the grant raced an abort."""
        blocks = tuple(blocks)
        unasked = self._want is None or self.blocks is not None
        rule = self._rule(ReceiverInput.RESERVED_UNASKED if unasked else ReceiverInput.RESERVED)
        out: list[Action] = []
        if rule.effect is Effect.IGNORE:
            out.append(FreeBlocks(blocks))
            return out
        if not 0 < tokens <= len(blocks) * self.block_size:
            raise PlanError(f"{tokens} tokens do not fit in {len(blocks)} blocks")
        self._want = None
        self.blocks, self.tokens, self._offered = blocks, tokens, True
        if self.delivered == 0:
            self._aux_block = blocks[0]
            self._requested = True
            out.append(
                Send(
                    TransferRequest(
                        session=self.session,
                        room=self.room,
                        epoch=self.epoch,
                        dst_blocks=list(blocks),
                        dst_tokens=tokens,
                        required_dst_info_num=self.required,
                    )
                )
            )
            self._move(Status.WaitingForInput, now, out)
        else:
            out.append(
                Send(
                    Resume(
                        session=self.session,
                        room=self.room,
                        epoch=self.epoch,
                        sent_tokens=self.delivered,
                        dst_blocks=list(blocks),
                        dst_tokens=tokens,
                    )
                )
            )
            self.deadline = now + self._window()
        return out

    def _status_kind(self, msg: StatusUpdate) -> tuple[ReceiverInput, str | None]:
        """The input kind of ``msg`` and, for :attr:`ReceiverInput.CHUNK_BAD`,
        what is wrong with the chunk."""
        if msg.epoch != self.epoch:
            return ReceiverInput.STATUS_STALE, None
        if msg.status is Status.Failed:
            return ReceiverInput.STATUS_FAILED, None
        if msg.status not in (Status.Transferring, Status.Success):
            return ReceiverInput.STATUS_BOGUS, None
        if msg.sent_tokens <= self.delivered:
            return ReceiverInput.STATUS_OLD, None
        problem = self._check_chunk(msg)
        if problem is not None:
            return ReceiverInput.CHUNK_BAD, problem
        if msg.status is Status.Success:
            return ReceiverInput.CHUNK_LAST, None
        return ReceiverInput.CHUNK_PARTIAL, None

    def status_update(self, msg: StatusUpdate, now: float) -> list[Action]:
        """The encoder reports on this room (after each chunk, or a failure).

        Never raises: a report that cannot be right fails the room and tells
        the encoder; stale and old ones are dropped."""
        kind, problem = self._status_kind(msg)
        rule = self._rule(kind)
        out: list[Action] = []
        if kind is ReceiverInput.STATUS_STALE:
            out.append(
                Drop(f"room {self.room}: status for epoch {msg.epoch}, expected {self.epoch}")
            )
            return out
        if rule.effect is Effect.IGNORE and self.done:
            # Any status for our epoch means no write is in flight any more.
            out.append(Drop(f"room {self.room}: status {msg.status} after the room ended"))
            self._release(out)
            return out
        if kind is ReceiverInput.STATUS_FAILED:
            self._release(out)
            self._move(Status.Failed, now, out, msg.reason or "failed by sender")
            return out
        if kind is ReceiverInput.STATUS_BOGUS:
            out.append(Drop(f"room {self.room}: unexpected status {msg.status} from the encoder"))
            return out
        if kind is ReceiverInput.STATUS_OLD:
            out.append(Drop(f"room {self.room}: old status at sent_tokens={msg.sent_tokens}"))
            return out
        if kind is ReceiverInput.CHUNK_BAD:
            self._release(out)
            self._move(Status.Failed, now, out, f"protocol error: {problem}")
            out.append(
                Send(
                    Abort(
                        session=self.session,
                        room=self.room,
                        epoch=self.epoch,
                        reason=f"protocol error: {problem}",
                    )
                )
            )
            return out
        blocks = self.blocks
        if blocks is None:  # _check_chunk refused a chunk with no reservation
            raise IllegalInput(self.status, kind, f"room {self.room}: a chunk without blocks")
        count = msg.sent_tokens - self.delivered
        first = self.delivered == 0
        self.total_tokens = msg.total_tokens
        if first and msg.meta is not None:
            self.meta = msg.meta
        out.append(
            Harvest(
                start_token=self.delivered,
                count=count,
                total_tokens=msg.total_tokens,
                runs=block_runs(self.block_size, blocks, count),
                with_aux=first,
                aux_block=self._aux_block if self._aux_block is not None else blocks[0],
                blocks=blocks,
            )
        )
        self._release(out)
        self.delivered = msg.sent_tokens
        if kind is ReceiverInput.CHUNK_LAST:
            self._move(Status.Success, now, out)
        else:
            self._move(Status.Transferring, now, out)
            self._want = msg.total_tokens - self.delivered
            out.append(Reserve(self._want))
        return out

    def peer_abort(self, msg: Abort, now: float) -> list[Action]:
        """The encoder abandoned the room (it has nothing in flight to us).
        Never raises."""
        stale = msg.epoch != self.epoch
        rule = self._rule(ReceiverInput.PEER_ABORT_STALE if stale else ReceiverInput.PEER_ABORT)
        out: list[Action] = []
        if stale:
            out.append(
                Drop(f"room {self.room}: abort for epoch {msg.epoch}, expected {self.epoch}")
            )
            return out
        self._release(out)
        if rule.effect is Effect.HANDLE:
            self._move(Status.Failed, now, out, f"aborted by peer: {msg.reason}")
        return out

    def abort(self, now: float, reason: str = "aborted by receiver") -> list[Action]:
        """Give up. The encoder is told; an outstanding reservation is kept
        until the encoder acknowledges, because a write may still be landing.
        May be called any time; after the room ended it returns no actions."""
        rule = self._rule(ReceiverInput.ABORT)
        out: list[Action] = []
        if rule.effect is Effect.HANDLE:
            self._give_up(reason, now, out)
        return out

    def peer_dead(self, now: float, reason: str) -> list[Action]:
        """The encoder is gone and nothing more will land in our blocks:
        :meth:`peer_lost` and :meth:`settled` at once. Never raises."""
        rule = self._rule(ReceiverInput.PEER_DEAD)
        out: list[Action] = []
        self._lose(rule, now, reason, out)
        self._release(out)
        return out

    def peer_lost(self, now: float, reason: str) -> list[Action]:
        """The encoder is gone (declared dead), but a write of its may still be
        on its way: the room fails now, and blocks already offered to the
        encoder are kept until :meth:`settled`. Never raises."""
        rule = self._rule(ReceiverInput.PEER_LOST)
        out: list[Action] = []
        self._lose(rule, now, reason, out)
        return out

    def _lose(self, rule: Rule, now: float, reason: str, out: list[Action]) -> None:
        self._want = None
        if rule.effect is Effect.HANDLE:
            self._move(Status.Failed, now, out, f"encoder lost: {reason}")
        if not self._offered:
            self._release(out)

    def settled(self) -> list[Action]:
        """Nothing the encoder wrote can land any more (its data-plane link
        was fenced, or its grace period passed): offered blocks come back.

        Only after :meth:`peer_lost` (or once the room ended otherwise): on a
        live room it raises :class:`IllegalInput`, since the encoder may still
        write into the blocks it was offered."""
        self._rule(ReceiverInput.SETTLED)
        out: list[Action] = []
        self._release(out)
        return out

    def tick(self, now: float) -> list[Action]:
        """The clock moved; give up when the deadline has passed."""
        expired = now >= self.deadline
        rule = self._rule(ReceiverInput.TICK_EXPIRED if expired else ReceiverInput.TICK)
        out: list[Action] = []
        why = self._timed_out(now)
        if rule.effect is Effect.HANDLE and why is not None:
            self._give_up(why, now, out)
        return out

    # -- internals

    def _give_up(self, reason: str, now: float, out: list[Action]) -> None:
        self._want = None
        self._move(Status.Failed, now, out, reason)
        # Tell the encoder even when no request went out yet, so it does not keep
        # the embedding for a receiver that is gone. It acknowledges with a status
        # for this epoch once nothing of ours is in flight; only then are offered
        # blocks released.
        out.append(
            Send(Abort(session=self.session, room=self.room, epoch=self.epoch, reason=reason))
        )
        if not self._offered:
            self._release(out)

    def _release(self, out: list[Action]) -> None:
        if self.blocks is not None:
            out.append(FreeBlocks(self.blocks))
            self.blocks = None
            self._offered = False

    def _check_chunk(self, msg: StatusUpdate) -> str | None:
        if self.blocks is None:
            return (
                f"a chunk reported at sent_tokens={msg.sent_tokens} with no reservation outstanding"
            )
        if self.total_tokens is not None and msg.total_tokens != self.total_tokens:
            return f"total_tokens changed from {self.total_tokens} to {msg.total_tokens}"
        if msg.sent_tokens - self.delivered > self.tokens:
            return (
                f"sent_tokens={msg.sent_tokens} overruns the reservation of {self.tokens} "
                f"tokens after {self.delivered}"
            )
        last = msg.sent_tokens == msg.total_tokens
        if last != (msg.status is Status.Success):
            return (
                f"status {msg.status} disagrees with "
                f"sent_tokens={msg.sent_tokens}/{msg.total_tokens}"
            )
        return None
