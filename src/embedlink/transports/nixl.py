"""``nixl``: NVIDIA NIXL (the Inference Xfer Library) over UCX, a second
multi-node data plane beside Mooncake, and a single-copy path on one host.

The receiver's :class:`NixlServer` registers the pool once with this
process's NIXL agent and offers, in ``Register``, the agent's name and its
metadata for that pool (NIXL's own serialisation of the UCX worker address
and the region's remote key, carried as base64 text, never unpickled). The
sender's :class:`NixlWriter` adds the remote agent once per session (cached
for the writer's life), on its first write, on a writer thread: making this
process's agent takes about 0.5 s and adding a remote agent, then connecting
to it, about 30 ms with UCX's peer error handling, and neither may stall the
endpoint's loop, which runs ``connect()``. It writes each chunk's merged
copies as one NIXL ``WRITE`` with a notification;
it watches the request until it is done or the writer's deadline (the room
timeout of the endpoint that made it) passes. A NIXL error, a failed request
or a passed deadline is a :class:`~embedlink.transports.DataPlaneError` naming
NIXL's error: the room fails, never hangs. A request still in progress at the
deadline is released, which asks UCX to cancel it; one NIXL cannot release yet
is kept and released by a later write. After a failed or timed-out write the
connection to that peer is dropped (UCX keeps a failed endpoint failed) and the
next write connects again.

A ``DONE`` request has been flushed: its bytes are in the peer's memory when
the writer returns (NIXL flushes the UCX endpoint before it reports a write
done), so the status update that follows on the control plane cannot overtake
them. Receivers cannot fence a sender's link (UCX has no revocation of a remote
key that a peer holds): the language side keeps a dead encoder's blocks out of
use for ``stale_write_grace`` instead.

UCX picks the path itself: on one host ``cma`` (one ``process_vm_writev``
from the sender's memory into the receiver's; it needs permission to write
into the peer process: with Yama's ``ptrace_scope`` at 1 or more UCX falls
back, silently, to slower paths), across hosts ``tcp`` or, where RDMA
devices are configured, InfiniBand/RoCE verbs.

Options (``transport_options={"nixl": {...}}`` on the endpoints, or
``EMBEDLINK_NIXL_*`` environment variables):

* ``net_devices``: the network interfaces UCX may use (``UCX_NET_DEVICES``),
  e.g. ``eth0``; ``auto`` (the default) is the interface that holds the
  endpoint's host address (``lo`` for a loopback host, every interface for
  ``0.0.0.0``), so a test on loopback never listens on an external interface.
* ``rdma_devices``: RDMA devices by name (``mlx5_0,mlx5_1``; ``:port``
  optional, port 1 by default), added to the devices above; empty (the
  default) leaves UCX's InfiniBand module unloaded (see below).
* ``tls``: UCX transports (``UCX_TLS``), e.g. ``tcp`` to force TCP between two
  network namespaces of one host; empty (the default) lets UCX choose.
* ``error_handling``: UCX's endpoint error handling, ``peer`` (the default:
  a peer that dies fails the write with an error) or ``none``: a session's
  first contact is faster (measured here: adding the remote agent 0.6-0.8 ms
  instead of 8-9 ms and the first write 5.5 ms instead of 21 ms; the issue
  measured 1.6 against 60-140 ms), once per session; but UCX leaves what
  happens after a peer fails undefined (here a killed peer still failed the
  writes with an error, over ``cma`` and over TCP).
* ``workers``: UCX workers per agent (default 4, see ``WORKERS``): writes
  posted by different threads run in parallel, each on its own worker.
* ``verbose``: ``1`` shows NIXL's and UCX's informational logging.

The environment, and what stays process-wide. Every variable below is set
only while the UCX backend is created (under a lock) and restored at once, and
only where the user has not set it (an explicit ``net_devices``,
``rdma_devices`` or ``tls`` option wins over the user's variable):
``UCX_MODULES=^ib`` unless RDMA devices are configured (every process that
created the UCX backend with the InfiniBand module loaded and no RDMA device
died with SIGSEGV at exit on the machines we measured on), ``UCX_NET_DEVICES``
(above), ``UCX_TLS`` (above), ``UCX_LOG_LEVEL=info`` when verbose.
``NIXL_LOG_LEVEL=WARN`` (``INFO`` when verbose) is
set only around the import of NIXL's library, which reads it then: NIXL's
Python logger would otherwise write INFO lines to standard output. What
remains process-wide: NIXL's log levels (its Python ``nixl`` logger and its
C++ logging, fixed when the library is first imported here), and UCX's
global options, its loaded modules and log level among them (the first
backend created in the process decides, for every later one and for any other
UCX user in the process). NIXL's own errors (a dead peer, a refused write)
are logged by its C++ code to standard error, one line each. The agent is one per
process and set of options, shared by the endpoints in it, and lives as long as
the process.

Agents are made with NIXL's progress thread, woken by UCX's event descriptors
(and every ``PROGRESS_WAKE_US`` as NIXL's workaround wants): the Python
``nixl_agent`` sets that delay to 0, which makes the thread spin a whole core
(measured: 2.0 CPU-seconds in 2 idle seconds), so embedlink makes the agent
through the library's bindings instead.

GPU memory: a pool on ``cuda:N`` is registered as NIXL ``VRAM`` on device N,
on either side; UCX moves it with its CUDA transports (GPUDirect RDMA where the
hardware has it). Not yet run on a GPU (docs/nixl.md).

Install: ``pip install --no-deps nixl-cu12==1.5.1`` (its metadata asks for
torch, which pip would fetch as a ~3 GB CUDA build; NIXL needs only numpy at
run time), or ``pip install 'embedlink[nixl]'`` where torch is wanted anyway.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import importlib
import importlib.util
import ipaddress
import itertools
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..memory import BufferPool
from ..protocol import AUX_FIELD, Copy, TransportOffer
from . import Backend
from .base import DataPlaneError, PeerWriter, TransportServer, TransportUnavailable, check_bounds

log = logging.getLogger(__name__)

__all__ = [
    "BACKEND",
    "INSTALL_HINT",
    "NixlBackend",
    "NixlServer",
    "NixlWriter",
    "installed",
    "local_agent",
    "net_devices_for",
    "settings",
    "ucx_env",
]

INSTALL_HINT = (
    "the nixl transport needs NVIDIA NIXL: pip install --no-deps nixl-cu12==1.5.1 "
    "(without dependencies: its metadata asks for torch, which pip would install as a "
    "~3 GB CUDA build; NIXL needs only numpy), or pip install 'embedlink[nixl]' where "
    "torch is wanted anyway"
)

#: the wheels that provide NIXL's bindings, in the order they are tried
MODULES = ("nixl_cu12", "nixl_cu13")
#: what embedlink uses of the bindings (checked at import: a NIXL that lacks
#: one is refused, naming what it lacks, rather than failing in a write)
_NEEDED = (
    "nixlAgent",
    "nixlAgentConfig",
    "nixlRegDList",
    "nixlXferDList",
    "DRAM_SEG",
    "VRAM_SEG",
    "NIXL_WRITE",
    "NIXL_SUCCESS",
    "NIXL_IN_PROG",
    "NIXL_THREAD_SYNC_RW",
)
#: how often NIXL's progress thread wakes when UCX has nothing for it (it is
#: woken by UCX's event descriptors otherwise)
PROGRESS_WAKE_US = 20_000
#: UCX workers per agent. NIXL gives each thread that posts a write a worker
#: of its own (round robin), and a ``cma`` write is one system call made by
#: the posting thread, under its worker's lock: with one worker the endpoint's
#: writer threads take turns, with one each they copy in parallel. Measured on
#: 2 cores, 2000-token rooms, 8 in flight, three interleaved pairs: one worker
#: 0.36-0.44 of the raw write, four 0.85-1.27 (docs/nixl.md). Four: an
#: encoder's default ``write_workers``.
WORKERS = 4
#: how often a receiving agent collects the notifications that came with writes
NOTIF_INTERVAL = 0.5
#: a writer looks at its request without sleeping this long, then sleeps
#: ``POLL_INTERVAL`` between looks
SPIN_S = 200e-6
POLL_INTERVAL = 50e-6
#: offer parameters hold at most 4096 characters: the metadata goes in parts
_MD_PART = 4096
_MD_PARTS_MAX = 24

_ERROR_MODES = ("peer", "none")


def _present() -> bool:
    """Whether a NIXL wheel is there to import (without importing it)."""
    for name in MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


# Choosing ``nixl`` where NIXL is not installed fails here, when the endpoint
# is made (``get_backend``), with the install command; a NIXL that is there
# but cannot load fails when the transport starts, with the same command.
if not _present():
    raise TransportUnavailable(INSTALL_HINT)

_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def _option(options: Mapping[str, str] | None, name: str, default: str) -> str:
    if options and name in options:
        return str(options[name])
    return os.environ.get(f"EMBEDLINK_NIXL_{name.upper()}", default)


def _explicit(options: Mapping[str, str] | None, name: str) -> bool:
    return bool(options and name in options) or f"EMBEDLINK_NIXL_{name.upper()}" in os.environ


_IMPORT_LOCK = threading.Lock()
_ENV_LOCK = threading.RLock()  # scopes nest (a caller may scope its own variables)


@contextlib.contextmanager
def _scoped_env(values: Mapping[str, str], force: frozenset[str] = frozenset()) -> Iterator[None]:
    """Set ``values`` in the environment for the length of the block, then
    restore it; a variable the user already set is left alone unless its name
    is in ``force``."""
    with _ENV_LOCK:
        saved: dict[str, str | None] = {}
        for k, v in values.items():
            if k in os.environ and k not in force:
                continue
            saved[k] = os.environ.get(k)
            os.environ[k] = v
        try:
            yield
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old


def _import(verbose: bool = False) -> Any:
    """NIXL's bindings (``nixl_cu12._bindings``); TransportUnavailable with the
    install command when no NIXL wheel is importable."""
    with _IMPORT_LOCK:
        errors = []
        for name in MODULES:
            try:
                # NIXL reads NIXL_LOG_LEVEL when its library is loaded
                with _scoped_env({"NIXL_LOG_LEVEL": "INFO" if verbose else "WARN"}):
                    mod = importlib.import_module(f"{name}._bindings")
            except ImportError as exc:
                errors.append(f"{name}: {exc}")
                continue
            missing = [n for n in _NEEDED if not hasattr(mod, n)]
            if missing:
                raise TransportUnavailable(
                    f"nixl: {name} lacks {', '.join(missing)} (embedlink is tested with "
                    f"nixl-cu12 1.5.1): {INSTALL_HINT}"
                )
            return mod
    raise TransportUnavailable(f"{INSTALL_HINT} ({'; '.join(errors)})")


@functools.cache
def installed() -> bool:
    """Whether NIXL can be imported here (cached)."""
    try:
        _import()
    except TransportUnavailable:
        return False
    return True


# -- which interfaces UCX may use


_SIOCGIFADDR = 0x8915


def _interface_addresses() -> dict[str, str]:
    """``{interface: IPv4 address}`` of this network namespace."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)
            except OSError:
                continue  # no IPv4 address
            out[name] = socket.inet_ntoa(res[20:24])
    return out


