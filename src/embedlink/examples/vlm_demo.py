"""``embedlink demo --model``: a real vision-language model split across
processes by embedlink, checked bitwise against the same model in one process.

Three processes, each with the same number of torch threads:

* **encoder**: the model's processor and vision tower
  (:meth:`TinyVL.encode <embedlink.examples.qwen_vl.TinyVL.encode>`); sends each
  request's embedding rows, ``token_ids``, ``mrope_positions`` and (aux record)
  ``mrope_position_delta``, plus ``deepstack`` for Qwen3-VL, through a real
  :class:`~embedlink.EncoderEndpoint`;
* **language**: a real :class:`~embedlink.LanguageEndpoint` with a small
  default reservation (256 tokens), so a large image's room resumes; it opens
  ``window`` receivers at once (several rooms in flight), then runs prefill
  and greedy decoding for each request from what arrived, one request at a
  time;
* **monolithic**: the whole model on the same prompts and images.

The orchestrating process (the CLI, or a test) starts them, hands the same
requests (prompt and PNG images) to the encoder and the monolithic process,
runs one bootstrap server per (model, dtype) case, and compares the two
answers: the same tokens, and the raw bytes of every forward pass's logits
(the prefill's for every prompt position, then each decode step's). It
imports neither torch nor transformers itself.

Each request's prefill runs alone, with the same shapes both ways: bitwise
equality is a property of identical computation, and batching requests
together differently on the two sides would change it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..protocol import Status
from . import MODELS, PERTURBATIONS
from .images import ImageSpec, draw, from_png, to_png

__all__ = [
    "DEFAULT_REQUESTS",
    "PERTURBATIONS",
    "CaseResult",
    "DemoResult",
    "Request",
    "RequestResult",
    "make_requests",
    "run",
]

#: The demo's requests, cycled through: images of several sizes and aspect
#: ratios, in image tokens (so both models get the same counts), with a text.
#: With the demo's 256-token default reservation, requests 3, 5 and 7 resume.
DEFAULT_REQUESTS: tuple[tuple[tuple[ImageSpec, ...], str], ...] = (
    ((ImageSpec(8, 8),), "describe this image"),
    ((ImageSpec(16, 6),), "what is in the picture"),
    ((ImageSpec(5, 15),), "count the shapes"),
    ((ImageSpec(18, 15),), "describe the colours"),
    ((ImageSpec(10, 10), ImageSpec(7, 14)), "compare these two images"),
    ((ImageSpec(24, 16),), "tell me about it"),
    ((ImageSpec(2, 2),), "what is in this image"),
    ((ImageSpec(32, 24),), "describe the shapes and lines"),
)

_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class Request:
    """One prompt with its images, as the encoder and the monolithic process
    both receive it. ``sizes``: each image's ``(width, height)`` in pixels."""

    room: int
    prompt: str
    images: tuple[bytes, ...]
    sizes: tuple[tuple[int, int], ...]


def make_requests(
    model: str,
    count: int | None = None,
    *,
    seed: int = 0,
    specs: Sequence[tuple[Sequence[ImageSpec], str]] = DEFAULT_REQUESTS,
) -> list[Request]:
    """``count`` requests (default: one per spec) for ``model``, cycling
    through ``specs``; request ``i`` is room ``i`` and its images are drawn
    from ``(seed, i)``, so a repeated spec is a new picture."""
    ppt = MODELS[model].pixels_per_token
    out = []
    for i in range(len(specs) if count is None else count):
        images, text = specs[i % len(specs)]
        sizes = tuple(s.pixels(ppt) for s in images)
        prompt = (
            "<|im_start|> user "
            + " ".join(_IMAGE for _ in images)
            + f" {text} <|im_end|> <|im_start|> assistant"
        )
        pngs = tuple(to_png(draw(w, h, seed, i, k)) for k, (w, h) in enumerate(sizes))
        out.append(Request(i, prompt, pngs, sizes))
    return out


