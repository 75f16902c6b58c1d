"""The entry point in a fresh process, through SGLang's own load_plugins():
discovered, replacing both classes only when EMBEDLINK_SGLANG=1, refusing
(one error, nothing replaced) an SGLang it does not know."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

PROBE = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
if sys.argv[1] == "fake-version":
    from importlib import metadata
    real = metadata.version
    metadata.version = lambda name: "0.0.1" if name == "sglang" else real(name)
from importlib import metadata
eps = [e.value for e in metadata.entry_points(group="sglang.srt.plugins")]
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.disaggregation.encoder import receiver, server
print(json.dumps({
    "entry_points": eps,
    "waiting": receiver.WaitingZmqRequest.__module__ + "." + receiver.WaitingZmqRequest.__name__,
    "delivery": server.ZmqDelivery.__module__ + "." + server.ZmqDelivery.__name__,
    "route": any(getattr(r, "path", "") == "/embedlink"
                 for r in __import__("sglang.srt.disaggregation.encoder.http_server",
                                     fromlist=["app"]).app.routes),
}))
"""


def probe(enabled: str | None, mode: str = "") -> tuple[dict, str]:
    env = dict(os.environ)
    env.pop("EMBEDLINK_SGLANG", None)
    if enabled is not None:
        env["EMBEDLINK_SGLANG"] = enabled
    p = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_enabled_the_entry_point_replaces_both_classes_and_adds_the_route():
    got, _ = probe("1")
    assert "embedlink.integrations.sglang_plugin:register" in got["entry_points"]
    assert got["waiting"] == "embedlink.integrations.sglang.EmbedlinkWaitingRequest"
    assert got["delivery"] == "embedlink.integrations.sglang.EmbedlinkDelivery"
    assert got["route"] is True


@pytest.mark.parametrize("value", [None, "0"])
def test_off_by_default_nothing_is_replaced(value):
    got, _ = probe(value)
    assert got["waiting"].endswith("receiver.WaitingZmqRequest")
    assert got["delivery"].endswith("server.ZmqDelivery")
    assert got["route"] is False


def test_an_unsupported_sglang_is_refused_with_one_error_naming_both_versions():
    got, err = probe("1", "fake-version")
    assert got["waiting"].endswith("receiver.WaitingZmqRequest")
    assert got["delivery"].endswith("server.ZmqDelivery")
    lines = [line for line in err.splitlines() if "embedlink" in line and "ERROR" in line]
    assert len(lines) == 1, err
    assert "0.5.23" in lines[0] and "0.0.1" in lines[0]
