"""SGLang's encoder disaggregation (EPD) over embedlink: the two classes the
plugin (:mod:`.sglang_plugin`) puts in place of SGLang's ``zmq_to_scheduler``
transport, and the endpoints behind them.

How a request moves (SGLang's control flow is kept; only the bytes change
path):

* the language side's scheduler builds a waiting request per multimodal
  request (:class:`EmbedlinkWaitingRequest`, replacing ``WaitingZmqRequest``);
  it registers with each encoder as SGLang does (``/scheduler_receive_url``,
  so the encoder's ``send_with_url`` runs) and opens one embedlink receiver
  per *part* (one encoder's share of one modality), room id derived from the
  part id both sides know;
* the encoder's delivery (:class:`EmbedlinkDelivery`, replacing
  ``ZmqDelivery``) sends each part once through embedlink, whatever the
  number of language TP ranks (embedlink delivers to each), with SGLang's
  ``EmbeddingData`` (grid, modality, timestamps; no tensor) pickled as the
  room's ``meta``;
* each scheduler tick polls the receivers without blocking; an arrived part
  goes through SGLang's own ``consume_parts`` (its unpickler, validation and
  aggregation); a failed room fails the request with embedlink's reason; a
  released request (SGLang's timeout, a failure, a user abort) aborts and
  clears its rooms.

The language side learns each encoder's embedlink address from the encoder
itself (``GET {encoder_url}/embedlink``, a route the plugin adds to SGLang's
encoder server, fetched off the scheduler thread and cached): nothing for
the user to start. An encoder without the plugin answers 404; its parts then
take SGLang's own path (its ZMQ frames reach the same waiting request).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.disaggregation.encoder import receiver as _receiver
from sglang.srt.disaggregation.encoder import server as _server
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from .. import config as _config
from ..embedding import Embedding
from ..endpoints.encoder import EncoderEndpoint, Sender
from ..endpoints.language import LanguageEndpoint, Receiver
from ..protocol import Status, TransferError
from ._plane import embedding_schema
from .sglang_plugin import DELIVERY, WAITING

log = logging.getLogger("embedlink.sglang")

__all__ = [
    "EmbedlinkDelivery",
    "EmbedlinkWaitingRequest",
    "install",
    "part_room",
    "status_report",
]

#: SGLang's classes as they were before the plugin replaced them (the
#: HookRegistry rebinds module globals that point at them, so they are kept
#: in a container, and reached through ``super()`` in the subclasses)
ORIGINAL: dict[str, type] = {}
_PENDING = _receiver.WaitingMMRequestStatus.PENDING
_TORCH_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_ROUTE_PATH = "/embedlink"
#: how long an encoder's answer is trusted before it is asked again
_ROUTE_TTL = 10.0
_ROUTE_RETRY = 1.0


def part_room(part_rid: str) -> int:
    """The room id of a part, from the part id both sides know
    (``f"{rid}_local_part_{i}"``): 63 bits of its BLAKE2b digest."""
    digest = hashlib.blake2b(part_rid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _room_timeout_default() -> float:
    """Below SGLang's own receive timeout, so a failure carries embedlink's
    reason rather than SGLang's "Timeout waiting for image embedding"."""
    recv = float(os.environ.get("SGLANG_ENCODER_RECV_TIMEOUT", "180") or 180)
    return max(1.0, min(60.0, 0.8 * recv))


def _settings(role: str, flags: dict[str, Any]) -> _config.Config:
    """embedlink's settings for this process: ``EMBEDLINK_*`` (and SGLang's
    aliases) from the environment, ``EMBEDLINK_CONFIG``, then what SGLang
    decides (``flags``: widths, dtype, ranks)."""
    env = os.environ
    if "room_timeout" not in flags and "EMBEDLINK_ROOM_TIMEOUT" not in env:
        flags["room_timeout"] = _room_timeout_default()
    if role == "language" and "EMBEDLINK_ZERO_COPY" not in env:
        # parts arrive as views of the pool; SGLang's aggregation copies them
        # (torch.cat) and the rooms are cleared right after
        flags["zero_copy"] = True
    return _config.load(role, flags, env=env)


