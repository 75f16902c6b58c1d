"""The parts of the encoder endpoint (embedlink.endpoints.encoder), each alone:
early requests, sessions (negotiation, heartbeats, liveness), write dispatch,
and the helpers shared with the language endpoint (endpoints._common).
No endpoint, no ZeroMQ socket, no clock: time is passed in."""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from embedlink import BufferPool, BufferSchema
from embedlink._runtime.auth import Authenticator
from embedlink._runtime.host import host_id
from embedlink.endpoints._common import PayloadOpener, StepLock
from embedlink.endpoints.encoder.early import EarlyRequests
from embedlink.endpoints.encoder.sessions import Peer, Sessions
from embedlink.endpoints.encoder.stats import EndpointStats
from embedlink.endpoints.encoder.writes import WriteDispatch
from embedlink.observability.metrics import EndpointMetrics
from embedlink.observability.noise import NoiseLog
from embedlink.protocol import (
    AUX_FIELD,
    Abort,
    FieldDesc,
    Heartbeat,
    RegionDesc,
    Register,
    TransferRequest,
    TransportOffer,
    encode,
)
from embedlink.protocol.planner import Copy, Plan, Segment
from embedlink.protocol.rooms import WriteChunk
from embedlink.transports import PeerWriter, TransportError, get_backend
from embedlink.transports.tcp import TcpWriter

SCHEMA = BufferSchema(hidden_size=16)
NAMES = [*SCHEMA.names, AUX_FIELD]


def request(room, epoch=1, session="s"):
    return TransferRequest(session=session, room=room, epoch=epoch, dst_blocks=[0], dst_tokens=16)


def metrics():
    return EndpointMetrics("encoder", lambda: 0, lambda: 0)


def sample(m, name):
    return m.registry.get_sample_value(name, {"side": "encoder"}) or 0


# -- early requests


def test_early_requests_say_which_request_is_the_first_of_its_room():
    early = EarlyRequests()
    assert early.file(7, 1.0, b"a", request(7))
    assert not early.file(7, 2.0, b"b", request(7, epoch=2))
    assert early.file(8, 2.0, b"a", request(8))
    assert 7 in early and 8 in early and 9 not in early


def test_an_early_abort_is_not_a_request():
    early = EarlyRequests()
    abort = Abort(session="s", room=3, epoch=1, reason="gave up")
    early.file(3, 1.0, b"a", abort)
    assert early.count() == 0  # nothing asked for room 3 yet
    assert early.file(3, 1.5, b"a", request(3))  # the first request comes after the abort
    assert early.count() == 1


def test_early_requests_count_rooms_asked_for_not_messages():
    early = EarlyRequests()
    early.file(1, 1.0, b"a", request(1))
    early.file(1, 1.0, b"b", request(1, session="t"))
    early.file(2, 1.0, b"a", request(2))
    assert early.count() == 2


def test_adopting_early_requests_hands_them_over_in_order_once():
    early = EarlyRequests()
    first, second = request(5), Abort(session="s", room=5, epoch=1, reason="x")
    early.file(5, 1.0, b"a", first)
    early.file(5, 2.0, b"b", second)
    assert early.adopt(5) == [(b"a", first), (b"b", second)]
    assert early.adopt(5) == []
    assert 5 not in early and early.count() == 0


def test_early_requests_expire_after_the_ttl_and_their_requests_are_refused():
    early = EarlyRequests()
    early.file(1, 10.0, b"a", request(1, epoch=4))
    early.file(1, 11.0, b"a", Abort(session="s", room=1, epoch=4, reason="x"))
    early.file(2, 15.0, b"b", request(2, epoch=9))
    refused = []

    def refuse(identity, room, epoch, reason):
        refused.append((identity, room, epoch, reason))

    early.expire(15.0, 5.0, refuse)  # room 1 waited exactly the ttl: still kept
    assert refused == [] and 1 in early
    early.expire(15.5, 5.0, refuse)
    # only the request is answered (an abort needs no answer); room 2 is younger
    assert refused == [(b"a", 1, 4, "no sender for room 1 within 5s")]
    assert 1 not in early and 2 in early and early.count() == 1
    early.expire(20.5, 5.0, refuse)
    assert refused[-1] == (b"b", 2, 9, "no sender for room 2 within 5s")
    assert early.count() == 0


