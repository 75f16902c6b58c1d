import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def run(*args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_import_prints_failed_value():
    p = run(sys.executable, "-c", "import embedlink; print(embedlink.Status.Failed.value)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "4"


def test_cli_version():
    p = run(sys.executable, "-m", "embedlink.cli", "version")
    assert p.returncode == 0 and "protocol 1" in p.stdout


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_cli_demo_verifies_every_request(transport):
    p = run(
        sys.executable,
        "-m",
        "embedlink.cli",
        "demo",
        "-n",
        "12",
        "--hidden-size",
        "64",
        "--max-tokens",
        "3000",
        "--transport",
        transport,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "12/12" in p.stdout
    assert "resumes" in p.stdout
    assert f"over {transport}" in p.stdout
    assert "0, 0" in p.stdout  # both pools fully free at the end


def test_cli_demo_rejects_bad_flags():
    p = run(
        sys.executable, "-m", "embedlink.cli", "demo", "--min-tokens", "10", "--max-tokens", "5"
    )
    assert p.returncode != 0
    assert "min-tokens" in p.stdout + p.stderr
