"""``mooncake``: the Mooncake Transfer Engine, the multi-node data plane.

Uses the real engine (``mooncake.engine.TransferEngine``) in ``P2PHANDSHAKE``
metadata mode (no etcd): each engine listens on its own RPC port and peers
address it as ``host:rpc_port`` (its *session id*, carried in ``Register``).
Each pool is registered once with ``batch_register_memory``.

How a plan is written depends on ``wait``. Either way each merged copy of
the plan is submitted at once (``transfer_submit_write``) and the writer
watches their states (``transfer_check_status``, which releases the GIL)
until all are done or the writer's own deadline passes: the room timeout of
the endpoint that made the writer, so two endpoints in one process with
different timeouts each keep their own (the engine's ``MC_TRANSFER_TIMEOUT``
is process-wide, read once when the engine starts; embedlink does not set it).

* ``poll`` (what ``auto``, the default, picks for ``tcp``): the states are
  looked at every 100 us. Two plans per peer may be in flight at once. The
  engine's own synchronous calls spin on the status without pausing: that
  costs a whole core for the length of every write, and on a small host the
  engine's worker threads need that core (see docs/performance.md). Copies of
  6-64 MiB go as up to four requests (the engine moves them in parallel).
* ``spin``: the states are looked at without sleeping, yielding the CPU
  between looks; what ``auto`` picks for ``rdma``, whose writes end too soon
  for a poll interval to be small beside them. One plan per peer at a time.

The Python binding has no non-blocking status for a batch of several requests
(``get_batch_transfer_status`` spins until the batch is done;
``transfer_check_status`` reads the first request only), hence one submission
per merged copy; a plan has one copy per field when its blocks are contiguous.

A non-zero return code, a failed request or a passed deadline becomes a
:class:`~embedlink.transports.DataPlaneError` carrying the code: the room
fails, terminally. After a failed request the writer waits (up to the
deadline) for the plan's other requests to settle, so that they do not land in
the peer's pool after the room has failed and its blocks may have gone to
another room. Requests still pending at the deadline cannot be cancelled (the
engine has no call for it; its own timeout in ``spin`` mode has the same
limit): they are abandoned, looked at again on later writes so the engine
frees them once they end.

Options (``transport_options={"mooncake": {...}}`` on the endpoints, or
``EMBEDLINK_MOONCAKE_*`` environment variables): ``protocol`` (``tcp``, the
default, or ``rdma``), ``device_name`` (RDMA devices, e.g. ``mlx5_0,mlx5_1``),
``verbose`` (``1`` shows the engine's own start-up logging, which is quiet by
default), ``wait`` (``auto``, the default, ``poll`` or ``spin``; above).

Process-wide state: the engine is one per process (and host, protocol and
devices), shared by the endpoints in it. It reads its own configuration from
``MC_*`` environment variables (``MC_LOG_LEVEL`` when its library is first
imported); embedlink sets ``MC_LOG_LEVEL`` (``ERROR``, or ``INFO`` when the
first engine asked is verbose) only around that import, unless the user set
it, and restores the environment afterwards. At ``ERROR`` a successful start still prints two lines of the
engine's own logging to standard error; nothing redirects it.

Install: ``pip install 'embedlink[mooncake]'`` on CPU machines
(``mooncake-transfer-engine-non-cuda``); on GPU machines install
``mooncake-transfer-engine`` (CUDA 12) or ``mooncake-transfer-engine-cuda13``
instead (they provide the same module; install one). The native library needs
Debian's ``libibverbs1`` even for TCP.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..memory import BufferPool
from ..protocol import AUX_FIELD, Copy, TransportOffer
from . import Backend
from .base import DataPlaneError, PeerWriter, TransportServer, TransportUnavailable, check_bounds

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND",
    "INSTALL_HINT",
    "MooncakeBackend",
    "MooncakeServer",
    "MooncakeWriter",
    "local_engine",
]

INSTALL_HINT = (
    "the mooncake transport needs the Mooncake Transfer Engine: "
    "pip install 'embedlink[mooncake]' (mooncake-transfer-engine-non-cuda; on GPU machines "
    "mooncake-transfer-engine or mooncake-transfer-engine-cuda13) and Debian's libibverbs1 "
    "(apt-get install -y libibverbs1)"
)


def _option(options: Mapping[str, str] | None, name: str, default: str) -> str:
    if options and name in options:
        return str(options[name])
    return os.environ.get(f"EMBEDLINK_MOONCAKE_{name.upper()}", default)


_IMPORT_LOCK = threading.Lock()


def _engine_class(verbose: bool = False) -> Any:
    # The native library reads MC_LOG_LEVEL when it is first imported.
    with _IMPORT_LOCK, _engine_env(verbose):
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:  # missing package, or libibverbs.so.1 missing
            raise TransportUnavailable(f"{INSTALL_HINT} ({exc})") from exc
    return TransferEngine


@contextlib.contextmanager
def _engine_env(verbose: bool) -> Iterator[None]:
    """The environment the engine's library reads when it is first imported:
    its start-up chatter (topology discovery, ports) is INFO, so errors only
    unless asked; a user's own ``MC_LOG_LEVEL`` wins. Restored afterwards,
    so the endpoint leaves the process's environment as it found it."""
    key = "MC_LOG_LEVEL"
    if key in os.environ:
        yield
        return
    os.environ[key] = "INFO" if verbose else "ERROR"
    try:
        yield
    finally:
        os.environ.pop(key, None)


