"""Configuration: one precedence (flag > EMBEDLINK_* > SGLang alias > file's
command table > file top level > default), SGLang's names as aliases, and bad
values failing with the setting's name and source."""

import pytest

from embedlink.config import SETTINGS, ConfigError, load, settings_for
from embedlink.protocol import Status, TransferRequest
from embedlink.protocol.layout import BufferSchema
from embedlink.protocol.rooms import Drop, SenderRoom, StatusChanged


def write(tmp_path, text):
    p = tmp_path / "embedlink.toml"
    p.write_text(text)
    return str(p)


def test_defaults_without_anything():
    cfg = load("language", {}, env={})
    assert cfg["heartbeat_interval"] == 2.0
    assert cfg["default_tokens"] == 1024
    assert cfg["transports"] == ("shm", "tcp")
    assert cfg["bootstrap_timeout"] is None
    assert set(cfg.sources.values()) == {"default"}
    assert load("bootstrap", {}, env={})["port"] == 8998
    assert load("encoder", {}, env={})["port"] == 0


def test_precedence_each_layer_beats_the_next(tmp_path):
    path = write(
        tmp_path,
        "heartbeat_interval = 1.0\nroom_ttl = 11.0\nroom_timeout = 12.0\nwindow = 3\n"
        "[language]\nheartbeat_interval = 2.5\nroom_ttl = 13.0\nroom_timeout = 14.0\n",
    )
    env = {
        "EMBEDLINK_HEARTBEAT_INTERVAL": "7",
        "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "8",
        "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "5",
        "EMBEDLINK_ROOM_TTL": "99",
    }
    flags = {"heartbeat_interval": 3.0, "room_ttl": None}
    cfg = load("language", flags, env=env, config_file=path)
    assert (cfg["heartbeat_interval"], cfg.sources["heartbeat_interval"]) == (
        3.0,
        "flag --heartbeat-interval",
    )
    assert (cfg["room_ttl"], cfg.sources["room_ttl"]) == (99.0, "env EMBEDLINK_ROOM_TTL")
    assert (cfg["heartbeat_misses"], cfg.sources["heartbeat_misses"]) == (
        5,
        "env SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE",
    )
    assert cfg["room_timeout"] == 14.0 and "[language]" in cfg.sources["room_timeout"]
    assert cfg["window"] == 3 and cfg.sources["window"] == f"file {path}"
    # without the flag, EMBEDLINK_* beats SGLang's name
    cfg = load("language", {}, env=env, config_file=path)
    assert cfg["heartbeat_interval"] == 7.0
    # without either variable, the file's [language] table beats its top level
    cfg = load("language", {}, env={}, config_file=path)
    assert cfg["heartbeat_interval"] == 2.5
    # the encoder reads the top level, not [language]
    assert load("encoder", {}, env={}, config_file=path)["heartbeat_interval"] == 1.0


