"""``mooncake``: the Mooncake Transfer Engine, the multi-node data plane.

Uses the real engine (``mooncake.engine.TransferEngine``) in ``P2PHANDSHAKE``
metadata mode (no etcd): each engine listens on its own RPC port and peers
address it as ``host:rpc_port`` (its *session id*, carried in ``Register``).
Each pool is registered once with ``batch_register_memory``; each plan is one
``batch_transfer_sync_write`` over its merged copies. The engine bounds that
call by ``MC_TRANSFER_TIMEOUT`` (seconds, at least 5; embedlink sets it from the
room timeout when unset), and any non-zero return code becomes a
:class:`~embedlink.transports.TransportError` carrying the code: the room
fails, terminally.

Options (``transport_options={"mooncake": {...}}`` on the endpoints, or
``EMBEDLINK_MOONCAKE_*`` environment variables): ``protocol`` (``tcp``, the
default, or ``rdma``), ``device_name`` (RDMA devices, e.g. ``mlx5_0,mlx5_1``),
``verbose`` (``1`` shows the engine's own start-up logging, which is quiet by
default).

Install: ``pip install 'embedlink[mooncake]'`` on CPU machines
(``mooncake-transfer-engine-non-cuda``); on GPU machines install
``mooncake-transfer-engine`` (CUDA 12) or ``mooncake-transfer-engine-cuda13``
instead (they provide the same module; install one). The native library needs
Debian's ``libibverbs1`` even for TCP.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..memory import BufferPool
from ..protocol import AUX_FIELD, Copy, TransportOffer
from . import Backend
from .base import PeerWriter, TransportError, TransportServer, TransportUnavailable, check_bounds

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


def _engine_class(verbose: bool) -> Any:
    # The engine reads MC_LOG_LEVEL when it is constructed: its start-up chatter
    # (topology discovery, ports) is INFO; keep errors only unless asked.
    os.environ.setdefault("MC_LOG_LEVEL", "INFO" if verbose else "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:  # missing package, or libibverbs.so.1 missing
        raise TransportUnavailable(f"{INSTALL_HINT} ({exc})") from exc
    return TransferEngine


@functools.cache
def installed() -> bool:
    """Whether the engine can be imported here (cached)."""
    try:
        _engine_class(verbose=False)
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
                f"mooncake: initialize({host!r}, P2PHANDSHAKE, {protocol!r}, {device_name!r}) returned {rc}"
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
                raise TransportError(
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


class MooncakeWriter(PeerWriter):
    """One batched write per plan into a peer's registered pool."""

    name = "mooncake"
    # The engine splits each write over its own worker threads; concurrent
    # batches to one peer contend for them (measured on 2 cores: one at a time
    # moves 2000-token rooms ~1.6x faster than four).
    max_concurrent_writes = 1

    def __init__(
        self, engine: _Engine, session: str, addrs: dict[str, int], regions: dict[str, int]
    ) -> None:
        self.engine = engine
        self.session = session
        self.addrs = addrs
        self.regions = regions
        self._sources: set[int] = set()  # source pools this writer registered
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
        rc = self.engine.engine.batch_transfer_sync_write(self.session, srcs, dsts, lens)
        if rc != 0:
            raise TransportError(
                f"mooncake: batch_transfer_sync_write to {self.session} returned {rc} "
                f"({len(copies)} copies, {sum(lens)} bytes): the peer is unreachable, refused the "
                "write or it timed out"
            )


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
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(max(5, int(timeout))))
        engine = local_engine(local_host, opts)
        return MooncakeWriter(
            engine, p["session"], dict(zip(field_names, addrs, strict=True)), regions
        )


BACKEND: Backend = MooncakeBackend()
