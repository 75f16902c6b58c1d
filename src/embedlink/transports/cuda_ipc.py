"""``cuda_ipc``: same host, same GPU(s). Device-to-device copies straight into
the language pool's GPU memory.

The receiver's pool is one CUDA allocation (``BufferPool(device="cuda:N")``).
It exports that allocation through CUDA IPC the way torch's own multiprocessing
does (``UntypedStorage._share_cuda_``); the offer carries the handle's fields as
plain data (never a pickle: the offer comes from a peer). The sender maps the
allocation once (``UntypedStorage._new_shared_cuda``), then issues each plan's
copies on its own stream and synchronises before it reports the chunk written,
so the receiver can read the bytes as soon as the status arrives.

Offered only when both ends run on the same host (boot id) and the receiver's
GPU, named by UUID, is visible to the sender.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._runtime.host import host_id as local_host_id
from ..memory import BufferPool
from ..protocol import AUX_FIELD, Copy, TransportOffer
from . import Backend
from .base import DataPlaneError, PeerWriter, TransportServer, TransportUnavailable, check_bounds

log = logging.getLogger(__name__)

__all__ = ["BACKEND", "CudaIpcBackend", "CudaIpcServer", "CudaIpcWriter", "visible_gpus"]


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise TransportUnavailable("cuda_ipc needs torch with CUDA") from exc
    if not torch.cuda.is_available():
        raise TransportUnavailable("cuda_ipc needs a CUDA GPU; none is visible")
    return torch


def visible_gpus() -> dict[str, int]:
    """``{uuid: local device index}`` of the GPUs this process sees (empty without CUDA)."""
    try:
        torch = _torch()
    except TransportUnavailable:
        return {}
    return {
        str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())
    }


class CudaIpcServer(TransportServer):
    """Exports the pool's CUDA allocation."""

    name = "cuda_ipc"

    def __init__(self, pool: BufferPool, *, host: str) -> None:
        super().__init__(pool, host=host)
        if not (pool.is_torch and str(pool.device).startswith("cuda")):
            raise TransportUnavailable(
                f"cuda_ipc: needs a CUDA pool, not one on {pool.device or 'the host'}"
            )
        self._params: dict[str, str] = {}

    def start(self) -> CudaIpcServer:
        torch = _torch()
        t = self.pool.tensor
        storage = t.untyped_storage()
        (_device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = (
            storage._share_cuda_()
        )
        names = [*self.pool.schema.names, AUX_FIELD]
        self._params = {
            "host_id": local_host_id(),
            "gpu": str(torch.cuda.get_device_properties(t.device).uuid),
            "handle": bytes(handle).hex(),
            "storage_size": str(int(size)),
            "storage_offset": str(int(offset)),
            "ref_handle": bytes(ref_handle).hex(),
            "ref_offset": str(int(ref_offset)),
            "event_handle": bytes(event_handle).hex() if event_handle else "",
            "event_sync": "1" if event_sync else "0",
            "tensor_offset": str(int(t.storage_offset())),
            "nbytes": str(self.pool.nbytes),
            "offsets": ",".join(str(self.pool.layout[n][0]) for n in names),
        }
        return self

    def offer(self) -> TransportOffer:
        assert self._params, "start() first"
        return TransportOffer("cuda_ipc", dict(self._params))

    def fence(self, peer: str, done: Callable[[], None], *, gone: bool = False) -> bool:
        # The sender's own process copies into the mapping, synchronously: once
        # that process is gone (or closed its endpoint, which waits for its
        # writes), nothing more can land. A sender that only fell silent may
        # still be copying: that needs the grace period.
        if gone:
            done()
        return gone


class CudaIpcWriter(PeerWriter):
    """Device-to-device copies into a peer's mapped pool, on a private stream."""

    name = "cuda_ipc"
    # device-to-device copies are queued, then one stream sync (~30 us for 14 MB)
    inline_max_bytes = 1 << 40

    def __init__(
        self, params: Mapping[str, str], field_names: list[str], regions: dict[str, int]
    ) -> None:
        torch = _torch()
        gpus = visible_gpus()
        index = gpus.get(params.get("gpu", ""))
        if index is None:
            raise TransportUnavailable(
                f"cuda_ipc: the peer's GPU {params.get('gpu')} is not visible here"
            )
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                index,
                bytes.fromhex(params["handle"]),
                int(params["storage_size"]),
                int(params["storage_offset"]),
                bytes.fromhex(params["ref_handle"]),
                int(params["ref_offset"]),
                bytes.fromhex(params["event_handle"]) if params.get("event_handle") else b"",
                params.get("event_sync") == "1",
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise TransportUnavailable(f"cuda_ipc: cannot open the peer's memory: {exc}") from exc
        self.device = torch.device("cuda", index)
        whole = torch.empty(0, dtype=torch.uint8, device=self.device)
        whole.set_(storage, 0, (storage.nbytes(),), (1,))
        start = int(params["tensor_offset"])
        nbytes = int(params["nbytes"])
        if start + nbytes > storage.nbytes():
            raise TransportUnavailable("cuda_ipc: the peer's pool lies outside its allocation")
        self._mem: Any = whole[start : start + nbytes]
        self._storage = storage
        offs = [int(x) for x in params["offsets"].split(",")]
        if len(offs) != len(field_names):
            raise TransportUnavailable("cuda_ipc: the offer's offsets do not match the schema")
        self.offsets = dict(zip(field_names, offs, strict=True))
        self.regions = regions
        for name, size in regions.items():
            if name not in self.offsets or self.offsets[name] + size > nbytes:
                raise TransportUnavailable(
                    f"cuda_ipc: region {name!r} lies outside the peer's pool"
                )
        self._stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()
        self._torch = torch

    def write(self, copies: Sequence[Copy], src: BufferPool, timeout: float) -> None:
        check_bounds(copies, self.regions, src)
        torch = self._torch
        if self._mem is None:
            raise DataPlaneError("cuda_ipc: writer closed")
        back = src.tensor if src.is_torch else torch.from_numpy(src.backing)
        with self._lock:
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                    for c in copies:
                        d = self.offsets[c.field] + c.dst_offset
                        s = src.layout[c.field][0] + c.src_offset
                        self._mem[d : d + c.length].copy_(back[s : s + c.length], non_blocking=True)
                self._stream.synchronize()
            except RuntimeError as exc:  # CUDA errors surface as RuntimeError in torch
                raise DataPlaneError(f"cuda_ipc: copy failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._mem = None
            self._storage = None


class CudaIpcBackend:
    name = "cuda_ipc"
    host_memory_only = False

    def server(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> TransportServer:
        return CudaIpcServer(pool, host=host)

    def reachable(self, offer: TransportOffer, *, host_id: str) -> bool:
        p = offer.params
        return p.get("host_id") == host_id and p.get("gpu", "") in visible_gpus()

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
        return CudaIpcWriter(offer.params, field_names, regions)


BACKEND: Backend = CudaIpcBackend()