# -- sessions


class Recorder:
    def __init__(self, busy=False):
        self.busy = busy
        self.failed = []
        self.executors = []

    def rooms_busy(self, session):
        return self.busy

    def fail_rooms(self, session, now, reason):
        self.failed.append((session, reason))

    def executor_for(self, writer, transport):
        self.executors.append((writer, transport))
        return None


@pytest.fixture
def lang_pool():
    return BufferPool(SCHEMA, 8, 16)


@pytest.fixture
def tcp_offer(lang_pool):
    server = get_backend("tcp").server(lang_pool, host="127.0.0.1").start()
    yield server.offer()
    server.close()


def make_sessions(rec, *, transports=("tcp",), interval=2.0, misses=3):
    stats, m = EndpointStats(), metrics()
    s = Sessions(
        schema=SCHEMA,
        transports=transports,
        pool=BufferPool(SCHEMA, 8, 16),
        field_names=NAMES,
        room_timeout=5.0,
        advertise_host="127.0.0.1",
        transport_options={},
        heartbeat_interval=interval,
        heartbeat_misses=misses,
        stats=stats,
        metrics=m,
        executor_for=rec.executor_for,
        rooms_busy=rec.rooms_busy,
        fail_rooms=rec.fail_rooms,
    )
    return s, stats, m


def register(offers, *, session="s", pool=None, schema=SCHEMA):
    pool = pool or BufferPool(schema, 8, 16)
    return Register(
        session=session,
        rank=0,
        host_id=host_id(),
        schema=[FieldDesc(n, list(sh), d) for n, sh, d in schema.describe()],
        block_size=16,
        num_blocks=8,
        regions=[RegionDesc(n, *pool.region(n)) for n in [*schema.names, AUX_FIELD]],
        transports=offers,
    )


def test_a_session_with_another_schema_is_refused_with_both_schemas(tcp_offer):
    rec = Recorder()
    sessions, _, _ = make_sessions(rec)
    other = BufferSchema(hidden_size=32)
    sessions.register(b"id", register([tcp_offer], schema=other))
    peer = sessions.get("s")
    assert peer is not None and peer.writer is None and peer.transport is None
    assert peer.refused.startswith("schema mismatch: encoder has ")
    assert str(SCHEMA.describe()) in peer.refused and str(other.describe()) in peer.refused
    assert rec.executors == []  # no transport was even tried
    assert sessions.transports_by_session() == {"s": None}


def test_a_session_without_a_common_transport_is_refused_naming_the_offers(lang_pool):
    rec = Recorder()
    sessions, _, _ = make_sessions(rec, transports=("tcp",))
    shm = TransportOffer("shm", {"host_id": host_id(), "segment": "x"})
    bad_tcp = TransportOffer("tcp", {})  # no address: not reachable
    sessions.register(b"id", register([shm, bad_tcp], pool=lang_pool))
    peer = sessions.get("s")
    assert peer.writer is None
    assert peer.refused == (
        "no common transport: language offers ['shm', 'tcp'], encoder has ['tcp']"
        " (tcp: not reachable from here)"
    )


def test_a_session_gets_the_first_offered_transport_both_sides_have(tcp_offer, lang_pool):
    rec = Recorder()
    sessions, _, _ = make_sessions(rec, transports=("tcp",))
    shm = TransportOffer("shm", {"host_id": host_id(), "segment": "x"})  # not ours
    sessions.register(b"id", register([shm, tcp_offer], pool=lang_pool))
    peer = sessions.get("s")
    try:
        assert peer.refused is None and peer.transport == "tcp"
        assert isinstance(peer.writer, TcpWriter)
        assert rec.executors == [(peer.writer, "tcp")]
        assert peer.regions == {n: lang_pool.region(n)[1] for n in NAMES}
        assert sessions.transports_by_session() == {"s": "tcp"}
    finally:
        sessions.close_writers()
    assert peer.writer is None


def test_registering_again_closes_the_old_sessions_writer(tcp_offer):
    sessions, _, _ = make_sessions(Recorder())
    sessions.register(b"one", register([tcp_offer]))
    old = sessions.get("s")
    assert old.writer is not None
    sessions.register(b"two", register([tcp_offer]))
    assert old.writer is None
    assert sessions.get("s") is not old and sessions.get("s").identity == b"two"
    sessions.close_writers()


