"""Process entry points shared by ``embedlink demo``, the benchmarks and the
integration tests: an encoder process and a language process, each driven over
multiprocessing queues. Embeddings are generated from ``(seed, room)``, so the
language side regenerates what it expects and verifies every byte without the
data travelling any other way.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _torch
from .._runtime.loop import BUSY_POLL_S
from ..embedding import Embedding
from ..protocol import BufferSchema, TransferError

__all__ = ["RoomResult", "encoder_worker", "language_worker", "make_embedding", "schema_from"]


def schema_from(cfg: dict[str, Any]) -> BufferSchema:
    return BufferSchema(
        hidden_size=int(cfg.get("hidden_size", 3584)), dtype=str(cfg.get("dtype", "bfloat16"))
    )


def make_embedding(schema: BufferSchema, n: int, seed: int, room: int) -> Embedding:
    """A deterministic embedding of ``n`` tokens for ``room``."""
    rng = np.random.default_rng([seed, room])
    arrays: dict[str, Any] = {}
    for f in schema.fields:
        raw = np.frombuffer(rng.bytes(n * f.token_bytes), dtype=np.uint8)
        arrays[f.name] = raw.view(f.np_dtype).reshape((n, *f.shape))
    extra = {
        k: v for k, v in arrays.items() if k not in ("embedding", "token_ids", "mrope_positions")
    }
    return Embedding(
        embedding=arrays["embedding"],
        token_ids=arrays["token_ids"],
        mrope_positions=np.ascontiguousarray(arrays["mrope_positions"].T),
        extra=extra,
        mrope_position_delta=room % 1000,
    )


def _host_bytes(x: Any) -> np.ndarray[Any, Any] | None:
    if x is None:
        return None
    if _torch.is_tensor(x):
        x = _torch.to_host_numpy(
            x, np.dtype(np.uint8) if x.element_size() == 1 else np.dtype(f"u{x.element_size()}")
        )
    return np.ascontiguousarray(x).view(np.uint8)


def on_device(emb: Embedding, device: str | None) -> Embedding:
    """``emb`` with every array moved to torch ``device`` (unchanged for None)."""
    if device is None:
        return emb
    from ..embedding import _to_tensor

    schema_like = {
        "embedding": emb.embedding,
        "token_ids": emb.token_ids,
        "mrope_positions": emb.mrope_positions,
        **emb.extra,
    }
    moved = {}
    for k, v in schema_like.items():
        moved[k] = _to_tensor(k, v, str(v.dtype), device).to(device)
    return Embedding(
        embedding=moved.pop("embedding"),
        token_ids=moved.pop("token_ids"),
        mrope_positions=moved.pop("mrope_positions"),
        extra=moved,
        mrope_position_delta=emb.mrope_position_delta,
    )


def same_embedding(a: Embedding, b: Embedding) -> bool:
    """Byte-for-byte equality of every field (numpy or torch, any device)."""

    def eq(x: Any, y: Any) -> bool:
        hx, hy = _host_bytes(x), _host_bytes(y)
        return bool(
            hx is not None
            and hy is not None
            and tuple(x.shape) == tuple(y.shape)
            and np.array_equal(hx.reshape(-1), hy.reshape(-1))
        )

    return (
        eq(a.embedding, b.embedding)
        and eq(a.token_ids, b.token_ids)
        and eq(a.mrope_positions, b.mrope_positions)
        and a.extra.keys() == b.extra.keys()
        and all(eq(a.extra[k], b.extra[k]) for k in a.extra)
        and a.mrope_position_delta == b.mrope_position_delta
    )


@dataclass
class RoomResult:
    room: int
    tokens: int
    status: int
    ok: bool
    reason: str | None
    history: list[tuple[int, int]]
    latency: float
    nbytes: int


def _setup_logging(cfg: dict[str, Any]) -> None:
    from ..observability.logs import setup_logging

    level = cfg.get("log_level") or os.environ.get("EMBEDLINK_LOG_LEVEL", "WARNING")
    setup_logging(str(level), os.environ.get("EMBEDLINK_LOG_JSON") == "1")


def _endpoint_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings both worker endpoints take from ``cfg``, with their defaults."""
    return dict(
        num_blocks=int(cfg["num_blocks"]),
        block_size=int(cfg.get("block_size", 128)),
        transports=tuple(cfg.get("transports", ("tcp",))),
        tp_rank=int(cfg.get("tp_rank", 0)),
        tp_size=int(cfg.get("tp_size", 1)),
        dp_size=int(cfg.get("dp_size", 1)),
        room_timeout=float(cfg.get("room_timeout", 60.0)),
        device=cfg.get("device"),
        heartbeat_interval=float(cfg.get("heartbeat_interval", 2.0)),
        heartbeat_misses=int(cfg.get("heartbeat_misses", 3)),
        auth_secret=cfg.get("auth_secret"),
        local_control=bool(cfg.get("local_control", True)),
        busy_poll_us=float(cfg.get("busy_poll_us", BUSY_POLL_S * 1e6)),
    )


