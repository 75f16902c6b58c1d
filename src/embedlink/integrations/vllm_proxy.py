"""A router for disaggregated encode/prefill serving with vLLM (aiohttp).

vLLM 0.33.0 instances load :class:`~embedlink.integrations.vllm.EmbedlinkECConnector`:
encoder instances with ``ec_role: "ec_producer"`` and prefill/decode instances
with ``ec_role: "ec_consumer"``. This proxy is what clients talk to
(``embedlink vllm-proxy``)::

    POST /v1/chat/completions, POST /v1/completions   (OpenAI-compatible)
    GET  /v1/models, GET /health    -> the first --prefill instance, relayed as it answers
    GET  /proxy/health              -> 200 {"status": "ok", ...} while the proxy is up

A request with multimodal input takes two upstream calls:

1. to an encoder instance (round-robin over ``--encoder``), the client's body
   with ``stream: false`` (``stream_options`` removed), ``max_tokens: 1``
   (and ``max_completion_tokens: 1`` for chat; ``n: 1`` when ``n`` is given)
   and ``ec_transfer_params: {"embedlink": {}}``. The encoder's connector
   assigns a room to each multimodal item, sends the item's embedding into
   it, and vLLM returns the rooms as the response's top-level
   ``ec_transfer_params``, e.g. ``{"embedlink": {"rooms": [..],
   "bootstrap": "host:port", "dp_group": 0}}``;
2. to a prefill/decode instance (round-robin over ``--prefill``), the
   client's original body (``stream`` as the client asked) with
   ``ec_transfer_params`` set to exactly what the encoder returned. Its
   answer goes back to the client: status, content type and body; an SSE
   body (``text/event-stream``) chunk by chunk as it arrives, never buffered.

A request without multimodal input goes straight to a prefill instance,
unchanged. What counts as multimodal:

* chat: any part of a message's ``content`` list that is an object whose
  ``type`` is not a text type (``text``, ``input_text``, ``refusal``,
  ``thinking``): ``image_url``, ``input_audio``, ``audio_url``,
  ``video_url``, ``image_embeds`` and so on (a part without ``type`` is
  multimodal when it has a key other than ``text``);
* completions: a non-empty top-level ``multi_modal_data``, or a ``prompt``
  that is an object (or a list holding objects) with a non-empty
  ``multi_modal_data`` or a non-text ``type``. Strings and token ids are text.

Both calls carry the client's ``Authorization`` header and one
``X-Request-Id`` (the client's, or a fresh one), so the two instances' logs
name the request alike.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "code"}}``
(``code`` is the HTTP status, as vLLM writes it):

* body not a JSON object: 400 ``invalid_request_error``;
* encoder unreachable, timed out, answering 5xx (or another non-2xx that is
  not a 4xx), answering without a non-empty ``ec_transfer_params`` object or
  with a body that is not JSON: 502 ``encoder_failed``, naming the encoder
  and what happened (the upstream status and the start of its body). A 4xx
  from the encoder is relayed as it is: the request was bad, not the encoder;
* prefill instance unreachable or timed out before answering: 502
  ``prefill_failed``;
* prefill instance answering 5xx to a request whose embeddings went through
  embedlink: 502 ``embedding_transfer_failed``, naming the rooms and the
  request id and pointing at the prefill instance's log (vLLM turns a failed
  transfer into a bare 500 "Internal server error"; its log has the reason).
  Any other answer of a prefill instance is relayed as it is. A streamed
  answer has sent its status before any failure inside the stream: vLLM
  then writes the error as an SSE event itself; a prefill instance that
  drops the connection mid-stream gets a final ``data: {"error": ...}``
  event (type ``prefill_failed``) from the proxy.

Every upstream call goes through one :class:`aiohttp.ClientSession`, made when
the app starts and closed when it stops, with no cap on connections.
``timeout`` bounds each encoder call as a whole, and each prefill call's
connect and every wait for the next byte (the head, then between body
chunks), so a long stream is not cut off while tokens keep coming. Nothing
blocks the event loop. There are no retries: a request is sent to one
encoder and one prefill instance at most once.

The tests (tests/integration/test_vllm_proxy.py) run this proxy as a real
process against fake vLLM instances: aiohttp servers that speak vLLM's HTTP
side (recording what they get, answering with ``ec_transfer_params`` and SSE)
with no engine behind them. That checks the proxy's own contract; the
connector's is checked against vLLM in tests/vllm.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

__all__ = ["check_url", "has_multimodal_input", "make_app", "run"]

#: the largest client body accepted (base64 images and videos are large)
MAX_BODY = 1 << 30
#: how much of an upstream's error body goes into a message
EXCERPT = 300
#: content-part types that carry text only
TEXT_TYPES = frozenset({"text", "input_text", "refusal", "thinking"})
#: what goes to the encoder as the request's transfer params
ENCODER_PARAMS: dict[str, Any] = {"embedlink": {}}
_FORWARDED = ("Authorization",)


class _Upstreams:
    """The instances of one kind, taken in turn (one event loop: no lock)."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("need at least one upstream URL")
        self.urls = tuple(u.rstrip("/") for u in urls)
        self._next = 0

    def pick(self) -> str:
        url = self.urls[self._next % len(self.urls)]
        self._next += 1
        return url


