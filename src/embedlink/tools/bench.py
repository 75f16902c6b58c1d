"""``embedlink bench``: end-to-end throughput and latency per transport, payload
and reservation mode, side by side with that transport's raw limit measured in
the same run.

For each transport one encoder process and one language process are started
and kept for all of that transport's rows. A row sends ``rooms`` embeddings of
``tokens`` tokens with ``window`` in flight; the reservation is either exact
(``exact``) or the default 1024 tokens (``resume``, so larger rooms resume).
By default rows use the one-copy path (``Sender.buffer()``/``commit()`` and a
``zero_copy`` language endpoint: the transport's copy is the only one); with
``one_copy=False`` they use ``send()`` and reassembling receives (two more
copies). Latency runs from the moment both sides were ready (``commit()`` or
``send()`` called, receiver created) to ``wait()`` returning, on the host's
monotonic clock. The first room of every row is
verified byte for byte outside the timed path.

Raw limits (the same bytes, measured here, as a sustained rate: the best of
three batches of back-to-back operations): ``shm`` a single-threaded memcpy;
``tcp`` one loopback TCP stream into a preallocated buffer; ``mooncake``
``batch_transfer_sync_write`` between two engines; ``nixl`` one NIXL ``WRITE``
(with a notification) from one process into another's registered memory,
its status looked at without pause, with the UCX transport that carried it
(``nixl_ucx_path_<tokens>`` in the extras, from ``UCX_PROTO_INFO``). The ZeroMQ round trip of
100 bytes between two processes on two different CPUs is reported for
small-room latency. ``pin`` puts the encoder and the language process on one
CPU each.
"""

from __future__ import annotations

import collections
import json
import math
import multiprocessing as mp
import os
import queue
import resource
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .._runtime.loop import BUSY_POLL_S
from ..protocol import BufferSchema

__all__ = ["BenchRow", "raw_gbps", "run_bench"]

SIZES = (64, 2000, 16384)
QUICK_SIZES = (64, 2000)


