"""`embedlink bootstrap | encoder | language | status` as separate real
processes on loopback, configured by flags, environment and a TOML file."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDLINK_", "SGLANG_"))} | {
    "PYTHONUNBUFFERED": "1",
    "COLUMNS": "200",
}
CLI = [sys.executable, "-m", "embedlink.service.cli"]


class Proc:
    """A CLI process whose stdout is read line by line until a pattern shows."""

    def __init__(self, *args, env=None):
        self.p = subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or ENV,
        )
        self.lines: list[str] = []

    def expect(self, pattern, timeout=60.0):
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no {pattern!r} within {timeout}s; output:\n{''.join(self.lines)}")

    def stop(self, timeout=20.0):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            out, _ = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, _ = self.p.communicate()
        self.lines.append(out or "")
        return self.p.returncode, "".join(self.lines)


def run(*args, env=None, timeout=120):
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or ENV
    )


@pytest.fixture
def bootstrap():
    b = Proc("bootstrap", "--port", "0")
    addr = b.expect(r"http://(\S+) ").group(1)
    yield addr
    code, out = b.stop()
    assert code == 0, out


def start_encoder(boot, *extra, env=None):
    enc = Proc(
        "encoder",
        "--bootstrap",
        boot,
        "--metrics-port",
        "0",
        "--hidden-size",
        "64",
        "--max-tokens",
        "2500",
        "--num-blocks",
        "256",
        *extra,
        env=env,
    )
    m = enc.expect(r"on (\S+) \(transports (\S+)\); /status and /metrics on http://(\S+)")
    return enc, m.group(1), m.group(2), m.group(3)


def test_encoder_language_status_across_processes(bootstrap, tmp_path):
    # The encoder takes its transports from a TOML file and its heartbeat from
    # SGLang's variable; the language side from flags.
    cfg = tmp_path / "embedlink.toml"
    cfg.write_text('transports = ["tcp"]\n[encoder]\nseed = 7\n')
    env = ENV | {"SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.5"}
    enc, control, transports, status_addr = start_encoder(bootstrap, "--config", str(cfg), env=env)
    try:
        assert transports == "tcp"
        lang = run(
            "language",
            "--bootstrap",
            bootstrap,
            "--hidden-size",
            "64",
            "--rooms",
            "30",
            "--window",
            "4",
            "--seed",
            "7",
            "--transport",
            "tcp,shm",
        )
        assert lang.returncode == 0, lang.stdout + lang.stderr
        assert "verified byte for byte" in lang.stdout and "30/30" in lang.stdout
        assert "rooms that resumed" in lang.stdout

        # status through the bootstrap server follows the rank's status address
        st = run("status", bootstrap, "--json", timeout=30)
        assert st.returncode == 0, st.stderr
        snap = json.loads(st.stdout)
        assert snap["status"]["side"] == "bootstrap"
        (rank,) = snap["status"]["ranks"]
        assert rank["address"] == control and rank["status_address"] == status_addr
        encoder_view = snap["ranks"][status_addr]
        assert encoder_view["side"] == "encoder"
        assert encoder_view["counters"]["chunks_written"] >= 30
        assert encoder_view["pool"]["blocks_used"] == 0
        assert [p["transport"] for p in encoder_view["peers"]] == ["tcp"]

        # and directly, as a table
        st = run("status", status_addr, timeout=30)
        assert st.returncode == 0, st.stderr
        assert "encoder rank 0" in st.stdout and "Transferring" in st.stdout
    finally:
        code, out = enc.stop()
    assert code == 0, out
    assert "stopped: 30 rooms sent, 0 refused" in out


HOOKS = """
from embedlink import Embedding
import numpy as np

def encode(room, schema):
    if room % 2:
        return None
    n = 10 + room
    return Embedding(
        embedding=np.zeros((n, schema.fields[0].shape[0]), dtype=schema.fields[0].np_dtype),
        token_ids=np.arange(n, dtype=np.int32),
        mrope_positions=np.zeros((3, n), dtype=np.int32),
    )

def consume(room, emb):
    if room == 4:
        raise RuntimeError("model rejected room 4")
    assert emb.num_tokens == 10 + room
"""


def test_hooks_on_both_sides(bootstrap, tmp_path):
    (tmp_path / "my_hooks.py").write_text(HOOKS)
    env = ENV | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    enc, *_ = start_encoder(bootstrap, "--hook", "my_hooks:encode", "--transport", "tcp", env=env)
    try:
        lang = run(
            "language",
            "--bootstrap",
            bootstrap,
            "--hidden-size",
            "64",
            "--rooms",
            "6",
            "--hook",
            "my_hooks:consume",
            env=env | {"EMBEDLINK_TRANSPORTS": "tcp"},
        )
    finally:
        code, out = enc.stop()
    assert lang.returncode == 1, lang.stdout + lang.stderr
    text = lang.stdout
    assert "accepted by my_hooks:consume" in text and "2/6" in text
    assert "no embedding for room 1" in text  # the encoder hook refused odd rooms
    assert "model rejected room 4" in text
    assert code == 0 and "3 rooms sent, 3 refused" in out


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["encoder", "--heartbeat-interval", "-1"], {}, "'heartbeat_interval' (from flag"),
        (
            ["language", "--bootstrap", "127.0.0.1:1"],
            {"SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "many"},
            "'heartbeat_misses' (from env SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE)",
        ),
        (["encoder", "--hook", "no_such_module_xyz:f"], {}, "cannot import 'no_such_module_xyz'"),
        (["bootstrap", "--port", "99999"], {}, "'port' (from flag --port)"),
        (["encoder", "--transport", "tcp,pigeon"], {}, "unknown transport(s) 'pigeon'"),
    ],
)
def test_bad_configuration_fails_at_start_naming_the_setting(args, env, words):
    p = run(*args, env=ENV | env, timeout=60)
    assert p.returncode not in (0, None)
    assert words in p.stdout + p.stderr


def test_print_config_shows_sources(tmp_path):
    cfg = tmp_path / "e.toml"
    cfg.write_text("[language]\nwindow = 5\n")
    p = run(
        "language",
        "--config",
        str(cfg),
        "--rooms",
        "9",
        "--print-config",
        env=ENV | {"SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE": "512"},
    )
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.strip()}
    assert "flag --rooms" in rows["rooms"]
    assert "SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE" in rows["default_tokens"]
    assert "512" in rows["default_tokens"]
    assert "[language]" in rows["window"]
    assert "default" in rows["heartbeat_interval"]


def test_status_of_something_else_is_a_clear_error():
    p = run("status", "127.0.0.1:1", timeout=30)
    assert p.returncode != 0
    assert "cannot reach 127.0.0.1:1" in p.stdout + p.stderr


def test_every_command_has_help():
    for cmd in ("demo", "bench", "bootstrap", "encoder", "language", "status", "version"):
        p = run(cmd, "--help", timeout=30)
        assert p.returncode == 0 and "Usage:" in p.stdout, cmd