def net_devices_for(host: str) -> str:
    """``UCX_NET_DEVICES`` for an endpoint bound to ``host``: ``lo`` for a
    loopback address, ``all`` for ``0.0.0.0`` (or no host), else the interface
    that holds the host's IPv4 address. TransportUnavailable when none does."""
    if host in ("", "0.0.0.0", "*", "::"):
        return "all"
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError) as exc:
        raise TransportUnavailable(f"nixl: cannot resolve host {host!r}: {exc}") from exc
    if ipaddress.ip_address(addr).is_loopback:
        return "lo"
    for name, a in _interface_addresses().items():
        if a == addr:
            return name
    raise TransportUnavailable(
        f"nixl: no network interface here has {host!r} ({addr}); name the interfaces UCX "
        "should use with the nixl option net_devices (EMBEDLINK_NIXL_NET_DEVICES), e.g. eth0"
    )


def ucx_env(host: str, options: Mapping[str, str] | None = None) -> tuple[dict[str, str], set[str]]:
    """The UCX variables set while this process's backend for ``host`` is
    created, and those of them that override the user's own (explicit
    options)."""
    env: dict[str, str] = {}
    force: set[str] = set()
    rdma = [d.strip() for d in _option(options, "rdma_devices", "").split(",") if d.strip()]
    if not rdma:
        env["UCX_MODULES"] = "^ib"
    nets = _option(options, "net_devices", "auto").strip() or "auto"
    devices = net_devices_for(host) if nets == "auto" else nets
    if rdma and devices != "all":
        devices = ",".join([*(d if ":" in d else f"{d}:1" for d in rdma), devices])
    env["UCX_NET_DEVICES"] = devices
    if _explicit(options, "net_devices") or rdma:
        force.add("UCX_NET_DEVICES")
    tls = _option(options, "tls", "").strip()
    if tls:
        env["UCX_TLS"] = tls
        force.add("UCX_TLS")
    if _option(options, "verbose", "0") == "1":
        env["UCX_LOG_LEVEL"] = "info"
    return env, force


