"""Settings for the standalone commands: flags, environment, a TOML file.

One precedence, highest first:

1. a command-line flag (``--heartbeat-interval 5``);
2. ``EMBEDLINK_<NAME>`` in the environment (``EMBEDLINK_HEARTBEAT_INTERVAL=5``);
3. SGLang's name for the same thing, where one exists
   (``SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL=5``), so a deployment's existing
   environment carries over;
4. the TOML file given by ``--config`` or ``EMBEDLINK_CONFIG``: the table of
   the command (``[encoder]``, ``[language]``, ``[bootstrap]``) first, then
   the top level;
5. the built-in default.

Every value is checked when it is read; a bad one raises :class:`ConfigError`
naming the setting and where the value came from, and the commands exit with
that message before starting anything. Unknown keys in the file are errors too
(a misspelt key would otherwise be silently ignored).

The table of settings (:data:`SETTINGS`) is the one source for the flags, the
environment names, the file keys and ``docs/configuration.md``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .protocol import EmbedlinkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["SETTINGS", "Config", "ConfigError", "Setting", "load", "load_mapping", "settings_for"]

ROLES = ("encoder", "language", "bootstrap")
_ENDPOINTS = frozenset({"encoder", "language"})
_ALL = frozenset(ROLES)
_ENC = frozenset({"encoder"})
_LANG = frozenset({"language"})
_TRANSPORTS = ("shm", "tcp", "mooncake", "cuda_ipc", "nixl")


class ConfigError(EmbedlinkError, ValueError):
    """A setting has a bad value; the message names the setting and its source."""

    def __init__(self, setting: str, source: str, problem: str) -> None:
        super().__init__(f"setting {setting!r} (from {source}): {problem}")
        self.setting = setting
        self.source = source
        self.problem = problem


Check = Callable[[Any], "str | None"]


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be positive, got {v}"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"must be zero or more, got {v}"


def _at_least_one(v: Any) -> str | None:
    return None if v >= 1 else f"must be at least 1, got {v}"


def _busy_poll(v: Any) -> str | None:
    return None if 0 <= v <= 1e6 else f"must be between 0 and 1000000 microseconds, got {v}"


def _port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else f"must be a port number in [0, 65535], got {v}"


def _host_port(v: Any) -> str | None:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return f"must be host:port, got {v!r}"
    return None


def _choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}; got {v!r}"

    return check


def _transports(v: Any) -> str | None:
    if not v:
        return "name at least one transport"
    bad = [t for t in v if t not in _TRANSPORTS]
    if bad:
        return f"unknown transport(s) {', '.join(map(repr, bad))}; known: {', '.join(_TRANSPORTS)}"
    return None


def _hook(v: Any) -> str | None:
    if v == "synthetic":
        return None
    module, sep, func = str(v).partition(":")
    if not sep or not module or not func.isidentifier():
        return f"must be 'synthetic' or module:function, got {v!r}"
    return None


def _dtype(v: Any) -> str | None:
    from .protocol import resolve_dtype

    try:
        resolve_dtype(str(v))
    except (KeyError, ValueError, TypeError) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Setting:
    """One setting: its name (the file key; the flag is the name with dashes,
    the environment variable ``EMBEDLINK_`` + the name upper-cased), its type
    (``int``, ``float``, ``str``, ``bool`` or ``list``), default, help, the
    commands it applies to, SGLang's environment name when it means the same,
    and a check returning a problem or None."""

    name: str
    type: str
    default: Any
    help: str
    roles: frozenset[str]
    sglang: str | None = None
    check: Check | None = None
    optional: bool = False  # None allowed (an empty environment value means None)
    role_defaults: Mapping[str, Any] = field(default_factory=dict)
    secret: bool = False

    @property
    def env(self) -> str:
        return "EMBEDLINK_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_for(self, role: str) -> Any:
        return self.role_defaults.get(role, self.default)


SETTINGS: tuple[Setting, ...] = (
    # -- where things are
    Setting(
        "bootstrap",
        "str",
        None,
        "bootstrap server host:port (the encoder registers there; the language side looks encoders up)",
        _ENDPOINTS,
        check=_host_port,
        optional=True,
    ),
    Setting(
        "host",
        "str",
        "127.0.0.1",
        "address to bind (control plane, data plane servers, metrics)",
        _ALL,
    ),
    Setting(
        "advertise_host",
        "str",
        None,
        "address peers should use to reach this encoder (default: --host)",
        _ENC,
        optional=True,
    ),
    Setting(
        "port",
        "int",
        0,
        "port to bind (0: a free one)",
        frozenset({"encoder", "bootstrap"}),
        check=_port,
        role_defaults={"bootstrap": 8998},
    ),
    Setting(
        "metrics_port",
        "int",
        None,
        "serve /metrics and /status on this port (0: a free one; unset: none)",
        _ENDPOINTS,
        check=_port,
        optional=True,
    ),
    # -- the buffers
    Setting(
        "hidden_size",
        "int",
        3584,
        "embedding width (Qwen2.5-VL-7B: 3584)",
        _ENDPOINTS,
        check=_positive,
    ),
    Setting("dtype", "str", "bfloat16", "embedding dtype", _ENDPOINTS, check=_dtype),
    Setting("block_size", "int", 128, "tokens per pool block", _ENDPOINTS, check=_positive),
    Setting(
        "num_blocks", "int", 1024, "blocks in this endpoint's pool", _ENDPOINTS, check=_positive
    ),
    Setting(
        "default_tokens",
        "int",
        1024,
        "tokens reserved for a room before its length is known",
        _LANG,
        sglang="SGLANG_EMBEDDING_DEFAULT_ALLOCATE_BUFFER_SIZE",
        check=_positive,
    ),
    Setting(
        "device",
        "str",
        None,
        "torch device of the pool (e.g. cuda:0; unset: host memory)",
        _ENDPOINTS,
        optional=True,
    ),
    Setting(
        "transports",
        "list",
        ("shm", "tcp"),
        "data planes offered/accepted, in order of preference (comma-separated in the environment)",
        _ENDPOINTS,
        check=_transports,
    ),
    Setting(
        "mooncake_protocol",
        "str",
        "tcp",
        "Mooncake protocol",
        _ENDPOINTS,
        check=_choice("tcp", "rdma"),
    ),
    Setting(
        "mooncake_device_name",
        "str",
        "",
        "RDMA devices for Mooncake, e.g. mlx5_0,mlx5_1",
        _ENDPOINTS,
    ),
    Setting(
        "mooncake_wait",
        "str",
        "auto",
        "how the encoder waits for a Mooncake write: poll (sleeps between looks, two writes "
        "per peer at once), spin (the engine's synchronous call, which keeps a core busy) "
        "or auto (poll over tcp, spin over rdma)",
        _ENC,
        check=_choice("auto", "poll", "spin"),
    ),
    Setting(
        "nixl_net_devices",
        "str",
        "auto",
        "network interfaces NIXL's UCX may use (UCX_NET_DEVICES), e.g. eth0 or eth0,eth1; "
        "auto: the interface holding this endpoint's host address (lo on loopback, every "
        "interface for 0.0.0.0); all: every interface",
        _ENDPOINTS,
    ),
    Setting(
        "nixl_rdma_devices",
        "str",
        "",
        "RDMA devices for NIXL, e.g. mlx5_0,mlx5_1 (port 1 unless given as mlx5_0:2); "
        "empty: no RDMA (UCX's InfiniBand module is not loaded)",
        _ENDPOINTS,
    ),
    Setting(
        "nixl_tls",
        "str",
        "",
        "UCX transports for NIXL (UCX_TLS), e.g. tcp; empty: UCX chooses (cma on one host)",
        _ENDPOINTS,
    ),
    Setting(
        "nixl_error_handling",
        "str",
        "peer",
        "UCX endpoint error handling for NIXL: peer (a dead peer fails the write) or none "
        "(a session's first contact is faster, about 6 ms instead of 30 ms here, but UCX "
        "leaves what happens after a peer fails undefined; docs/nixl.md)",
        _ENDPOINTS,
        check=_choice("peer", "none"),
    ),
    Setting(
        "nixl_workers",
        "int",
        4,
        "UCX workers of this process's NIXL agent (1-64): writes posted by different "
        "writer threads run in parallel, each on its own worker",
        _ENDPOINTS,
        check=lambda v: None if 1 <= v <= 64 else f"must be between 1 and 64, got {v}",
    ),
    Setting(
        "local_control",
        "bool",
        True,
        "control messages between an encoder and a language rank on the same host go over a "
        "Unix socket instead of ZeroMQ (fewer thread wake-ups per room; see "
        "docs/performance.md); other peers use ZeroMQ either way",
        _ENDPOINTS,
    ),
    Setting(
        "busy_poll_us",
        "float",
        400.0,
        "microseconds the endpoint's threads keep looking for the next control message "
        "after handling one before they sleep (yielding the CPU to other runnable threads "
        "meanwhile); on the 2-core VM we measure on, whose idle CPUs halt, it took a small "
        "room's latency from 0.45 to 0.26 ms. 0 always sleeps (docs/performance.md)",
        _ENDPOINTS,
        check=_busy_poll,
    ),
    # -- parallelism
    Setting(
        "tp_rank", "int", 0, "this rank's tensor-parallel rank", _ENDPOINTS, check=_non_negative
    ),
    Setting("tp_size", "int", 1, "tensor-parallel size", _ENDPOINTS, check=_positive),
    Setting("dp_size", "int", 1, "data-parallel size", _ENDPOINTS, check=_positive),
    Setting("dp_rank", "int", 0, "this encoder's data-parallel group", _ENC, check=_non_negative),
    # -- time
    Setting(
        "room_timeout",
        "float",
        60.0,
        "seconds a room may go without progress",
        _ENDPOINTS,
        check=_positive,
    ),
    Setting(
        "bootstrap_timeout",
        "float",
        None,
        "seconds a room may stay Bootstrapping (unset: room_timeout)",
        _ENDPOINTS,
        sglang="SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT",
        check=_positive,
        optional=True,
    ),
    Setting(
        "route_refresh",
        "float",
        10.0,
        "seconds a looked-up encoder address is used before it is looked up again "
        "(in the background; an encoder declared dead is looked up at once)",
        _LANG,
        check=_positive,
    ),
    Setting(
        "zero_copy",
        "bool",
        False,
        "hand out an embedding that arrived in the pool as views of the pool instead of "
        "copying it into fresh memory; its blocks stay in use until the receiver is cleared "
        "(the vLLM connector turns it on and lends at most half the pool: docs/vllm.md)",
        _LANG,
    ),
    Setting(
        "stale_write_grace",
        "float",
        30.0,
        "seconds the blocks of an encoder declared dead stay out of use when its "
        "transport cannot fence its writes (mooncake, nixl, shm, cuda_ipc; tcp fences at once)",
        _LANG,
        check=_positive,
    ),
    Setting(
        "heartbeat_interval",
        "float",
        2.0,
        "seconds between heartbeats",
        _ENDPOINTS,
        sglang="SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL",
        check=_positive,
    ),
    Setting(
        "heartbeat_misses",
        "int",
        3,
        "missed heartbeats before a peer is declared dead",
        _ENDPOINTS,
        sglang="SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE",
        check=_at_least_one,
    ),
    Setting(
        "register_interval",
        "float",
        10.0,
        "seconds between an encoder's registrations with the bootstrap server after the "
        "first (a restarted bootstrap server learns the encoder again within this long)",
        _ENC,
        check=_positive,
    ),
    Setting(
        "room_ttl",
        "float",
        600.0,
        "seconds a finished, uncleared room is kept",
        _ENDPOINTS,
        check=_positive,
    ),
    # -- security
    Setting(
        "auth_secret",
        "str",
        None,
        "shared secret for HMAC-authenticated control messages and registrations",
        _ALL,
        optional=True,
        secret=True,
    ),
    # -- what the standalone processes do
    Setting(
        "hook",
        "str",
        "synthetic",
        "encoder: module:function(room, schema) -> Embedding; language: "
        "module:function(room, embedding) called per room; 'synthetic': generated "
        "embeddings, verified byte for byte",
        _ENDPOINTS,
        check=_hook,
    ),
    Setting("seed", "int", 0, "seed of the synthetic embeddings", _ENDPOINTS, check=_non_negative),
    Setting("min_tokens", "int", 64, "shortest synthetic embedding", _ENC, check=_positive),
    Setting("max_tokens", "int", 4096, "longest synthetic embedding", _ENC, check=_positive),
    Setting("rooms", "int", 100, "rooms to request", _LANG, check=_positive),
    Setting("first_room", "int", 0, "id of the first room", _LANG, check=_non_negative),
    Setting("window", "int", 16, "rooms in flight", _LANG, check=_positive),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def settings_for(role: str) -> list[Setting]:
    """The settings a command takes, in table order."""
    return [s for s in SETTINGS if role in s.roles]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_text(s: Setting, text: str) -> Any:
    """Parse an environment value; raises ValueError with the problem."""
    text = text.strip()
    if s.optional and text.lower() in ("", "none"):
        return None
    if s.type == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if s.type == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if s.type == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if s.type == "list":
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return text


def _from_file(s: Setting, value: Any) -> Any:
    """Check a TOML value's type; raises ValueError with the problem."""
    if s.type == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if s.type == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if s.type == "bool" and isinstance(value, bool):
        return value
    if s.type == "str" and isinstance(value, str):
        return value
    if s.type == "list":
        if isinstance(value, str):
            return _from_text(s, value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    want = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "a string",
        "list": "a list of strings",
    }[s.type]
    raise ValueError(f"expected {want}, got {value!r}")