def test_a_heartbeat_keeps_a_session_alive_and_is_answered(tcp_offer):
    sessions, _, _ = make_sessions(Recorder())
    sessions.register(b"one", register([tcp_offer]))
    reply = sessions.heartbeat(b"lane/1", Heartbeat(session="s", seq=4), 123.0)
    assert reply == Heartbeat(session="s", seq=4, reply=False, registered=True)
    peer = sessions.get("s")
    assert peer.last_seen == 123.0 and peer.identity == b"lane/1"
    assert sessions.heartbeat(b"x", Heartbeat(session="s", seq=5, reply=False), 124.0) is None
    assert peer.last_seen == 124.0
    # an unknown session is told so, so that it registers again
    assert sessions.heartbeat(b"x", Heartbeat(session="who", seq=1), 1.0).registered is False
    sessions.close_writers()


def test_a_silent_session_is_declared_dead_after_interval_times_misses(tcp_offer, caplog):
    rec = Recorder(busy=True)
    sessions, stats, m = make_sessions(rec, interval=2.0, misses=3)
    sessions.register(b"one", register([tcp_offer]))
    peer = sessions.get("s")
    peer.last_seen = 100.0
    sessions.check_liveness(101.9)
    assert peer.misses == 0
    sessions.check_liveness(104.5)  # two intervals of silence
    assert peer.misses == 2 and sample(m, "embedlink_heartbeat_misses_total") == 2
    sessions.check_liveness(106.0)  # exactly interval * misses: not yet
    assert peer.refused is None and rec.failed == []
    caplog.set_level(logging.INFO, logger="embedlink.endpoints.encoder")
    sessions.check_liveness(106.5)
    assert peer.refused == "session declared dead (no heartbeat from s for 6.5s); register again"
    assert rec.failed == [("s", "no heartbeat from s for 6.5s")]
    assert stats.dead_sessions == 1 and sample(m, "embedlink_heartbeat_dead_peers_total") == 1
    assert peer.writer is None  # closed: a write planned before fails instead of landing
    # rooms suffered: a warning, under the package's logger (the name operators configure)
    [line] = [r for r in caplog.records if "declared dead" in r.getMessage()]
    assert line.name == "embedlink.endpoints.encoder" and line.levelno == logging.WARNING
    sessions.check_liveness(200.0)  # a dead session is not declared dead again
    assert rec.failed == [("s", "no heartbeat from s for 6.5s")] and stats.dead_sessions == 1


def test_a_silence_after_a_heartbeat_starts_counting_again(tcp_offer):
    sessions, _, m = make_sessions(Recorder(), interval=2.0, misses=3)
    sessions.register(b"one", register([tcp_offer]))
    peer = sessions.get("s")
    peer.last_seen = 100.0
    sessions.check_liveness(104.0)
    sessions.heartbeat(b"one", Heartbeat(session="s", seq=1, reply=False), 104.0)
    sessions.check_liveness(104.5)
    assert peer.misses == 0 and peer.refused is None
    assert sample(m, "embedlink_heartbeat_misses_total") == 2
    sessions.close_writers()


def test_a_closed_lane_kills_only_the_session_behind_it(tcp_offer, caplog):
    rec = Recorder(busy=False)
    sessions, _, _ = make_sessions(rec)
    sessions.register(b"lane/1", register([tcp_offer], session="a"))
    sessions.register(b"zmq", register([tcp_offer], session="b"))
    caplog.set_level(logging.INFO, logger="embedlink.endpoints.encoder")
    sessions.lane_closed(b"lane/1", "eof")
    assert rec.failed == [("a", "its same-host control connection ended (eof)")]
    assert sessions.get("a").refused is not None and sessions.get("b").refused is None
    # no room suffered: news, not a warning
    [line] = [r for r in caplog.records if "declared dead" in r.getMessage()]
    assert line.levelno == logging.INFO
    described = sessions.describe(0.0, lambda identity: identity.startswith(b"lane/"))
    assert [(d["session"], d["control"], d["alive"]) for d in described] == [
        ("a", "unix", False),
        ("b", "zmq", True),
    ]
    sessions.close_writers()


# -- write dispatch


