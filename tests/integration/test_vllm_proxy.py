"""``embedlink vllm-proxy`` as a real process against fake vLLM instances.

The fakes are aiohttp servers in this process (one event loop on a thread of
its own, real loopback sockets, port 0) that speak the HTTP side of vLLM's
OpenAI server: a fake encoder records what it got and answers with
``ec_transfer_params``, a fake prefill records and answers JSON or SSE. No
engine is behind them, which is enough for the proxy's own contract (what
goes where, what comes back); the connector itself is tested against vLLM in
tests/vllm.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from embedlink.integrations.vllm_proxy import has_multimodal_input

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
PARAMS = {"embedlink": {"rooms": [1, 2], "bootstrap": "127.0.0.1:9", "dp_group": 0}}
CHUNKS = [f"data: {json.dumps({'choices': [{'delta': {'content': w}}]})}\n\n" for w in "abc"]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
WAIT = 20.0  # the most a fake waits on a test's gate


def chat(*parts: Any, **extra: Any) -> dict[str, Any]:
    content: Any = list(parts) if parts else "hello"
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


# -- fake vLLM instances


class Fake:
    """One fake vLLM instance. ``mode`` says how it answers; ``gate`` holds
    a stream after its first chunk (and a hanging encoder) until set."""

    def __init__(self, role: str, journal: list[str]) -> None:
        self.role = role
        self.journal = journal
        self.url = ""
        self.got: list[tuple[str, Any, Any]] = []
        self.mode = "ok"
        self.gate = threading.Event()
        self.stream_done = threading.Event()
        self.reset()

    def reset(self) -> None:
        self.got.clear()
        self.mode = "ok"
        self.gate.set()
        self.stream_done.clear()

    def bodies(self) -> list[Any]:
        return [body for _, _, body in self.got]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.method == "POST" else None
        self.got.append((request.path, request.headers.copy(), body))
        self.journal.append(self.url)
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": f"{self.url} model"}]})
        if request.path == "/health":
            return web.Response(status=200)
        if self.mode == "bad_request":
            return web.json_response(
                {"error": {"message": "bad model", "type": "BadRequestError", "code": 400}},
                status=400,
            )
        if self.mode == "error":
            return web.json_response(
                {"error": {"message": "Internal server error", "type": "x", "code": 500}},
                status=500,
            )
        if self.role == "encoder":
            return await self._encode()
        if body.get("stream"):
            return await self._stream(request)
        return web.json_response({"id": "cmpl-1", "choices": [{"text": "a cat"}], "by": self.url})

    async def _encode(self) -> web.Response:
        if self.mode == "hang":
            await asyncio.to_thread(self.gate.wait, WAIT)
        answer: dict[str, Any] = {"id": "enc-1", "choices": [{"index": 0, "text": "x"}]}
        if self.mode == "no_params":
            return web.json_response(answer)
        return web.json_response({**answer, "ec_transfer_params": PARAMS})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await out.prepare(request)
        for i, chunk in enumerate(CHUNKS):
            await out.write(chunk.encode())
            if i == 0 and self.mode == "break":
                assert request.transport is not None
                request.transport.abort()  # mid-body: the chunked body never ends
                return out
            if i == 0:
                await asyncio.to_thread(self.gate.wait, WAIT)
            else:
                await asyncio.sleep(0.01)
        # before the end goes out: a client that saw the end knows it is set
        # (set afterwards, a handler running late under load set it after the
        # next test's reset)
        self.stream_done.set()
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out


class Upstreams:
    """Fake instances served from one event loop on a thread of its own: two
    encoders and two prefill instances; ``journal`` lists the URL of each
    one that got a request, in order."""

    def __init__(self) -> None:
        self.journal: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.enc_a = self.add("encoder")
        self.enc_b = self.add("encoder")
        self.prefill = self.add("prefill")
        self.spare = self.add("prefill")
        self.all = (self.enc_a, self.enc_b, self.prefill, self.spare)

    def add(self, role: str) -> Fake:
        fake = Fake(role, self.journal)
        fake.url = asyncio.run_coroutine_threadsafe(self._serve(fake), self.loop).result(10)
        return fake

    async def _serve(self, fake: Fake) -> str:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    def close(self) -> None:
        async def cleanup() -> None:
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the proxy process


class Proxy:
    """``embedlink vllm-proxy --port 0`` in its own process."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "embedlink.service.cli", "vllm-proxy", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(
            target=self._pump, args=(self.proc.stdout, self.lines), daemon=True
        ).start()
        threading.Thread(target=self._drain, daemon=True).start()
        first = self.lines.get(timeout=30)
        m = re.search(r" on (http://\S+) ", first or "")
        assert m, f"no address in {first!r}; stderr: {''.join(self.stderr)}"
        self.url = m.group(1)

    @staticmethod
    def _pump(stream: Any, out: queue.Queue[str | None]) -> None:
        for line in stream:
            out.put(line)
        out.put(None)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Signal it; its exit status and what it printed after the first line."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        rest = []
        while (line := self.lines.get(timeout=5)) is not None:
            rest.append(line)
        return rc, "".join(rest)


