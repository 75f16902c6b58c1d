"""A peer process for the lossy-link tests, run inside a network namespace:

    python -m tests.integration.lossy_peer encoder HOST TRANSPORT CONFIG_JSON
    python -m tests.integration.lossy_peer language HOST BOOTSTRAP TRANSPORT CONFIG_JSON

The encoder side runs the bootstrap server and an encoder endpoint bound to
HOST and prints ``@@ {"ready": BOOTSTRAP_ADDRESS}``; the language side runs a
language endpoint bound to its own HOST. Each then obeys one JSON command per
line on standard input and answers each with one line ``@@ JSON`` on standard
output (other output, such as a native library's, is not prefixed):

``{"op": "send", "jobs": [[room, tokens], ...]}`` (encoder) sends the rooms in
order on a thread of its own; ``{"op": "run", "jobs": ..., "workers": W}``
(language) receives them with ``W`` threads, each creating a receiver and
waiting for it at once. Either side waits for each room until ``deadline``
seconds after it was created (``wait(timeout)`` on the language side; a
room still unfinished then is a *violation*, reported, aborted and cleared),
verifies a language room byte for byte, and clears every room.
``{"op": "progress"}`` counts rooms and peer deaths, ``{"op": "live"}``
lists the language rooms under way, ``{"op": "drain", "timeout": S}`` waits
(bounded) for every room given so far and then for the pool to be wholly free,
and answers with every room's outcome; ``{"op": "quit"}`` closes the endpoint.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import traceback
from typing import Any

from embedlink import (
    BootstrapServer,
    BufferSchema,
    EncoderEndpoint,
    LanguageEndpoint,
    Status,
    TransferError,
)
from embedlink.tools.workers import make_embedding, same_embedding

TERMINAL = (int(Status.Success), int(Status.Failed))


def stacks() -> str:
    """Every thread's stack (to show where a room is stuck)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


def reply(obj: Any) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def endpoint_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(
        transports=(cfg["transport"],),
        room_timeout=float(cfg["room_timeout"]),
        heartbeat_interval=float(cfg.get("heartbeat_interval", 2.0)),
        heartbeat_misses=int(cfg.get("heartbeat_misses", 3)),
        block_size=int(cfg.get("block_size", 128)),
    )


def wait_pool_free(ep: Any, deadline: float) -> tuple[int, int]:
    """Poll ``ep.pool_usage()`` until no block is used or ``deadline`` passes."""
    while True:
        usage = ep.pool_usage()
        if usage[0] == 0 or time.monotonic() >= deadline:
            return usage
        time.sleep(0.02)


