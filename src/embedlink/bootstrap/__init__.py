"""The bootstrap server (aiohttp) and its client.

Encoder ranks register where their control plane listens; language ranks look
them up. Routes (SGLang's shape)::

    PUT /route    {"role", "tp_size", "dp_size", "rank_ip", "rank_port", "engine_rank", "dp_group"?}
    GET /route?engine_rank=R&target_dp_group=G   -> {"rank_ip", "rank_port"}
    GET /route?engine_rank=-1&target_dp_group=-1 -> {"tp_size", "dp_size"}
    GET /health   -> {"status": "ok"}
    GET /status   -> {"side": "bootstrap", "ranks": [...], ...}  (what ``embedlink status`` shows)
    GET /metrics  -> Prometheus text

A malformed request gets 400, an unknown rank 404, a registration that
contradicts the parallel sizes already registered 409; every error body is
JSON ``{"error": "..."}``. Nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from .._runtime.auth import AUTH_HEADER, Authenticator
from ..observability.metrics import render
from ..protocol import EmbedlinkError

log = logging.getLogger(__name__)

__all__ = ["BootstrapClient", "BootstrapError", "BootstrapServer", "RouteInfo"]

_MAX_SIZE = 4096


class RouteInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One encoder rank's registration."""

    role: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    tp_size: Annotated[int, msgspec.Meta(ge=1, le=_MAX_SIZE)]
    dp_size: Annotated[int, msgspec.Meta(ge=1, le=_MAX_SIZE)]
    rank_ip: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    rank_port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    engine_rank: Annotated[int, msgspec.Meta(ge=0, lt=_MAX_SIZE)]
    dp_group: Annotated[int, msgspec.Meta(ge=0, lt=_MAX_SIZE)] = 0
    #: ``host:port`` of the rank's ``/status`` and ``/metrics`` ("" when it has none)
    status_address: Annotated[str, msgspec.Meta(max_length=300)] = ""