_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
_ENCODERS: web.AppKey[_Upstreams] = web.AppKey("encoders", _Upstreams)
_PREFILLS: web.AppKey[_Upstreams] = web.AppKey("prefills", _Upstreams)
_TIMEOUT: web.AppKey[float] = web.AppKey("timeout", float)


def check_url(url: str) -> str:
    """``url`` without a trailing slash; raises ValueError unless it is an
    http or https URL with a host (and no query or fragment)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a base URL takes no query or fragment")
    try:
        parts.port  # noqa: B018  (raises on a port out of range)
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    return url.rstrip("/")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= EXCERPT else text[:EXCERPT] + "..."


def _failure(exc: BaseException) -> str:
    what = "unreachable" if isinstance(exc, aiohttp.ClientConnectorError) else "failed"
    return f"{what}: {type(exc).__name__}: {exc}"


def _has_mm_prompt(prompt: Any) -> bool:
    if isinstance(prompt, dict):
        if prompt.get("multi_modal_data"):
            return True
        kind = prompt.get("type")
        return isinstance(kind, str) and kind not in TEXT_TYPES
    if isinstance(prompt, list):
        return any(isinstance(p, dict | list) and _has_mm_prompt(p) for p in prompt)
    return False


def _is_mm_part(part: dict[str, Any]) -> bool:
    kind = part.get("type")
    if kind is None:  # vLLM goes by the keys then, as does this
        return any(k != "text" for k in part)
    return kind not in TEXT_TYPES


def has_multimodal_input(body: dict[str, Any], chat: bool) -> bool:
    """Whether a request needs an encoder (the module docstring says what counts)."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return False
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for part in content:
                if isinstance(part, dict) and _is_mm_part(part):
                    return True
        return False
    return bool(body.get("multi_modal_data")) or _has_mm_prompt(body.get("prompt"))


def _encoder_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["stream"] = False
    out.pop("stream_options", None)
    out["max_tokens"] = 1
    if chat:
        out["max_completion_tokens"] = 1
    if "n" in out:
        out["n"] = 1
    out["ec_transfer_params"] = copy.deepcopy(ENCODER_PARAMS)
    return out


def _headers(request: web.Request, request_id: str) -> dict[str, str]:
    out = {h: request.headers[h] for h in _FORWARDED if h in request.headers}
    out["X-Request-Id"] = request_id
    return out