# -- the agent


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class _Agent:
    """One NIXL agent with a UCX backend: registers memory regions once
    (counted), adds remote agents once (counted), collects notifications."""

    def __init__(self, host: str, options: Mapping[str, str] | None) -> None:
        opts = dict(options or {})
        verbose = _option(opts, "verbose", "0") == "1"
        mode, workers, env, force = settings(host, opts)
        nb = _import(verbose)
        self.nb = nb
        self.name = f"embedlink-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        cfg = nb.nixlAgentConfig()
        cfg.useProgThread = True
        cfg.useListenThread = False
        cfg.pthrDelay = PROGRESS_WAKE_US
        cfg.syncMode = nb.NIXL_THREAD_SYNC_RW
        try:
            self.agent = nb.nixlAgent(self.name, cfg)
            if "UCX" not in self.agent.getAvailPlugins():
                raise TransportUnavailable(f"nixl: this NIXL has no UCX plugin: {INSTALL_HINT}")
            with _scoped_env(env, frozenset(force)):
                self.backend = self.agent.createBackend(
                    "UCX", {"ucx_error_handling_mode": mode, "num_workers": str(workers)}
                )
        except TransportUnavailable:
            raise
        except Exception as exc:  # NIXL raises its own exception types
            raise TransportUnavailable(
                f"nixl: creating the UCX backend failed ({_error_text(exc)}; with {env})"
            ) from exc
        self.host = host
        self.env = env
        self.error_handling = mode
        log.debug("nixl: agent %s, UCX backend with %s", self.name, env)
        self._lock = threading.Lock()
        self._registered: dict[tuple[int, int], tuple[int, int, Any]] = {}
        self._remotes: dict[str, int] = {}  # remote agent -> writers using it
        self._gen: dict[str, int] = {}  # remote agent -> connection generation
        self._loaded: dict[str, set[bytes]] = {}  # remote agent -> metadata loaded
        self._remote_lock = threading.Lock()  # one load or reset at a time
        self.notifications: dict[str, int] = {}  # remote agent -> notifications seen
        self._collector: threading.Thread | None = None
        self._collector_stop = threading.Event()
        self._collecting = 0
        self._seq = itertools.count(1)

    # memory

    def _reg_list(self, addr: int, nbytes: int, mem: str, dev: int) -> Any:
        nb = self.nb
        seg = nb.VRAM_SEG if mem == "VRAM" else nb.DRAM_SEG
        return nb.nixlRegDList(seg, [(addr, nbytes, dev, "")])

    def register(self, addr: int, nbytes: int, mem: str = "DRAM", dev: int = 0) -> None:
        """Register ``[addr, addr + nbytes)`` once; counted, so each user
        releases its own registration with :meth:`unregister`."""
        key = (addr, dev)
        with self._lock:
            held = self._registered.get(key)
            if held is not None and held[0] >= nbytes:
                self._registered[key] = (held[0], held[1] + 1, held[2])
                return
            try:
                if held is not None:  # grew: register again at the new size
                    self.agent.deregisterMem(held[2], [self.backend])
                descs = self._reg_list(addr, nbytes, mem, dev)
                self.agent.registerMem(descs, [self.backend])
            except Exception as exc:
                raise DataPlaneError(
                    f"nixl: registering {nbytes} bytes of {mem} at {addr:#x} failed: "
                    f"{_error_text(exc)}"
                ) from exc
            self._registered[key] = (nbytes, (held[1] if held else 0) + 1, descs)

    def unregister(self, addr: int, dev: int = 0) -> None:
        key = (addr, dev)
        with self._lock:
            held = self._registered.get(key)
            if held is None:
                return
            if held[1] > 1:
                self._registered[key] = (held[0], held[1] - 1, held[2])
                return
            del self._registered[key]
            try:
                self.agent.deregisterMem(held[2], [self.backend])
            except Exception as exc:
                log.warning("nixl: deregistering %#x failed: %s", addr, _error_text(exc))

    def metadata(self, addr: int, dev: int = 0) -> bytes:
        """This agent's metadata for one registered region, with what a peer
        needs to connect (NIXL's partial metadata)."""
        with self._lock:
            held = self._registered[(addr, dev)]
        return bytes(self.agent.getLocalPartialMD(held[2], True, [self.backend]))

    # remote agents

    def retain_remote(self, name: str) -> None:
        """Count a writer to remote agent ``name`` (see :meth:`release_remote`)."""
        with self._lock:
            self._remotes[name] = self._remotes.get(name, 0) + 1

    def release_remote(self, name: str) -> None:
        """The last writer to ``name`` is gone: forget the remote agent (NIXL
        disconnects from it)."""
        with self._lock:
            n = self._remotes.get(name, 0) - 1
            if n > 0:
                self._remotes[name] = n
                return
            self._remotes.pop(name, None)
            self._gen.pop(name, None)
            loaded = self._loaded.pop(name, None)
        if loaded:
            self._invalidate(name)

    def add_remote(self, name: str, md: bytes) -> int:
        """Load a peer's metadata for remote agent ``name`` unless it is loaded
        already (NIXL merges what a later load adds: the metadata of several
        pools of one peer); returns the connection's generation, for
        :meth:`reset_remote`. Cheap when loaded."""
        with self._remote_lock:
            with self._lock:
                gen = self._gen.setdefault(name, 0)
                if md in self._loaded.setdefault(name, set()):
                    return gen
            try:
                got = self.agent.loadRemoteMD(md)
            except Exception as exc:
                raise DataPlaneError(
                    f"nixl: adding the remote agent failed: {_error_text(exc)}"
                ) from exc
            got = got.decode() if isinstance(got, bytes) else str(got)
            if got != name:
                with self._lock:
                    known = got in self._loaded
                if not known:
                    self._invalidate(got)
                raise DataPlaneError(f"nixl: the offer names agent {name!r}, its metadata {got!r}")
            with self._lock:
                self._loaded[name].add(md)
            return gen

    def reset_remote(self, name: str, gen: int) -> None:
        """A write on generation ``gen`` of the connection to ``name`` failed
        or timed out: drop the connection (UCX keeps a failed endpoint
        failed), so that the next write connects again. Later failures of
        writes on the same generation change nothing."""
        with self._remote_lock:
            with self._lock:
                if self._gen.get(name) != gen:
                    return
                self._gen[name] = gen + 1
                self._loaded[name] = set()
            self._invalidate(name)

    def _invalidate(self, name: str) -> None:
        try:
            self.agent.invalidateRemoteMD(name)
        except Exception as exc:  # already gone, or disconnected
            log.debug("nixl: invalidating %s: %s", name, _error_text(exc))

    def notification(self) -> str:
        return f"embedlink:{next(self._seq)}"

    # notifications

    def collect_notifications(self) -> None:
        """Count a user of the thread that collects the notifications of
        writes into this agent (NIXL keeps them until asked); the first starts
        it. Each user stops it with :meth:`stop_collecting`."""
        with self._lock:
            self._collecting += 1
            if self._collector is not None:
                return
            stop = threading.Event()
            self._collector = threading.Thread(
                target=self._collect, args=(stop,), name="embedlink-nixl-notifs", daemon=True
            )
            self._collector_stop = stop
            self._collector.start()

    def stop_collecting(self) -> None:
        """The last user gone, the collecting thread ends (after a last look);
        joined before this returns."""
        with self._lock:
            self._collecting -= 1
            if self._collecting > 0 or self._collector is None:
                return
            thread, self._collector = self._collector, None
            self._collector_stop.set()
        thread.join(10)
        self.drain()

    def _collect(self, stop: threading.Event) -> None:
        while not stop.wait(NOTIF_INTERVAL):
            self.drain()

    def drain(self) -> dict[str, int]:
        """Collect the notifications now; ``{remote agent: count}`` so far."""
        try:
            got = self.agent.getNotifs({}, [self.backend])
        except Exception as exc:
            log.debug("nixl: collecting notifications: %s", _error_text(exc))
            got = {}
        with self._lock:
            for name, msgs in got.items():
                self.notifications[name] = self.notifications.get(name, 0) + len(msgs)
            return dict(self.notifications)