def dead_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- a client


@dataclass
class Reply:
    status: int
    ctype: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        assert self.ctype.startswith("application/json"), (self.ctype, self.body)
        err: dict[str, Any] = self.json()["error"]
        assert set(err) == {"message", "type", "code"}, err
        return err


async def _call(method: str, url: str, **kw: Any) -> Reply:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as r:
        return Reply(r.status, r.headers.get("Content-Type", ""), await r.read())


def call(method: str, url: str, **kw: Any) -> Reply:
    return asyncio.run(asyncio.wait_for(_call(method, url, **kw), 30))


def post(proxy: Proxy, path: str, body: Any, **kw: Any) -> Reply:
    return call("POST", proxy.url + path, json=body, **kw)


# -- fixtures


@pytest.fixture(scope="module")
def ups():
    u = Upstreams()
    yield u
    u.close()


@pytest.fixture(scope="module")
def proxy(ups):
    p = Proxy(
        "--encoder",
        ups.enc_a.url,
        "--encoder",
        ups.enc_b.url + "/",
        "--prefill",
        ups.prefill.url,
    )
    yield p
    rc, _ = p.stop()
    assert rc == 0, "".join(p.stderr)


@pytest.fixture(autouse=True)
def fresh(request):
    if "ups" in request.fixturenames:
        ups = request.getfixturevalue("ups")
        for f in ups.all:
            f.reset()
        ups.journal.clear()
    yield


def encoders_got(ups: Upstreams) -> list[Any]:
    return ups.enc_a.bodies() + ups.enc_b.bodies()


# -- what goes where


def test_multimodal_chat_goes_to_an_encoder_then_to_the_prefill_with_its_params(ups, proxy):
    body = chat({"type": "text", "text": "what is it?"}, IMAGE, max_tokens=50, temperature=0)
    headers = {"X-Request-Id": "req-7", "Authorization": "Bearer k"}
    r = post(proxy, "/v1/chat/completions", body, headers=headers)
    assert r.status == 200, r.body
    assert r.json()["by"] == ups.prefill.url
    (enc,) = encoders_got(ups)
    assert enc == {
        **body,
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "ec_transfer_params": {"embedlink": {}},
    }
    (pre,) = ups.prefill.bodies()
    assert pre == {**body, "ec_transfer_params": PARAMS}
    assert ups.journal[0] in (ups.enc_a.url, ups.enc_b.url)
    assert ups.journal[1:] == [ups.prefill.url]
    # one request id names the request on both instances
    ids = {h["X-Request-Id"] for f in (ups.enc_a, ups.enc_b, ups.prefill) for _, h, _ in f.got}
    assert ids == {"req-7"}
    assert {
        h["Authorization"] for f in (ups.enc_a, ups.enc_b, ups.prefill) for _, h, _ in f.got
    } == {"Bearer k"}