class BootstrapError(EmbedlinkError):
    """The bootstrap server refused a request or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SERVER: web.AppKey[Any] = web.AppKey("embedlink_server", object)


@web.middleware
async def _no_500(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _count(request, exc.status)
        raise
    except Exception as exc:  # a client must never see a 500
        log.warning("bootstrap: %s %s failed: %r", request.method, request.path, exc)
        _count(request, 400)
        return _error(400, f"bad request: {exc}")
    _count(request, response.status)
    return response


def _count(request: web.Request, status: int) -> None:
    server = request.app.get(_SERVER)
    if server is not None:
        route = (
            request.path
            if request.path in ("/route", "/health", "/metrics", "/status")
            else "other"
        )
        server._requests.labels(route, str(status)).inc()


class BootstrapServer:
    """HTTP registry of encoder ranks, run on its own thread and event loop.

    ``BootstrapServer(host="127.0.0.1", port=0).start()`` binds (port 0 picks a
    free port); :attr:`address` is ``"host:port"``. The constructor opens
    nothing; :meth:`start` runs once (RuntimeError when called again or after
    :meth:`close`); :meth:`close` is idempotent, fine without :meth:`start`,
    and joins the server's thread. It is a context manager.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 8998, *, auth_secret: str | bytes | None = None
    ) -> None:
        self.host = host
        self._auth = Authenticator(auth_secret)
        #: registrations refused for a missing or wrong authentication tag
        self.unauthenticated = 0
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "embedlink_bootstrap_requests",
            "Bootstrap requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        Gauge(
            "embedlink_bootstrap_ranks", "Encoder ranks registered", registry=self.registry
        ).set_function(lambda: len(self._routes))
        self.port = port
        self._routes: dict[tuple[int, int], RouteInfo] = {}
        self._sizes: tuple[int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False

    # -- lifecycle

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> BootstrapServer:
        if self._stopped:
            raise RuntimeError("the bootstrap server is closed; create a new one")
        if self._thread is not None:
            raise RuntimeError("the bootstrap server is already started")
        self._thread = threading.Thread(target=self._run, name="embedlink-bootstrap", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise BootstrapError(
                f"bootstrap server failed to start on {self.address}: {self._error}"
            )
        return self

    def close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        loop = self._loop
        if loop is not None and self._error is None:
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # its loop has ended already
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> BootstrapServer:
        return self if self._thread is not None and not self._stopped else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        """Start (if needed) and block until :meth:`close` or KeyboardInterrupt."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            self.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            assert self._runner is not None
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _setup(self) -> None:
        app = web.Application(middlewares=[_no_500], client_max_size=64 * 1024)
        app[_SERVER] = self
        app.router.add_get("/metrics", self._metrics)
        app.router.add_put("/route", self._put_route)
        app.router.add_get("/route", self._get_route)
        app.router.add_get("/health", self._health)
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1])

    # -- handlers

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render(self.registry), content_type="text/plain", charset="utf-8")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "ranks": len(self._routes)})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        """Registered ranks and sizes, JSON-ready (``GET /status``)."""
        ranks = [
            {
                "role": info.role,
                "engine_rank": info.engine_rank,
                "dp_group": info.dp_group,
                "address": f"{info.rank_ip}:{info.rank_port}",
                "status_address": info.status_address or None,
            }
            for _, info in sorted(self._routes.items())
        ]
        return {
            "side": "bootstrap",
            "address": self.address,
            "tp_size": None if self._sizes is None else self._sizes[0],
            "dp_size": None if self._sizes is None else self._sizes[1],
            "ranks": ranks,
            "unauthenticated": self.unauthenticated,
        }

    async def _put_route(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self._auth.verify_header(body, request.headers.get(AUTH_HEADER)):
            self.unauthenticated += 1
            return _error(401, f"registration not authenticated (missing or wrong {AUTH_HEADER})")
        try:
            info = msgspec.json.decode(body, type=RouteInfo)
        except msgspec.ValidationError as exc:
            return _error(400, f"invalid registration: {exc}")
        except msgspec.DecodeError as exc:
            return _error(400, f"registration is not JSON: {exc}")
        if info.engine_rank >= info.tp_size:
            return _error(
                400, f"engine_rank={info.engine_rank} must be below tp_size={info.tp_size}"
            )
        if info.dp_group >= info.dp_size:
            return _error(400, f"dp_group={info.dp_group} must be below dp_size={info.dp_size}")
        sizes = (info.tp_size, info.dp_size)
        if self._sizes is not None and sizes != self._sizes:
            return _error(
                409,
                f"tp_size/dp_size {sizes} contradict the registered {self._sizes}",
            )
        self._sizes = sizes
        old = self._routes.get((info.dp_group, info.engine_rank))
        self._routes[(info.dp_group, info.engine_rank)] = info
        # encoders register again every few seconds: only news is worth a line
        log.log(
            logging.DEBUG if old == info else logging.INFO,
            "bootstrap: registered %s rank %d (dp %d) at %s:%d",
            info.role,
            info.engine_rank,
            info.dp_group,
            info.rank_ip,
            info.rank_port,
        )
        return web.json_response({"status": "ok"})

    async def _get_route(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            rank = int(q["engine_rank"])
            group = int(q["target_dp_group"])
        except KeyError as exc:
            return _error(400, f"missing query parameter {exc.args[0]}")
        except ValueError:
            return _error(400, "engine_rank and target_dp_group must be integers")
        if rank == -1 and group == -1:
            if self._sizes is None:
                return _error(404, "no encoder rank has registered yet")
            return web.json_response({"tp_size": self._sizes[0], "dp_size": self._sizes[1]})
        info = self._routes.get((group, rank))
        if info is None:
            return _error(404, f"no encoder rank {rank} registered in dp group {group}")
        return web.json_response({"rank_ip": info.rank_ip, "rank_port": info.rank_port})


class BootstrapClient:
    """Blocking client for a :class:`BootstrapServer` at ``address`` ("host:port")."""

    def __init__(
        self, address: str, timeout: float = 5.0, *, auth_secret: str | bytes | None = None
    ) -> None:
        if ":" not in address:
            raise ValueError(f"bootstrap address {address!r} must be host:port")
        self.address = address
        self.timeout = timeout
        self._auth = Authenticator(auth_secret)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(self._auth.header(data) if data else {})}
        req = urllib.request.Request(
            f"http://{self.address}{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", exc.reason)
            except Exception:
                msg = exc.reason
            raise BootstrapError(
                f"bootstrap {self.address}: {method} {path}: {exc.code} {msg}", exc.code
            ) from None
        except (OSError, ValueError) as exc:
            raise BootstrapError(f"bootstrap {self.address} unreachable: {exc}") from None

    def register(self, info: RouteInfo) -> None:
        self._request("PUT", "/route", msgspec.to_builtins(info))

    def sizes(self) -> tuple[int, int]:
        """``(tp_size, dp_size)`` of the encoder."""
        r = self._request("GET", "/route?engine_rank=-1&target_dp_group=-1")
        return int(r["tp_size"]), int(r["dp_size"])

    def lookup(self, engine_rank: int, dp_group: int) -> tuple[str, int]:
        """``(rank_ip, rank_port)`` of one encoder rank's control plane."""
        r = self._request("GET", f"/route?engine_rank={engine_rank}&target_dp_group={dp_group}")
        return str(r["rank_ip"]), int(r["rank_port"])

    def health(self) -> bool:
        try:
            return self._request("GET", "/health").get("status") == "ok"  # type: ignore[no-any-return]
        except BootstrapError:
            return False