@dataclass
class BenchRow:
    transport: str
    tokens: int
    mode: str
    rooms: int
    nbytes_per_room: int
    gbps: float
    raw_gbps: float
    ratio_to_raw: float
    rooms_per_s: float
    p50_ms: float
    p99_ms: float
    raw_p50_ms: float
    resumes_per_room: float
    rss_encoder_mb: float
    rss_language_mb: float
    #: CPU time (user + system, all threads) per room in each process
    cpu_ms_per_room_encoder: float
    cpu_ms_per_room_language: float
    verified: bool
    device: str = "host"
    api: str = "one-copy"
    #: rooms in flight (1: a latency probe on an idle pipeline)
    window: int = 8
    #: p50 of a 100-byte ZeroMQ round trip on loopback between two processes
    #: on two different CPUs (where there are two), measured in this run
    zmq_rtt_ms: float = float("nan")
    #: the CPUs the encoder and language processes were pinned to ("0/1"),
    #: empty when they ran wherever the scheduler put them
    cpus: str = ""
    #: the endpoints' ``busy_poll_us`` setting in this run
    busy_poll_us: float = float("nan")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    """Peak resident set of this process, MB. ``VmHWM`` where Linux has it:
    ``ru_maxrss`` survives fork and exec, so a spawned worker would report its
    parent's peak (the raw baselines' buffers) instead of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- workers


def worker_cpus(pin: bool) -> tuple[int | None, int | None]:
    """The CPUs to pin the encoder and the language process to: the first two
    this process may use, or ``(None, None)`` (unpinned) when ``pin`` is off,
    fewer than two are available or the platform cannot pin."""
    if not pin or not hasattr(os, "sched_setaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def _affinity() -> list[int] | None:
    """The CPUs this process may run on (None where the platform cannot say)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _pin(cpu: int | None) -> None:
    """Keep this process (every thread it starts from now on) on ``cpu``.

    Why the bench offers it: on a virtual machine waking a thread on another
    CPU costs tens of microseconds, on the same CPU a few, so where the
    processes run moves small-room latency; pinned, a process also cannot
    spread its threads over the cores (docs/performance.md has both
    effects)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _fill(buf: Any, emb: Any) -> None:
    pairs = [
        (buf.embedding, emb.embedding),
        (buf.token_ids, emb.token_ids),
        (buf.mrope_positions, emb.mrope_positions),
    ]
    pairs += [(buf.extra[k], emb.extra[k]) for k in buf.extra]
    for dst, src in pairs:
        if hasattr(dst, "copy_"):
            dst.copy_(src)
        else:
            dst[...] = src


def _prefault(pool: Any) -> None:
    """Write every page of ``pool`` once, as a long-running server's pool would
    have been: untouched pages read as the kernel's shared zero page (cached,
    so faster than memory) and fault on first write, either of which would
    skew the first row."""
    if pool.on_host:
        pool.backing.fill(0x5A)
    else:
        pool.tensor.fill_(0x5A)
    pool.synchronize()


def _bench_encoder(cfg: dict[str, Any], cmds: Any, replies: Any) -> None:
    from ..endpoints.encoder import EncoderEndpoint
    from .workers import make_embedding, on_device

    _pin(cfg.get("cpu"))
    schema = BufferSchema(hidden_size=cfg["hidden_size"])
    device = cfg.get("device")
    with EncoderEndpoint(
        schema,
        bootstrap=cfg["bootstrap"],
        num_blocks=cfg["num_blocks"],
        block_size=cfg["block_size"],
        transports=(cfg["transport"],),
        room_timeout=120.0,
        device=device,
        busy_poll_us=cfg["busy_poll_us"],
    ) as ep:
        _prefault(ep.pool)
        replies.put(("ready", _affinity()))
        cache: dict[int, Any] = {}
        while True:
            cmd = cmds.get()
            if cmd[0] == "stop":
                return
            _, rooms = cmd
            cpu0 = _cpu_s()
            sent: dict[int, float] = {}
            txs = []
            for i, (room, n) in enumerate(rooms):
                if n not in cache:
                    cache[n] = on_device(make_embedding(schema, n, 0, n), device)
                tx = ep.sender(room)
                if cfg.get("one_copy", True):
                    # The encoder's output is produced straight into the pool, on a
                    # real encoder by the model (off the CPU). The bench writes it for
                    # the row's first room, which the language side verifies; the
                    # others send the pool's bytes as they are, so the row measures
                    # embedlink's work (control plane + the transport's one copy)
                    # rather than a CPU memcpy standing in for the model.
                    buf = tx.buffer(n)
                    if i == 0 or cfg.get("fill_all", False):
                        _fill(buf, cache[n])
                    sent[room] = time.monotonic()
                    tx.commit(mrope_position_delta=cache[n].mrope_position_delta)
                else:
                    sent[room] = time.monotonic()
                    tx.send(cache[n])
                txs.append(tx)
                # clear finished rooms as we go, so the table stays small
                while txs and txs[0].poll().is_terminal:
                    txs.pop(0).clear()
            for tx in txs:
                tx.wait(120)
                tx.clear()
            ep.allocator.wait_all_free(30)
            replies.put(("row_done", sent, _rss_mb(), _cpu_s() - cpu0))


def _bench_language(cfg: dict[str, Any], cmds: Any, replies: Any) -> None:
    from ..endpoints.language import LanguageEndpoint
    from ..protocol import Status
    from .workers import make_embedding, same_embedding

    _pin(cfg.get("cpu"))
    schema = BufferSchema(hidden_size=cfg["hidden_size"])
    with LanguageEndpoint(
        schema,
        num_blocks=cfg["num_blocks"],
        block_size=cfg["block_size"],
        default_tokens=1024,
        resume_headroom=cfg.get("resume_headroom"),
        transports=(cfg["transport"],),
        room_timeout=120.0,
        device=cfg.get("device"),
        zero_copy=cfg.get("one_copy", True),
        busy_poll_us=cfg["busy_poll_us"],
    ) as ep:
        _prefault(ep.pool)
        replies.put(("ready", _affinity()))
        while True:
            cmd = cmds.get()
            if cmd[0] == "stop":
                return
            _, rooms, exact, window = cmd
            cpu0 = _cpu_s()
            done: dict[int, float] = {}
            created: dict[int, float] = {}
            resumes = 0
            verified = True
            pending: list[tuple[int, int, Any]] = []
            first = True

            def finish(room: int, n: int, rx: Any, done: dict[int, float] = done) -> None:
                nonlocal resumes, verified, first
                try:
                    emb = rx.wait(timeout=120)
                    done[room] = time.monotonic()
                    if first:  # outside the timed path of the others: it is done
                        verified = same_embedding(emb, make_embedding(schema, n, 0, n))
                        first = False
                except Exception:
                    verified = False
                resumes += sum(1 for s, _ in rx.history if s is Status.Transferring)
                rx.clear()

            for room, n in rooms:
                if len(pending) >= window:
                    finish(*pending.pop(0))
                tokens = n if exact else None
                created[room] = time.monotonic()
                pending.append(
                    (room, n, ep.receiver(bootstrap=cfg["bootstrap"], room=room, tokens=tokens))
                )
            for p in pending:
                finish(*p)
            ep.allocator.wait_all_free(30)
            replies.put(("row_done", done, created, resumes, verified, _rss_mb(), _cpu_s() - cpu0))


# --------------------------------------------------------------------------- raw limits


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures (NaN and infinities as they are)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _best(fn: Callable[[], None], nbytes: int, repeat: int, budget: float = 2.0) -> float:
    """Sustained GB/s of ``fn``: after one warm-up call, the best of three
    batches of back-to-back calls (``repeat`` calls in all, within about
    ``budget`` seconds), each batch timed as a whole. The end-to-end rows
    sustain hundreds of rooms, so their limit is a sustained rate too, not one
    lucky call."""
    fn()
    per_batch = max(1, repeat // 3, min(1000, int(50e6 // max(1, nbytes))))
    best = 0.0
    t_end = time.perf_counter() + budget
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(per_batch):
            fn()
        dt = time.perf_counter() - t
        best = max(best, per_batch * nbytes / dt / 1e9)
        if time.perf_counter() > t_end:
            break
    return best


class _Cycle:
    """Offsets of successive room-sized slots in a source and a destination
    buffer of ``src_slots`` and ``dst_slots`` rooms: the raw baselines move
    each room from a different place to a different place, as the pools do, so
    the same few megabytes are not copied hot out of the cache every time."""

    def __init__(self, nbytes: int, src_slots: int, dst_slots: int) -> None:
        self.nbytes, self.src_slots, self.dst_slots = nbytes, src_slots, dst_slots
        self.i = 0

    def next(self) -> tuple[int, int]:
        i, self.i = self.i, self.i + 1
        return (i % self.src_slots) * self.nbytes, (i % self.dst_slots) * self.nbytes


def _filled(n: int, value: int) -> np.ndarray[Any, Any]:
    a = np.empty(n, np.uint8)
    a.fill(value)  # every page written: no zero-page reads, no first-touch faults
    return a


def raw_memcpy_gbps(nbytes: int, src_slots: int = 1, dst_slots: int = 1) -> float:
    """A single-threaded memcpy of ``nbytes`` at a time, cycling through
    pool-sized buffers of ``src_slots`` and ``dst_slots`` rooms."""
    src = _filled(nbytes * src_slots, 1)
    dst = _filled(nbytes * dst_slots, 2)
    cyc = _Cycle(nbytes, src_slots, dst_slots)

    def once() -> None:
        s, d = cyc.next()
        np.copyto(dst[d : d + nbytes], src[s : s + nbytes])

    return _best(once, nbytes, 20)


def raw_tcp_gbps(nbytes: int, src_slots: int = 1, dst_slots: int = 1) -> float:
    """One loopback TCP stream of ``nbytes`` at a time into a preallocated
    buffer, cycling through buffers of ``src_slots``/``dst_slots`` rooms."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    sink = memoryview(_filled(nbytes * dst_slots, 2))  # type: ignore[arg-type]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        i = 0
        with conn:
            while not stop.is_set():
                base = (i % dst_slots) * nbytes
                i += 1
                got = 0
                while got < nbytes:
                    k = conn.recv_into(sink[base + got : base + nbytes], nbytes - got)
                    if k == 0:
                        return
                    got += k
                conn.sendall(b"k")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    payload = memoryview(_filled(nbytes * src_slots, 1))  # type: ignore[arg-type]
    cyc = _Cycle(nbytes, src_slots, dst_slots)
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def once() -> None:
            s, _ = cyc.next()
            c.sendall(payload[s : s + nbytes])
            c.recv(1)

        gbps = _best(once, nbytes, 20)
    stop.set()
    srv.close()
    th.join(2)
    return gbps