@dataclass
class Config:
    """Resolved settings of one command: :attr:`values` by name and, for each,
    :attr:`sources` (``flag --x``, ``env NAME``, ``file PATH [table]`` or
    ``default``)."""

    role: str
    values: dict[str, Any]
    sources: dict[str, str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def describe(self) -> list[tuple[str, str, str]]:
        """``(name, value, source)`` rows, secrets masked."""
        rows = []
        for name, value in self.values.items():
            shown = "***" if _BY_NAME[name].secret and value else repr(value)
            rows.append((name, shown, self.sources[name]))
        return rows

    def transport_options(self) -> dict[str, dict[str, str]]:
        opts = {"protocol": str(self.values["mooncake_protocol"])}
        if self.values["mooncake_device_name"]:
            opts["device_name"] = str(self.values["mooncake_device_name"])
        if "mooncake_wait" in self.values:
            opts["wait"] = str(self.values["mooncake_wait"])
        # nixl: only what differs from the transport's defaults, so that a
        # user's own UCX_NET_DEVICES still wins over "auto"
        nixl: dict[str, str] = {}
        v = self.values
        if v["nixl_net_devices"] != "auto":
            nixl["net_devices"] = str(v["nixl_net_devices"])
        for key in ("rdma_devices", "tls"):
            if v[f"nixl_{key}"]:
                nixl[key] = str(v[f"nixl_{key}"])
        if v["nixl_error_handling"] != "peer":
            nixl["error_handling"] = str(v["nixl_error_handling"])
        if v["nixl_workers"] != 4:
            nixl["workers"] = str(v["nixl_workers"])
        return {"mooncake": opts, **({"nixl": nixl} if nixl else {})}

    def endpoint_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~embedlink.EncoderEndpoint` or
        :class:`~embedlink.LanguageEndpoint` (by :attr:`role`), schema excluded."""
        v = self.values
        shared = (
            "num_blocks", "block_size", "tp_rank", "tp_size", "dp_size", "host",
            "room_timeout", "bootstrap_timeout", "heartbeat_interval", "heartbeat_misses",
            "room_ttl", "auth_secret", "metrics_port", "device", "local_control",
            "busy_poll_us",
        )  # fmt: skip
        kw: dict[str, Any] = {name: v[name] for name in shared}
        kw.update(transports=tuple(v["transports"]), transport_options=self.transport_options())
        if self.role == "encoder":
            kw.update(
                bootstrap=v["bootstrap"],
                dp_rank=v["dp_rank"],
                advertise_host=v["advertise_host"],
                port=v["port"],
                register_interval=v["register_interval"],
            )
        else:
            kw.update(
                default_tokens=v["default_tokens"],
                route_refresh=v["route_refresh"],
                stale_write_grace=v["stale_write_grace"],
                zero_copy=v["zero_copy"],
            )
        return kw


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
            return data
    except FileNotFoundError:
        raise ConfigError("config", path, "file not found") from None
    except OSError as exc:
        raise ConfigError("config", path, f"cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", path, f"not valid TOML: {exc}") from None


def _file_layers(role: str, path: str, data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(source, {name: value})]`` for the command's table, then the top level;
    unknown keys and tables are errors."""
    top: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in ROLES:
            if not isinstance(value, dict):
                raise ConfigError(key, f"file {path}", "must be a table, e.g. [encoder]")
            tables[key] = value
        elif key in _BY_NAME:
            top[key] = value
        else:
            raise ConfigError(key, f"file {path}", _unknown(key))
    for table, values in tables.items():
        for key in values:
            if key not in _BY_NAME:
                raise ConfigError(key, f"file {path} [{table}]", _unknown(key))
            if table not in _BY_NAME[key].roles:
                raise ConfigError(
                    key, f"file {path} [{table}]", f"does not apply to the {table} command"
                )
    return [(f"file {path} [{role}]", tables.get(role, {})), (f"file {path}", top)]


def _unknown(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(_BY_NAME) + list(ROLES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown setting{hint}"


def load(
    role: str,
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Resolve the settings of command ``role`` (``encoder``, ``language`` or
    ``bootstrap``). ``flags`` maps setting names to what the command line gave
    (None or absent: not given). The file is ``config_file``, else
    ``EMBEDLINK_CONFIG`` from ``env`` (default: ``os.environ``). Raises
    :class:`ConfigError` naming the first bad setting."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    env = os.environ if env is None else env
    flags = flags or {}
    path = config_file or env.get("EMBEDLINK_CONFIG") or None
    layers = _file_layers(role, path, _read_file(path)) if path else []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in settings_for(role):
        value, source = _resolve(s, role, flags, env, layers)
        if value is None and not s.optional:
            raise ConfigError(s.name, source, "must be set")
        if value is not None and s.check is not None:
            problem = s.check(value)
            if problem:
                raise ConfigError(s.name, source, problem)
        values[s.name] = value
        sources[s.name] = source
    _cross_check(values, sources)
    return Config(role, values, sources)


def load_mapping(
    role: str,
    mapping: Mapping[str, Any],
    *,
    source: str,
    refuse: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the settings of ``role`` from a host program's dict (a serving
    engine's connector config), then ``EMBEDLINK_*`` from ``env`` (default:
    none), then defaults. Keys are setting names; values may be typed or text
    (JSON from a command line keeps ``"true"`` and ``"8"`` as strings).
    ``refuse`` maps setting names the host decides itself to the reason.
    Raises :class:`ConfigError` naming the key and ``source``: an unknown key
    (with the nearest name), one for another role, one in ``refuse``, a bad
    value."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    refuse = refuse or {}
    given: dict[str, Any] = {}
    for key, value in mapping.items():
        if key in refuse:
            raise ConfigError(key, source, refuse[key])
        st = _BY_NAME.get(key)
        if st is None:
            raise ConfigError(key, source, _unknown(key))
        if role not in st.roles:
            raise ConfigError(key, source, f"does not apply to the {role} side")
        try:
            if value is None and st.optional:
                given[key] = None
            elif isinstance(value, str) and st.type != "str":
                given[key] = _from_text(st, value)
            else:
                given[key] = _from_file(st, value)
        except ValueError as exc:
            raise ConfigError(key, source, str(exc)) from None
    env = {} if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for st in settings_for(role):
        if st.name in given:
            value, src = given[st.name], source
        else:
            value, src = _resolve(st, role, {}, env, [])
        if value is None and not st.optional:
            raise ConfigError(st.name, src, "must be set")
        if value is not None and st.check is not None:
            problem = st.check(value)
            if problem:
                raise ConfigError(st.name, src, problem)
        values[st.name] = value
        sources[st.name] = src
    _cross_check(values, sources)
    return Config(role, values, sources)


def _resolve(
    s: Setting,
    role: str,
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    layers: list[tuple[str, dict[str, Any]]],
) -> tuple[Any, str]:
    given = flags.get(s.name)
    if given is not None and given != ():
        return (tuple(given) if s.type == "list" else given), f"flag {s.flag}"
    for name in (s.env, s.sglang):
        if name and name in env:
            try:
                return _from_text(s, env[name]), f"env {name}"
            except ValueError as exc:
                raise ConfigError(s.name, f"env {name}", str(exc)) from None
    for source, table in layers:
        if s.name in table:
            try:
                return _from_file(s, table[s.name]), source
            except ValueError as exc:
                raise ConfigError(s.name, source, str(exc)) from None
    return s.default_for(role), "default"


def _cross_check(values: dict[str, Any], sources: dict[str, str]) -> None:
    def fail(name: str, problem: str) -> None:
        raise ConfigError(name, sources[name], problem)

    if "tp_rank" in values and values["tp_rank"] >= values["tp_size"]:
        fail("tp_rank", f"{values['tp_rank']} must be below tp_size={values['tp_size']}")
    if "dp_rank" in values and values["dp_rank"] >= values["dp_size"]:
        fail("dp_rank", f"{values['dp_rank']} must be below dp_size={values['dp_size']}")
    if "min_tokens" in values and values["min_tokens"] > values["max_tokens"]:
        fail("min_tokens", f"{values['min_tokens']} exceeds max_tokens={values['max_tokens']}")
    if "default_tokens" in values:
        pool = values["num_blocks"] * values["block_size"]
        if values["default_tokens"] > pool:
            fail(
                "default_tokens",
                f"{values['default_tokens']} exceeds the pool's {pool} tokens "
                f"(num_blocks x block_size)",
            )