async def _read_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "invalid_request_error", f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error(400, "invalid_request_error", f"request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "invalid_request_error", "request body must be a JSON object")
    return body


async def _encode(
    request: web.Request, url: str, body: dict[str, Any], headers: dict[str, str]
) -> dict[str, Any] | web.Response:
    """The encoder's ``ec_transfer_params``, or the response for the client."""
    session = request.app[_SESSION]
    timeout = request.app[_TIMEOUT]
    target = f"{url}{request.path}"
    try:
        async with session.post(
            target, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            status = resp.status
            ctype = resp.headers.get("Content-Type", "application/json")
            raw = await resp.read()
    except asyncio.TimeoutError:
        return _error(502, "encoder_failed", f"encoder {url} did not answer within {timeout:g} s")
    except (aiohttp.ClientError, OSError) as exc:
        return _error(502, "encoder_failed", f"encoder {url} {_failure(exc)}")
    if 400 <= status < 500:
        # the request was bad, not the encoder: the client hears what vLLM said
        return web.Response(status=status, body=raw, headers={"Content-Type": ctype})
    if not 200 <= status < 300:
        return _error(
            502, "encoder_failed", f"encoder {url} answered HTTP {status}: {_excerpt(raw)}"
        )
    try:
        answer = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _error(
            502,
            "encoder_failed",
            f"encoder {url} answered HTTP {status} with a body that is not JSON: {_excerpt(raw)}",
        )
    params = answer.get("ec_transfer_params") if isinstance(answer, dict) else None
    if not isinstance(params, dict) or not params:
        return _error(
            502,
            "encoder_failed",
            f"encoder {url} answered HTTP {status} without ec_transfer_params (is it a vLLM "
            "instance with the EmbedlinkECConnector as ec_producer?): " + _excerpt(raw),
        )
    return params


def _rooms(params: dict[str, Any] | None) -> Any:
    mine = (params or {}).get("embedlink")
    return mine.get("rooms") if isinstance(mine, dict) else None


async def _relay(
    request: web.Request,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    params: dict[str, Any] | None,
) -> web.StreamResponse:
    """Send ``body`` to the prefill instance at ``url`` and relay its answer."""
    session = request.app[_SESSION]
    timeout = request.app[_TIMEOUT]
    limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
    rid = headers["X-Request-Id"]
    try:
        async with session.post(
            f"{url}{request.path}", json=body, headers=headers, timeout=limits
        ) as resp:
            ctype = resp.headers.get("Content-Type", "application/json")
            if resp.status >= 500 and params is not None:
                raw = await resp.read()
                rooms = _rooms(params)
                log.warning(
                    "request %s: prefill %s answered %d after embedlink rooms %s",
                    rid,
                    url,
                    resp.status,
                    rooms,
                )
                return _error(
                    502,
                    "embedding_transfer_failed",
                    f"prefill instance {url} failed the request (HTTP {resp.status}: "
                    f"{_excerpt(raw)}) whose embeddings came through embedlink rooms "
                    f"{rooms}; look at the prefill instance's log (request id {rid}) for "
                    "the reason",
                )
            if not ctype.startswith("text/event-stream"):
                raw = await resp.read()
                return web.Response(status=resp.status, body=raw, headers={"Content-Type": ctype})
            out = web.StreamResponse(
                status=resp.status, headers={"Content-Type": ctype, "Cache-Control": "no-cache"}
            )
            try:
                await out.prepare(request)
                await _stream(resp, out, url, rid)
            except ConnectionResetError:
                # the client went away; leaving the block closes the upstream
                # call, which vLLM takes as an abort of the request
                log.info("request %s: the client disconnected", rid)
            return out
    except asyncio.TimeoutError:
        return _error(
            502, "prefill_failed", f"prefill instance {url} did not answer within {timeout:g} s"
        )
    except (aiohttp.ClientError, OSError) as exc:
        return _error(502, "prefill_failed", f"prefill instance {url} {_failure(exc)}")


async def _stream(
    resp: aiohttp.ClientResponse, out: web.StreamResponse, url: str, rid: str
) -> None:
    """Copy an SSE body chunk by chunk as it arrives. Raises
    ConnectionResetError when the client has gone."""
    while True:
        try:
            chunk = await resp.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # the status went out already: the client learns it in-stream
            log.warning("request %s: prefill %s broke off the stream: %r", rid, url, exc)
            event = {
                "error": {
                    "message": f"prefill instance {url} broke off the stream: "
                    f"{type(exc).__name__}: {exc}",
                    "type": "prefill_failed",
                    "code": 502,
                }
            }
            # blank lines first: they end whatever event the upstream left half-sent
            await out.write(b"\n\ndata: " + json.dumps(event).encode() + b"\n\n")
            break
        if not chunk:
            break
        await out.write(chunk)
    await out.write_eof()


async def _completion(request: web.Request) -> web.StreamResponse:
    body = await _read_object(request)
    if isinstance(body, web.Response):
        return body
    chat = request.path.endswith("/chat/completions")
    rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    headers = _headers(request, rid)
    params: dict[str, Any] | None = None
    if has_multimodal_input(body, chat):
        encoder = request.app[_ENCODERS].pick()
        got = await _encode(request, encoder, _encoder_body(body, chat), headers)
        if isinstance(got, web.Response):
            return got
        params = got
        body = {**body, "ec_transfer_params": params}
        log.debug("request %s: encoder %s gave %s", rid, encoder, params)
    return await _relay(request, request.app[_PREFILLS].pick(), body, headers, params)


async def _passthrough(request: web.Request) -> web.Response:
    url = request.app[_PREFILLS].urls[0]
    timeout = request.app[_TIMEOUT]
    headers = {h: request.headers[h] for h in _FORWARDED if h in request.headers}
    try:
        async with request.app[_SESSION].get(
            f"{url}{request.path_qs}",
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type")
            return web.Response(
                status=resp.status, body=raw, headers={"Content-Type": ctype} if ctype else None
            )
    except asyncio.TimeoutError:
        return _error(
            502, "prefill_failed", f"prefill instance {url} did not answer within {timeout:g} s"
        )
    except (aiohttp.ClientError, OSError) as exc:
        return _error(502, "prefill_failed", f"prefill instance {url} {_failure(exc)}")


async def _own_health(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "status": "ok",
            "encoders": list(request.app[_ENCODERS].urls),
            "prefills": list(request.app[_PREFILLS].urls),
        }
    )


async def _session(app: web.Application) -> AsyncIterator[None]:
    # no cap on connections: the instances' own queues decide concurrency
    app[_SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[_SESSION].close()


def make_app(encoders: Sequence[str], prefills: Sequence[str], timeout: float) -> web.Application:
    """The proxy as an aiohttp application (the module docstring says what
    it serves). ``encoders`` and ``prefills`` are base URLs
    (``http://host:port``); ``timeout`` is in seconds."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    app = web.Application(client_max_size=MAX_BODY)
    app[_ENCODERS] = _Upstreams([check_url(u) for u in encoders])
    app[_PREFILLS] = _Upstreams([check_url(u) for u in prefills])
    app[_TIMEOUT] = float(timeout)
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/chat/completions", _completion)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_get("/v1/models", _passthrough)
    app.router.add_get("/health", _passthrough)
    app.router.add_get("/proxy/health", _own_health)
    return app


async def _serve(
    app: web.Application, host: str, port: int, on_ready: Callable[[str], None] | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        where = f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}"
        log.info("vllm proxy on %s", where)
        if on_ready is not None:
            on_ready(where)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await runner.cleanup()


def run(
    encoders: Sequence[str],
    prefills: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    timeout: float = 600.0,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve :func:`make_app` on ``host:port`` (0: any free port) until
    SIGINT or SIGTERM, then close every connection and return. ``on_ready``
    gets the URL it listens on (with the bound port). Requests in flight at
    the signal get aiohttp's shutdown timeout (60 s) to finish. Call it from
    the main thread (it installs the signal handlers); raises OSError when the
    address cannot be bound."""
    asyncio.run(_serve(make_app(encoders, prefills, timeout), host, port, on_ready))
