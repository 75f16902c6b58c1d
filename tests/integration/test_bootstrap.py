import json
import urllib.error
import urllib.request

import pytest

from embedlink import BootstrapClient, BootstrapError
from embedlink.bootstrap import RouteInfo

pytestmark = pytest.mark.integration


def http(boot, method, path, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://{boot.address}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


REG = {
    "role": "encoder",
    "tp_size": 2,
    "dp_size": 1,
    "rank_ip": "127.0.0.1",
    "rank_port": 5555,
    "engine_rank": 1,
}


def test_bootstrap_register_and_lookup(boot):
    assert http(boot, "GET", "/health")[0] == 200
    assert http(boot, "PUT", "/route", REG) == (200, {"status": "ok"})
    assert http(boot, "GET", "/route?engine_rank=1&target_dp_group=0") == (
        200,
        {"rank_ip": "127.0.0.1", "rank_port": 5555},
    )
    assert http(boot, "GET", "/route?engine_rank=-1&target_dp_group=-1") == (
        200,
        {"tp_size": 2, "dp_size": 1},
    )


def test_bootstrap_unknown_rank_is_404_with_message(boot):
    status, body = http(boot, "GET", "/route?engine_rank=-1&target_dp_group=-1")
    assert status == 404 and "no encoder" in body["error"]
    http(boot, "PUT", "/route", REG)
    status, body = http(boot, "GET", "/route?engine_rank=0&target_dp_group=0")
    assert status == 404 and "rank 0" in body["error"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/route", b"not json"),
        ("PUT", "/route", b"[]"),
        ("PUT", "/route", json.dumps({**REG, "tp_size": 0}).encode()),
        ("PUT", "/route", json.dumps({**REG, "rank_port": 70000}).encode()),
        ("PUT", "/route", json.dumps({**REG, "engine_rank": 5}).encode()),
        ("PUT", "/route", json.dumps({**REG, "role": 3}).encode()),
        ("PUT", "/route", json.dumps({k: v for k, v in REG.items() if k != "rank_ip"}).encode()),
        ("GET", "/route?engine_rank=x&target_dp_group=0", None),
        ("GET", "/route?engine_rank=0", None),
    ],
)
def test_bootstrap_malformed_is_400_never_500(boot, method, path, body):
    status, reply = http(boot, method, path, raw=body)
    assert status == 400, reply
    assert reply["error"]


def test_bootstrap_conflicting_sizes_is_409(boot):
    http(boot, "PUT", "/route", REG)
    status, body = http(boot, "PUT", "/route", {**REG, "tp_size": 4})
    assert status == 409 and "contradict" in body["error"]


def test_bootstrap_client_errors_are_typed(boot):
    c = BootstrapClient(boot.address)
    with pytest.raises(BootstrapError) as ei:
        c.lookup(3, 0)
    assert ei.value.status == 404
    c.register(
        RouteInfo(role="encoder", tp_size=1, dp_size=1, rank_ip="h", rank_port=1, engine_rank=0)
    )
    assert c.lookup(0, 0) == ("h", 1)
    assert c.health()
    dead = BootstrapClient("127.0.0.1:1", timeout=1)
    assert not dead.health()
    with pytest.raises(BootstrapError, match="unreachable"):
        dead.sizes()


def test_bootstrap_cli_serves_health(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(
        [sys.executable, "-m", "embedlink.service.cli", "bootstrap", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        c = BootstrapClient(f"127.0.0.1:{port}", timeout=1)
        deadline = time.monotonic() + 30
        while not c.health():
            assert time.monotonic() < deadline, "bootstrap CLI did not come up"
            assert p.poll() is None, p.stdout.read()
            time.sleep(0.1)
    finally:
        p.terminate()
        p.wait(10)