# --------------------------------------------------------------------------- encoder side


class _EncoderPlane:
    """One encoder endpoint per embedding width, in the process that owns
    SGLang's rank-0 ``MMEncoder`` (the only rank that sends)."""

    def __init__(self, encoder: Any) -> None:
        dims = {m.name: int(w) for m, w in dict(encoder._embedding_dims).items()}
        dtype = _TORCH_DTYPES.get(encoder._embedding_dtype)
        if dtype is None:
            raise ValueError(f"embedlink: no transfer dtype for {encoder._embedding_dtype}")
        self.dtype = dtype
        self.widths = dims
        self.endpoints: dict[int, EncoderEndpoint] = {}
        for width in sorted(set(dims.values())):
            cfg = _settings("encoder", {"hidden_size": width, "dtype": dtype})
            kw = cfg.endpoint_kwargs()
            kw.update(tp_rank=0, tp_size=1, bootstrap=None)  # reached directly, by address
            self.endpoints[width] = EncoderEndpoint(embedding_schema(width, dtype), **kw).start()
        #: part id -> (its sender, when it was opened, its endpoint's room timeout)
        self.senders: dict[str, tuple[Sender, float, float]] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="embedlink-sglang")
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """The ``/embedlink`` answer: where each modality's endpoint listens,
        and how full each pool is (an operator's check that the plugin runs)."""
        with self.lock:
            self._sweep()
            open_rooms = len(self.senders)
        return {
            "active": True,
            "dtype": self.dtype,
            "modalities": {
                m: {"address": self.endpoints[w].address, "width": w}
                for m, w in self.widths.items()
            },
            "pools": {
                str(w): {"used": ep.allocator.num_used, "free": ep.allocator.num_free}
                for w, ep in self.endpoints.items()
            },
            "open_rooms": open_rooms,
            # per width: the language sessions (one per scheduler TP rank)
            # registered, and what was written to them (one chunk per
            # destination rank and per resume)
            "delivered": {
                str(w): {
                    "sessions": len(ep.sessions()),
                    "chunks_written": ep.stats.chunks_written,
                    "bytes_written": ep.stats.bytes_written,
                    "write_failures": ep.stats.write_failures,
                }
                for w, ep in self.endpoints.items()
            },
        }

    def sender(self, part_rid: str, modality: str) -> Sender:
        with self.lock:
            self._sweep()
            known = self.senders.get(part_rid)
            if known is not None:
                return known[0]
            width = self.widths.get(modality)
            if width is None:
                raise ValueError(f"embedlink: no endpoint for modality {modality!r}")
            ep = self.endpoints[width]
            s = ep.sender(part_room(part_rid))
            self.senders[part_rid] = (s, time.monotonic(), ep.room_timeout)
            return s

    def release(self, part_rid: str) -> None:
        """SGLang let go of the part. A room that ended is cleared once its
        receivers heard it (or after a room timeout: a receiver that comes
        late then still hears why it failed, instead of waiting out its own
        deadline); one still moving is left to finish and be swept."""
        with self.lock:
            self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        for rid, (s, since, timeout) in list(self.senders.items()):
            if not s.poll().is_terminal:
                continue
            if s.poll() is Status.Success or now - since > timeout:
                s.clear()
                del self.senders[rid]

    def close(self) -> None:
        for ep in self.endpoints.values():
            ep.close()
        self.pool.shutdown(wait=False)


_encoder_plane: _EncoderPlane | None = None
_encoder_lock = threading.Lock()


def _plane_for(encoder: Any) -> _EncoderPlane:
    global _encoder_plane
    with _encoder_lock:
        if _encoder_plane is None:
            _encoder_plane = _EncoderPlane(encoder)
        return _encoder_plane


