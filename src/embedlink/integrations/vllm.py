"""vLLM's encoder-cache (EC) connector over embedlink.

Load it with::

    --ec-transfer-config '{"ec_connector": "EmbedlinkECConnector",
                           "ec_role": "ec_producer",            # or "ec_consumer"
                           "ec_connector_extra_config": {"bootstrap": "10.0.0.1:8998"}}'

(the ``vllm.general_plugins`` entry point registers the name; without it add
``"ec_connector_module_path": "embedlink.integrations.vllm"``). The keys of
``ec_connector_extra_config`` are embedlink's setting names
(docs/configuration.md); ``tp_rank`` and ``tp_size`` come from vLLM, and
``hidden_size`` and ``dtype`` default to the model's. See docs/vllm.md.

How the roles split the work (vLLM builds one connector per process and
role):

* scheduler role, either side: bookkeeping only (no network). A consumer's
  scheduler defers a request (``ensure_cache_available``) until each of its
  items arrived on every worker rank, and fails it through
  ``take_unavailable_requests`` with the reason when a transfer failed; a
  producer's scheduler hands each request's rooms to its workers and returns
  them in ``ec_transfer_params`` for the proxy to pass on;
* worker role: one embedlink endpoint per worker process. The consumer's
  workers receive on their own threads and put arrived tensors into the
  encoder cache in ``start_load_caches``; the producer's first tensor-parallel
  rank sends every encoder output, once per room, from a thread of its own.

The scheduler and its workers talk over same-host Unix datagrams
(:mod:`._plane`): vLLM's V1 model runner runs no connector hook on a step
with nothing scheduled, so the step metadata alone could never tell the
workers to fetch what a deferred request waits for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .. import config as _config
from ..endpoints.encoder import EncoderEndpoint
from ..endpoints.language import LanguageEndpoint
from ._plane import (
    ConsumerScheduler,
    ConsumerWorker,
    Item,
    ProducerScheduler,
    ProducerWorker,
    embedding_schema,
)

#: The vLLM releases this connector is tested with (the ``vllm`` extra pins it).
SUPPORTED = ("0.33.0",)


def _check_vllm() -> str:
    try:
        have = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        raise ImportError(
            "embedlink.integrations.vllm needs vLLM: pip install 'embedlink[vllm]' "
            f"(supported: vllm {', '.join(SUPPORTED)})"
        ) from None
    if have not in SUPPORTED:
        raise ImportError(
            f"embedlink's vLLM connector supports vllm {', '.join(SUPPORTED)}; "
            f"vllm {have} is installed (pip install 'embedlink[vllm]')"
        )
    return have


VLLM_VERSION = _check_vllm()

import torch  # noqa: E402  (after the version check: its message first)
from vllm.distributed.ec_transfer.ec_connector.base import (  # noqa: E402
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED", "EmbedlinkECConnector", "EmbedlinkECMetadata", "register"]

NAME = "EmbedlinkECConnector"

#: settings vLLM decides, and why they may not be given
_REFUSED = {
    "tp_rank": "comes from vLLM (the worker's tensor-parallel rank)",
    "tp_size": "comes from vLLM (tensor_parallel_size)",
    "hook": "the demo's embedding source; vLLM's encoder is the source here",
    "seed": "a demo setting",
    "min_tokens": "a demo setting",
    "max_tokens": "a demo setting",
    "rooms": "a demo setting",
    "first_room": "a demo setting",
    "window": "a demo setting",
}
_EXTRA = "ec_connector_extra_config"
_TORCH_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class EmbedlinkECMetadata(ECConnectorMetadata):  # type: ignore[misc]
    """What the scheduler tells its workers each step (pickled by vLLM)."""

    #: consumer: ``{identifier: room}`` to put into the encoder cache now
    loads: dict[str, int] = field(default_factory=dict)
    #: producer: ``(room, identifier, rows)`` assigned this step
    sends: list[tuple[int, str, int]] = field(default_factory=list)


def register() -> None:
    """Register the connector's name with vLLM's factory (see
    :func:`embedlink.integrations.vllm_plugin.register`)."""
    from .vllm_plugin import register as _register

    _register()


def _items(request: Request) -> list[Item]:
    out = []
    for i, f in enumerate(request.mm_features):
        pos = f.mm_position
        out.append(
            Item(f.identifier, int(request.get_num_encoder_embeds(i)), pos.offset + pos.length)
        )
    return out


class EmbedlinkECConnector(ECConnectorBase):  # type: ignore[misc]
    """vLLM's ``ECConnectorBase`` over embedlink (module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole) -> None:
        super().__init__(vllm_config=vllm_config, role=role)
        ec = vllm_config.ec_transfer_config
        if self.is_producer and self.is_consumer:
            raise ValueError(
                f"{NAME}: ec_role 'ec_both' is not supported: run an ec_producer "
                "instance and an ec_consumer instance"
            )
        if not (self.is_producer or self.is_consumer):
            raise ValueError(f"{NAME}: unknown ec_role {ec.ec_role!r}")
        side = "encoder" if self.is_producer else "language"
        extra = dict(ec.ec_connector_extra_config or {})
        model = vllm_config.model_config
        if "hidden_size" not in extra:
            extra["hidden_size"] = int(model.get_hidden_size())
        if "dtype" not in extra:
            dtype = _TORCH_DTYPES.get(model.dtype)
            if dtype is None:
                raise ValueError(f"{NAME}: the model dtype {model.dtype} has no transfer dtype")
            extra["dtype"] = dtype
        par = vllm_config.parallel_config
        self._tp_size = int(par.tensor_parallel_size)
        extra["tp_size"] = self._tp_size
        # vLLM's tensor-parallel rank when its groups are up (in a worker),
        # else the worker's rank within its tensor-parallel group
        self._tp_rank = _tp_rank(int(getattr(par, "rank", 0)), self._tp_size)
        refused = dict(_REFUSED)
        given = {k: v for k, v in extra.items() if k not in ("tp_size",)}
        if side == "language" and "default_tokens" not in given:
            # each room reserves its item's size; this only has to fit the pool
            probe = _config.load_mapping(
                side, {**given, "default_tokens": 1}, source=_EXTRA, refuse=refused
            )
            pool = probe["num_blocks"] * probe["block_size"]
            given["default_tokens"] = min(1024, pool)
        if side == "language" and "zero_copy" not in given:
            # items are lent to vLLM's encoder cache out of the pool, at most
            # half of it (ConsumerWorker): no copy, no fresh memory per item
            given["zero_copy"] = True
        self.settings = _config.load_mapping(side, given, source=_EXTRA, refuse=refused)
        v = self.settings.values
        self._bootstrap: str | None = v["bootstrap"]
        if self._bootstrap is None:
            raise _config.ConfigError(
                "bootstrap", _EXTRA, "must be set (the bootstrap server's host:port)"
            )
        self._width = int(v["hidden_size"])
        self._dtype = str(v["dtype"])
        engine = ec.engine_id or "default"
        dp = int(getattr(par, "data_parallel_rank", 0) or 0)
        base = f"embedlink-vllm:{engine}:{dp}"
        self._sched_box = f"{base}:scheduler"
        self._worker_boxes = [f"{base}:worker{r}" for r in range(self._tp_size)]
        self._consumer_sched: ConsumerScheduler | None = None
        self._producer_sched: ProducerScheduler | None = None
        self._consumer: ConsumerWorker | None = None
        self._producer: ProducerWorker | None = None
        kw = self.settings.endpoint_kwargs()
        kw.update(tp_rank=self._tp_rank, tp_size=self._tp_size)
        schema = embedding_schema(self._width, self._dtype)
        if role == ECConnectorRole.SCHEDULER:
            if self.is_consumer:
                # a backstop past the rooms' own deadlines (they fail first, with reasons)
                limit = 2 * float(v["room_timeout"]) + float(v["bootstrap_timeout"] or 0) + 10
                self._consumer_sched = ConsumerScheduler(
                    mailbox=self._sched_box,
                    workers=self._worker_boxes,
                    bootstrap=self._bootstrap,
                    deadline=limit,
                ).start()
            else:
                self._producer_sched = ProducerScheduler(
                    bootstrap=self._bootstrap, dp_rank=int(v["dp_rank"])
                )
            return
        device = _worker_device(vllm_config)
        if self.is_consumer:
            self._consumer = ConsumerWorker(
                LanguageEndpoint(schema, **kw),
                rank=self._tp_rank,
                mailbox=self._worker_boxes[self._tp_rank],
                scheduler=self._sched_box,
                to_tensor=lambda a: _to_torch(a, self._dtype, device),
            ).start()
        elif self._tp_rank == 0:
            # every rank encodes the same outputs: the first one sends them,
            # registered as the instance's only encoder rank
            kw.update(tp_rank=0, tp_size=1)
            self._producer = ProducerWorker(EncoderEndpoint(schema, **kw)).start()

    # -- both roles

    def shutdown(self) -> None:
        for part in (self._consumer_sched, self._consumer, self._producer):
            if part is not None:
                part.close()

    # -- scheduler role

    def has_cache_item(self, identifier: str) -> bool:
        if self._consumer_sched is None:
            return False  # a producer encodes everything itself
        return self._consumer_sched.has_item(identifier)

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        if not request.mm_features:
            return True
        params = request.ec_transfer_params
        if self._producer_sched is not None:
            self._producer_sched.seen(request.request_id, params, _items(request))
            return True
        assert self._consumer_sched is not None
        return self._consumer_sched.ensure(
            request.request_id, params, _items(request), num_computed_tokens
        )

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        if self._consumer_sched is not None:
            ident = request.mm_features[index].identifier
            self._consumer_sched.allocated(request.request_id, index, ident)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> EmbedlinkECMetadata:
        if self._consumer_sched is not None:
            return EmbedlinkECMetadata(loads=self._consumer_sched.take_loads())
        assert self._producer_sched is not None
        return EmbedlinkECMetadata(sends=self._producer_sched.take_sends())

    def take_unavailable_requests(self) -> set[str]:
        sched = self._consumer_sched or self._producer_sched
        if sched is None:
            return set()
        failed = sched.take_unavailable()
        for rid, why in failed.items():
            log.error("embedlink: request %s failed: %s", rid, why)
        return set(failed)

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        # Never True: vLLM would then hold the request's KV blocks until a KV
        # connector reported it, which an EC connector never does.
        rid = request.request_id
        if self._producer_sched is not None:
            return False, self._producer_sched.finished(rid)
        if self._consumer_sched is not None:
            why = self._consumer_sched.failure(rid)
            self._consumer_sched.finished(rid)
            if why is not None:
                return False, {"embedlink": {"error": why}}
        return False, None

    # -- worker role

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        if self._consumer is None:
            return
        meta = self._get_connector_metadata()
        if not meta.loads:
            return
        missing = self._consumer.load(encoder_cache, meta.loads)
        if missing:
            # the scheduler admitted them on this rank's word: a bug if it happens
            log.error("embedlink: items %s were scheduled but are not held here", missing)

    def start_save_caches(self, **kwargs: Any) -> None:
        if self._producer is None:
            return
        meta = self._get_connector_metadata()
        if meta.sends:
            self._producer.plan(meta.sends)
        cache = kwargs.get("encoder_cache")
        if cache:
            self._producer.offer(cache)

    def save_caches(
        self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any
    ) -> None:
        if self._producer is not None:
            self._producer.saved(encoder_cache, mm_hash)


def _tp_rank(worker_rank: int, tp_size: int) -> int:
    try:
        from vllm.distributed import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return int(parallel_state.get_tensor_model_parallel_rank())
    except Exception:  # no process groups (a scheduler process, a test)
        pass
    return worker_rank % tp_size


def _worker_device(vllm_config: VllmConfig) -> torch.device:
    dev = vllm_config.device_config.device
    if isinstance(dev, torch.device) and dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev if isinstance(dev, torch.device) else torch.device(str(dev or "cpu"))


def _to_torch(array: Any, dtype: str, device: torch.device) -> torch.Tensor:
    """A received embedding (numpy, bfloat16 through ml_dtypes; or a torch
    tensor from a device pool) as a tensor of the model dtype on ``device``."""
    if isinstance(array, torch.Tensor):
        return array.to(device)
    import numpy as np

    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(array))
    return t.to(device) if device.type != "cpu" else t
