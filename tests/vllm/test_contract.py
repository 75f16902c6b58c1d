"""The connector against vLLM's real classes: nothing abstract left, every
override shaped like the base's hook, built by vLLM's own factory from the
module path, the entry point and the command line; and tripwires that fail
when vLLM moves or reshapes a hook the connector relies on."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import uuid

import pytest
from tests.vllm.model_dir import make_model_dir, make_scheduler

from embedlink import BootstrapServer
from embedlink.config import ConfigError

vllm_conn = pytest.importorskip("embedlink.integrations.vllm")

from vllm.config import ECTransferConfig  # noqa: E402
from vllm.distributed.ec_transfer.ec_connector.base import (  # noqa: E402
    ECConnectorBase,
    ECConnectorRole,
)
from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory  # noqa: E402

Conn = vllm_conn.EmbedlinkECConnector


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qwen2-audio-tiny"))


@pytest.fixture
def boot():
    with BootstrapServer(host="127.0.0.1", port=0) as b:
        yield b


def ec_config(role: str, extra: dict, *, module_path: bool = True) -> ECTransferConfig:
    return ECTransferConfig(
        ec_connector="EmbedlinkECConnector",
        ec_connector_module_path="embedlink.integrations.vllm" if module_path else None,
        ec_role=role,
        engine_id=uuid.uuid4().hex,
        ec_connector_extra_config=extra,
    )


def test_no_abstract_method_is_left():
    assert not getattr(Conn, "__abstractmethods__", frozenset())


def _hooks():
    for name, fn in inspect.getmembers(ECConnectorBase, inspect.isfunction):
        if name.startswith("__") and name != "__init__":
            continue
        if name in Conn.__dict__:
            yield name, fn


@pytest.mark.parametrize("name", [n for n, _ in _hooks()])
def test_each_override_has_the_base_signature(name):
    def shape(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert shape(getattr(Conn, name)) == shape(getattr(ECConnectorBase, name)), name


def test_the_hooks_the_connector_needs_are_overridden():
    mine = set(Conn.__dict__)
    for hook in (
        "has_cache_item",
        "ensure_cache_available",
        "update_state_after_alloc",
        "build_connector_meta",
        "take_unavailable_requests",
        "request_finished",
        "start_load_caches",
        "start_save_caches",
        "save_caches",
        "shutdown",
    ):
        assert hook in mine, hook


@pytest.mark.parametrize("role", [ECConnectorRole.SCHEDULER, ECConnectorRole.WORKER])
@pytest.mark.parametrize("ec_role", ["ec_producer", "ec_consumer"])
def test_the_factory_builds_each_role_from_the_module_path(model_dir, boot, role, ec_role):
    extra = {"bootstrap": boot.address, "transports": ["tcp"], "num_blocks": 16, "block_size": 16}
    sched = make_scheduler(model_dir, ec_config(ec_role, extra))
    assert type(sched.ec_connector) is Conn
    sched.shutdown()  # its connector holds the scheduler's same-host mailbox
    conn = ECConnectorFactory.create_connector(sched.vllm_config, role)
    try:
        assert type(conn) is Conn and conn.role is role
        assert conn.is_producer == (ec_role == "ec_producer")
        # the model's width and dtype unless given
        assert conn.settings["hidden_size"] == 64 and conn.settings["dtype"] == "float16"
    finally:
        conn.shutdown()


def test_the_entry_point_registers_the_name_once_however_often_it_runs(model_dir, boot):
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.value == "embedlink.integrations.vllm_plugin:register"]
    assert ours, [ep.value for ep in eps]
    ours[0].load()()
    ours[0].load()()  # vLLM may load plugins more than once: no error
    assert "EmbedlinkECConnector" in ECConnectorFactory._registry
    extra = {"bootstrap": boot.address, "transports": ["tcp"]}
    sched = make_scheduler(model_dir, ec_config("ec_consumer", extra, module_path=False))
    try:
        assert type(sched.ec_connector) is Conn  # the Scheduler built it by name alone
    finally:
        sched.shutdown()


def test_the_command_line_json_reaches_the_connector(model_dir, boot):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    cfg = {
        "ec_connector": "EmbedlinkECConnector",
        "ec_connector_module_path": "embedlink.integrations.vllm",
        "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"bootstrap": boot.address, "num_blocks": "32"},
    }
    args = parser.parse_args(["--model", str(model_dir), "--ec-transfer-config", json.dumps(cfg)])
    ec = EngineArgs.from_cli_args(args).ec_transfer_config
    sched = make_scheduler(model_dir, ec)
    try:
        conn = sched.ec_connector
        assert type(conn) is Conn
        assert conn.settings["num_blocks"] == 32  # a JSON string, typed by embedlink
        assert conn.settings.sources["num_blocks"] == "ec_connector_extra_config"
    finally:
        sched.shutdown()


@pytest.mark.parametrize(
    "extra, match",
    [
        ({}, "bootstrap"),
        ({"bootstrap": "nowhere"}, "bootstrap"),
        ({"bootstrap": "127.0.0.1:1", "num_blokcs": 8}, "num_blocks"),  # did you mean
        ({"bootstrap": "127.0.0.1:1", "tp_rank": 1}, "comes from vLLM"),
        ({"bootstrap": "127.0.0.1:1", "room_timeout": "soon"}, "room_timeout"),
        ({"bootstrap": "127.0.0.1:1", "transports": ["carrier-pigeon"]}, "transports"),
    ],
)
def test_bad_extra_config_fails_start_up_naming_the_key(model_dir, extra, match):
    with pytest.raises(ConfigError, match=match):
        make_scheduler(model_dir, ec_config("ec_consumer", extra))


def test_ec_both_is_refused_with_a_reason(model_dir):
    with pytest.raises(ValueError, match="ec_both"):
        make_scheduler(model_dir, ec_config("ec_both", {"bootstrap": "127.0.0.1:1"}))


def test_an_unsupported_vllm_version_is_named(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.34.1")
    with pytest.raises(ImportError, match=r"supports vllm 0\.33\.0; vllm 0\.34\.1 is installed"):
        vllm_conn._check_vllm()


# -- tripwires: where vLLM calls what the connector relies on


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_tripwire_the_scheduler_calls_the_consumer_hooks():
    from vllm.v1.core.sched.scheduler import Scheduler

    src = _source(Scheduler)
    for call in (
        "ec_connector.ensure_cache_available(",
        "ec_connector.has_cache_item(",
        "ec_connector.update_state_after_alloc(",
        "ec_connector.build_connector_meta(",
        "ec_connector.take_unavailable_requests(",
        "ec_connector.request_finished(",
    ):
        assert call in src, f"vLLM's Scheduler no longer calls {call}"


def test_tripwire_the_v1_runner_mixin_calls_the_worker_hooks():
    from vllm.v1.worker.ec_connector_model_runner_mixin import ECConnectorModelRunnerMixin

    src = _source(ECConnectorModelRunnerMixin)
    for call in (
        "start_load_caches(",
        "start_save_caches(",
        "save_caches(",
        "bind_connector_metadata(",
    ):
        assert call in src, f"the V1 runner mixin no longer calls {call}"


def test_tripwire_the_v2_runner_calls_the_worker_hooks():
    from vllm.v1.worker.gpu.ec_connector import ActiveECConnector

    src = _source(ActiveECConnector)
    for call in (
        "start_load_caches(",
        "start_save_caches(",
        "save_caches(",
        "bind_connector_metadata(",
    ):
        assert call in src, f"V2's ActiveECConnector no longer calls {call}"


def test_tripwire_ec_transfer_params_reach_the_request():
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    r = Request(
        request_id="x",
        prompt_token_ids=[1, 2],
        sampling_params=SamplingParams(
            max_tokens=1, extra_args={"ec_transfer_params": {"embedlink": {"rooms": [1]}}}
        ),
        pooling_params=None,
    )
    assert r.ec_transfer_params == {"embedlink": {"rooms": [1]}}