class EmbedlinkDelivery(_server.ZmqDelivery):  # type: ignore[misc,name-defined]
    """SGLang's encoder delivery over embedlink: each part is sent once (the
    calls for further language TP ranks wait on the same room: embedlink
    delivers to every rank that asked); an encoder error aborts the room
    with its text, so the language side fails the request with it; a room
    that fails raises SGLang's ``MMError`` (the encode request fails)."""

    def __init__(self, encoder: Any, *, cleanup_receive_state: bool) -> None:
        super().__init__(encoder, cleanup_receive_state=cleanup_receive_state)
        self.plane = _plane_for(encoder)
        self._sends: dict[str, asyncio.Future[None]] = {}

    async def send(self, state: Any, destination: Any) -> None:
        fut = self._sends.get(state.req_id)
        if fut is None:
            fut = asyncio.ensure_future(self._deliver(state))
            self._sends[state.req_id] = fut
        await asyncio.shield(fut)

    async def _deliver(self, state: Any) -> None:
        mm = await self.encoder._wait_for_embedding(state)
        modality = getattr(mm.modality, "name", str(mm.modality))
        sender = self.plane.sender(state.req_id, modality)
        if mm.error_msg is not None:
            # SGLang delivers an error part like data; embedlink ends the room
            # with its text, which the language side fails the request with
            sender.abort(f"encoder error ({mm.error_code}): {mm.error_msg}")
            return
        tensor = mm.embedding
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()  # the host transports (as SGLang's own path does)
        meta = pickle.dumps(mm.copy_without_embedding())
        loop = asyncio.get_running_loop()
        pool = self.plane.pool
        try:
            # the encoder's output is not written again: lend it in place
            await loop.run_in_executor(
                pool, lambda: sender.send(Embedding(embedding=tensor), borrow=True, meta=meta)
            )
        except ValueError as exc:  # the width or dtype does not match the schema
            sender.abort(f"the encoder output does not fit the transfer schema: {exc}")
        except TransferError:
            pass  # no encoder blocks within the room timeout: the room failed, with why
        status = await loop.run_in_executor(pool, sender.wait, None)
        if status is not Status.Success:
            raise _server.MMError(
                f"embedlink: part {state.req_id} (room {sender.room}): {sender.failure_reason}",
                502,
            )

    async def release(self, state: Any) -> None:
        await super().release(state)
        self._sends.pop(state.req_id, None)
        self.plane.release(state.req_id)


# --------------------------------------------------------------------------- language side


@dataclass
class _Route:
    """What an encoder said about itself (``GET /embedlink``)."""

    info: dict[str, Any] | None = None  # {"active": bool, "modalities": ..., "dtype": ...}
    error: str | None = None
    fetched: float = 0.0
    first_error: float | None = None
    fetching: bool = False