# --- the three processes ---------------------------------------------------


def _init_process(cfg: dict[str, Any]) -> Any:
    """torch with the demo's thread count, set explicitly and the same in
    every process: how a matrix product is split among threads may change
    the order of its sums, so no process is left to its own default. (At
    these sizes, 1 and 2 threads happened to give the same bytes here.)"""
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    return torch


def _endpoint_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(
        block_size=int(cfg["block_size"]),
        transports=(str(cfg["transport"]),),
        room_timeout=float(cfg["room_timeout"]),
    )


def _versions(torch: Any) -> dict[str, Any]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def encoder_process(cfg: dict[str, Any], cmds: Any, events: Any) -> None:
    """The encoder: obey ``cmds`` until ``("stop",)``, reporting on ``events``.

    ``("open", case, bootstrap)`` builds the case's model (vision half) and an
    endpoint registered there, then reports ``("ready", case, address,
    fingerprint)``; ``("encode", case, requests, perturb)`` encodes and sends
    each request (``("sent", case, room, info)`` each, then ``("encoded",
    case)``); ``("close", case)`` waits for every room to end, closes the
    endpoint and reports ``("closed", case, {room: (status, reason)})``.
    """
    try:
        torch = _init_process(cfg)
        from ..endpoints.encoder import EncoderEndpoint
        from .qwen_vl import TinyVL, perturb

        events.put(("up", "encoder", _versions(torch)))
        models: dict[tuple[str, str], TinyVL] = {}
        ep: Any = None
        senders: dict[int, Any] = {}
        while True:
            cmd = cmds.get()
            if cmd[0] == "stop":
                break
            case = cmd[1]
            if cmd[0] == "open":
                m = models.get(case) or TinyVL(case[0], case[1], "encoder", int(cfg["seed"]))
                models[case] = m
                ep = EncoderEndpoint(
                    m.schema(),
                    bootstrap=cmd[2],
                    num_blocks=int(cfg["encoder_blocks"]),
                    **_endpoint_kwargs(cfg),
                ).start()
                events.put(("ready", case, ep.address, m.fingerprint()))
            elif cmd[0] == "encode":
                m = models[case]
                for req, kind in zip(cmd[2], cmd[3], strict=True):
                    enc = m.encode(req.prompt, [from_png(p) for p in req.images])
                    if kind is not None:
                        perturb(enc.embedding, kind, m.image_token_id)
                    tx = ep.sender(req.room)
                    senders[req.room] = tx
                    tx.send(enc.embedding, timeout=float(cfg["room_timeout"]))
                    info = {
                        "prompt_tokens": enc.prompt_tokens,
                        "image_tokens": enc.image_tokens,
                        "resized": enc.resized,
                        "vision_seconds": enc.vision_seconds,
                    }
                    events.put(("sent", case, req.room, info))
                events.put(("encoded", case))
            elif cmd[0] == "close":
                deadline = time.monotonic() + float(cfg["room_timeout"])
                statuses = {}
                for room, tx in senders.items():
                    st = tx.wait(max(0.0, deadline - time.monotonic()))
                    statuses[room] = (int(st), tx.failure_reason)
                    tx.clear()
                senders.clear()
                ep.close()
                ep = None
                events.put(("closed", case, statuses))
    except Exception:
        events.put(("crashed", "encoder", traceback.format_exc()))