@functools.cache
def installed() -> bool:
    """Whether the engine can be imported here (cached)."""
    try:
        _engine_class()
    except TransportUnavailable:
        return False
    return True


class _Engine:
    """One engine per process and (host, protocol, devices); registers each
    memory region once."""

    def __init__(self, host: str, protocol: str, device_name: str, verbose: bool) -> None:
        cls = _engine_class(verbose)
        self.engine = cls()
        rc = self.engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise TransportUnavailable(
                f"mooncake: initialize({host!r}, P2PHANDSHAKE, {protocol!r}, {device_name!r}) "
                f"returned {rc} (the engine's own log lines, on standard error, say why)"
            )
        self.host = host
        self.protocol = protocol
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self._registered: dict[int, tuple[int, int]] = {}  # addr -> (nbytes, users)
        self._lock = threading.Lock()

    def register(self, addr: int, nbytes: int) -> None:
        """Register ``[addr, addr + nbytes)`` once; counted, so each user
        releases its own registration with :meth:`unregister`."""
        with self._lock:
            held = self._registered.get(addr)
            if held is not None and held[0] >= nbytes:
                self._registered[addr] = (held[0], held[1] + 1)
                return
            if held is not None:  # grew: register again at the new size
                self.engine.batch_unregister_memory([addr])
            rc = self.engine.batch_register_memory([addr], [nbytes])
            if rc != 0:
                raise DataPlaneError(
                    f"mooncake: batch_register_memory({addr:#x}, {nbytes}) returned {rc}"
                )
            self._registered[addr] = (nbytes, (held[1] if held else 0) + 1)

    def unregister(self, addr: int) -> None:
        with self._lock:
            held = self._registered.get(addr)
            if held is None:
                return
            if held[1] > 1:
                self._registered[addr] = (held[0], held[1] - 1)
                return
            del self._registered[addr]
            rc = self.engine.batch_unregister_memory([addr])
            if rc != 0:
                log.warning("mooncake: batch_unregister_memory(%#x) returned %d", addr, rc)


_ENGINES: dict[tuple[str, str, str], _Engine] = {}
_ENGINES_LOCK = threading.Lock()


def local_engine(host: str, options: Mapping[str, str] | None = None) -> _Engine:
    """This process's engine for ``host`` and the configured protocol."""
    protocol = _option(options, "protocol", "tcp")
    device = _option(options, "device_name", "")
    verbose = _option(options, "verbose", "0") == "1"
    key = (host, protocol, device)
    with _ENGINES_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = _Engine(host, protocol, device, verbose)
            _ENGINES[key] = eng
        return eng