class _LanguagePlane:
    """One language endpoint per embedding width in a scheduler process, and
    the encoders' answers, fetched on SGLang's registration thread."""

    def __init__(self) -> None:
        self.endpoints: dict[tuple[int, str], LanguageEndpoint] = {}
        self.routes: dict[str, _Route] = {}
        self.lock = threading.Lock()
        #: the last parts that ended here: (part id, status history, reason)
        self.recent: collections.deque[tuple[str, list[tuple[str, int]], str | None]] = (
            collections.deque(maxlen=256)
        )

    def endpoint(self, width: int, dtype: str, tp_rank: int, tp_size: int) -> LanguageEndpoint:
        with self.lock:
            ep = self.endpoints.get((width, dtype))
            if ep is None:
                cfg = _settings("language", {"hidden_size": width, "dtype": dtype})
                kw = cfg.endpoint_kwargs()
                kw.update(tp_rank=tp_rank, tp_size=tp_size)
                ep = LanguageEndpoint(embedding_schema(width, dtype), **kw).start()
                self.endpoints[(width, dtype)] = ep
            return ep

    def route(self, url: str, runner: Any) -> _Route:
        """The cached answer of ``url``; asks again (once at a time) when it
        is older than its TTL. Never blocks."""
        now = time.monotonic()
        with self.lock:
            r = self.routes.setdefault(url, _Route())
            stale = now - r.fetched > (_ROUTE_TTL if r.info is not None else _ROUTE_RETRY)
            if stale and not r.fetching and runner is not None:
                r.fetching = True
                runner.submit(self._fetch(url, r))
            return r

    def forget(self, url: str) -> None:
        """An encoder's room failed: ask it again (it may have restarted elsewhere)."""
        with self.lock:
            r = self.routes.get(url)
            if r is not None:
                r.fetched = 0.0

    async def _fetch(self, url: str, r: _Route) -> None:
        import aiohttp

        info: dict[str, Any] | None = None
        error: str | None = None
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.get(url.rstrip("/") + _ROUTE_PATH) as resp,
            ):
                if resp.status == 404:
                    info = {"active": False, "reason": "the encoder does not run the plugin"}
                elif resp.status != 200:
                    error = f"GET {url}{_ROUTE_PATH}: HTTP {resp.status}: {await resp.text()}"
                else:
                    info = await resp.json()
        except Exception as exc:  # the encoder is down or unreachable: say which
            error = f"GET {url}{_ROUTE_PATH}: {type(exc).__name__}: {exc}"
        with self.lock:
            r.fetching = False
            r.fetched = time.monotonic()
            if info is not None:
                if r.info != info and not info.get("active"):
                    log.warning(
                        "embedlink: encoder %s: %s; its parts take SGLang's own path",
                        url,
                        info.get("reason", "inactive"),
                    )
                r.info, r.error, r.first_error = info, None, None
            else:
                r.error = error
                if r.first_error is None:
                    r.first_error = r.fetched

    def close(self) -> None:
        for ep in self.endpoints.values():
            ep.close()


_language_plane: _LanguagePlane | None = None
_language_lock = threading.Lock()


def _language() -> _LanguagePlane:
    global _language_plane
    with _language_lock:
        if _language_plane is None:
            _language_plane = _LanguagePlane()
        return _language_plane


def status_report() -> dict[str, Any]:
    """This process's embedlink endpoints (for tests and operators): per
    side, per width, the pool's used and free blocks; on the language side
    also the last parts that ended (their status histories and reasons)."""
    out: dict[str, Any] = {"language": {}, "encoder": {}, "recent_parts": []}
    if _language_plane is not None:
        for (w, _), ep in _language_plane.endpoints.items():
            out["language"][w] = {"used": ep.allocator.num_used, "free": ep.allocator.num_free}
        out["recent_parts"] = [
            {"part": rid, "history": hist, "reason": why}
            for rid, hist, why in list(_language_plane.recent)
        ]
    if _encoder_plane is not None:
        for w, eep in _encoder_plane.endpoints.items():
            out["encoder"][w] = {
                "used": eep.allocator.num_used,
                "free": eep.allocator.num_free,
                "open": len(_encoder_plane.senders),
            }
    return out