def encoder_worker(cfg: dict[str, Any], cmds: Any, replies: Any) -> None:
    """Run an :class:`EncoderEndpoint`; obey commands until ``("stop",)``.

    Commands: ``("open", room)`` (a sender that sends nothing yet),
    ``("send", room, n)``, ``("send_many", [(room, n), ...])``, ``("abort", room)``, ``("wait_idle", timeout)``
    (clear finished rooms and report when none is live), ``("stats",)``,
    ``("stop",)``. Every command gets one reply on ``replies``; the first reply
    is ``("ready", address)``.
    """
    from ..endpoints.encoder import EncoderEndpoint

    _setup_logging(cfg)
    schema = schema_from(cfg)
    seed = int(cfg.get("seed", 0))
    ep = EncoderEndpoint(
        schema,
        bootstrap=cfg.get("bootstrap"),
        **_endpoint_kwargs(cfg),
    ).start()
    senders: dict[int, Any] = {}
    replies.put(("ready", ep.address))

    def reap() -> None:
        for room, tx in list(senders.items()):
            if tx.poll().is_terminal:
                tx.clear()
                del senders[room]

    try:
        while True:
            cmd = cmds.get()
            kind = cmd[0]
            if kind == "stop":
                replies.put(("stopped",))
                return
            try:
                if kind == "open":
                    senders[cmd[1]] = ep.sender(cmd[1])
                    replies.put(("opened", cmd[1]))
                elif kind == "send":
                    _, room, n = cmd
                    reap()
                    tx = senders.get(room) or ep.sender(room)
                    senders[room] = tx
                    tx.send(on_device(make_embedding(schema, n, seed, room), cfg.get("device")))
                    replies.put(("sent", room))
                elif kind == "send_many":
                    for room, n in cmd[1]:
                        reap()
                        tx = ep.sender(room)
                        senders[room] = tx
                        tx.send(on_device(make_embedding(schema, n, seed, room), cfg.get("device")))
                    replies.put(("sent_many", len(cmd[1])))
                elif kind == "abort":
                    senders[cmd[1]].abort()
                    replies.put(("aborted", cmd[1]))
                elif kind == "wait_idle":
                    deadline = time.monotonic() + float(cmd[1])
                    for tx in list(senders.values()):
                        tx.wait(max(0.0, deadline - time.monotonic()))
                    statuses = {r: (int(tx.poll()), tx.failure_reason) for r, tx in senders.items()}
                    reap()
                    # a terminal room may still be waiting for a write to finish
                    ep.allocator.wait_all_free(max(0.0, deadline - time.monotonic()))
                    replies.put(("idle", statuses, ep.pool_usage()))
                elif kind == "stats":
                    replies.put(
                        (
                            "stats",
                            ep.pool_usage(),
                            ep.room_count(),
                            ep.sessions(),
                            vars(ep.stats).copy(),
                            ep.loop_errors,
                        )
                    )
                else:
                    replies.put(("error", f"unknown command {kind!r}"))
            except Exception as exc:
                replies.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        ep.close()


def language_worker(cfg: dict[str, Any], jobs: list[tuple[int, int]], out: Any) -> None:
    """Run a :class:`LanguageEndpoint`, receive ``jobs`` (``(room, n)``) with
    ``cfg["window"]`` rooms in flight, verify each, and put one
    :class:`RoomResult` per room on ``out``, then ``("done", pool_usage)``."""
    from ..endpoints.language import LanguageEndpoint

    _setup_logging(cfg)
    schema = schema_from(cfg)
    seed = int(cfg.get("seed", 0))
    window = int(cfg.get("window", 16))
    try:
        with LanguageEndpoint(
            schema,
            default_tokens=int(cfg.get("default_tokens", 1024)),
            **_endpoint_kwargs(cfg),
        ) as ep:
            pending: list[tuple[int, int, Any, float]] = []
            it = iter(jobs)

            def finish(room: int, n: int, rx: Any, t0: float) -> None:
                reason = None
                ok = False
                try:
                    emb = rx.wait(timeout=float(cfg.get("wait_timeout", 120.0)))
                    ok = same_embedding(emb, make_embedding(schema, n, seed, room))
                    if not ok:
                        reason = "embedding differs from what was sent"
                except TransferError as exc:
                    reason = exc.reason
                except TimeoutError as exc:
                    reason = str(exc)
                    rx.abort("receiver gave up waiting")
                out.put(
                    RoomResult(
                        room,
                        n,
                        int(rx.poll()),
                        ok,
                        reason,
                        [(int(s), t) for s, t in rx.history],
                        time.perf_counter() - t0,
                        n * schema.token_bytes,
                    )
                )
                rx.clear()

            for room, n in it:
                if len(pending) >= window:
                    finish(*pending.pop(0))
                rx = ep.receiver(bootstrap=cfg["bootstrap"], room=room)
                pending.append((room, n, rx, time.perf_counter()))
            for p in pending:
                finish(*p)
            # blocks held for writes the encoder has not acknowledged yet come back shortly
            ep.allocator.wait_all_free(10.0)
            out.put(("done", ep.pool_usage(), ep.loop_errors))
    except Exception:
        out.put(("crashed", traceback.format_exc()))


def drain(q: Any, timeout: float) -> Any:
    """``q.get`` with a timeout that raises TimeoutError naming the wait."""
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no message within {timeout}s") from None