@pytest.mark.parametrize(
    ("alias", "setting", "text", "value"),
    [
        ("SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE", "default_tokens", "2048", 2048),
        ("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL", "heartbeat_interval", "5.0", 5.0),
        ("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", "heartbeat_misses", "2", 2),
        ("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "bootstrap_timeout", "300", 300.0),
    ],
)
def test_sglang_aliases(alias, setting, text, value):
    cfg = load("language", {}, env={alias: text})
    assert cfg[setting] == value
    assert cfg.sources[setting] == f"env {alias}"
    assert cfg.endpoint_kwargs()[setting] == value


@pytest.mark.parametrize(
    ("env", "setting", "words"),
    [
        ({"EMBEDLINK_HEARTBEAT_INTERVAL": "soon"}, "heartbeat_interval", "expected a number"),
        ({"SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "0"}, "heartbeat_misses", "at least 1"),
        ({"SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE": "-5"}, "default_tokens", "positive"),
        ({"EMBEDLINK_TRANSPORTS": "tcp,carrier-pigeon"}, "transports", "carrier-pigeon"),
        ({"EMBEDLINK_BOOTSTRAP": "nohost"}, "bootstrap", "host:port"),
        ({"EMBEDLINK_METRICS_PORT": "70000"}, "metrics_port", "65535"),
        ({"EMBEDLINK_DTYPE": "float7"}, "dtype", "float7"),
        ({"EMBEDLINK_HOOK": "no colon"}, "hook", "module:function"),
        ({"EMBEDLINK_TP_RANK": "2", "EMBEDLINK_TP_SIZE": "2"}, "tp_rank", "below tp_size"),
        ({"EMBEDLINK_DEFAULT_TOKENS": "999999"}, "default_tokens", "exceeds the pool"),
        ({"EMBEDLINK_BUSY_POLL_US": "-1"}, "busy_poll_us", "between 0 and 1000000"),
    ],
)
def test_bad_environment_names_setting_and_source(env, setting, words):
    with pytest.raises(ConfigError) as info:
        load("language", {}, env=env)
    assert info.value.setting == setting
    assert words in str(info.value)
    assert info.value.source.startswith("env ") or info.value.source == "default"
    assert setting in str(info.value)


def test_bad_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"heartbeat_interval.*flag --heartbeat-interval"):
        load("encoder", {"heartbeat_interval": -1.0}, env={})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'heartbeat_interval'"):
        load("encoder", {}, env={}, config_file=write(tmp_path, "heartbeat_intervall = 3\n"))
    with pytest.raises(ConfigError, match=r"room_timeout.*\[encoder\].*expected a number"):
        load("encoder", {}, env={}, config_file=write(tmp_path, '[encoder]\nroom_timeout = "x"\n'))
    with pytest.raises(ConfigError, match="does not apply to the encoder command"):
        load("encoder", {}, env={}, config_file=write(tmp_path, "[encoder]\ndefault_tokens = 5\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load("encoder", {}, env={}, config_file=write(tmp_path, "= broken\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load("encoder", {}, env={}, config_file=str(tmp_path / "missing.toml"))
    # EMBEDLINK_CONFIG names the file when --config does not
    path = write(tmp_path, "transports = ['tcp']\n[bootstrap]\nport = 9000\n")
    assert load("encoder", {}, env={"EMBEDLINK_CONFIG": path})["transports"] == ("tcp",)
    assert load("bootstrap", {}, env={"EMBEDLINK_CONFIG": path})["port"] == 9000


def test_optional_settings_take_an_empty_value_as_unset():
    cfg = load("encoder", {}, env={"EMBEDLINK_METRICS_PORT": "", "EMBEDLINK_BOOTSTRAP": "none"})
    assert cfg["metrics_port"] is None and cfg["bootstrap"] is None


def test_secrets_are_masked_in_the_description():
    cfg = load("encoder", {}, env={"EMBEDLINK_AUTH_SECRET": "hunter2"})
    assert cfg["auth_secret"] == "hunter2"
    assert "hunter2" not in str(cfg.describe())


def test_endpoint_kwargs_build_real_endpoints():
    from embedlink import EncoderEndpoint, LanguageEndpoint

    env = {
        "EMBEDLINK_TRANSPORTS": "tcp",
        "EMBEDLINK_NUM_BLOCKS": "16",
        "EMBEDLINK_HIDDEN_SIZE": "32",
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "7",
    }
    schema = BufferSchema(hidden_size=32)
    lang = load(
        "language",
        {},
        env={**env, "EMBEDLINK_DEFAULT_TOKENS": "256", "EMBEDLINK_BUSY_POLL_US": "0"},
    )
    ep = LanguageEndpoint(schema, **lang.endpoint_kwargs())
    try:
        assert (ep.num_blocks, ep.default_tokens, ep.bootstrap_timeout) == (16, 256, 7.0)
        assert ep.busy_poll_us == 0.0
    finally:
        ep.close()
    enc = EncoderEndpoint(schema, **load("encoder", {}, env=env).endpoint_kwargs())
    try:
        assert enc.transports == ("tcp",) and enc.bootstrap_timeout == 7.0
        assert enc.busy_poll_us == pytest.approx(400)  # the default
    finally:
        enc.close()


def test_every_setting_is_documented_and_reaches_a_command():
    for s in SETTINGS:
        assert s.help and s.roles
        assert s.env == "EMBEDLINK_" + s.name.upper()
    names = {s.name for s in settings_for("bootstrap")}
    assert names == {"host", "port", "auth_secret"}


def test_bootstrap_timeout_bounds_only_bootstrapping():
    """SGLang's bootstrap timeout: a room may wait this long for its peer;
    once the request arrived, the (longer) room timeout applies."""
    schema = BufferSchema(hidden_size=8)
    room = SenderRoom(1, schema=schema, block_size=4, now=0.0, timeout=60.0, bootstrap_timeout=5.0)
    assert room.tick(4.9) == []
    acts = room.tick(5.1)
    assert room.status is Status.Failed
    assert "5s" in (room.failure_reason or "")
    assert any(isinstance(a, StatusChanged) for a in acts)

    room = SenderRoom(2, schema=schema, block_size=4, now=0.0, timeout=60.0, bootstrap_timeout=5.0)
    acts = room.request(
        TransferRequest(room=2, session="s", epoch=1, dst_blocks=(0,), dst_tokens=4),
        1.0,
        dst_num_blocks=8,
    )
    assert not any(isinstance(a, Drop) for a in acts)
    assert room.status is Status.WaitingForInput
    room.tick(30.0)
    assert room.status is Status.WaitingForInput  # the room timeout (60 s) applies now
    room.tick(61.5)
    assert room.status is Status.Failed and "60s" in (room.failure_reason or "")


def test_mooncake_settings_reach_the_transport_options():
    enc = load(
        "encoder",
        {"mooncake_wait": "spin"},
        env={"EMBEDLINK_MOONCAKE_PROTOCOL": "rdma", "EMBEDLINK_MOONCAKE_DEVICE_NAME": "mlx5_0"},
    )
    assert enc.endpoint_kwargs()["transport_options"] == {
        "mooncake": {"protocol": "rdma", "device_name": "mlx5_0", "wait": "spin"}
    }
    # the wait is the encoder's (the writing side); the language side has none
    assert load("language", {}, env={}).transport_options() == {"mooncake": {"protocol": "tcp"}}
    assert load("encoder", {}, env={})["mooncake_wait"] == "auto"
    with pytest.raises(ConfigError, match=r"mooncake_wait.*EMBEDLINK_MOONCAKE_WAIT"):
        load("encoder", {}, env={"EMBEDLINK_MOONCAKE_WAIT": "busy"})


def test_nixl_settings_reach_the_transport_options_only_where_they_differ():
    lang = load(
        "language",
        {"nixl_net_devices": "eth1", "nixl_workers": 2},
        env={"EMBEDLINK_NIXL_RDMA_DEVICES": "mlx5_0,mlx5_1", "EMBEDLINK_NIXL_TLS": "rc,cma"},
    )
    assert lang.transport_options()["nixl"] == {
        "net_devices": "eth1",
        "rdma_devices": "mlx5_0,mlx5_1",
        "tls": "rc,cma",
        "workers": "2",
    }
    # the defaults pass nothing: the transport's own defaults apply, and a
    # user's UCX_NET_DEVICES still wins over "auto"
    assert "nixl" not in load("encoder", {}, env={}).transport_options()
    assert load("encoder", {}, env={})["nixl_net_devices"] == "auto"
    enc = load("encoder", {}, env={"EMBEDLINK_NIXL_ERROR_HANDLING": "none"})
    assert enc.transport_options()["nixl"] == {"error_handling": "none"}
    with pytest.raises(ConfigError, match=r"nixl_error_handling.*EMBEDLINK_NIXL_ERROR_HANDLING"):
        load("encoder", {}, env={"EMBEDLINK_NIXL_ERROR_HANDLING": "fatal"})
    with pytest.raises(ConfigError, match=r"nixl_workers"):
        load("language", {"nixl_workers": 0}, env={})
    assert load("language", {"transports": ["nixl", "tcp"]}, env={})["transports"] == (
        "nixl",
        "tcp",
    )