_AGENTS: dict[tuple[str, ...], _Agent] = {}
_AGENTS_LOCK = threading.Lock()


def settings(
    host: str, options: Mapping[str, str] | None
) -> tuple[str, int, dict[str, str], set[str]]:
    """The checked options of an agent for ``host``: error handling, workers,
    and the UCX environment (:func:`ucx_env`); TransportUnavailable naming a
    bad one. Cheap: nothing is created."""
    mode = _option(options, "error_handling", "peer")
    if mode not in _ERROR_MODES:
        raise TransportUnavailable(
            f"nixl: option error_handling={mode!r} is not one of {', '.join(_ERROR_MODES)}"
        )
    raw = _option(options, "workers", str(WORKERS))
    try:
        workers = int(raw)
    except ValueError:
        workers = 0
    if not 1 <= workers <= 64:
        raise TransportUnavailable(f"nixl: option workers={raw!r} is not a number in [1, 64]")
    env, force = ucx_env(host, options)
    return mode, workers, env, force


def local_agent(host: str, options: Mapping[str, str] | None = None) -> _Agent:
    """This process's agent for ``host`` and the given options (made on first
    use: about half a second, most of it creating the UCX backend)."""
    mode, workers, env, _ = settings(host, options)
    key = (mode, str(workers), *sorted(f"{k}={v}" for k, v in env.items()))
    with _AGENTS_LOCK:
        agent = _AGENTS.get(key)
        if agent is None:
            agent = _Agent(host, options)
            _AGENTS[key] = agent
        return agent