def wait_language_pools_free(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until every language pool of this
    process is free (blocks come back when SGLang releases its requests);
    True if they all are. Waits on each pool's allocator, not by polling."""
    deadline = time.monotonic() + timeout
    eps = [] if _language_plane is None else list(_language_plane.endpoints.values())
    return all(ep.allocator.wait_all_free(max(0.0, deadline - time.monotonic())) for ep in eps)


@dataclass
class _Arrived:
    """An embedlink part's tensor, handed through ``consume_parts`` in place
    of SGLang's raw frame."""

    tensor: torch.Tensor


@dataclass
class _Part:
    idx: int
    rid: str
    url: str
    modality: str
    rx: Receiver | None = None
    done: bool = False


def _parts(rid: str, assigned: Any, urls: list[str]) -> list[_Part]:
    """The request's parts, numbered as SGLang numbers them
    (``WaitingZmqRequest.send_encode_request``: modality-major, then encoder
    order, encoders with nothing assigned skipped)."""
    out: list[_Part] = []
    if not assigned:
        return out
    modalities = list(assigned.keys())
    _, per_modality = _receiver.calculate_modality_num_parts(modalities, assigned)
    offset = 0
    for modality in modalities:
        cum = 0
        for idx, n in enumerate(assigned[modality]):
            if n == 0:
                continue
            part = offset + cum
            out.append(
                _Part(
                    part,
                    _receiver.create_part_req_id(rid, part),
                    urls[idx],
                    getattr(modality, "name", str(modality)),
                )
            )
            cum += 1
        offset += per_modality[modality]
    return out


class EmbedlinkWaitingRequest(_receiver.WaitingZmqRequest):  # type: ignore[misc,name-defined]
    """SGLang's waiting multimodal request with its parts arriving through
    embedlink (module docstring). Built by SGLang's scheduler with the same
    arguments as ``WaitingZmqRequest``; polled on every tick, never blocking."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._el_parts = _parts(self.rid, self.num_items_assigned, list(self.encoder_urls))
        self._el_plane = _language()
        self._el_released = False

    def send_encode_request(self) -> None:
        # SGLang's registration: the encoder's send_with_url waits for it
        # before it calls the delivery (once per language TP rank)
        super().send_encode_request()
        self._el_step()

    def _try_recv_mm_data(self) -> None:
        super()._try_recv_mm_data()
        if self.status == _PENDING:
            self._el_step()

    def _el_step(self) -> None:
        for p in self._el_parts:
            if p.done:
                continue
            if p.rx is None and not self._el_open(p):
                if self.status != _PENDING:
                    return
                continue
            if p.rx is None:
                continue
            st = p.rx.poll()
            if st is Status.Success:
                p.done = True
                self._el_arrived(p)
            elif st is Status.Failed:
                p.done = True
                self._el_plane.forget(p.url)
                self._fail_and_release(
                    f"embedlink: part {p.rid} from {p.url} (room {p.rx.room}) failed: "
                    f"{p.rx.failure_reason}",
                    502,
                )
            if self.status != _PENDING:
                return

    def _el_open(self, p: _Part) -> bool:
        """Open the part's receiver once the encoder's address is known;
        False while it is not (or the part takes SGLang's own path)."""
        r = self._el_plane.route(p.url, self.registration_runner)
        if r.info is None:
            if r.error is not None and r.first_error is not None:
                waited = time.monotonic() - r.first_error
                if waited > _room_timeout_default():
                    self._fail_and_release(
                        f"embedlink: cannot learn where encoder {p.url} listens for "
                        f"{waited:.0f}s: {r.error}",
                        502,
                    )
            return False
        if not r.info.get("active"):
            p.done = True  # SGLang's own frames bring it (consume_parts)
            return False
        spec = r.info.get("modalities", {}).get(p.modality)
        if spec is None:
            self._fail_and_release(
                f"embedlink: encoder {p.url} has no embedlink endpoint for {p.modality}", 502
            )
            return False
        # the scheduler registers receive_count = its TP size with the encoder
        tp_size = int(self.receive_count)
        ep = self._el_plane.endpoint(int(spec["width"]), str(r.info["dtype"]), _tp_rank(), tp_size)
        # every TP rank receives the part: the encoder's room waits for all
        # of them (one sender, one write per rank), as SGLang's encoder waits
        # for receive_count destinations
        p.rx = ep.receiver(
            encoder=str(spec["address"]), room=part_room(p.rid), required_dst_info_num=tp_size
        )
        return True

    def _el_arrived(self, p: _Part) -> None:
        assert p.rx is not None
        meta = p.rx.meta
        if meta is None:
            self._fail_and_release(
                f"embedlink: part {p.rid} arrived without SGLang's metadata", 502
            )
            return
        emb = p.rx.wait(0)
        tensor = _to_torch(emb.embedding)
        # SGLang's own path from here: its unpickler, validation, aggregation
        self.consume_parts([meta, _Arrived(tensor)])

    def _extract_embedding_from_buffer(self, recv_obj: Any, parts: Any) -> None:
        if len(parts) > 1 and isinstance(parts[1], _Arrived):
            t = parts[1].tensor
            want = list(recv_obj.shape)
            if list(t.shape) != want or t.dtype != recv_obj.dtype:
                raise ValueError(
                    f"embedlink delivered {list(t.shape)} {t.dtype}, "
                    f"the encoder described {want} {recv_obj.dtype}"
                )
            recv_obj.embedding = t  # a view of the pool until the rooms are cleared
            return
        super()._extract_embedding_from_buffer(recv_obj, parts)

    def _finish_assemble(self, recv_embedding: Any) -> None:
        super()._finish_assemble(recv_embedding)
        # SGLang concatenated the parts into tensors of its own: the pool's
        # blocks can go back
        self._el_release("assembled")

    def release_resources(self) -> None:
        self._el_release("released by SGLang")
        super().release_resources()

    def _el_release(self, why: str) -> None:
        if self._el_released:
            return
        self._el_released = True
        for p in self._el_parts:
            if p.rx is None:
                continue
            if not p.rx.poll().is_terminal:
                p.rx.abort(f"{why} (request {self.rid})")
            self._el_plane.recent.append(
                (p.rid, [(st.name, n) for st, n in p.rx.history], p.rx.failure_reason)
            )
            p.rx.clear()


def _tp_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().tp_rank)


def _to_torch(array: Any) -> torch.Tensor:
    import numpy as np

    if isinstance(array, torch.Tensor):
        return array
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


# --------------------------------------------------------------------------- installing


def _route_answer() -> dict[str, Any]:
    if _encoder_plane is None:
        return {
            "active": False,
            "reason": "no embedlink delivery in this encoder "
            "(encoder DP > 1: SGLang does not load plugins in its DP workers)",
        }
    return _encoder_plane.info()


def _check_backend(server_args: Any, *args: Any, **kwargs: Any) -> None:
    backend = getattr(server_args, "encoder_transfer_backend", None)
    if backend != "zmq_to_scheduler":
        log.warning(
            "embedlink: the SGLang plugin is inactive: --encoder-transfer-backend %s "
            "(it carries zmq_to_scheduler only); SGLang's own transport is used",
            backend,
        )


def _refuse_dp(*args: Any, **kwargs: Any) -> None:
    log.error(
        "embedlink: encoder DP > 1 is not supported by the SGLang plugin (SGLang does not "
        "load plugins in its encoder DP workers): this encoder uses SGLang's own ZMQ path"
    )


_installed = False


def install() -> None:
    """Replace SGLang's ``WaitingZmqRequest`` and ``ZmqDelivery`` (through its
    HookRegistry, applied by ``load_plugins``), add the ``/embedlink`` route
    to its encoder server, and log when the configured backend or encoder DP
    leaves the plugin inactive. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    ORIGINAL.setdefault("WaitingZmqRequest", _receiver.WaitingZmqRequest)
    ORIGINAL.setdefault("ZmqDelivery", _server.ZmqDelivery)
    HookRegistry.register(WAITING, EmbedlinkWaitingRequest, HookType.REPLACE)
    HookRegistry.register(DELIVERY, EmbedlinkDelivery, HookType.REPLACE)
    HookRegistry.register(
        f"{_receiver.__name__}.create_mm_receiver", _check_backend, HookType.BEFORE
    )
    HookRegistry.register(
        "sglang.srt.disaggregation.encoder.runtime.launch_dp_runtime", _refuse_dp, HookType.BEFORE
    )
    try:
        from sglang.srt.disaggregation.encoder import http_server
    except Exception as exc:  # the language side does not need it
        log.debug("embedlink: no SGLang encoder server here: %s", exc)
    else:
        if not any(getattr(r, "path", None) == _ROUTE_PATH for r in http_server.app.routes):
            http_server.app.add_api_route(_ROUTE_PATH, _route_answer, methods=["GET"])
    log.info("embedlink: SGLang plugin active (zmq_to_scheduler carried over embedlink)")