async def _stream_through(proxy: Proxy, ups: Upstreams, body: dict[str, Any]) -> list[bytes]:
    ups.prefill.gate.clear()
    events = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events.append(await r.content.readuntil(b"\n\n"))
        # the first chunk is here while the prefill still holds the rest
        assert not ups.prefill.stream_done.is_set()
        ups.prefill.gate.set()
        while event := await r.content.readuntil(b"\n\n"):
            events.append(event)
    return events


@pytest.mark.parametrize("multimodal", [True, False])
def test_stream_relays_each_chunk_as_it_arrives(ups, proxy, multimodal):
    parts = [IMAGE] if multimodal else [{"type": "text", "text": "hi"}]
    body = chat(*parts, stream=True, stream_options={"include_usage": True}, max_tokens=50)
    events = asyncio.run(asyncio.wait_for(_stream_through(proxy, ups, body), 30))
    assert events == [c.encode() for c in CHUNKS] + [b"data: [DONE]\n\n"]
    assert ups.prefill.bodies() == [{**body, "ec_transfer_params": PARAMS} if multimodal else body]
    if multimodal:
        (enc,) = encoders_got(ups)
        assert enc["stream"] is False and "stream_options" not in enc
        assert enc["max_tokens"] == 1 and enc["ec_transfer_params"] == {"embedlink": {}}
    else:
        assert encoders_got(ups) == []


def test_a_stream_the_prefill_breaks_off_ends_with_an_error_event(ups, proxy):
    ups.prefill.mode = "break"

    async def read() -> bytes:
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.url + "/v1/chat/completions", json=chat(stream=True)) as r,
        ):
            assert r.status == 200
            return await r.read()

    got = asyncio.run(asyncio.wait_for(read(), 30))
    first, rest = got.split(b"\n\n", 1)
    assert first + b"\n\n" == CHUNKS[0].encode()
    data = rest.strip()
    assert data.startswith(b"data: ")
    err = json.loads(data[len(b"data: ") :])["error"]
    assert err["type"] == "prefill_failed" and ups.prefill.url in err["message"]
    # and the proxy goes on serving
    assert post(proxy, "/v1/chat/completions", chat()).status == 200


@pytest.mark.parametrize(
    "body",
    [
        chat(),
        chat({"type": "text", "text": "hi"}, {"type": "text", "text": "there"}, stream=False),
    ],
    ids=["string", "text-parts"],
)
def test_text_only_chat_skips_the_encoder(ups, proxy, body):
    r = post(proxy, "/v1/chat/completions", body)
    assert r.status == 200, r.body
    assert encoders_got(ups) == []
    assert ups.prefill.bodies() == [body]  # unchanged: no ec_transfer_params


def test_text_only_completion_skips_the_encoder(ups, proxy):
    body = {"model": "m", "prompt": "once upon", "max_tokens": 5}
    r = post(proxy, "/v1/completions", body)
    assert r.status == 200, r.body
    assert encoders_got(ups) == []
    assert ups.prefill.got[0][0] == "/v1/completions"
    assert ups.prefill.bodies() == [body]


def test_completion_with_multi_modal_data_goes_through_the_encoder(ups, proxy):
    body = {
        "model": "m",
        "prompt": "<image> a",
        "multi_modal_data": {"image": "x"},
        "max_tokens": 5,
    }
    r = post(proxy, "/v1/completions", body)
    assert r.status == 200, r.body
    (enc,) = encoders_got(ups)
    assert enc == {
        **body,
        "stream": False,
        "max_tokens": 1,
        "ec_transfer_params": {"embedlink": {}},
    }
    assert [path for f in (ups.enc_a, ups.enc_b) for path, _, _ in f.got] == ["/v1/completions"]
    assert ups.prefill.bodies() == [{**body, "ec_transfer_params": PARAMS}]


