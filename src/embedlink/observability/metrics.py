"""Prometheus metrics for endpoints and the bootstrap server.

Each endpoint and server has its own registry (several can live in one
process), served over HTTP: ``metrics_port=`` on an endpoint starts an
exporter (port 0 picks a free one; :attr:`MetricsExporter.port` tells which)
that answers ``GET /metrics`` (Prometheus text), ``GET /status`` (the
endpoint's live rooms by status, pool use and peers as JSON, what
``embedlink status`` shows) and ``GET /health``; the bootstrap server serves
the same three routes itself.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

__all__ = ["EndpointMetrics", "MetricsExporter", "render", "rooms_by_status"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class EndpointMetrics:
    """The metrics of one endpoint (``side`` is ``encoder`` or ``language``)."""

    def __init__(
        self, side: str, free_blocks: Callable[[], float], used_blocks: Callable[[], float]
    ) -> None:
        self.side = side
        r = self.registry = CollectorRegistry()
        self.rooms = Counter(
            "embedlink_rooms", "Rooms that ended, by final status", ["side", "status"], registry=r
        )
        self.resumes = Counter(
            "embedlink_resumes", "Partial chunks followed by a resume", ["side"], registry=r
        )
        self.bytes = Counter(
            "embedlink_bytes", "Payload bytes moved", ["side", "transport", "direction"], registry=r
        )
        self.chunk_seconds = Histogram(
            "embedlink_chunk_seconds",
            "Data-plane write of one chunk",
            ["side", "transport"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.room_seconds = Histogram(
            "embedlink_room_seconds",
            "Room creation to its final status",
            ["side", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "embedlink_dropped_messages",
            "Control messages dropped as malformed",
            ["side"],
            registry=r,
        )
        self.ignored = Counter(
            "embedlink_ignored_inputs",
            "Inputs ignored (old epoch, duplicate, late)",
            ["side"],
            registry=r,
        )
        self.unauthenticated = Counter(
            "embedlink_unauthenticated_messages",
            "Control messages rejected by authentication",
            ["side"],
            registry=r,
        )
        self.heartbeat_misses = Counter(
            "embedlink_heartbeat_misses",
            "Heartbeat intervals a peer stayed silent through",
            ["side"],
            registry=r,
        )
        self.dead_peers = Counter(
            "embedlink_heartbeat_dead_peers",
            "Peers declared dead after missed heartbeats",
            ["side"],
            registry=r,
        )
        pool = Gauge("embedlink_pool_blocks", "Pool blocks by state", ["side", "state"], registry=r)
        pool.labels(side, "free").set_function(free_blocks)
        pool.labels(side, "used").set_function(used_blocks)

        # labelled children by label values: labels() validates and locks on
        # every call, and these run once or twice per room
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.side, *values)
        return child

    def ended(self, status: str, seconds: float) -> None:
        self._child(self.rooms, status).inc()
        self._child(self.room_seconds, status).observe(seconds)

    def moved(
        self, transport: str, direction: str, nbytes: int, seconds: float | None = None
    ) -> None:
        self._child(self.bytes, transport, direction).inc(nbytes)
        if seconds is not None:
            self._child(self.chunk_seconds, transport).observe(seconds)


class MetricsExporter:
    """An HTTP server for one endpoint on ``host:port`` (port 0: a free one).

    ``GET /metrics``: the registry; ``GET /status``: ``status()`` as JSON (404
    when no status function was given); ``GET /health``. :meth:`start` binds
    and runs it on its own thread (the constructor opens nothing);
    :meth:`close` stops it and joins that thread. A failing status function
    answers 503 with the error and never stops the server.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/health":
                    self._json(200, {"status": "ok"})
                elif path == "/status" and exporter._status is not None:
                    try:
                        body = exporter._status()
                    except Exception as exc:  # e.g. the endpoint is closing
                        self._json(503, {"error": f"status unavailable: {exc}"})
                    else:
                        self._json(200, body)
                else:
                    self._json(404, {"error": f"no route {path}; try /metrics, /status, /health"})

            def _json(self, code: int, body: Any) -> None:
                self._reply(code, json.dumps(body).encode(), "application/json")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics http: " + format, *args)

        self._status = status
        self._handler = Handler
        self._host = host
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsExporter:
        """Bind and serve; :attr:`port` is then the bound port. OSError when
        the port cannot be bound."""
        if self._server is not None:
            raise RuntimeError("the metrics exporter is already started")
        server = ThreadingHTTPServer((self._host, self.port), self._handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever, name="embedlink-metrics", daemon=True
        )
        self._thread.start()
        return self

    def address(self, host: str) -> str:
        """``host:port`` of this server as reached through ``host``."""
        return f"{host}:{self.port}"

    def close(self) -> None:
        """Stop serving and join the server thread. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)


def rooms_by_status(statuses: Iterable[Any]) -> dict[str, int]:
    """``{status name: count}`` over every :class:`~embedlink.Status`, zeros included."""
    from ..protocol import Status

    counts = {st.name: 0 for st in Status}
    for st in statuses:
        counts[st.name] += 1
    return counts


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format."""
    return generate_latest(registry)