def language_process(cfg: dict[str, Any], cmds: Any, events: Any) -> None:
    """The language side: obey ``cmds`` until ``("stop",)``.

    ``("receive", case, bootstrap, rooms)`` builds the case's model (language
    half) and an endpoint with ``cfg["default_tokens"]`` per first
    reservation, keeps ``cfg["window"]`` receivers open at once and, for each
    room in order, waits for it and generates from what arrived, reporting
    ``("generated", case, room, history, generation)``; then ``("received",
    case, fingerprint, pool_usage)``.
    """
    try:
        torch = _init_process(cfg)
        from ..endpoints.language import LanguageEndpoint
        from ..protocol import TransferError
        from .qwen_vl import TinyVL

        events.put(("up", "language", _versions(torch)))
        models: dict[tuple[str, str], TinyVL] = {}
        while True:
            cmd = cmds.get()
            if cmd[0] == "stop":
                break
            _, case, bootstrap, rooms = cmd
            m = models.get(case) or TinyVL(case[0], case[1], "language", int(cfg["seed"]))
            models[case] = m
            with LanguageEndpoint(
                m.schema(),
                num_blocks=int(cfg["language_blocks"]),
                default_tokens=int(cfg["default_tokens"]),
                **_endpoint_kwargs(cfg),
            ) as ep:
                window = max(1, int(cfg["window"]))
                todo = list(rooms)
                open_rx: list[Any] = []
                while todo or open_rx:
                    while todo and len(open_rx) < window:
                        open_rx.append(ep.receiver(bootstrap=bootstrap, room=todo.pop(0)))
                    rx = open_rx.pop(0)
                    try:
                        emb = rx.wait(timeout=float(cfg["room_timeout"]))
                    except (TransferError, TimeoutError) as exc:
                        history = [(int(s), t) for s, t in rx.history]
                        events.put(("generated", case, rx.room, history, f"{exc}"))
                        rx.clear()
                        continue
                    history = [(int(s), t) for s, t in rx.history]
                    rx.clear()
                    gen = m.generate_from_arrived(emb, int(cfg["new_tokens"]))
                    events.put(("generated", case, rx.room, history, gen))
                # blocks of writes the encoder has not acknowledged yet come back shortly
                ep.allocator.wait_all_free(10.0)
                events.put(("received", case, m.fingerprint(), ep.pool_usage()))
    except Exception:
        events.put(("crashed", "language", traceback.format_exc()))


def monolithic_process(cfg: dict[str, Any], cmds: Any, events: Any) -> None:
    """The reference: ``("run", case, requests)`` runs each request through
    the whole model (and through ``generate()`` when
    ``cfg["check_generate"]``), reporting ``("reference", case, room,
    generation, generate_tokens)`` each, then ``("ran", case, fingerprint)``."""
    try:
        torch = _init_process(cfg)
        from .qwen_vl import TinyVL

        events.put(("up", "monolithic", _versions(torch)))
        while True:
            cmd = cmds.get()
            if cmd[0] == "stop":
                break
            _, case, requests = cmd
            m = TinyVL(case[0], case[1], "whole", int(cfg["seed"]))
            n = int(cfg["new_tokens"])
            for req in requests:
                images = [from_png(p) for p in req.images]
                gen = m.generate_monolithic(req.prompt, images, n)
                hf = m.hf_generate(req.prompt, images, n) if cfg["check_generate"] else None
                events.put(("reference", case, req.room, gen, hf))
            events.put(("ran", case, m.fingerprint()))
    except Exception:
        events.put(("crashed", "monolithic", traceback.format_exc()))


# --- results ------------------------------------------------------------------


@dataclass
class RequestResult:
    """One request of one case, both ways."""

    room: int
    sizes: tuple[tuple[int, int], ...]
    resized: list[tuple[int, int]]
    image_tokens: list[int]
    prompt_tokens: int
    #: the receiver's ``(status, sent_tokens)`` history
    history: list[tuple[int, int]]
    perturbed: str | None
    disaggregated: list[int]
    monolithic: list[int]
    #: tokens of transformers' own ``generate()`` (None when not run)
    hf_generate: list[int] | None
    #: the prefill's logits, ``[prompt_tokens, vocab]``, bitwise equal
    prefill_equal: bool
    #: how many decode steps' logits are bitwise equal, of ``decode_steps``
    decode_equal: int
    decode_steps: int
    #: the largest absolute difference over all logits (0.0 when identical)
    max_abs_diff: float
    failure: str | None = None

    @property
    def resumed(self) -> bool:
        """The room resumed: a chunk arrived with more to come."""
        return any(s == Status.Transferring for s, _ in self.history)

    @property
    def resumed_at(self) -> list[int]:
        return [t for s, t in self.history if s == Status.Transferring]

    @property
    def identical(self) -> bool:
        """Same tokens and every logit bitwise equal."""
        return (
            self.failure is None
            and self.disaggregated == self.monolithic
            and self.prefill_equal
            and self.decode_equal == self.decode_steps
        )