def test_round_robin_across_two_encoders(ups, proxy):
    for _ in range(4):
        assert post(proxy, "/v1/chat/completions", chat(IMAGE)).status == 200
    assert len(ups.enc_a.got) == len(ups.enc_b.got) == 2
    firsts = [u for u in ups.journal if u != ups.prefill.url]
    assert firsts[0] != firsts[1] and firsts[:2] == firsts[2:]


def test_models_and_health_pass_through_to_the_first_prefill(ups):
    p = Proxy("--encoder", ups.enc_a.url, "--prefill", ups.prefill.url, "--prefill", ups.spare.url)
    try:
        r = call("GET", p.url + "/v1/models")
        assert r.status == 200 and r.json()["data"][0]["id"] == f"{ups.prefill.url} model"
        assert call("GET", p.url + "/health").status == 200
        assert [path for path, _, _ in ups.prefill.got] == ["/v1/models", "/health"]
        own = call("GET", p.url + "/proxy/health")
        assert own.status == 200 and own.json()["status"] == "ok"
        # completions go round the prefill instances
        for _ in range(2):
            assert post(p, "/v1/completions", {"model": "m", "prompt": "x"}).status == 200
        assert len(ups.spare.got) == 1
        assert ups.spare.got[0][0] == "/v1/completions"
    finally:
        assert p.stop()[0] == 0


# -- errors


def test_bad_json_is_400(proxy):
    r = call("POST", proxy.url + "/v1/chat/completions", data=b"{not json")
    assert r.status == 400
    assert r.error()["type"] == "invalid_request_error" and "JSON" in r.error()["message"]
    r = post(proxy, "/v1/completions", [1, 2])
    assert r.status == 400 and "object" in r.error()["message"]


def test_encoder_without_params_is_502_encoder_failed(ups, proxy):
    ups.enc_a.mode = ups.enc_b.mode = "no_params"
    r = post(proxy, "/v1/chat/completions", chat(IMAGE))
    assert r.status == 502
    err = r.error()
    assert err["type"] == "encoder_failed" and err["code"] == 502
    assert "ec_transfer_params" in err["message"] and "enc-1" in err["message"]
    assert re.search(re.escape(ups.enc_a.url) + "|" + re.escape(ups.enc_b.url), err["message"])
    assert ups.prefill.got == []


def test_encoder_500_is_502_with_its_status_and_body(ups, proxy):
    ups.enc_a.mode = ups.enc_b.mode = "error"
    r = post(proxy, "/v1/chat/completions", chat(IMAGE))
    assert r.status == 502
    err = r.error()
    assert err["type"] == "encoder_failed"
    assert "HTTP 500" in err["message"] and "Internal server error" in err["message"]
    assert ups.prefill.got == []


def test_encoder_4xx_is_relayed_as_it_is(ups, proxy):
    ups.enc_a.mode = ups.enc_b.mode = "bad_request"
    r = post(proxy, "/v1/chat/completions", chat(IMAGE))
    assert r.status == 400
    assert r.json() == {"error": {"message": "bad model", "type": "BadRequestError", "code": 400}}
    assert ups.prefill.got == []


def test_prefill_500_on_an_embedlink_request_is_502_embedding_transfer_failed(ups, proxy):
    ups.prefill.mode = "error"
    r = post(proxy, "/v1/chat/completions", chat(IMAGE), headers={"X-Request-Id": "req-9"})
    assert r.status == 502
    err = r.error()
    assert err["type"] == "embedding_transfer_failed"
    msg = err["message"]
    assert ups.prefill.url in msg and "failed the request" in msg
    assert "[1, 2]" in msg and "log" in msg and "req-9" in msg


