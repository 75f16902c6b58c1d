"""An SGLang encoder-only server without a model, for the tests: SGLang's real
FastAPI encoder app and request lifecycle, the model stages stood in for
(sglang_env). Plugins load through SGLang's own ``load_plugins()`` (so
``EMBEDLINK_SGLANG=1`` in the environment puts embedlink's delivery in
place). Binds port 0, prints ``PORT <n>``, serves until killed.

Usage: python encoder_proc.py MODEL_DIR JSON   (JSON: {"tokens": {rid: n},
"fail": substr, "hang": substr, "dim": width})
"""

from __future__ import annotations

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sglang_env


def main() -> None:
    model_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import uvicorn
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )
    from sglang.srt.runtime_context import get_parallel, publish

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sa = sglang_env.server_args(model_dir, encoder_only=True, port=port)
    publish(sa, role="encoder")
    # what MMEncoder.__init__ does for its TP group, on gloo, world size 1
    init_distributed_environment(
        backend="gloo",
        world_size=1,
        rank=0,
        local_rank=0,
        distributed_init_method=f"tcp://127.0.0.1:{sglang_env.free_port()}",
    )
    get_parallel().override_permanently(
        tp_rank=0, pp_size=1, pp_rank=0, attn_dp_size=1, attn_dp_rank=0, attn_tp_size=1,
        attn_tp_rank=0, attn_cp_rank=0, attn_dcp_size=1, moe_ep_size=1, moe_ep_rank=0,
        moe_dp_size=1, moe_tp_size=1,
    )  # fmt: skip
    initialize_model_parallel()
    from sglang.srt.disaggregation.encoder import http_server

    enc = sglang_env.encoder_shell(int(spec.get("dim", sglang_env.HIDDEN)))
    sglang_env.fake_model_stage(
        enc, spec.get("tokens", {}), fail=spec.get("fail", ""), hang=spec.get("hang", "")
    )
    # what http_server.launch_server leaves behind for TP 1 without batching
    http_server.encoder = enc
    http_server.send_sockets = []
    http_server.encoder_scheduler = None
    http_server.local_runtime = None
    http_server.dp_dispatcher = None
    print(f"DELIVERY {type(enc.delivery).__module__}.{type(enc.delivery).__name__}", flush=True)
    sock.listen(2048)  # connections wait in the backlog until uvicorn serves
    print(f"PORT {port}", flush=True)
    config = uvicorn.Config(http_server.app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