def raw_mooncake_gbps(
    nbytes: int, src_slots: int = 1, dst_slots: int = 1, *, polled: bool = False
) -> float:
    """``batch_transfer_sync_write`` of ``nbytes`` at a time between two
    engines, cycling through registered buffers of ``src_slots``/``dst_slots``
    rooms (the issue's raw limit). ``polled``: instead, as the transport's
    default ``wait`` does: two writes in flight, each cut into the same
    ``transfer_submit_write`` requests, polled."""
    from ..transports.mooncake import _engine_class

    cls = _engine_class()
    a, b = cls(), cls()
    for e in (a, b):
        if e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("mooncake: initialize failed")
    src = _filled(nbytes * src_slots, 1)
    dst = _filled(nbytes * dst_slots, 2)
    a.batch_register_memory([src.ctypes.data], [src.nbytes])
    b.batch_register_memory([dst.ctypes.data], [dst.nbytes])
    target = f"127.0.0.1:{b.get_rpc_port()}"
    cyc = _Cycle(nbytes, src_slots, dst_slots)

    def once() -> None:
        s, d = cyc.next()
        rc = a.batch_transfer_sync_write(
            target, [src.ctypes.data + s], [dst.ctypes.data + d], [nbytes]
        )
        if rc != 0:
            raise RuntimeError(f"mooncake raw write returned {rc}")

    once()  # handshake outside the timing
    if not polled:
        return _best(once, nbytes, 20)
    from ..transports.mooncake import POLL_INTERVAL, _pieces

    # what the transport's default wait does, without embedlink around it:
    # two writes in flight, each cut into the same requests, polled
    ops = max(6, min(200, int(150e6 // max(1, nbytes))))

    def settle_oldest(pending: collections.deque[list[int]]) -> None:
        for bid in pending.popleft():
            while (rc := a.transfer_check_status(bid)) == 0:
                time.sleep(POLL_INTERVAL)
            if rc != 1:
                raise RuntimeError(f"mooncake raw polled write ended with status {rc}")

    best = 0.0
    for _ in range(3):
        pending: collections.deque[list[int]] = collections.deque()
        t = time.perf_counter()
        for _ in range(ops):
            s, d = cyc.next()
            pieces = _pieces([src.ctypes.data + s], [dst.ctypes.data + d], [nbytes])
            pending.append([a.transfer_submit_write(target, *p) for p in pieces])
            if len(pending) == 2:
                settle_oldest(pending)
        while pending:
            settle_oldest(pending)
        best = max(best, ops * nbytes / (time.perf_counter() - t) / 1e9)
    return best


def _raw_nixl_buffer(nbytes: int, value: int, device: str | None) -> tuple[Any, int, str, int]:
    """A filled buffer for the raw NIXL write: ``(buffer, address, NIXL memory
    type, device id)``, host memory or (``device``) a CUDA tensor."""
    if device is None:
        buf = _filled(nbytes, value)
        return buf, int(buf.ctypes.data), "DRAM", 0
    import torch

    t = torch.full((nbytes,), value, dtype=torch.uint8, device=device)
    return t, int(t.data_ptr()), "VRAM", int(t.device.index or 0)


def _raw_nixl_target(q_in: Any, q_out: Any, nbytes: int, device: str | None = None) -> None:
    """The receiving agent of the raw NIXL write: a registered buffer, its
    metadata sent to the parent; held until told to stop."""
    from ..transports.nixl import local_agent

    try:
        agent = local_agent("127.0.0.1")
        dst, addr, mem, dev = _raw_nixl_buffer(nbytes, 2, device)
        agent.register(addr, nbytes, mem, dev)
        agent.collect_notifications()
        q_out.put((agent.name, agent.metadata(addr, dev), addr, mem, dev))
    except Exception as exc:  # reported to the parent, which raises it
        q_out.put(f"{type(exc).__name__}: {exc}")
        return
    q_in.get()
    agent.stop_collecting()
    del dst


def _raw_nixl_writer(
    q_in: Any, q_out: Any, nbytes: int, src_slots: int, dst_slots: int, device: str | None = None
) -> None:
    """The writing agent of the raw NIXL write. UCX prints its protocol
    choices (``UCX_PROTO_INFO``) to standard output: that is pointed at a file
    for the length of this process, and the path of ``ucp_put`` read from it."""
    import tempfile

    from ..transports.nixl import _scoped_env, local_agent

    log_file = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (open for the process's life)
    os.dup2(log_file.fileno(), 1)
    try:
        name, md, dst_addr, dst_mem, dst_dev = q_in.get()
        with _scoped_env({"UCX_PROTO_INFO": "y"}, frozenset({"UCX_PROTO_INFO"})):
            agent = local_agent("127.0.0.1")
        nb, a = agent.nb, agent.agent
        src, src_addr, src_mem, src_dev = _raw_nixl_buffer(nbytes * src_slots, 1, device)
        agent.register(src_addr, nbytes * src_slots, src_mem, src_dev)
        agent.retain_remote(name)
        agent.add_remote(name, md)
        remote = name
        cyc = _Cycle(nbytes, src_slots, dst_slots)
        seg = {"DRAM": nb.DRAM_SEG, "VRAM": nb.VRAM_SEG}

        def once() -> None:
            s, d = cyc.next()
            local = nb.nixlXferDList(seg[src_mem], [(src_addr + s, nbytes, src_dev)])
            far = nb.nixlXferDList(seg[dst_mem], [(dst_addr + d, nbytes, dst_dev)])
            req = a.createXferReq(nb.NIXL_WRITE, local, far, remote, "raw", [agent.backend])
            status = a.postXferReq(req)
            while status == nb.NIXL_IN_PROG:
                status = a.getXferStatus(req)
            a.releaseXferReq(req)
            if status != nb.NIXL_SUCCESS:
                raise RuntimeError(f"nixl raw write ended with status {status}")

        gbps = _best(once, nbytes, 20)
        agent.release_remote(remote)
        sys.stdout.flush()
        log_file.seek(0)
        q_out.put((gbps, ucx_put_path(log_file.read())))
        del src
    except Exception as exc:  # reported to the parent, which raises it
        q_out.put(f"{type(exc).__name__}: {exc}")


def ucx_put_path(proto_info: str) -> str:
    """The UCX transport of the largest ``ucp_put`` from host memory to a peer
    (not the worker's endpoint to itself), read from UCX's ``UCX_PROTO_INFO``
    tables: ``cma/memory``, ``tcp/lo``, ...; ``?`` when there is none."""
    endpoint = operation = ""
    for line in proto_info.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 1:  # a table's title: the endpoint, then the operation
            if "cfg#" in cells[0]:
                endpoint, operation = cells[0], ""
            else:
                operation = cells[0]
        elif (
            len(cells) == 3
            and cells[0].endswith("..inf")
            and " self cfg#" not in endpoint
            and operation.startswith("remote memory write by ucp_put* from host memory")
        ):
            return cells[2]
    return "?"


def raw_nixl(
    nbytes: int, src_slots: int = 1, dst_slots: int = 1, device: str | None = None
) -> tuple[float, str]:
    """One NIXL ``WRITE`` (with a notification, as the transport's) of
    ``nbytes`` at a time from one process into another's registered memory,
    waited for by looking at its status without pause, cycling through
    ``src_slots``/``dst_slots`` room-sized slots; both agents made the way the
    transport makes them; ``device``: GPU buffers on both sides (not yet run
    on a GPU). Returns the sustained GB/s and the UCX transport that carried
    a host write (``?`` for GPU buffers, whose table UCX titles otherwise)."""
    ctx = mp.get_context("spawn")
    to_t, from_t, to_w, from_w = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    target = ctx.Process(
        target=_raw_nixl_target, args=(to_t, from_t, nbytes * dst_slots, device), daemon=True
    )
    writer = ctx.Process(
        target=_raw_nixl_writer,
        args=(to_w, from_w, nbytes, src_slots, dst_slots, device),
        daemon=True,
    )
    target.start()
    writer.start()
    try:
        try:
            got = from_t.get(timeout=120)
            if isinstance(got, str):
                raise RuntimeError(f"nixl raw write: {got}")
            to_w.put(got)
            result = from_w.get(timeout=300)
        except queue.Empty:
            raise RuntimeError("nixl raw write: a process gave no answer") from None
        if isinstance(result, str):
            raise RuntimeError(f"nixl raw write: {result}")
        to_t.put("stop")
    finally:
        for p in (writer, target):
            p.join(20)
            if p.is_alive():
                p.kill()
    return float(result[0]), str(result[1])


def _raw_ipc_child(q_in: Any, q_out: Any, nbytes: int) -> None:
    import torch

    dst = q_in.get()  # a CUDA tensor of the parent's, mapped here through CUDA IPC
    src = torch.ones(nbytes, dtype=torch.uint8, device=dst.device)
    stream = torch.cuda.Stream(device=dst.device)  # type: ignore[no-untyped-call,unused-ignore]

    def once() -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()

    once()
    q_out.put(_best(once, nbytes, 50))
    q_in.get()  # keep the mapping until the parent is done


def raw_cuda_ipc_gbps(nbytes: int, device: str) -> float:
    """A device-to-device copy from another process into memory it maps through
    CUDA IPC (torch's own sharing), synchronised like the transport's."""
    import torch
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    p = ctx.Process(target=_raw_ipc_child, args=(q_in, q_out, nbytes), daemon=True)
    p.start()
    try:
        q_in.put(dst)
        gbps = float(q_out.get(timeout=120))
        q_in.put(None)
    finally:
        p.join(20)
        if p.is_alive():
            p.kill()
    return gbps


def raw_mooncake_gpu_gbps(nbytes: int, device: str) -> float:
    """One ``batch_transfer_sync_write`` of ``nbytes`` between GPU buffers."""
    import torch

    from ..transports.mooncake import _engine_class

    cls = _engine_class()
    a, b = cls(), cls()
    for e in (a, b):
        if e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("mooncake: initialize failed")
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    a.batch_register_memory([src.data_ptr()], [nbytes])
    b.batch_register_memory([dst.data_ptr()], [nbytes])
    target = f"127.0.0.1:{b.get_rpc_port()}"

    def once() -> None:
        rc = a.batch_transfer_sync_write(target, [src.data_ptr()], [dst.data_ptr()], [nbytes])
        if rc != 0:
            raise RuntimeError(f"mooncake raw GPU write returned {rc}")

    once()
    return _best(once, nbytes, 20)


def raw_gbps(
    transport: str,
    nbytes: int,
    device: str | None = None,
    src_slots: int = 1,
    dst_slots: int = 1,
) -> float:
    """The raw limit of ``transport`` for ``nbytes`` per operation; host
    baselines cycle through ``src_slots``/``dst_slots`` room-sized slots."""
    if transport == "cuda_ipc":
        return raw_cuda_ipc_gbps(nbytes, device or "cuda:0")
    if transport == "mooncake" and device is not None and device.startswith("cuda"):
        return raw_mooncake_gpu_gbps(nbytes, device)
    if transport == "shm":
        return raw_memcpy_gbps(nbytes, src_slots, dst_slots)
    if transport == "tcp":
        return raw_tcp_gbps(nbytes, src_slots, dst_slots)
    if transport == "mooncake":
        return raw_mooncake_gbps(nbytes, src_slots, dst_slots)
    if transport == "nixl":
        return raw_nixl(nbytes, src_slots, dst_slots, device)[0]
    raise ValueError(f"no raw baseline for {transport!r}")


def _zmq_rtt_server(cpu: int | None, ports: Any, n: int) -> None:
    import zmq

    _pin(cpu)
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    ports.put(rep.bind_to_random_port("tcp://127.0.0.1"))
    if rep.poll(30_000):
        for _ in range(n):
            rep.send(rep.recv())
            if not rep.poll(5_000):
                break
    rep.close(0)
    ctx.term()


def _zmq_rtt_client(cpu: int | None, port: int, n: int, out: Any) -> None:
    import zmq

    _pin(cpu)
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 5_000)
    req.connect(f"tcp://127.0.0.1:{port}")
    msg = b"x" * 100
    times = []
    warm = min(50, n // 4)  # the first ones set up the connection
    try:
        for i in range(n):
            t = time.perf_counter()
            req.send(msg)
            req.recv()
            if i >= warm:
                times.append(time.perf_counter() - t)
        out.put(statistics.median(times) * 1e3)
    except Exception as exc:  # reported to the parent, which raises it
        out.put(f"ZeroMQ round trip failed: {type(exc).__name__}: {exc}")
    finally:
        req.close(0)
        ctx.term()


def zmq_round_trip_ms(n: int = 2000, cpus: tuple[int | None, int | None] = (None, None)) -> float:
    """p50 of a 100-byte ZeroMQ REQ/REP round trip over loopback TCP between
    two processes (ms); ``cpus`` pins the client and the server (None: left
    to the scheduler).

    Two processes, as a room crosses two. Where they run matters more than
    anything else on a virtual machine: on one CPU the round trip takes a
    third of what it takes across two (docs/performance.md), and left alone
    the scheduler sometimes does put both on one CPU."""
    ctx = mp.get_context("spawn")
    ports, out = ctx.Queue(), ctx.Queue()
    total = n + 50
    server = ctx.Process(target=_zmq_rtt_server, args=(cpus[1], ports, total), daemon=True)
    server.start()
    client = None
    try:
        try:
            port = ports.get(timeout=60)
            client = ctx.Process(
                target=_zmq_rtt_client, args=(cpus[0], port, total, out), daemon=True
            )
            client.start()
            result = out.get(timeout=60)
        except queue.Empty:
            raise RuntimeError("ZeroMQ round trip: a process gave no answer in 60 s") from None
    finally:
        for p in (client, server):
            if p is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
    if isinstance(result, str):
        raise RuntimeError(result)
    return float(result)


# --------------------------------------------------------------------------- driver


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _probes(sizes: Sequence[int], modes: Sequence[str]) -> list[tuple[int, str, int]]:
    """``(tokens, mode, most rooms)`` of the one-in-flight rows: the smallest
    payload exact, and 2000 tokens (or the next size up) in every mode."""
    small = min(sizes)
    out = [(small, "exact", 300)]
    big = [n for n in sizes if n >= 2000]
    if big:
        out += [(min(big), m, 60) for m in modes]
    return out


def _reply(q: Any, procs: Sequence[Any], timeout: float, what: str) -> Any:
    """The next reply on ``q``; a worker that died meanwhile (a crash at start,
    an exception in a row: its traceback is on stderr) fails the bench at once
    instead of after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(
                    f"bench {what}: worker {dead[0].name} exited with code {dead[0].exitcode}"
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench {what} timed out after {timeout:g} s") from None


def _row(
    queues: tuple[Any, Any, Any, Any],
    procs: Sequence[Any],
    rooms: list[tuple[int, int]],
    *,
    transport: str,
    tokens: int,
    mode: str,
    window: int,
    raw: float,
    token_bytes: int,
    device: str | None,
    one_copy: bool,
    zmq_rtt_ms: float,
    cpus: str = "",
    busy_poll_us: float = float("nan"),
) -> BenchRow:
    """Run one row through the two worker processes and summarise it."""
    e_cmd, e_rep, l_cmd, l_rep = queues
    k = len(rooms)
    l_cmd.put(("row", rooms, mode == "exact", window))
    e_cmd.put(("row", rooms))
    what = f"row {transport}/{tokens}/{mode}"
    _, sent, rss_e, cpu_e = _reply(e_rep, procs, 600, what)
    _, done, created, resumes, verified, rss_l, cpu_l = _reply(l_rep, procs, 600, what)
    # from the moment both sides were ready (the data committed and the
    # receiver created) to wait() returning
    lat = [
        done[r] - max(sent[r], created[r])
        for r, _ in rooms
        if r in done and r in sent and r in created
    ]
    span = max(done.values()) - min(sent.values()) if done else float("nan")
    nbytes = tokens * token_bytes
    gbps = nbytes * len(done) / span / 1e9
    return BenchRow(
        transport=transport,
        tokens=tokens,
        mode=mode,
        rooms=k,
        nbytes_per_room=nbytes,
        # significant figures, not decimals: a slow small-room row on a busy
        # host is a few MB/s, which three decimals of GB/s would print as 0
        gbps=_sig(gbps),
        raw_gbps=_sig(raw),
        ratio_to_raw=_sig(gbps / raw) if raw else float("nan"),
        rooms_per_s=round(len(done) / span, 1),
        p50_ms=round(_pct(lat, 50) * 1e3, 3),
        p99_ms=round(_pct(lat, 99) * 1e3, 3),
        raw_p50_ms=round(nbytes / (raw * 1e9) * 1e3, 3) if raw else float("nan"),
        resumes_per_room=round(resumes / max(1, len(done)), 2),
        rss_encoder_mb=round(rss_e, 1),
        rss_language_mb=round(rss_l, 1),
        cpu_ms_per_room_encoder=round(cpu_e / k * 1e3, 3),
        cpu_ms_per_room_language=round(cpu_l / k * 1e3, 3),
        verified=bool(verified) and len(done) == k,
        device=device or "host",
        api="one-copy" if one_copy else "copying",
        window=window,
        zmq_rtt_ms=round(zmq_rtt_ms, 4),
        cpus=cpus,
        busy_poll_us=busy_poll_us,
    )


def run_bench(
    *,
    transports: Sequence[str] = ("shm", "tcp", "mooncake"),
    sizes: Sequence[int] = SIZES,
    modes: Sequence[str] = ("exact", "resume"),
    rooms_for: Callable[[int], int] | None = None,
    window: int = 8,
    hidden_size: int = 3584,
    block_size: int = 128,
    progress: Callable[[str], None] | None = None,
    device: str | None = None,
    one_copy: bool = True,
    latency_probes: bool = True,
    pin: bool = False,
    busy_poll_us: float | None = None,
) -> tuple[list[BenchRow], dict[str, Any]]:
    """Run every (transport, size, mode) row with ``window`` rooms in flight,
    then (``latency_probes``) a few rows with one room in flight; return the
    rows and the extras (``zmq_rtt_ms``, ...). Each transport's processes are
    spawned once. ``pin`` keeps the encoder process on one CPU and the
    language process on another (:func:`worker_cpus`). The ZeroMQ round trip
    is measured between two processes on two different CPUs either way.
    ``busy_poll_us``: the endpoints' setting (None: its default)."""
    from ..bootstrap import BootstrapServer

    schema = BufferSchema(hidden_size=hidden_size)
    rooms_for = rooms_for or (lambda n: max(8, min(2000, int(2e9 // (n * schema.token_bytes)))))
    ctx = mp.get_context("spawn")
    rows: list[BenchRow] = []
    enc_cpu, lang_cpu = worker_cpus(pin)
    cpus = "" if enc_cpu is None else f"{enc_cpu}/{lang_cpu}"
    # The baseline's two processes go on two different CPUs whether or not the
    # workers are pinned: left to the scheduler, it sometimes puts both on one
    # CPU, and the same round trip then takes a third of the time.
    apart = worker_cpus(True)
    extras: dict[str, Any] = {"zmq_rtt_ms": zmq_round_trip_ms(cpus=(apart[1], apart[0]))}
    busy_poll = BUSY_POLL_S * 1e6 if busy_poll_us is None else busy_poll_us
    extras["busy_poll_us"] = busy_poll
    if "shm" in transports:
        # for reference: the same memcpy on one buffer, hot in the cache (what a
        # naive baseline reports; the rows' limit cycles through pool-sized
        # buffers, as the transport does)
        hot = 2000 if 2000 in sizes else max(sizes)
        extras["memcpy_hot_gbps"] = raw_memcpy_gbps(hot * schema.token_bytes)
        extras["memcpy_hot_tokens"] = float(hot)
    if "mooncake" in transports and device is None:
        # for reference: the raw write the way the transport's default wait
        # does it (two in flight, polled); the rows' limit stays the engine's
        # synchronous write
        n_ref = (2000 if 2000 in sizes else max(sizes)) * schema.token_bytes
        extras["mooncake_polled_gbps"] = raw_mooncake_gbps(
            n_ref, window + 2, window + 1, polled=True
        )
        extras["mooncake_polled_tokens"] = float(n_ref // schema.token_bytes)
    max_tokens = max(sizes)
    per_room_blocks = -(-max_tokens // block_size)
    room_id = 0
    with BootstrapServer(host="127.0.0.1", port=0) as boot:
        for transport in transports:
            cfg = dict(
                bootstrap=boot.address,
                hidden_size=hidden_size,
                block_size=block_size,
                transport=transport,
                device=device,
                one_copy=one_copy,
                busy_poll_us=busy_poll,
            )
            e_cmd, e_rep, l_cmd, l_rep = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
            enc = ctx.Process(
                target=_bench_encoder,
                daemon=True,
                name=f"bench-encoder-{transport}",
                args=(
                    {**cfg, "num_blocks": per_room_blocks * (window + 2), "cpu": enc_cpu},
                    e_cmd,
                    e_rep,
                ),
            )
            lang = ctx.Process(
                target=_bench_language,
                daemon=True,
                name=f"bench-language-{transport}",
                # window rooms at their full size plus the headroom kept for resumes
                args=(
                    {
                        **cfg,
                        "num_blocks": per_room_blocks * (window + 1) + 16,
                        "resume_headroom": per_room_blocks + 16,
                        "cpu": lang_cpu,
                    },
                    l_cmd,
                    l_rep,
                ),
            )
            enc.start()
            lang.start()
            try:
                for q, cpu in ((e_rep, enc_cpu), (l_rep, lang_cpu)):
                    ready = _reply(q, (enc, lang), 120, f"start of {transport}")
                    if ready[0] != "ready":
                        raise RuntimeError("bench worker failed to start")
                    if cpu is not None and ready[1] != [cpu]:
                        raise RuntimeError(f"a bench worker asked for CPU {cpu} runs on {ready[1]}")
                raws: dict[int, float] = {}
                plan = [(n, mode, window, rooms_for(n)) for n in sizes for mode in modes]
                if latency_probes:
                    # one room at a time: the latency of a room on an idle
                    # pipeline, and what resuming adds to it
                    plan += [(n, m, 1, min(r, rooms_for(n))) for n, m, r in _probes(sizes, modes)]
                for n, mode, w, k in plan:
                    if n not in raws and transport == "nixl":
                        raws[n], path = raw_nixl(
                            n * schema.token_bytes, window + 2, window + 1, device
                        )
                        extras[f"nixl_ucx_path_{n}"] = path
                    if n not in raws:
                        # the same working set as the rows: the encoder cycles
                        # through window + 2 rooms of its pool, the language
                        # side window + 1
                        raws[n] = raw_gbps(
                            transport,
                            n * schema.token_bytes,
                            device,
                            src_slots=window + 2,
                            dst_slots=window + 1,
                        )
                    rooms = [(room_id + i, n) for i in range(k)]
                    room_id += k
                    if progress:
                        progress(f"{transport} {n} tokens {mode}, window {w}: {k} rooms")
                    rows.append(
                        _row(
                            (e_cmd, e_rep, l_cmd, l_rep),
                            (enc, lang),
                            rooms,
                            transport=transport,
                            tokens=n,
                            mode=mode,
                            window=w,
                            raw=raws[n],
                            token_bytes=schema.token_bytes,
                            device=device,
                            one_copy=one_copy,
                            zmq_rtt_ms=extras["zmq_rtt_ms"],
                            busy_poll_us=extras["busy_poll_us"],
                            cpus=cpus,
                        )
                    )
            finally:
                for q in (e_cmd, l_cmd):
                    q.put(("stop",))
                for p in (enc, lang):
                    p.join(10)
                    if p.is_alive():
                        p.kill()
    return rows, extras


def rows_json(rows: Sequence[BenchRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


def plot(rows: Sequence[BenchRow], path: str) -> None:
    """GB/s against payload per transport (and mode) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the loaded rows only (one-in-flight probes are about latency)
    widest = max((r.window for r in rows), default=0)
    rows = [r for r in rows if r.window == widest]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t, m in sorted({(r.transport, r.mode) for r in rows}):
        sel = sorted((r for r in rows if r.transport == t and r.mode == m), key=lambda r: r.tokens)
        ax.plot(
            [r.nbytes_per_room / 1e6 for r in sel],
            [r.gbps for r in sel],
            marker="o",
            label=f"{t} ({m})",
        )
    for t in sorted({r.transport for r in rows}):
        sel = sorted((r for r in rows if r.transport == t), key=lambda r: r.tokens)
        ax.plot(
            [r.nbytes_per_room / 1e6 for r in sel],
            [r.raw_gbps for r in sel],
            linestyle=":",
            label=f"{t} raw limit",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload per room (MB)")
    ax.set_ylabel("GB/s end to end")
    ax.set_title("embedlink bench")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
