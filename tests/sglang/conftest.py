"""The SGLang tier: the real SGLang 0.5.23 in .venv-sglang (scripts/setup_sglang.sh).

The test process is a language-side scheduler rank: SGLang's config is
published once, a gloo TP group of one is up, and SGLang's own
``load_plugins()`` has installed the plugin (``EMBEDLINK_SGLANG=1``).
Encoders run in processes of their own (``embedlink.tools.sglang_testbed.encoder_main``),
and so do the scheduler ranks of a TP group larger than one
(``spawn_language_ranks``: ``language_rank_main``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from embedlink.tools import sglang_testbed as sglang_env  # noqa: E402

# set before SGLang's modules read them (the plugin, SGLang's receive timeout)
os.environ["EMBEDLINK_SGLANG"] = "1"
os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
os.environ.setdefault("EMBEDLINK_NUM_BLOCKS", "64")  # 8,192 tokens of 128
os.environ.setdefault("EMBEDLINK_HIDDEN_SIZE", str(sglang_env.HIDDEN))

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return sglang_env.write_config(str(tmp_path_factory.mktemp("qwen2vl-config")))


def _destroy(receivers: list[Any]) -> None:
    """Close SGLang's receivers' ZeroMQ contexts (sockets without linger): left
    to garbage collection, a context's ``__del__`` waits for its open sockets
    forever, and the test process never exits."""
    for rx in receivers:
        for name in ("context", "scheduler_context"):
            ctx = getattr(rx, name, None)
            if ctx is not None:
                ctx.destroy(linger=0)


@pytest.fixture(scope="session")
def scheduler(model_dir: str) -> Iterator[Any]:
    """This process as a language scheduler rank; returns a factory of
    scheduler-side ``MMReceiverHTTP``s (SGLang reads its receive timeout when
    one is built)."""
    import torch
    from sglang.srt.disaggregation.encoder.receiver import MMReceiverHTTP
    from sglang.srt.plugins import load_plugins

    load_plugins()
    sa = sglang_env.server_args(model_dir, language_only=True, encoder_urls=[])
    sglang_env.publish_scheduler(sa)
    sglang_env.gloo_world_of_one()

    made: list[Any] = []

    def make(recv_timeout: float | None = None) -> Any:
        old = os.environ.get("SGLANG_ENCODER_RECV_TIMEOUT")
        if recv_timeout is not None:
            os.environ["SGLANG_ENCODER_RECV_TIMEOUT"] = str(recv_timeout)
        try:
            rx = MMReceiverHTTP(
                sa, dtype=torch.bfloat16, hf_config=None, scheduler=sglang_env.scheduler_stub()
            )
        finally:
            if recv_timeout is not None:
                if old is None:
                    os.environ.pop("SGLANG_ENCODER_RECV_TIMEOUT", None)
                else:
                    os.environ["SGLANG_ENCODER_RECV_TIMEOUT"] = old
        rx.mm_processor = sglang_env.RecordingMMProcessor()
        made.append(rx)
        return rx

    make.server_args = sa  # type: ignore[attr-defined]
    yield make
    _destroy(made)


@pytest.fixture(scope="session")
def dispatch(scheduler: Any) -> Iterator[Any]:
    """The tokenizer manager's half: SGLang's real ``MMReceiverHTTP`` without
    a scheduler sends ``/encode`` for each part of a request to the encoders
    (as ``TokenizerManager`` does) and fills in how it split the items; the
    request as the scheduler then gets it is returned."""
    from sglang.srt.disaggregation.encoder.receiver import MMReceiverHTTP
    from sglang.srt.managers.io_struct import GenerateReqInput

    senders: dict[tuple[str, ...], Any] = {}

    def send(rid: str, urls: list[str], images: int = 1) -> tuple[Any, list[Any]]:
        tm = senders.get(tuple(urls))
        if tm is None:
            tm = MMReceiverHTTP(
                scheduler.server_args, hf_config=None, scheduler=None, encode_urls=list(urls)
            )
            senders[tuple(urls)] = tm
        obj = GenerateReqInput(
            text="<image>" * images + " describe",
            rid=rid,
            image_data=[f"http://example.invalid/{i}.png" for i in range(images)],
        )
        errors: list[Any] = []
        ready = tm.send_encode_request(obj, on_dispatch_error=errors.append)
        req = sglang_env.recv_req(rid, obj.num_items_assigned, obj.encoder_urls)
        ready.set()  # TokenizerManager sets it once the request is on its way
        return req, errors

    yield send
    _destroy(list(senders.values()))


class Encoder:
    def __init__(self, proc: subprocess.Popen[str], url: str, delivery: str) -> None:
        self.proc, self.url, self.delivery = proc, url, delivery
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def spawn_encoder(model_dir: str) -> Iterator[Any]:
    """Start an encoder-only SGLang server (``embedlink.tools.sglang_testbed.encoder_main``) on port 0;
    returns it once it listens."""
    started: list[Encoder] = []

    def spawn(plugin: bool = True, transports: str = "shm,tcp", **spec: Any) -> Encoder:
        env = dict(os.environ)
        env["EMBEDLINK_SGLANG"] = "1" if plugin else "0"
        env["EMBEDLINK_TRANSPORTS"] = transports
        proc = subprocess.Popen(
            [sys.executable, "-m", sglang_env.__name__, model_dir, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        delivery, deadline = "", time.monotonic() + 120
        seen: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("DELIVERY "):
                delivery = line.split()[1]
            if line.startswith("PORT "):
                enc = Encoder(proc, f"http://127.0.0.1:{int(line.split()[1])}", delivery)
                started.append(enc)
                return enc
        proc.kill()
        raise AssertionError("the encoder did not start:\n" + "".join(seen))

    yield spawn
    for e in started:
        e.stop()


def tick_until_done(
    rx: Any, first: list[Any], timeout: float = 60.0
) -> tuple[list[Any], list[Any]]:
    """Tick SGLang's scheduler-side receiver (as the scheduler loop does)
    until the requests in ``first`` are all ready or aborted."""
    want = {r.rid for r in first}
    ready: list[Any] = []
    aborted: list[Any] = []
    out, ab = rx.process_waiting_requests(first)
    deadline = time.monotonic() + timeout
    while True:
        ready += out
        aborted += ab
        done = {r.rid for r in ready} | {a[0].rid for a in aborted}
        if want <= done or time.monotonic() > deadline:
            return ready, aborted
        time.sleep(0.002)  # the scheduler's next tick
        out, ab = rx.process_waiting_requests([])


def pools_free(timeout: float = 30.0) -> dict[str, Any]:
    """Wait until every language pool of this process is free; the report."""
    from embedlink.integrations.sglang import status_report, wait_language_pools_free

    wait_language_pools_free(timeout)
    return status_report()


def encoder_state(url: str, timeout: float = 30.0, rooms: bool = True) -> dict[str, Any]:
    """``GET {url}/embedlink`` once its pools are free and (``rooms``) its
    rooms gone, or the deadline passed: the plugin's own report. (A room that
    failed is kept for a room timeout, so a receiver that comes late still
    hears why.)"""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url + "/embedlink", timeout=10) as r:
            state = json.loads(r.read())
        quiet = all(p["used"] == 0 for p in state.get("pools", {}).values())
        if (quiet and (not rooms or state.get("open_rooms") == 0)) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


class LanguageRank:
    """One scheduler rank in its own process
    (``embedlink.tools.sglang_testbed.language_rank_main``), its output read
    on a thread; ``wait_for(prefix)`` waits (bounded) for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # end of output
            self._cond.notify_all()

    def wait_for(self, prefix: str, timeout: float) -> str:
        def found() -> str | None:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            return "EOF" if self.lines and self.lines[-1] == "" else None

        with self._cond:
            line = self._cond.wait_for(found, timeout=timeout)
        if not line or line == "EOF":
            raise AssertionError(
                f"language rank: no {prefix.strip()!r} line (exit {self.proc.poll()}):\n"
                + "".join(self.lines[-60:])
            )
        return line

    def send(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.wait_for("RESULT ", timeout)[len("RESULT ") :])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def spawn_language_ranks(model_dir: str) -> Iterator[Any]:
    """Start ``tp_size`` scheduler ranks forming one gloo TP group; returns
    them once every rank said ``READY`` (its group is up, its
    ``MMReceiverHTTP`` built)."""
    started: list[LanguageRank] = []

    def spawn(tp_size: int = 2, deadline: float = 120.0) -> list[LanguageRank]:
        port = sglang_env.free_port()
        ranks = []
        for r in range(tp_size):
            spec = {"rank": r, "tp_size": tp_size, "dist_port": port, "deadline": deadline}
            proc = subprocess.Popen(
                [sys.executable, "-m", sglang_env.__name__, "--language-rank", model_dir,
                 json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=dict(os.environ),
            )  # fmt: skip
            lr = LanguageRank(proc)
            started.append(lr)
            ranks.append(lr)
        for r, lr in enumerate(ranks):
            assert lr.wait_for("READY ", 180).split()[1] == str(r)
        return ranks

    yield spawn
    for lr in started:
        lr.stop()