class FakeLoop:
    """Keeps what worker threads hand to the loop, to be run by the test."""

    def __init__(self):
        self.calls = []
        self.called = threading.Event()

    def call(self, fn, *args):
        self.calls.append((fn, args))
        self.called.set()

    def run_calls(self):
        calls, self.calls = self.calls, []
        for fn, args in calls:
            fn(*args)


class FakeWriter(PeerWriter):
    name = "fake"

    def __init__(self, *, inline=0, fail=None, any_memory=False, limit=None):
        self.inline_max_bytes = inline
        self.max_concurrent_writes = limit
        self.reads_any_memory = any_memory
        self.fail = fail
        self.writes = []

    def write(self, copies, src, timeout):
        self.writes.append(("pool", copies, src, threading.current_thread().name))
        if self.fail is not None:
            raise self.fail

    def write_from(self, copies, sources, timeout):
        self.writes.append(("from", copies, sources, threading.current_thread().name))


class FakeLent:
    def __init__(self):
        self.asked = []
        self.placed = 0

    def sources(self, copies, start_token, counts):
        self.asked.append((copies, start_token, counts))
        return ["bytes"] * len(copies)

    def place(self):
        self.placed += 1


def chunk(nbytes, dst="s"):
    plan = Plan(
        copies=(Copy("embedding", 0, 0, nbytes),),
        segments=(Segment(0, 0, 2),),
        start_token=0,
        tokens=2,
        is_last=True,
    )
    return WriteChunk(dst=dst, epoch=1, plan=plan)


def make_peer(writer, session="s"):
    peer = Peer(session, b"id", register([TransportOffer("fake", {})], session=session))
    peer.writer, peer.transport = writer, "fake"
    return peer


@pytest.fixture
def dispatch():
    loop, stats, m, reports = FakeLoop(), EndpointStats(), metrics(), []
    writes = WriteDispatch(
        loop,
        BufferPool(SCHEMA, 8, 16),
        workers=2,
        room_timeout=5.0,
        stats=stats,
        metrics=m,
        report=lambda *a: reports.append((a, stats.chunks_written, stats.write_failures)),
    )
    yield writes, loop, stats, reports
    writes.shutdown()


def test_a_small_write_runs_inline_and_is_reported_before_it_is_counted(dispatch):
    writes, loop, stats, reports = dispatch
    room, writer = object(), FakeWriter(inline=64)
    writes.dispatch(room, chunk(64), make_peer(writer))
    assert [w[0] for w in writer.writes] == ["pool"]
    assert writer.writes[0][3] == threading.current_thread().name  # on this (the loop's) thread
    # reported at once (no hand-off), with the counters not yet moved
    assert reports == [((room, "s", True, None), 0, 0)]
    assert stats.chunks_written == 1 and stats.bytes_written == 64
    assert writes.outstanding == 0 and loop.calls == []


def test_a_larger_write_runs_on_a_worker_and_is_outstanding_until_reported(dispatch):
    writes, loop, stats, reports = dispatch
    room, writer = object(), FakeWriter(inline=64)
    writes.dispatch(room, chunk(65), make_peer(writer))
    assert writes.outstanding == 1  # counted before the worker could report
    assert loop.called.wait(10)
    assert writer.writes[0][3].startswith("embedlink-write")
    assert reports == [] and writes.outstanding == 1  # not before the loop runs the report
    loop.run_calls()
    assert writes.outstanding == 0
    assert reports == [((room, "s", True, None), 0, 0)]
    assert stats.chunks_written == 1 and stats.bytes_written == 65


def test_a_session_with_its_own_executor_writes_there(dispatch):
    writes, loop, _, reports = dispatch
    writer = FakeWriter()
    peer = make_peer(writer)
    peer.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="own-threads")
    try:
        writes.dispatch(object(), chunk(10), peer)
        assert loop.called.wait(10)
    finally:
        peer.executor.shutdown(wait=True)
    assert writer.writes[0][3].startswith("own-threads")
    loop.run_calls()
    assert len(reports) == 1 and writes.outstanding == 0


def test_a_write_without_a_writer_fails_and_is_counted(dispatch):
    writes, loop, stats, reports = dispatch
    room = object()
    writes.dispatch(room, chunk(10, dst="gone"), None)
    assert loop.called.wait(10)
    loop.run_calls()
    assert reports == [((room, "gone", False, "no data-plane connection to gone"), 0, 0)]
    assert stats.write_failures == 1 and stats.chunks_written == 0 and writes.outstanding == 0


