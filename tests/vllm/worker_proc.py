"""A vLLM worker process for tests/vllm/test_workers.py.

It does what a vLLM worker does with an EC connector and nothing else: makes
the process-wide connector with vLLM's own ``ensure_ec_transfer_initialized``
and, for each scheduler output the test sends it, runs the hooks through the
real runner code: the V1 runner's ``ECConnectorModelRunnerMixin`` (no hooks
on a step with nothing scheduled, as V1 does; a producer's every step), or
Model Runner V2's ``ActiveECConnector`` (``no_forward`` on empty steps).

The model is the one stand-in: the test sends the encoder outputs (what the
audio tower would compute) with each step that schedules them.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def main(conn: Any, vllm_config: Any, runner: str) -> None:
    try:
        _serve(conn, vllm_config, runner)
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        raise


def _serve(conn: Any, vllm_config: Any, runner: str) -> None:
    import torch
    from vllm.distributed.ec_transfer.ec_transfer_state import (
        ensure_ec_transfer_initialized,
        ensure_ec_transfer_shutdown,
        get_ec_transfer,
    )
    from vllm.v1.worker.ec_connector_model_runner_mixin import ECConnectorModelRunnerMixin as Mixin
    from vllm.v1.worker.gpu.ec_connector import ActiveECConnector

    ensure_ec_transfer_initialized(vllm_config)
    connector = get_ec_transfer()
    cache: dict[str, torch.Tensor] = {}
    v2 = ActiveECConnector(vllm_config, cache) if runner == "v2" else None
    conn.send(("ready", type(connector).__name__))
    while True:
        op, *args = conn.recv()
        if op == "stop":
            ensure_ec_transfer_shutdown()
            conn.send(("stopped", None))
            return
        if op == "evict":
            # vLLM keeps a finished request's items cached until it needs the
            # room; items the connector lent out of its pool go back with them
            cache.clear()
            conn.send(("evicted", None))
            continue
        if op == "pool":
            part = connector._consumer or connector._producer
            conn.send(("pool", None if part is None else part.ep.pool_usage()))
            continue
        so, encoded = args
        for h in so.free_encoder_mm_hashes or ():  # the runner's evictions, every step
            cache.pop(h, None)
        ran = False
        if v2 is not None:
            if so.total_num_scheduled_tokens == 0:
                v2.no_forward(so)
            else:
                with v2.maybe_get_output(so):
                    cache.update(encoded)  # V2 saves keys new since the hooks ran
            ran = True
        elif so.total_num_scheduled_tokens > 0 or connector.is_producer:
            with Mixin.maybe_get_ec_connector_output(so, encoder_cache=cache):
                for ident, t in encoded.items():  # _execute_mm_encoder, per item
                    cache[ident] = t
                    Mixin.maybe_save_ec_to_connector(cache, ident)
            ran = True
        # what the gather step would read: the items of this step's requests
        conn.send(("step", ran, {k: v.clone() for k, v in cache.items()}))
