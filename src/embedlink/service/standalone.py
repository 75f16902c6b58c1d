"""What ``embedlink encoder`` and ``embedlink language`` run: one endpoint per
process, for deployments across hosts.

The encoder serves rooms on demand: whenever a language rank asks for a room it
has no sender for, it calls the *hook* for the embedding and sends it. The
language process asks for ``rooms`` rooms, ``window`` at a time, and hands
each result to its hook. With the ``synthetic`` hook on both sides the encoder
generates a deterministic embedding from ``(seed, room)`` (its length drawn
from ``[min_tokens, max_tokens]``) and the language side regenerates it and
compares byte for byte, so two hosts can check a deployment end to end.

Hooks are ``module:function``:

* encoder: ``function(room: int, schema: BufferSchema) -> Embedding`` (return
  None to refuse the room: it is aborted, the language side sees ``Failed``);
* language: ``function(room: int, embedding: Embedding) -> None``; an
  exception marks that room not ok and is reported, the process goes on.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Config, ConfigError
from ..embedding import Embedding
from ..protocol import BufferSchema, Status, TransferError
from ..tools.workers import make_embedding, same_embedding

log = logging.getLogger(__name__)

__all__ = ["LanguageRun", "load_hook", "run_encoder", "run_language", "synthetic_tokens"]

EncoderHook = Callable[[int, BufferSchema], "Embedding | None"]
LanguageHook = Callable[[int, Embedding], None]


def load_hook(spec: str, source: str = "the command line") -> Callable[..., Any] | None:
    """Import ``module:function``; None for ``synthetic``. Raises ConfigError
    naming the hook when the module or function cannot be found."""
    if spec == "synthetic":
        return None
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError("hook", source, f"cannot import {module_name!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError("hook", source, f"{module_name!r} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


def synthetic_tokens(seed: int, room: int, min_tokens: int, max_tokens: int) -> int:
    """The length of the synthetic embedding of ``room``."""
    rng = np.random.default_rng([seed, room, 1])
    return int(rng.integers(min_tokens, max_tokens + 1))


def schema_of(cfg: Config) -> BufferSchema:
    return BufferSchema(hidden_size=cfg["hidden_size"], dtype=cfg["dtype"])


def run_encoder(
    cfg: Config,
    stop: threading.Event,
    *,
    on_ready: Callable[[Any], None] | None = None,
) -> dict[str, int]:
    """Run an encoder endpoint until ``stop`` is set, sending every requested
    room. Returns counts: ``sent``, ``refused`` (hook gave None or failed)."""
    from ..endpoints.encoder import EncoderEndpoint

    schema = schema_of(cfg)
    hook: EncoderHook | None = load_hook(cfg["hook"], cfg.sources["hook"])
    requested: queue.SimpleQueue[int] = queue.SimpleQueue()
    counts = {"sent": 0, "refused": 0}
    senders: dict[int, Any] = {}
    with EncoderEndpoint(schema, on_request=requested.put, **cfg.endpoint_kwargs()) as ep:
        if on_ready is not None:
            on_ready(ep)
        while not stop.is_set():
            try:
                room = requested.get(timeout=0.2)
            except queue.Empty:
                _reap(senders)
                continue
            _reap(senders)
            if room in senders:
                log.warning("encoder: room %d requested again while still live; ignored", room)
                continue
            tx = senders[room] = ep.sender(room)
            try:
                if hook is None:
                    n = synthetic_tokens(cfg["seed"], room, cfg["min_tokens"], cfg["max_tokens"])
                    emb: Embedding | None = make_embedding(schema, n, cfg["seed"], room)
                else:
                    emb = hook(room, schema)
                if emb is None:
                    tx.abort(f"the encoder hook returned no embedding for room {room}")
                    counts["refused"] += 1
                    continue
                tx.send(emb)
                counts["sent"] += 1
            except TransferError as exc:
                counts["refused"] += 1
                log.warning("encoder: room %d: %s", room, exc)
            except Exception as exc:  # a bad hook or embedding fails its room only
                counts["refused"] += 1
                reason = f"encoder hook failed: {type(exc).__name__}: {exc}"
                log.warning("encoder: room %d: %s", room, reason)
                tx.abort(reason)
    return counts


def _wait_for_encoder(bootstrap: str, auth_secret: str | None, timeout: float) -> None:
    """Wait (up to ``timeout``) until an encoder has registered, so the two
    commands can be started in either order."""
    from ..bootstrap import BootstrapClient, BootstrapError

    client = BootstrapClient(bootstrap, auth_secret=auth_secret)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.sizes()
            return
        except BootstrapError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootstrapError(f"no encoder registered within {timeout:g}s: {exc}") from None
            # the encoder is another process reached over HTTP: nothing to
            # wait on but the next poll
            time.sleep(min(0.2, left))


def _reap(senders: dict[int, Any]) -> None:
    for room, tx in list(senders.items()):
        if tx.poll().is_terminal:
            tx.clear()
            del senders[room]


@dataclass
class RoomOutcome:
    room: int
    status: Status
    ok: bool
    reason: str | None
    tokens: int
    resumes: int
    latency: float
    nbytes: int


@dataclass
class LanguageRun:
    outcomes: list[RoomOutcome]
    wall: float


def run_language(
    cfg: Config,
    *,
    progress: Callable[[RoomOutcome], None] | None = None,
    wait_timeout: float | None = None,
) -> LanguageRun:
    """Ask for ``cfg['rooms']`` rooms from ``cfg['bootstrap']`` with ``window``
    in flight, verify (synthetic) or hand each to the hook, and report."""
    from ..endpoints.language import LanguageEndpoint
    from ..transports import get_backend

    if cfg["bootstrap"] is None:
        raise ConfigError("bootstrap", cfg.sources["bootstrap"], "the language side needs one")
    schema = schema_of(cfg)
    hook: LanguageHook | None = load_hook(cfg["hook"], cfg.sources["hook"])
    seed, window = cfg["seed"], cfg["window"]
    wait = wait_timeout if wait_timeout is not None else cfg["room_timeout"] * 4
    outcomes: list[RoomOutcome] = []

    def finish(room: int, rx: Any, t0: float) -> None:
        ok, reason, tokens, nbytes = False, None, 0, 0
        try:
            emb = rx.wait(timeout=wait)
            tokens = emb.num_tokens
            nbytes = tokens * schema.token_bytes
            if hook is None:
                ok = same_embedding(emb, make_embedding(schema, tokens, seed, room))
                if not ok:
                    reason = "embedding differs from the synthetic one (different --seed?)"
            else:
                hook(room, emb)
                ok = True
        except TransferError as exc:
            reason = exc.reason
        except TimeoutError as exc:
            reason = str(exc)
            rx.abort("receiver gave up waiting")
        except Exception as exc:
            reason = f"language hook failed: {type(exc).__name__}: {exc}"
        outcome = RoomOutcome(
            room,
            rx.poll(),
            ok,
            reason,
            tokens,
            sum(1 for s, _ in rx.history if s is Status.Transferring),
            time.perf_counter() - t0,
            nbytes,
        )
        rx.clear()
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)

    for t in cfg["transports"]:
        get_backend(t)  # a missing engine fails now, with its install command
    _wait_for_encoder(cfg["bootstrap"], cfg["auth_secret"], cfg["room_timeout"])
    t_start = time.perf_counter()
    with LanguageEndpoint(schema, **cfg.endpoint_kwargs()) as ep:
        pending: list[tuple[int, Any, float]] = []
        first = cfg["first_room"]
        for room in range(first, first + cfg["rooms"]):
            if len(pending) >= window:
                finish(*pending.pop(0))
            rx = ep.receiver(bootstrap=cfg["bootstrap"], room=room)
            pending.append((room, rx, time.perf_counter()))
        for p in pending:
            finish(*p)
    return LanguageRun(outcomes, time.perf_counter() - t_start)