class Encoder:
    def __init__(self, host: str, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.schema = BufferSchema(hidden_size=int(cfg["hidden_size"]))
        self.seed = int(cfg.get("seed", 0))
        self.deadline = float(cfg["deadline"])
        self.boot = BootstrapServer(host=host, port=0).start()
        self.ep = EncoderEndpoint(
            self.schema,
            bootstrap=self.boot.address,
            host=host,
            num_blocks=int(cfg["encoder_blocks"]),
            **endpoint_kwargs(cfg),
        ).start()
        self.lock = threading.Lock()
        self.results: dict[int, dict[str, Any]] = {}
        self.given = 0
        self.violations: list[str] = []
        self.threads: list[threading.Thread] = []
        self.send_errors: list[str] = []

    def send(self, jobs: list[list[int]]) -> None:
        with self.lock:
            self.given += len(jobs)
        waits: queue.Queue[Any] = queue.Queue()

        def sender() -> None:
            for room, n in jobs:
                tx = self.ep.sender(room)
                created = time.monotonic()
                try:
                    tx.send(make_embedding(self.schema, n, self.seed, room))
                except TransferError as exc:  # no free blocks within the room timeout
                    self.send_errors.append(f"room {room}: {exc}")
                except Exception as exc:
                    self.send_errors.append(f"room {room}: {type(exc).__name__}: {exc}")
                waits.put((room, n, tx, created))
            waits.put(None)

        def waiter() -> None:
            while True:
                item = waits.get()
                if item is None:
                    return
                room, n, tx, created = item
                status = tx.wait(max(0.0, created + self.deadline - time.monotonic()))
                if not status.is_terminal:
                    self.violations.append(
                        f"encoder room {room} still {status.name} {self.deadline:g}s after it was created"
                    )
                    tx.abort("test: past its deadline")
                out = {
                    "tokens": n,
                    "status": int(tx.poll()),
                    "reason": tx.failure_reason,
                    "history": [[int(s), t] for s, t in tx.history],
                }
                tx.clear()
                with self.lock:
                    self.results[room] = out

        for fn in (sender, waiter):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def progress(self) -> dict[str, Any]:
        with self.lock:
            done = len(self.results)
            failed = sum(1 for r in self.results.values() if r["status"] == int(Status.Failed))
        return {
            "given": self.given,
            "done": done,
            "failed": failed,
            "dead_sessions": self.ep.stats.dead_sessions,
            "pool": list(self.ep.pool_usage()),
        }

    def drain(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t for t in self.threads if t.is_alive()]
        usage = wait_pool_free(self.ep, deadline)
        with self.lock:
            results = {str(k): v for k, v in self.results.items()}
        return {
            "rooms": results,
            "given": self.given,
            "violations": list(self.violations),
            "unfinished_threads": len(unfinished),
            "stacks": stacks() if unfinished else "",
            "send_errors": list(self.send_errors),
            "pool": list(usage),
            "live_rooms": self.ep.room_count(),
            "stats": dict(vars(self.ep.stats)),
            "sessions": self.ep.sessions(),
            "loop_errors": self.ep.loop_errors,
        }

    def close(self) -> None:
        self.ep.close()
        self.boot.close()


class Language:
    def __init__(self, host: str, bootstrap: str, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.schema = BufferSchema(hidden_size=int(cfg["hidden_size"]))
        self.seed = int(cfg.get("seed", 0))
        self.deadline = float(cfg["deadline"])
        self.ep = LanguageEndpoint(
            self.schema,
            host=host,
            num_blocks=int(cfg["language_blocks"]),
            default_tokens=int(cfg.get("default_tokens", 1024)),
            stale_write_grace=float(cfg.get("stale_write_grace", 30.0)),
            **endpoint_kwargs(cfg),
        ).start()
        self.lock = threading.Lock()
        self.results: dict[int, dict[str, Any]] = {}
        self.live: dict[int, tuple[float, Any]] = {}  # room: (created, receiver or None)
        self.given = 0
        self.violations: list[str] = []
        self.threads: list[threading.Thread] = []
        self.crashes: list[str] = []
        self.corrupt: dict[int, Any] = {}  # room: the embedding that arrived wrong

    def run(self, jobs: list[list[int]], workers: int) -> None:
        todo: queue.Queue[tuple[int, int]] = queue.Queue()
        for room, n in jobs:
            todo.put((room, n))
        with self.lock:
            self.given += len(jobs)

        def worker() -> None:
            try:
                while True:
                    try:
                        room, n = todo.get_nowait()
                    except queue.Empty:
                        return
                    self.one(room, n)
            except Exception:
                self.crashes.append(traceback.format_exc())

        for _ in range(workers):
            t = threading.Thread(target=worker, daemon=True)
            t.start()
            self.threads.append(t)

    def one(self, room: int, n: int) -> None:
        created = time.monotonic()
        with self.lock:
            self.live[room] = (created, None)
        rx = self.ep.receiver(bootstrap=self.bootstrap, room=room)
        with self.lock:
            self.live[room] = (created, rx)
        ok, reason = False, None
        try:
            emb = rx.wait(timeout=self.deadline)
            ok = same_embedding(emb, make_embedding(self.schema, n, self.seed, room))
            if not ok:
                reason = "embedding differs from what was sent"
                with self.lock:
                    self.corrupt[room] = emb
        except TransferError as exc:
            reason = exc.reason
        except TimeoutError as exc:
            self.violations.append(f"language room {room}: wait({self.deadline:g}) raised {exc}")
            reason = f"TimeoutError: {exc}"
            rx.abort("test: past its deadline")
        out = {
            "tokens": n,
            "status": int(rx.poll()),
            "ok": ok,
            "reason": reason,
            "failure_reason": rx.failure_reason,
            "history": [[int(s), t] for s, t in rx.history],
            "created": created,
            "ended": time.monotonic(),
        }
        rx.clear()
        with self.lock:
            self.live.pop(room, None)
            self.results[room] = out

    def progress(self) -> dict[str, Any]:
        with self.lock:
            done = len(self.results)
            ok = sum(1 for r in self.results.values() if r["ok"])
            failed = sum(1 for r in self.results.values() if r["status"] == int(Status.Failed))
            live = len(self.live)
        return {
            "given": self.given,
            "done": done,
            "succeeded": ok,
            "failed": failed,
            "live": live,
            "dead_encoders": self.ep.dead_encoders,
            "pool": list(self.ep.pool_usage()),
        }

    def live_rooms(self) -> list[int]:
        with self.lock:
            return sorted(self.live)

    def drain(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t for t in self.threads if t.is_alive()]
        usage = wait_pool_free(self.ep, deadline)
        with self.lock:
            results = {str(k): v for k, v in self.results.items()}
            now = time.monotonic()
            stuck = {
                str(room): {
                    "age": round(now - created, 2),
                    "status": None if rx is None else int(rx.poll()),
                    "history": None if rx is None else [[int(s), t] for s, t in rx.history],
                }
                for room, (created, rx) in self.live.items()
            }
        return {
            "rooms": results,
            "given": self.given,
            "violations": list(self.violations),
            "unfinished_threads": len(unfinished),
            "stacks": stacks() if unfinished else "",
            "stuck": stuck,
            "crashes": list(self.crashes),
            "pool": list(usage),
            "live_rooms": self.ep.room_count(),
            "dead_encoders": self.ep.dead_encoders,
            "diagnosis": self.diagnosis() if usage[0] or unfinished else None,
            "forensics": self.forensics(),
            "dropped_messages": self.ep.dropped_messages,
            "ignored_inputs": self.ep.ignored_inputs,
            "loop_errors": self.ep.loop_errors,
        }

    def forensics(self) -> dict[str, str]:
        """For each room that arrived wrong: which of its tokens differ, and
        whose tokens they are (rows of the embedding are random, so a row
        found in another room's embedding came from that room)."""
        if not self.corrupt:
            return {}
        with self.lock:
            sizes = {room: r["tokens"] for room, r in self.results.items()}
            corrupt = dict(self.corrupt)
        rows: dict[bytes, tuple[int, int]] = {}
        for other, n in sizes.items():
            if other in corrupt:
                continue
            e = make_embedding(self.schema, n, self.seed, other).embedding
            for t in range(n):
                rows[e[t].tobytes()] = (other, t)
        out = {}
        for room, emb in corrupt.items():
            expected = make_embedding(self.schema, sizes[room], self.seed, room)
            fields = [
                name
                for name in ("embedding", "token_ids", "mrope_positions")
                if getattr(emb, name).tobytes() != getattr(expected, name).tobytes()
            ]
            if emb.mrope_position_delta != expected.mrope_position_delta:
                fields.append("mrope_position_delta")
            want, got = expected.embedding, emb.embedding
            bad = [t for t in range(len(want)) if got[t].tobytes() != want[t].tobytes()]
            if not bad:
                out[str(room)] = f"{', '.join(fields) or 'no field'} differ(s), not the embedding"
                continue
            found: dict[int, list[int]] = {}
            for t in bad:
                src = rows.get(got[t].tobytes())
                if src is not None:
                    found.setdefault(src[0], []).append(src[1])
            where = ", ".join(
                f"{len(ts)} of room {o}'s tokens {min(ts)}-{max(ts)}" for o, ts in found.items()
            )
            out[str(room)] = (
                f"{', '.join(fields)} differ; {len(bad)} of {len(want)} embedding rows "
                f"(tokens {bad[0]}-{bad[-1]}) hold {where or 'nothing recognisable'}"
            )
        return out

    def diagnosis(self) -> dict[str, Any]:
        """Where the pool's used blocks are (read off the endpoint's loop)."""
        ep = self.ep

        def look() -> dict[str, Any]:
            def room(live: Any) -> dict[str, Any]:
                r = live.room
                enc = live.encoder
                return {
                    "room": r.room,
                    "epoch": r.epoch,
                    "status": int(r.status),
                    "sent": r.sent_tokens,
                    "holds_blocks": r.holds_blocks,
                    "blocks": None if r.blocks is None else len(r.blocks),
                    "encoder": None if enc is None else enc.address,
                    "encoder_known": enc is not None and ep._encoders.get(enc.address) is enc,
                    "reason": r.failure_reason,
                    "history": [[int(s), t] for s, t in r.history],
                }

            return {
                "status": ep._snapshot(),
                "rooms": [room(v) for v in ep._rooms.values()][:20],
                "zombies": [room(v) for v in ep._zombies.values()][:20],
                "n_zombies": len(ep._zombies),
            }

        try:
            return ep._loop.call_wait(look, timeout=5.0)
        except Exception as exc:
            return {"error": repr(exc)}

    def close(self) -> None:
        self.ep.close()


def serve(peer: Encoder | Language) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "send" and isinstance(peer, Encoder):
                peer.send(cmd["jobs"])
                out: Any = {"ok": True}
            elif op == "run" and isinstance(peer, Language):
                peer.run(cmd["jobs"], int(cmd.get("workers", 16)))
                out = {"ok": True}
            elif op == "progress":
                out = {"ok": True, **peer.progress()}
            elif op == "live" and isinstance(peer, Language):
                out = {"ok": True, "rooms": peer.live_rooms()}
            elif op == "drain":
                out = {"ok": True, **peer.drain(float(cmd["timeout"]))}
            elif op == "quit":
                reply({"ok": True})
                return
            else:
                out = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception:
            out = {"ok": False, "error": traceback.format_exc()}
        reply(out)


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    role = sys.argv[1]
    peer: Encoder | Language
    if role == "encoder":
        host, transport, cfg = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        peer = Encoder(host, {**cfg, "transport": transport})
        reply({"ready": peer.boot.address})
    else:
        host, boot, transport, cfg = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
        peer = Language(host, boot, {**cfg, "transport": transport})
        reply({"ready": host})
    try:
        serve(peer)
    finally:
        peer.close()


if __name__ == "__main__":
    main()