@dataclass
class CaseResult:
    model: str
    dtype: str
    requests: list[RequestResult]
    seconds: float
    #: weight fingerprints: {"encoder"|"language"|"monolithic": {half: sha}}
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)
    #: the encoder's final status per room
    encoder_statuses: dict[int, tuple[int, str | None]] = field(default_factory=dict)
    #: language pool blocks (used, total) after the case
    language_pool: tuple[int, int] = (0, 0)

    @property
    def weights_match(self) -> bool:
        """Each half's weights are the same bytes on the side that uses it
        as in the monolithic process."""
        fp = self.fingerprints
        return (
            fp["encoder"]["vision"] == fp["monolithic"]["vision"]
            and fp["language"]["language"] == fp["monolithic"]["language"]
        )


@dataclass
class DemoResult:
    cases: list[CaseResult]
    seconds: float
    versions: dict[str, dict[str, Any]]
    config: dict[str, Any]

    @property
    def ok(self) -> bool:
        """Every request identical both ways, and the weights the same (a
        perturbed request is expected to make this False)."""
        return all(c.weights_match and all(r.identical for r in c.requests) for c in self.cases)


def _same_bytes(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _max_abs_diff(a: Sequence[np.ndarray[Any, Any]], b: Sequence[np.ndarray[Any, Any]]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def _compare(
    req: Request,
    info: dict[str, Any],
    history: Any,
    gen: Any,
    ref: Any,
    hf: Any,
    kind: str | None,
) -> RequestResult:
    failure = gen if isinstance(gen, str) else None
    tokens = [] if failure else list(gen.tokens)
    # a failed room has no logits: nothing matches
    logits: list[Any] = [None] * len(ref.logits) if failure else list(gen.logits)
    steps = len(ref.logits) - 1

    def same(x: Any, y: np.ndarray[Any, Any]) -> bool:
        return x is not None and _same_bytes(x, y)

    return RequestResult(
        room=req.room,
        sizes=req.sizes,
        resized=list(info.get("resized", [])),
        image_tokens=list(info.get("image_tokens", [])),
        prompt_tokens=int(info.get("prompt_tokens", 0)),
        history=list(history),
        perturbed=kind,
        disaggregated=tokens,
        monolithic=list(ref.tokens),
        hf_generate=hf,
        prefill_equal=same(logits[0], ref.logits[0]),
        decode_equal=sum(same(x, y) for x, y in zip(logits[1:], ref.logits[1:], strict=True)),
        decode_steps=steps,
        max_abs_diff=float("inf") if failure else _max_abs_diff(logits, ref.logits),
        failure=failure,
    )


# --- orchestration ----------------------------------------------------------


class _Children:
    """The three processes and the one queue they all report on."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.events: Any = ctx.Queue()
        self.cmds: dict[str, Any] = {}
        self.procs: dict[str, Any] = {}
        targets = {
            "monolithic": monolithic_process,
            "encoder": encoder_process,
            "language": language_process,
        }
        for role, target in targets.items():
            self.cmds[role] = ctx.Queue()
            self.procs[role] = ctx.Process(
                target=target,
                name=f"embedlink-vlm-{role}",
                args=(cfg, self.cmds[role], self.events),
                daemon=True,
            )
        for p in self.procs.values():
            p.start()
        #: the children told to stop: their exit is no failure
        self.stopping: set[str] = set()

    def send(self, role: str, *cmd: Any) -> None:
        if cmd[0] == "stop":
            self.stopping.add(role)
        self.cmds[role].put(cmd)

    def next_event(self, what: str, deadline: float) -> Any:
        """The next report from any child; RuntimeError when a child crashed
        or died, TimeoutError naming ``what`` at ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            try:
                ev = self.events.get(timeout=min(0.5, remaining))
            except queue.Empty:
                for role, p in self.procs.items():
                    if role not in self.stopping and not p.is_alive():
                        raise RuntimeError(
                            f"the {role} process exited (code {p.exitcode}) while waiting for {what}"
                        ) from None
                continue
            if ev[0] == "crashed":
                raise RuntimeError(f"the {ev[1]} process failed:\n{ev[2]}")
            return ev

    def stop(self) -> None:
        """Stop every child (a second stop is harmless: nobody reads it)."""
        for role, p in self.procs.items():
            if p.is_alive():
                self.cmds[role].put(("stop",))
        for p in self.procs.values():
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)


def run(
    models: Iterable[str] = ("qwen2-vl-tiny",),
    dtypes: Iterable[str] = ("float32", "bfloat16"),
    *,
    requests: int | None = None,
    specs: Sequence[tuple[Sequence[ImageSpec], str]] = DEFAULT_REQUESTS,
    new_tokens: int = 8,
    threads: int = 1,
    default_tokens: int = 256,
    block_size: int = 128,
    transport: str = "shm",
    window: int | None = None,
    seed: int = 0,
    perturb: dict[int, str] | None = None,
    check_generate: bool = True,
    timeout: float = 300.0,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run every (model, dtype) case through the three processes and compare.

    ``requests`` requests per case (default: one per spec), ``new_tokens``
    generated each; ``window`` receivers open at once at the language side
    (default: all of a case's requests); ``perturb`` maps a room to one of
    :data:`PERTURBATIONS`, applied at the encoder (``deepstack`` only to the
    models that have DeepStack). ``progress(line)`` is
    called as results come in. Raises ValueError for a bad argument,
    RuntimeError when a process fails (with its traceback), TimeoutError
    after ``timeout`` seconds.
    """
    models, dtypes = list(models), list(dtypes)
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for dt in dtypes:
        if dt not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dt!r}")
    if new_tokens < 1:
        raise ValueError("new_tokens must be at least 1")
    if threads < 1:
        raise ValueError("threads must be at least 1")
    perturb = dict(perturb or {})
    for room, kind in perturb.items():
        if kind not in PERTURBATIONS:
            raise ValueError(f"room {room}: unknown perturbation {kind!r}; known: {PERTURBATIONS}")
        if kind == "deepstack" and not any(MODELS[m].extra_fields for m in models):
            raise ValueError("the deepstack perturbation needs a model with DeepStack")
    per_model = {m: make_requests(m, requests, seed=seed, specs=specs) for m in models}
    n_requests = len(next(iter(per_model.values())))
    for room in perturb:
        if not 0 <= room < n_requests:
            raise ValueError(f"perturb: no room {room} (rooms are 0..{n_requests - 1})")
    largest = max(
        max(s.tokens for s in images) * len(images) + 64 for images, _ in specs[:n_requests]
    )
    per_room = -(-max(largest, default_tokens) // block_size)
    cfg: dict[str, Any] = {
        "threads": threads,
        "seed": seed,
        "new_tokens": new_tokens,
        "default_tokens": default_tokens,
        "block_size": block_size,
        "transport": transport,
        "window": window or n_requests,
        "room_timeout": min(timeout, 120.0),
        # room for every request at once on the encoder, for the window's
        # first reservations plus the largest resume at the language side
        "encoder_blocks": per_room * n_requests + 1,
        "language_blocks": -(-default_tokens // block_size) * (window or n_requests) + per_room,
        "check_generate": check_generate,
    }
    from ..bootstrap import BootstrapServer

    t_start = time.monotonic()
    deadline = t_start + timeout
    all_cases = [(m, dt) for m in models for dt in dtypes]
    kids = _Children(cfg)
    state = _RunState()
    cases: list[CaseResult] = []
    try:
        while len(state.versions) < 3:
            state.handle(kids.next_event("the processes to start", deadline))
        for case in all_cases:
            kids.send("monolithic", "run", case, per_model[case[0]])
        for case in all_cases:
            t0 = time.monotonic()
            reqs = per_model[case[0]]
            # deepstack changes only the models that have the field
            changes = {
                room: kind
                for room, kind in perturb.items()
                if kind != "deepstack" or MODELS[case[0]].extra_fields
            }
            with BootstrapServer(host="127.0.0.1", port=0) as boot:
                kids.send("encoder", "open", case, boot.address)
                while case not in state.ready:
                    state.handle(kids.next_event(f"the {case[1]} encoder to register", deadline))
                # the encoder is registered: the language side finds it at once
                kids.send("language", "receive", case, boot.address, [r.room for r in reqs])
                kids.send("encoder", "encode", case, reqs, [changes.get(r.room) for r in reqs])
                while case not in state.received:
                    ev = kids.next_event(f"the {case[0]} {case[1]} rooms", deadline)
                    state.handle(ev)
                    if ev[0] == "generated" and progress is not None:
                        progress(f"{case[0]} {case[1]} room {ev[2]}")
                kids.send("encoder", "close", case)
                while case not in state.closed:
                    state.handle(kids.next_event(f"the {case[1]} encoder to close", deadline))
            if case == all_cases[-1]:
                # let them exit while the reference finishes
                kids.send("encoder", "stop")
                kids.send("language", "stop")
            while case not in state.ran:
                state.handle(kids.next_event(f"the monolithic {case[0]} {case[1]}", deadline))
            results = [
                _compare(
                    r,
                    state.sent.get((case, r.room), {}),
                    *state.generated[(case, r.room)],
                    *state.references[(case, r.room)],
                    changes.get(r.room),
                )
                for r in reqs
            ]
            fingerprints = {
                "encoder": state.ready[case],
                "language": state.received[case][0],
                "monolithic": state.ran[case],
            }
            cases.append(
                CaseResult(
                    case[0],
                    case[1],
                    results,
                    time.monotonic() - t0,
                    fingerprints,
                    state.closed[case],
                    state.received[case][1],
                )
            )
    finally:
        kids.stop()
    return DemoResult(cases, time.monotonic() - t_start, state.versions, cfg)


@dataclass
class _RunState:
    """Every report the children sent, by kind and case."""

    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready: dict[Any, dict[str, str]] = field(default_factory=dict)
    sent: dict[Any, dict[str, Any]] = field(default_factory=dict)
    generated: dict[Any, tuple[Any, Any]] = field(default_factory=dict)
    received: dict[Any, tuple[dict[str, str], tuple[int, int]]] = field(default_factory=dict)
    closed: dict[Any, dict[int, tuple[int, str | None]]] = field(default_factory=dict)
    references: dict[Any, tuple[Any, Any]] = field(default_factory=dict)
    ran: dict[Any, dict[str, str]] = field(default_factory=dict)

    def handle(self, ev: Any) -> None:
        kind = ev[0]
        if kind == "up":
            self.versions[ev[1]] = ev[2]
        elif kind == "ready":
            self.ready[ev[1]] = ev[3]
        elif kind == "sent":
            self.sent[(ev[1], ev[2])] = ev[3]
        elif kind == "generated":
            self.generated[(ev[1], ev[2])] = (ev[3], ev[4])
        elif kind == "received":
            self.received[ev[1]] = (ev[2], ev[3])
        elif kind == "closed":
            self.closed[ev[1]] = ev[2]
        elif kind == "reference":
            self.references[(ev[1], ev[2])] = (ev[3], ev[4])
        elif kind == "ran":
            self.ran[ev[1]] = ev[2]


# --- the report ---------------------------------------------------------------


def _tokens(tokens: Sequence[int]) -> str:
    return " ".join(str(t) for t in tokens)


def _room_cell(r: RequestResult) -> str:
    if r.failure is not None:
        return "[red]Failed"
    if r.resumed:
        return "resumed at " + ", ".join(str(t) for t in r.resumed_at)
    return "one chunk"


def _logits_cell(r: RequestResult) -> str:
    if r.failure is not None:
        return f"[red]{r.failure}"
    steps = f"1+{r.decode_steps}" if r.decode_steps else "1"
    if r.perturbed is not None:
        return f"[yellow]perturbed {r.perturbed}:[/] " + _verdict(r, steps)
    return _verdict(r, steps)


def _verdict(r: RequestResult, steps: str) -> str:
    if r.identical:
        return f"[green]bitwise equal ({steps})"
    parts = []
    if not r.prefill_equal:
        parts.append("prefill")
    if r.decode_equal != r.decode_steps:
        parts.append(f"{r.decode_steps - r.decode_equal}/{r.decode_steps} decode")
    if r.disaggregated != r.monolithic:
        parts.append("tokens")
    return f"[red]DIFFER: {', '.join(parts)}; max |d| {r.max_abs_diff:.2g}"


def report(result: DemoResult, console: Any) -> None:
    """Print ``result``: per case, each request both ways; then a summary."""
    from rich import box
    from rich.table import Table

    cfg = result.config
    v = result.versions.get("language", {})
    console.print(
        f"transformers {v.get('transformers')}, torch {v.get('torch')}, "
        f"{cfg['threads']} torch thread(s) in each process, seeded random weights "
        f"(seed {cfg['seed']}), over {cfg['transport']}"
    )
    for case in result.cases:
        n = len(case.requests)
        table = Table(
            title=(
                f"{case.model} {case.dtype}: {n} requests, {min(cfg['window'], n)} rooms in "
                f"flight at once, first reservation {cfg['default_tokens']} tokens"
            ),
            box=box.SIMPLE_HEAD,
            title_justify="left",
        )
        table.add_column("room", justify="right")
        table.add_column("image(s), px")
        table.add_column("image tokens", justify="right")
        table.add_column("prompt", justify="right")
        table.add_column("embedlink room")
        table.add_column("way")
        table.add_column("generated tokens", no_wrap=True)
        table.add_column("logits")
        for r in case.requests:
            same = r.disaggregated == r.monolithic
            table.add_row(
                str(r.room),
                ", ".join(f"{w}x{h}" for w, h in r.sizes),
                " + ".join(str(t) for t in r.image_tokens),
                str(r.prompt_tokens),
                _room_cell(r),
                "disaggregated\nmonolithic",
                ("" if same else "[red]") + _tokens(r.disaggregated) + "\n" + _tokens(r.monolithic),
                _logits_cell(r),
            )
        console.print(table)
        if not case.weights_match:
            console.print(f"[red]the processes built different weights: {case.fingerprints}")
    total = sum(len(c.requests) for c in result.cases)
    n_same = sum(r.identical for c in result.cases for r in c.requests)
    resumed = sum(r.resumed for c in result.cases for r in c.requests)
    hf = [r for c in result.cases for r in c.requests if r.hf_generate is not None]
    hf_same = sum(r.hf_generate == r.monolithic for r in hf)
    per_case = ", ".join(
        f"{c.model} {c.dtype} {sum(r.identical for r in c.requests)}/{len(c.requests)}"
        for c in result.cases
    )
    colour = "green" if result.ok else "red"
    steps = cfg["new_tokens"] - 1
    console.print(
        f"logits: the prefill's (every prompt position) and {steps} decode steps', "
        "compared as raw bytes"
    )
    console.print(
        f"[bold {colour}]{n_same}/{total} requests identical both ways[/] "
        f"(same tokens, every logit bitwise equal: {per_case}); "
        f"rooms that resumed: {resumed}; transformers' generate() gave the monolithic "
        f"tokens for {hf_same}/{len(hf)}; {result.seconds:.1f} s"
    )
