"""A small fault-injecting TCP proxy, after Toxiproxy's model. Standard library only.

Every connection the proxy accepts is forwarded to an upstream: a fixed
``(host, port)``, or, in *transparent* mode, the connection's original
destination, read with ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` after an
nftables rule (``nat prerouting ... redirect to :PORT``) diverted it to the
proxy. In transparent mode the proxy runs on a router between two peers and
puts itself between them without either knowing.

Each direction of a connection is a *stream*: ``upstream`` (from the side that
connected to the side it connected to) and ``downstream`` (back). Toxics are set
per stream (or ``both``), change at runtime and apply at once to the live
connections and to new ones:

``latency``    ``latency`` ms (and ``jitter`` ms, uniform in +-jitter) added to
               every chunk of data; chunks keep their order, and the stream is
               pipelined (delay, not a lower rate).
``bandwidth``  ``rate`` bytes/s (token bucket, 10 ms worth of bytes at a time).
``timeout``    a stall: nothing more is forwarded (and nothing read, so the
               peers' own flow control holds the data back: unlike Toxiproxy,
               which drops it, no byte of the stream is lost when the toxic is
               removed); with ``timeout`` > 0 ms each connection is closed
               (FIN; the kernel adds an RST where held data was never read)
               that long after its stall began; with 0 it is held until the
               toxic is removed.
``reset_peer`` each connection is cut with a TCP RST (``SO_LINGER`` 0) ``timeout``
               ms after it first ran under the toxic (0: at once), both sides.

:meth:`FaultProxy.reset_all` cuts every live connection with RST now (a cut
mid-stream, whatever the connections are doing).

In-process use (a thread runs the proxy's event loop)::

    with FaultProxy(("127.0.0.1", 0), upstream=("127.0.0.1", 8080)) as p:
        p.set_toxic("latency", latency=20)       # both streams
        p.set_toxic("timeout", "downstream", timeout=0)
        p.remove_toxic("timeout")
        p.reset_all()

As a process (what the namespace tests run on their router namespace)::

    python -m tests.integration.faultproxy --listen 0.0.0.0:0 --transparent

prints ``@@ {"ready": PORT}`` and then obeys one JSON command per line on
standard input, answering each with one line ``@@ JSON``: ``{"op": "set", "toxic": "latency",
"stream": "both", "attrs": {"latency": 20}}``, ``{"op": "remove", "toxic":
..., "stream": ...}``, ``{"op": "clear"}``, ``{"op": "reset_all"}``,
``{"op": "stats"}``, ``{"op": "quit"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultProxy", "original_dst"]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
STREAMS = ("upstream", "downstream")
TOXICS = ("latency", "bandwidth", "timeout", "reset_peer")
#: bytes a stream holds (delayed or throttled) before it stops reading its source
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
_EOF = b""


def original_dst(sock: Any) -> tuple[str, int]:
    """The destination a connection had before a ``redirect`` rule sent it here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def _rst(transport: asyncio.BaseTransport | None) -> None:
    """Close ``transport`` with a TCP RST instead of a FIN."""
    if transport is None or transport.get_protocol() is None:
        return  # never made, or already gone
    if transport.is_closing():
        # (asyncio 3.11 can run connection_lost of a transport that flushed
        # after close() without noting it; aborting it again would repeat it)
        transport.abort()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


@dataclass
class _Stream:
    """One direction's toxics (shared by every connection)."""

    toxics: dict[str, dict[str, float]] = field(default_factory=dict)