class MooncakeServer(TransportServer):
    """Registers the pool with this process's engine and offers its session."""

    name = "mooncake"

    def __init__(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(pool, host=host)
        self.options = dict(options or {})
        self._engine: _Engine | None = None

    def start(self) -> MooncakeServer:
        self._engine = local_engine(self.host, self.options)
        self._engine.register(self.pool.base_addr, self.pool.nbytes)
        return self

    def offer(self) -> TransportOffer:
        assert self._engine is not None, "start() first"
        names = [*self.pool.schema.names, AUX_FIELD]
        return TransportOffer(
            "mooncake",
            {
                "session": self._engine.session,
                "protocol": self._engine.protocol,
                "addrs": ",".join(str(self.pool.region(n)[0]) for n in names),
            },
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.unregister(self.pool.base_addr)
            self._engine = None


#: How long a polled write sleeps between two looks at its requests: about 1%
#: of a 14 MB write over TCP, and a few microseconds of CPU per look.
POLL_INTERVAL = 100e-6

_WAITS = ("poll", "spin")

_yield = getattr(os, "sched_yield", lambda: time.sleep(0))

#: Polled writes cut a copy of 6-64 MiB into up to four requests of at least
#: 3 MiB: the engine moves separate requests in parallel. Measured on 2 cores
#: (docs/performance.md): a 14 MB copy as one request ~1.15-1.7 GB/s, as four
#: ~2-2.8 GB/s between two engines; 2000-token rooms end to end, 8 in flight,
#: medians of 7 interleaved runs 1.13 -> 1.34 GB/s. A 117 MB copy gained
#: nothing from it (1.26 GB/s as one request, 1.12 as eight).
SPLIT_BYTES = 3 << 20
SPLIT_MAX = 4
SPLIT_ABOVE = 64 << 20


def _wait_mode(wait: str, protocol: str) -> str:
    """``auto``: ``poll`` over TCP, where a 14 MB write takes milliseconds and
    the cores are better spent on the engine's threads; ``spin`` otherwise
    (RDMA finishes such a write in well under a millisecond, where a 100 us
    poll would be a noticeable share of it)."""
    if wait == "auto":
        return "poll" if protocol == "tcp" else "spin"
    return wait


def _pieces(srcs: list[int], dsts: list[int], lens: list[int]) -> list[tuple[int, int, int]]:
    """``(src, dst, length)`` requests for the copies (see ``SPLIT_BYTES``)."""
    out: list[tuple[int, int, int]] = []
    for s, d, n in zip(srcs, dsts, lens, strict=True):
        k = 1 if n > SPLIT_ABOVE else max(1, min(SPLIT_MAX, n // SPLIT_BYTES))
        step = -(-n // k)
        out.extend((s + off, d + off, min(step, n - off)) for off in range(0, n, step))
    return out


def _submitted(batch_id: int) -> bool:
    # the binding returns 0, or -1 cast to an unsigned 64-bit id, on failure
    return 0 < batch_id < (1 << 63)


class MooncakeWriter(PeerWriter):
    """Writes each plan into a peer's registered pool (``wait``: see the module
    docstring)."""

    name = "mooncake"
    # The engine splits each write over its own worker threads. With ``spin``
    # every write also holds a core while it waits, so concurrent writes to one
    # peer contend (measured on 2 cores: one at a time moved 2000-token rooms
    # ~1.6x faster than four). Polled writes leave the cores to the engine, and
    # two in flight keep its pipeline full between writes (2000-token rooms,
    # 8 in flight, on 2 cores: ~1.34 GB/s against ~1.07 with one; see
    # docs/performance.md). Set per instance from ``wait``.
    max_concurrent_writes = 1

    def __init__(
        self,
        engine: _Engine,
        session: str,
        addrs: dict[str, int],
        regions: dict[str, int],
        wait: str = "poll",
    ) -> None:
        if wait not in _WAITS:
            raise TransportUnavailable(
                f"mooncake: option wait={wait!r} is not one of auto, {', '.join(_WAITS)}"
            )
        self.engine = engine
        self.session = session
        self.addrs = addrs
        self.regions = regions
        self.wait = wait
        self.max_concurrent_writes = 2 if wait == "poll" else 1
        self._sources: set[int] = set()  # source pools this writer registered
        # requests still pending when their write gave up: looked at again on
        # later writes so the engine frees them once they end
        self._abandoned: list[int] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the registrations of the source pools this writer used (a
        stale registration would overlap the next pool at the same address)."""
        with self._lock:
            sources, self._sources = self._sources, set()
        for addr in sources:
            self.engine.unregister(addr)

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        check_bounds(copies, self.regions, src)
        if src.base_addr not in self._sources:
            with self._lock:
                if src.base_addr not in self._sources:
                    self.engine.register(src.base_addr, src.nbytes)
                    self._sources.add(src.base_addr)
        srcs = [src.region(c.field)[0] + c.src_offset for c in copies]
        dsts = [self.addrs[c.field] + c.dst_offset for c in copies]
        lens = [c.length for c in copies]
        self._write_watched(srcs, dsts, lens, timeout)

    def _write_watched(
        self, srcs: list[int], dsts: list[int], lens: list[int], timeout: float
    ) -> None:
        eng = self.engine.engine
        deadline = time.monotonic() + timeout
        self._reap()
        pending: list[int] = []
        problem: str | None = None
        spin = self.wait == "spin"
        requests = list(zip(srcs, dsts, lens, strict=True)) if spin else _pieces(srcs, dsts, lens)
        for s, d, n in requests:
            bid = eng.transfer_submit_write(self.session, s, d, n)
            if not _submitted(bid):
                problem = f"transfer_submit_write of {n} bytes was refused (returned {bid})"
                break
            pending.append(bid)
        while pending:
            still = []
            for bid in pending:
                rc = eng.transfer_check_status(bid)
                if rc == 0:
                    still.append(bid)
                elif rc != 1 and problem is None:
                    # -1: failed; -2: the engine's own timeout
                    problem = f"a request ended with status {rc}"
            pending = still
            if not pending:
                break
            if time.monotonic() >= deadline:
                with self._lock:
                    self._abandoned.extend(pending)
                raise DataPlaneError(
                    f"mooncake: write to {self.session} timed out after {timeout:g} s with "
                    f"{len(pending)} of {len(requests)} requests pending ({sum(lens)} bytes)"
                    + (f"; {problem}" if problem else "")
                )
            if spin:
                _yield()
            else:
                time.sleep(POLL_INTERVAL)
        if problem is not None:
            raise DataPlaneError(
                f"mooncake: write to {self.session} failed: {problem} ({len(requests)} requests, "
                f"{sum(lens)} bytes): the peer is unreachable or refused the write"
            )

    def _reap(self) -> None:
        """Look again at requests an earlier write gave up on; the engine frees
        each one that has ended."""
        if not self._abandoned:
            return
        with self._lock:
            old, self._abandoned = self._abandoned, []
        left = [b for b in old if self.engine.engine.transfer_check_status(b) == 0]
        if left:
            with self._lock:
                self._abandoned.extend(left)


class MooncakeBackend:
    name = "mooncake"
    host_memory_only = False

    def server(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> TransportServer:
        return MooncakeServer(pool, host=host, options=options)

    def reachable(self, offer: TransportOffer, *, host_id: str) -> bool:
        return "session" in offer.params and "addrs" in offer.params and installed()

    def connect(
        self,
        offer: TransportOffer,
        *,
        regions: dict[str, int],
        field_names: list[str],
        timeout: float,
        local_host: str = "127.0.0.1",
        options: Mapping[str, str] | None = None,
    ) -> PeerWriter:
        p = offer.params
        try:
            addrs = [int(x) for x in p["addrs"].split(",")]
        except (KeyError, ValueError) as exc:
            raise TransportUnavailable(f"mooncake: malformed offer: {exc}") from exc
        if len(addrs) != len(field_names):
            raise TransportUnavailable("mooncake: the offer's regions do not match the schema")
        opts = dict(options or {})
        opts.setdefault("protocol", p.get("protocol", "tcp"))
        engine = local_engine(local_host, opts)
        return MooncakeWriter(
            engine,
            p["session"],
            dict(zip(field_names, addrs, strict=True)),
            regions,
            wait=_wait_mode(_option(opts, "wait", "auto"), opts["protocol"]),
        )


BACKEND: Backend = MooncakeBackend()