def _memory_of(pool: BufferPool) -> tuple[str, int]:
    """NIXL's memory type and device id for a pool."""
    if pool.on_host:
        return "DRAM", 0
    dev = str(pool.device)
    if dev.startswith("cuda"):
        _, _, index = dev.partition(":")
        if not index:
            index = str(pool.tensor.device.index or 0)
        return "VRAM", int(index)
    raise TransportUnavailable(f"nixl: cannot register a pool on {pool.device}")


# -- receiving half


class NixlServer(TransportServer):
    """Registers the pool with this process's agent and offers its metadata."""

    name = "nixl"

    def __init__(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(pool, host=host)
        self.options = dict(options or {})
        self._agent: _Agent | None = None
        self._mem, self._dev = _memory_of(pool)

    def start(self) -> NixlServer:
        self._agent = local_agent(self.host, self.options)
        self._agent.register(self.pool.base_addr, self.pool.nbytes, self._mem, self._dev)
        self._agent.collect_notifications()
        return self

    @property
    def agent(self) -> _Agent:
        assert self._agent is not None, "start() first"
        return self._agent

    def offer(self) -> TransportOffer:
        agent = self.agent
        md = base64.b64encode(agent.metadata(self.pool.base_addr, self._dev)).decode()
        parts = [md[i : i + _MD_PART] for i in range(0, len(md), _MD_PART)]
        if len(parts) > _MD_PARTS_MAX:
            raise DataPlaneError(f"nixl: the agent's metadata ({len(md)} characters) is too large")
        names = [*self.pool.schema.names, AUX_FIELD]
        params = {
            "agent": agent.name,
            "mem": self._mem,
            "dev": str(self._dev),
            "addrs": ",".join(str(self.pool.region(n)[0]) for n in names),
            "md_parts": str(len(parts)),
        }
        params.update({f"md{i}": p for i, p in enumerate(parts)})
        return TransportOffer("nixl", params)

    def close(self) -> None:
        if self._agent is not None:
            agent, self._agent = self._agent, None
            agent.stop_collecting()
            agent.unregister(self.pool.base_addr, self._dev)


# -- sending half


class NixlWriter(PeerWriter):
    """Writes each plan into a peer's registered pool as one NIXL transfer."""

    name = "nixl"

    def __init__(
        self,
        agent: _Agent | Callable[[], _Agent],
        remote: str,
        metadata: bytes,
        addrs: dict[str, int],
        regions: dict[str, int],
        mem: str = "DRAM",
        dev: int = 0,
    ) -> None:
        # the agent, or how to get it: the backend's connect() runs on the
        # endpoint's loop, and making this process's agent takes ~0.5 s, so
        # the first write makes it, on a writer thread
        self._agent: _Agent | None = agent if isinstance(agent, _Agent) else None
        self._make_agent = agent if not isinstance(agent, _Agent) else None
        self._agent_lock = threading.Lock()
        self.remote = remote
        self.metadata = metadata
        self.addrs = addrs
        self.regions = regions
        self.mem = mem
        self.dev = dev
        self._retained = False
        self._sources: set[tuple[int, int]] = set()
        self._abandoned: list[int] = []  # requests a timed-out write could not release
        self._lock = threading.Lock()
        self._closed = False
        self._local = False

    @property
    def agent(self) -> _Agent:
        """This process's agent (made on the first write where needed)."""
        if self._agent is None:
            with self._agent_lock:
                if self._agent is None:
                    assert self._make_agent is not None
                    self._agent = self._make_agent()
        return self._agent

    def _connect(self) -> tuple[str, int]:
        """The remote agent and the generation of the connection to it: added
        on the first write (cached; again after a failed write)."""
        agent = self.agent
        with self._lock:
            if self._closed:
                raise DataPlaneError("nixl: writer closed")
            if self.remote == agent.name:
                # a pool of this very agent (two endpoints in one process):
                # NIXL writes to its own agent without loading metadata
                self._local = True
                return self.remote, -1
            if not self._retained:
                agent.retain_remote(self.remote)
                self._retained = True
        return self.remote, agent.add_remote(self.remote, self.metadata)

    def _source(self, src: BufferPool) -> tuple[int, str, int]:
        mem, dev = _memory_of(src)
        key = (src.base_addr, dev)
        if key not in self._sources:
            with self._lock:
                if self._closed:
                    raise DataPlaneError("nixl: writer closed")
                if key not in self._sources:
                    self.agent.register(src.base_addr, src.nbytes, mem, dev)
                    self._sources.add(key)
        return src.base_addr, mem, dev

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        check_bounds(copies, self.regions, src)
        if not copies:
            return
        deadline = time.monotonic() + timeout
        remote, gen = self._connect()
        try:
            self._write(copies, src, remote, deadline, timeout)
        except DataPlaneError:
            if gen >= 0:  # the next write connects again
                self.agent.reset_remote(remote, gen)
            raise

    def _write(
        self, copies: Sequence[Copy], src: BufferPool, remote: str, deadline: float, timeout: float
    ) -> None:
        _, mem, dev = self._source(src)
        nb = self.agent.nb
        local = [(src.region(c.field)[0] + c.src_offset, c.length, dev) for c in copies]
        far = [(self.addrs[c.field] + c.dst_offset, c.length, self.dev) for c in copies]
        nbytes = sum(c.length for c in copies)
        self._reap()
        agent = self.agent.agent
        try:
            ldl = nb.nixlXferDList(nb.VRAM_SEG if mem == "VRAM" else nb.DRAM_SEG, local)
            rdl = nb.nixlXferDList(nb.VRAM_SEG if self.mem == "VRAM" else nb.DRAM_SEG, far)
            req = agent.createXferReq(
                nb.NIXL_WRITE, ldl, rdl, remote, self.agent.notification(), [self.agent.backend]
            )
        except Exception as exc:
            raise DataPlaneError(
                f"nixl: preparing a write of {nbytes} bytes to {remote} failed: {_error_text(exc)}"
            ) from exc
        self._watch(agent, req, deadline, timeout, nbytes, len(copies))

    def _watch(
        self, agent: Any, req: int, deadline: float, timeout: float, nbytes: int, n: int
    ) -> None:
        nb = self.agent.nb
        what = f"write of {nbytes} bytes ({n} copies) to {self.remote}"
        try:
            status = agent.postXferReq(req)
            spin_until = time.monotonic() + SPIN_S
            while status == nb.NIXL_IN_PROG:
                now = time.monotonic()
                if now >= deadline:
                    self._release(agent, req, pending=True)
                    req = 0
                    raise DataPlaneError(f"nixl: {what} timed out after {timeout:g} s")
                if now < spin_until:
                    _yield()
                else:
                    time.sleep(POLL_INTERVAL)
                status = agent.getXferStatus(req)
            if status != nb.NIXL_SUCCESS:
                raise DataPlaneError(f"nixl: {what} ended with status {status}")
        except DataPlaneError:
            raise
        except Exception as exc:  # NIXL's errors: the peer died, refused, disconnected
            raise DataPlaneError(
                f"nixl: {what} failed: {_error_text(exc)}: the peer is unreachable or "
                "refused the write"
            ) from exc
        finally:
            if req:
                self._release(agent, req, pending=False)

    def _release(self, agent: Any, req: int, *, pending: bool) -> None:
        """Release a request; one still in progress is cancelled by the
        release, or, where NIXL cannot yet, kept for a later write to retry."""
        try:
            agent.releaseXferReq(req)
        except Exception as exc:
            if pending:
                with self._lock:
                    self._abandoned.append(req)
            else:
                log.debug("nixl: releasing a request: %s", _error_text(exc))

    def _reap(self) -> None:
        if not self._abandoned:
            return
        with self._lock:
            old, self._abandoned = self._abandoned, []
        left = []
        for req in old:
            try:
                self.agent.agent.releaseXferReq(req)
            except Exception:
                left.append(req)
        if left:
            with self._lock:
                self._abandoned.extend(left)

    def close(self) -> None:
        """Forget the remote agent (the last writer to it disconnects) and
        release the registrations of the source pools this writer used."""
        with self._lock:
            self._closed = True
            retained, self._retained = self._retained, False
            sources, self._sources = self._sources, set()
            agent = self._agent
        if agent is None:
            return  # never wrote
        self._reap()  # a request a timed-out write left: released if NIXL can now
        if retained:
            agent.release_remote(self.remote)
        for addr, dev in sources:
            agent.unregister(addr, dev)


class NixlBackend:
    name = "nixl"
    host_memory_only = False

    def server(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> TransportServer:
        return NixlServer(pool, host=host, options=options)

    def reachable(self, offer: TransportOffer, *, host_id: str) -> bool:
        p = offer.params
        return "agent" in p and "addrs" in p and "md_parts" in p and installed()

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
            parts = int(p["md_parts"])
            if not 0 < parts <= _MD_PARTS_MAX:
                raise ValueError(f"md_parts={parts}")
            md = base64.b64decode("".join(p[f"md{i}"] for i in range(parts)), validate=True)
            dev = int(p.get("dev", "0"))
            mem = p.get("mem", "DRAM")
            if mem not in ("DRAM", "VRAM"):
                raise ValueError(f"memory type {mem!r}")
        except (KeyError, ValueError) as exc:
            raise TransportUnavailable(f"nixl: malformed offer: {exc}") from exc
        if len(addrs) != len(field_names):
            raise TransportUnavailable("nixl: the offer's regions do not match the schema")
        settings(local_host, options)  # a bad option refuses nixl now, not at the first write
        return NixlWriter(
            functools.partial(local_agent, local_host, dict(options or {})),
            p["agent"],
            md,
            dict(zip(field_names, addrs, strict=True)),
            regions,
            mem=mem,
            dev=dev,
        )


BACKEND: Backend = NixlBackend()