class _Half:
    """One direction of one connection: data from ``src`` to ``dst``."""

    def __init__(self, conn: _Conn, stream: str) -> None:
        self.conn = conn
        self.stream = stream
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.last_due = 0.0
        self.next_free = 0.0  # bandwidth: when the next byte may go
        self.paused_src = False  # we stopped reading src (full, or stalled)
        self.dst_paused = False  # dst's write buffer is full
        self.stall_since: float | None = None
        self.reset_seen: float | None = None  # when reset_peer first applied here
        self.timer: asyncio.TimerHandle | None = None  # the next chunk's time
        self.deadline: asyncio.TimerHandle | None = None  # reset_peer / timeout
        self.eof_sent = False
        self.bytes = 0

    @property
    def toxics(self) -> dict[str, dict[str, float]]:
        return self.conn.proxy.streams[self.stream].toxics

    def on_data(self, data: bytes) -> None:
        if self.conn.closed:
            return
        now = time.monotonic()
        lat = self.toxics.get("latency")
        due = now
        if lat:
            jitter = lat.get("jitter", 0.0)
            due += max(0.0, lat.get("latency", 0.0) + random.uniform(-jitter, jitter)) / 1e3
        due = max(due, self.last_due)  # keep the order
        self.last_due = due
        self.queue.append((due, data))
        self.queued += len(data)
        if self.queued > HIGH_WATER:
            self._pause_src()
        self.pump()

    def on_eof(self) -> None:
        self.queue.append((max(time.monotonic(), self.last_due), _EOF))
        self.pump()

    def _pause_src(self) -> None:
        if not self.paused_src and self.src is not None:
            self.src.pause_reading()
            self.paused_src = True

    def _maybe_resume_src(self) -> None:
        if self.paused_src and self.queued < LOW_WATER and self.src is not None:
            self.paused_src = False
            self.src.resume_reading()

    def _at(self, when: float, fn: Any) -> asyncio.TimerHandle:
        loop = self.conn.proxy.loop
        return loop.call_at(loop.time() + max(0.0, when - time.monotonic()), fn)

    def _schedule(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self._at(when, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.pump()

    def _set_deadline(self, when: float | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if when is not None:
            self.deadline = self._at(when, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self.deadline = None
        self.pump()

    def cancel_timers(self) -> None:
        for t in (self.timer, self.deadline):
            if t is not None:
                t.cancel()
        self.timer = self.deadline = None

    def pump(self) -> None:
        """Forward what is due, honouring the toxics; set timers for the rest."""
        conn = self.conn
        if conn.closed or self.dst is None:
            return
        now = time.monotonic()
        tox = self.toxics
        deadline: float | None = None
        reset = tox.get("reset_peer")
        if reset is None:
            self.reset_seen = None
        else:
            if self.reset_seen is None:
                self.reset_seen = now
            at = self.reset_seen + reset.get("timeout", 0.0) / 1e3
            if now >= at:
                conn.reset("reset_peer")
                return
            deadline = at
        stall = tox.get("timeout")
        if stall is not None:
            if self.stall_since is None:
                self.stall_since = now
            self._pause_src()
            limit = stall.get("timeout", 0.0)
            if limit > 0:
                at = self.stall_since + limit / 1e3
                if now >= at:
                    conn.close("timeout")
                    return
                deadline = at if deadline is None else min(deadline, at)
            self._set_deadline(deadline)
            return
        self.stall_since = None
        self._set_deadline(deadline)
        bw = tox.get("bandwidth")
        rate = bw.get("rate", 0.0) if bw else 0.0
        while self.queue and not self.dst_paused:
            due, data = self.queue[0]
            if due > now:
                self._schedule(due)
                break
            if data is _EOF:
                self.queue.popleft()
                self.eof_sent = True
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                conn.maybe_done()
                return
            if rate > 0:
                if self.next_free > now:
                    self._schedule(self.next_free)
                    break
                piece = max(1024, int(rate * 0.01))
                if len(data) > piece:
                    self.queue[0] = (due, data[piece:])
                    data = data[:piece]
                else:
                    self.queue.popleft()
                self.next_free = max(self.next_free, now) + len(data) / rate
            else:
                self.queue.popleft()
            self.queued -= len(data)
            self.bytes += len(data)
            conn.proxy.bytes[self.stream] += len(data)
            self.dst.write(data)
        self._maybe_resume_src()


class _Side(asyncio.Protocol):
    """A transport's protocol: data it reads feeds ``out`` (the half it is
    the source of); ``into`` is the half that writes to it."""

    def __init__(self, conn: _Conn, out: _Half, into: _Half, on_made: Any = None) -> None:
        self.conn = conn
        self.out = out
        self.into = into
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self.on_made is not None:
            self.on_made(transport)

    def data_received(self, data: bytes) -> None:
        self.out.on_data(data)

    def eof_received(self) -> bool:
        self.out.on_eof()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        self.into.dst_paused = True

    def resume_writing(self) -> None:
        self.into.dst_paused = False
        self.into.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.conn.reset(f"peer: {exc}")  # pass the reset on
        else:
            self.conn.side_closed(self)


class _Conn:
    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.up = _Half(self, "upstream")
        self.down = _Half(self, "downstream")
        self.client = _Side(self, self.up, self.down)  # reads upstream data
        self.server = _Side(self, self.down, self.up)  # reads downstream data
        self.closed = False
        self.target: tuple[str, int] | None = None
        self.ended = 0

    def wire(self) -> None:
        assert self.client.transport is not None and self.server.transport is not None
        self.up.src, self.up.dst = self.client.transport, self.server.transport
        self.down.src, self.down.dst = self.server.transport, self.client.transport
        self.client.transport.resume_reading()
        self.up.pump()
        self.down.pump()

    def pump(self) -> None:
        self.up.pump()
        self.down.pump()

    def maybe_done(self) -> None:
        if self.up.eof_sent and self.down.eof_sent:
            self.close("done")

    def side_closed(self, side: _Side) -> None:
        if not self.closed:
            self.close("closed by a peer")

    def _end(self, why: str) -> None:
        self.closed = True
        for h in (self.up, self.down):
            h.cancel_timers()
        self.proxy.conns.discard(self)
        self.proxy.ended[why.split(":")[0]] += 1

    def close(self, why: str) -> None:
        """End both sides with a FIN (the kernel follows it with an RST where
        data the proxy held back was never read)."""
        if self.closed:
            return
        self._end(why)
        for t in (self.client.transport, self.server.transport):
            if t is not None and not t.is_closing():
                if t.can_write_eof():
                    t.write_eof()
                t.close()

    def reset(self, why: str) -> None:
        if self.closed:
            return
        self._end(why)
        _rst(self.client.transport)
        _rst(self.server.transport)


class FaultProxy:
    """Listen on ``listen`` (``port`` 0: any) and forward to ``upstream``, or
    to each connection's original destination when ``upstream`` is None."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int] | None = None) -> None:
        self.listen = listen
        self.upstream = upstream
        self.streams = {s: _Stream() for s in STREAMS}
        self.conns: set[_Conn] = set()
        self.accepted = 0
        self.connect_failures = 0
        self.resets = 0
        self.bytes = {s: 0 for s in STREAMS}
        self.ended: collections.Counter[str] = collections.Counter()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self._server = self.loop.run_until_complete(
                    self.loop.create_server(
                        self._accept,
                        self.listen[0],
                        self.listen[1],
                        backlog=512,
                        reuse_address=True,
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise TimeoutError("the proxy did not start within 30 s")
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        if self._thread is None:
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for c in list(self.conns):
                c.reset("proxy closed")

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control (any thread)

    def _call(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def set_toxic(self, toxic: str, stream: str = "both", **attrs: float) -> None:
        """Add (or change) ``toxic`` on ``stream`` (``upstream``, ``downstream``, ``both``)."""
        if toxic not in TOXICS:
            raise ValueError(f"unknown toxic {toxic!r}: one of {TOXICS}")
        self._call(self._set, toxic, self._streams(stream), dict(attrs))

    def remove_toxic(self, toxic: str, stream: str = "both") -> None:
        self._call(self._set, toxic, self._streams(stream), None)

    def clear(self) -> None:
        """Remove every toxic."""
        for t in TOXICS:
            self.remove_toxic(t)

    def reset_all(self) -> int:
        """Cut every live connection with RST now; how many were cut."""
        return int(self._call(self._reset_all))

    def stats(self) -> dict[str, Any]:
        return dict(self._call(self._stats))

    @staticmethod
    def _streams(stream: str) -> tuple[str, ...]:
        if stream == "both":
            return STREAMS
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}: upstream, downstream or both")
        return (stream,)

    # -- on the loop

    def _set(self, toxic: str, streams: tuple[str, ...], attrs: dict[str, float] | None) -> None:
        for s in streams:
            st = self.streams[s]
            if attrs is None:
                st.toxics.pop(toxic, None)
            else:
                st.toxics[toxic] = attrs
        for c in list(self.conns):
            c.pump()

    def _reset_all(self) -> int:
        live = [c for c in self.conns if not c.closed]
        for c in live:
            c.reset("reset_all")
        self.resets += len(live)
        return len(live)

    def _stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "accepted": self.accepted,
            "live": len(self.conns),
            "connect_failures": self.connect_failures,
            "resets": self.resets,
            "bytes": dict(self.bytes),
            "ended": dict(self.ended),
            "toxics": {s: dict(v.toxics) for s, v in self.streams.items()},
        }

    def _accept(self) -> asyncio.Protocol:
        conn = _Conn(self)
        self.accepted += 1
        self.conns.add(conn)

        def accepted(transport: asyncio.Transport) -> None:
            transport.pause_reading()  # until the upstream is connected
            try:
                target = self.upstream or original_dst(transport.get_extra_info("socket"))
            except OSError as exc:
                self.connect_failures += 1
                conn.reset(f"no original destination: {exc}")
                return
            conn.target = target
            self.loop.create_task(self._connect(conn, target))

        conn.client.on_made = accepted
        return conn.client

    async def _connect(self, conn: _Conn, target: tuple[str, int]) -> None:
        try:
            await self.loop.create_connection(lambda: conn.server, target[0], target[1])
        except OSError:
            self.connect_failures += 1
            conn.reset("connect failed")
            return
        if conn.closed:
            _rst(conn.server.transport)
            return
        conn.wire()


def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    upstream = None
    if args.upstream:
        uh, _, up = args.upstream.rpartition(":")
        upstream = (uh, int(up))
    elif not args.transparent:
        sys.exit("give --upstream HOST:PORT or --transparent")
    proxy = FaultProxy((host, int(port)), upstream).start()

    def answer(obj: Any) -> None:
        print("@@", json.dumps(obj), flush=True)

    answer({"ready": proxy.port})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                op = cmd["op"]
                if op == "set":
                    proxy.set_toxic(cmd["toxic"], cmd.get("stream", "both"), **cmd.get("attrs", {}))
                    reply: Any = {"ok": True}
                elif op == "remove":
                    proxy.remove_toxic(cmd["toxic"], cmd.get("stream", "both"))
                    reply = {"ok": True}
                elif op == "clear":
                    proxy.clear()
                    reply = {"ok": True}
                elif op == "reset_all":
                    reply = {"ok": True, "reset": proxy.reset_all()}
                elif op == "stats":
                    reply = {"ok": True, **proxy.stats()}
                elif op == "quit":
                    answer({"ok": True})
                    return
                else:
                    reply = {"ok": False, "error": f"unknown op {op!r}"}
            except Exception as exc:  # answer, keep serving
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            answer(reply)
    finally:
        proxy.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="0.0.0.0:0")
    ap.add_argument(
        "--upstream", help="HOST:PORT (default: each connection's original destination)"
    )
    ap.add_argument("--transparent", action="store_true", help="forward to SO_ORIGINAL_DST")
    _serve(ap.parse_args())