def test_prefill_errors_on_other_requests_are_relayed_as_they_are(ups, proxy):
    ups.prefill.mode = "error"
    r = post(proxy, "/v1/chat/completions", chat())
    assert r.status == 500 and r.json()["error"]["message"] == "Internal server error"
    ups.prefill.mode = "bad_request"
    r = post(proxy, "/v1/chat/completions", chat(IMAGE))
    assert r.status == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_unreachable_upstreams_are_502(ups):
    enc, pre = dead_url(), dead_url()
    p = Proxy("--encoder", enc, "--prefill", pre)
    try:
        r = post(p, "/v1/chat/completions", chat(IMAGE))
        assert r.status == 502
        assert r.error()["type"] == "encoder_failed"
        assert f"encoder {enc} unreachable" in r.error()["message"]
        r = post(p, "/v1/chat/completions", chat())
        assert r.status == 502
        assert r.error()["type"] == "prefill_failed" and pre in r.error()["message"]
        r = call("GET", p.url + "/v1/models")
        assert r.status == 502 and r.error()["type"] == "prefill_failed"
    finally:
        assert p.stop()[0] == 0


def test_encoder_timeout_is_502_encoder_failed(ups):
    ups.enc_a.mode = "hang"
    ups.enc_a.gate.clear()
    p = Proxy("--encoder", ups.enc_a.url, "--prefill", ups.prefill.url, "--timeout", "0.5")
    try:
        r = post(p, "/v1/chat/completions", chat(IMAGE))
        assert r.status == 502
        err = r.error()
        assert err["type"] == "encoder_failed"
        assert ups.enc_a.url in err["message"] and "0.5 s" in err["message"]
        assert ups.prefill.got == []
    finally:
        ups.enc_a.gate.set()
        assert p.stop()[0] == 0


# -- the command


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_proxy_exits_cleanly_on_a_signal(ups, sig):
    p = Proxy("--encoder", ups.enc_a.url, "--prefill", ups.prefill.url)
    assert call("GET", p.url + "/proxy/health").status == 200
    rc, out = p.stop(sig)
    assert rc == 0, "".join(p.stderr)
    assert "stopped" in out
    assert "Traceback" not in "".join(p.stderr)


@pytest.mark.parametrize(
    "flag,url",
    [("--encoder", "ftp://h:1"), ("--prefill", "localhost:8000"), ("--encoder", "http://")],
)
def test_cli_rejects_urls_that_are_not_http(flag, url):
    args = {"--encoder": "http://127.0.0.1:1", "--prefill": "http://127.0.0.1:2", flag: url}
    cmd = [sys.executable, "-m", "embedlink.service.cli", "vllm-proxy", "--port", "0"]
    for k, v in args.items():
        cmd += [k, v]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=ENV)
    assert p.returncode == 2
    assert f"Invalid value for {flag}" in p.stderr and "http://" in p.stderr


# -- what counts as multimodal


@pytest.mark.parametrize(
    "body,chat_api,expected",
    [
        (chat(), True, False),
        (chat({"type": "text", "text": "a"}), True, False),
        (chat(IMAGE), True, True),
        (chat({"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}), True, True),
        (chat({"type": "video_url", "video_url": {"url": "v"}}), True, True),
        (chat({"type": "image_embeds", "image_embeds": "x"}), True, True),
        (chat({"image_url": {"url": "u"}}), True, True),
        (chat({"text": "a"}), True, False),
        ({"messages": "nonsense"}, True, False),
        ({"prompt": "a"}, False, False),
        ({"prompt": [1, 2, 3]}, False, False),
        ({"prompt": ["a", "b"]}, False, False),
        ({"prompt": "a", "multi_modal_data": {"image": "x"}}, False, True),
        ({"prompt": {"prompt": "a", "multi_modal_data": {"image": "x"}}}, False, True),
        ({"prompt": [{"type": "text", "text": "a"}, {"type": "image_url"}]}, False, True),
        ({"prompt": [{"type": "text", "text": "a"}]}, False, False),
    ],
)
def test_what_counts_as_multimodal(body, chat_api, expected):
    before = copy.deepcopy(body)
    assert has_multimodal_input(body, chat_api) is expected
    assert body == before
