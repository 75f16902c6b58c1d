"""Prometheus metrics: scrape live endpoints and the bootstrap server over
HTTP and check that the counters move."""

import json
import re
import time
import urllib.request

import pytest

from embedlink import BufferSchema, EncoderEndpoint, LanguageEndpoint, Status
from embedlink.tools.workers import make_embedding, same_embedding

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
SCHEMA = BufferSchema(hidden_size=32)


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def scrape_until(url, ready, timeout=10.0):
    """Scrape until ``ready(text)`` holds (counters updated off the reply
    path land a moment later); the last scrape if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(url)
        try:
            if ready(text):
                return text
        except AssertionError:  # the series is not there yet
            pass
        if time.monotonic() > deadline:
            return text
        time.sleep(0.02)


def value(text, name, **labels):
    sel = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pat = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.M)
    for found, v in pat.findall(text):
        got = dict(kv.split("=", 1) for kv in found.split(",")) if found else {}
        if all(got.get(k) == f'"{w}"' for k, w in labels.items()):
            return float(v)
    raise AssertionError(f"{name}{{{sel}}} not in the scrape")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_metrics_move_on_endpoints_and_bootstrap(boot, transport):
    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=(transport,), metrics_port=0
        ) as enc,
        LanguageEndpoint(SCHEMA, num_blocks=64, transports=(transport,), metrics_port=0) as lang,
    ):
        e_url = f"http://{enc.metrics_address}/metrics"
        l_url = f"http://{lang.metrics_address}/metrics"
        before = scrape(e_url)
        assert value(before, "embedlink_pool_blocks", side="encoder", state="free") == 64
        rx = lang.receiver(bootstrap=boot.address, room=1)
        tx = enc.sender(1)
        tx.send(make_embedding(SCHEMA, 2000, 0, 1))
        assert same_embedding(rx.wait(timeout=30), make_embedding(SCHEMA, 2000, 0, 1))
        rx2 = lang.receiver(bootstrap=boot.address, room=2)
        rx2.abort()
        # The encoder replies before it counts (the reply is on the latency
        # path), so its counters trail the language side's success by a
        # moment: wait for the sender, then for the copy threads' counts.
        assert tx.wait(timeout=30) is Status.Success
        enc_text = scrape_until(
            e_url,
            lambda t: (
                value(t, "embedlink_chunk_seconds_count", side="encoder", transport=transport) >= 2
            ),
        )
        # the language side, too, wakes the waiting thread before it counts
        lang_text = scrape_until(
            l_url,
            lambda t: (
                value(t, "embedlink_room_seconds_count", side="language", status="Success")
                + value(t, "embedlink_rooms_total", side="language", status="Failed")
                >= 2
            ),
        )
        nbytes = 2000 * SCHEMA.token_bytes
        assert value(enc_text, "embedlink_rooms_total", side="encoder", status="Success") == 1
        assert (
            value(
                enc_text,
                "embedlink_bytes_total",
                side="encoder",
                transport=transport,
                direction="sent",
            )
            >= nbytes
        )
        assert value(enc_text, "embedlink_resumes_total", side="encoder") == 1
        assert (
            value(enc_text, "embedlink_chunk_seconds_count", side="encoder", transport=transport)
            == 2
        )
        assert value(lang_text, "embedlink_rooms_total", side="language", status="Success") == 1
        assert value(lang_text, "embedlink_rooms_total", side="language", status="Failed") == 1
        assert (
            value(
                lang_text,
                "embedlink_bytes_total",
                side="language",
                transport="all",
                direction="received",
            )
            == nbytes
        )
        assert (
            value(lang_text, "embedlink_room_seconds_count", side="language", status="Success") == 1
        )
    boot_text = scrape(f"http://{boot.address}/metrics")
    assert value(boot_text, "embedlink_bootstrap_requests_total", route="/route", status="200") >= 2
    assert "embedlink_bootstrap_ranks 1.0" in boot_text


def test_status_shows_rooms_pool_and_peers(boot):
    """GET /status on both endpoints: a room held mid-transfer shows up by
    status, its blocks as used, and each side names its peer."""

    with (
        EncoderEndpoint(
            SCHEMA, bootstrap=boot.address, num_blocks=64, transports=("tcp",), metrics_port=0
        ) as enc,
        LanguageEndpoint(
            SCHEMA, num_blocks=64, transports=("tcp",), metrics_port=0, default_tokens=256
        ) as lang,
    ):
        rx = lang.receiver(bootstrap=boot.address, room=5)
        tx = enc.sender(5)
        assert rx.poll() < 2
        # the receiver's reservation and the request are visible before any data
        deadline = time.monotonic() + 10
        while (
            lang.status()["rooms"]["WaitingForInput"] != 1
            or enc.status()["rooms"]["WaitingForInput"] != 1
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        e_snap = json.loads(scrape(f"http://{enc.metrics_address}/status"))
        l_snap = json.loads(scrape(f"http://{lang.metrics_address}/status"))
        assert e_snap["side"] == "encoder" and l_snap["side"] == "language"
        assert e_snap["rooms"]["WaitingForInput"] == 1
        assert l_snap["rooms"]["WaitingForInput"] == 1
        assert l_snap["pool"]["blocks_used"] == 2  # 256 tokens in 128-token blocks
        assert [p["encoder"] for p in l_snap["peers"]] == [enc.address]
        assert [p["session"] for p in e_snap["peers"]] == [lang.session]
        assert e_snap["peers"][0]["alive"] and e_snap["peers"][0]["transport"] == "tcp"
        tx.send(make_embedding(SCHEMA, 100, 0, 5))
        rx.wait(timeout=30)
        rx.clear()
        tx.clear()
        deadline = time.monotonic() + 10
        while sum(lang.status()["rooms"].values()) or sum(enc.status()["rooms"].values()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (
            json.loads(scrape(f"http://{boot.address}/status"))["ranks"][0]["status_address"]
            == enc.metrics_address
        )


def test_heartbeat_misses_and_dead_peers_are_counted():
    """An encoder that accepts the connection but never answers: the language
    side counts each silent heartbeat interval, then the dead peer."""
    import zmq

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with LanguageEndpoint(
            SCHEMA,
            num_blocks=16,
            transports=("tcp",),
            metrics_port=0,
            heartbeat_interval=0.1,
            heartbeat_misses=4,
        ) as lang:
            rx = lang.receiver(encoder=f"127.0.0.1:{port}", room=1)
            with pytest.raises(Exception, match="no answer from encoder"):
                rx.wait(timeout=10)
            text = scrape(f"http://{lang.metrics_address}/metrics")
            assert value(text, "embedlink_heartbeat_misses_total", side="language") >= 2
            assert value(text, "embedlink_heartbeat_dead_peers_total", side="language") == 1
    finally:
        silent.close(0)
        ctx.term()