@pytest.mark.parametrize(
    ("error", "reason"),
    [(TransportError("tcp: reset"), "tcp: reset"), (RuntimeError("boom"), "RuntimeError: boom")],
)
def test_a_failing_writer_fails_the_write_with_its_reason(dispatch, error, reason):
    writes, _, stats, reports = dispatch
    room = object()
    writes.write(room, chunk(10), make_peer(FakeWriter(fail=error)), inline=True)
    assert reports == [((room, "s", False, reason), 0, 0)]
    assert stats.write_failures == 1


def test_a_borrowed_payload_is_read_where_the_caller_keeps_it_until_released(dispatch):
    writes, _, _, _ = dispatch
    room, lent = object(), FakeLent()
    writes.lend(room, lent)
    any_memory, pool_only = FakeWriter(any_memory=True), FakeWriter()
    w = chunk(10)
    writes.write(room, w, make_peer(any_memory), inline=True)
    assert any_memory.writes[0][:3] == ("from", w.plan.copies, ["bytes"])
    assert lent.asked == [(w.plan.copies, 0, [2])]
    writes.write(room, w, make_peer(pool_only), inline=True)
    assert pool_only.writes[0][0] == "pool" and lent.placed == 1  # copied into the blocks first
    writes.release(room)
    writes.write(room, w, make_peer(any_memory), inline=True)
    assert any_memory.writes[-1][0] == "pool" and len(lent.asked) == 1


def test_a_transport_that_limits_concurrent_writes_gets_its_own_threads(dispatch):
    writes = dispatch[0]
    assert writes.executor_for(FakeWriter(), "fake") is None
    assert writes.executor_for(FakeWriter(limit=2), "fake") is None  # as many as the pool has
    own = writes.executor_for(FakeWriter(limit=1), "fake")
    try:
        assert own is not None and own._max_workers == 1
    finally:
        own.shutdown()


# -- shared with the language endpoint


def test_the_step_lock_holds_its_lock_while_the_room_takes_the_event():
    step = StepLock()
    seen = []

    def event(*args):
        seen.append((args, step._lock.locked()))
        return ["action"]

    assert step(event, 1, "two") == ["action"]
    assert seen == [((1, "two"), True)]
    assert not step._lock.locked()


class Counters:
    dropped_messages = 0
    unauthenticated_messages = 0


@pytest.fixture
def opener():
    counters, m = Counters(), metrics()
    noise = NoiseLog(logging.getLogger("test.noise"), "encoder", clock=lambda: 0.0)
    named = []

    def name(peer):
        named.append(peer)
        return f"peer {peer}"

    o = PayloadOpener(
        Authenticator("secret"),
        side="encoder",
        counters=counters,
        metrics=m,
        noise=noise,
        name=name,
    )
    return o, counters, m, noise, named


def test_a_sealed_payload_opens_and_names_no_peer(opener):
    o, counters, _, _, named = opener
    msg = Heartbeat(session="s", seq=1)
    assert o.open(Authenticator("secret").seal(encode(msg)), "p") == msg
    assert named == [] and counters.dropped_messages == 0 == counters.unauthenticated_messages


def test_an_unauthenticated_payload_is_counted_and_noted(opener, caplog):
    o, counters, m, noise, named = opener
    caplog.set_level(logging.WARNING, logger="test.noise")
    assert o.open(encode(Heartbeat(session="s", seq=1)), "p") is None
    assert counters.unauthenticated_messages == 1 and counters.dropped_messages == 0
    assert sample(m, "embedlink_unauthenticated_messages_total") == 1
    assert named == ["p"] and noise.lines == 1
    assert "peer p" in caplog.text and "unauthenticated" in caplog.text


def test_a_malformed_payload_is_counted_as_dropped(opener):
    o, counters, m, noise, named = opener
    assert o.open(Authenticator("secret").seal(b"\xc1 not msgpack"), "p") is None
    assert counters.dropped_messages == 1 and counters.unauthenticated_messages == 0
    assert sample(m, "embedlink_dropped_messages_total") == 1
    assert named == ["p"] and noise.lines == 1
    o.reject("q", "unexpected", "StatusUpdate is not for an encoder")
    assert counters.dropped_messages == 2 and named == ["p", "q"]
