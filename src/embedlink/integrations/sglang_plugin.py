"""The ``sglang.srt.plugins`` entry point: carry SGLang's encoder
disaggregation (EPD, ``--encoder-transfer-backend zmq_to_scheduler``) over
embedlink.

SGLang runs every installed plugin in its main processes and scheduler ranks
(``sglang.srt.plugins.load_plugins``), so this module costs nothing unless
``EMBEDLINK_SGLANG=1``. Enabled, :func:`register` checks the installed SGLang
and every seam it replaces; on any mismatch it logs one error naming what
changed and replaces nothing, leaving SGLang's own path as it was. See
docs/sglang.md.
"""

from __future__ import annotations

import inspect
import logging
import os
from importlib import metadata

log = logging.getLogger("embedlink.sglang")

__all__ = ["ENABLE", "SUPPORTED", "check_seams", "register"]

#: The SGLang releases the plugin is tested with (the ``sglang`` extra pins it).
SUPPORTED = ("0.5.23",)
#: The environment variable that turns the plugin on.
ENABLE = "EMBEDLINK_SGLANG"

RECEIVER = "sglang.srt.disaggregation.encoder.receiver"
SERVER = "sglang.srt.disaggregation.encoder.server"
#: What is replaced, by dotted path (SGLang's HookRegistry targets).
WAITING = f"{RECEIVER}.WaitingZmqRequest"
DELIVERY = f"{SERVER}.ZmqDelivery"

# The constructor parameters the scheduler passes (MMReceiverHTTP.
# _process_waiting_requests) and the delivery's: a change means a call the
# replacement would not understand.
_WAITING_PARAMS = (
    "rid",
    "recv_req",
    "mm_processor",
    "encoder_urls",
    "model_type",
    "host_name",
    "receive_count",
    "embedding_pool",
    "zmq_context",
    "embedding_port",
    "registration_runner",
)
_WAITING_ABSTRACT = {
    "send_encode_request",
    "_extract_embedding_from_buffer",
    "_prepare_embedding_buffer",
}
_WAITING_USED = (
    "_try_recv_mm_data",
    "consume_parts",
    "_fail_and_release",
    "release_resources",
    "_finish_assemble",
    "close_recv_socket",
)
_DELIVERY_ABSTRACT = {"send", "release"}


def check_seams() -> list[str]:
    """What differs from the SGLang the plugin was written against (empty:
    nothing). Imports SGLang's encoder modules."""
    import importlib

    problems: list[str] = []
    try:
        receiver = importlib.import_module(RECEIVER)
        server = importlib.import_module(SERVER)
    except Exception as exc:  # a moved module is a changed seam
        return [f"cannot import SGLang's EPD modules: {type(exc).__name__}: {exc}"]
    base = getattr(receiver, "WaitingMMRequestBase", None)
    waiting = getattr(receiver, "WaitingZmqRequest", None)
    if base is None or waiting is None:
        problems.append(f"{RECEIVER} has no WaitingMMRequestBase / WaitingZmqRequest")
    else:
        if getattr(base, "__abstractmethods__", set()) != _WAITING_ABSTRACT:
            problems.append(
                f"WaitingMMRequestBase's abstract methods are "
                f"{sorted(getattr(base, '__abstractmethods__', set()))}, "
                f"expected {sorted(_WAITING_ABSTRACT)}"
            )
        params = list(inspect.signature(base.__init__).parameters)[1:]
        missing = [p for p in _WAITING_PARAMS if p not in params]
        if missing:
            problems.append(f"WaitingMMRequestBase.__init__ lacks {missing} (has {params})")
        for name in _WAITING_USED:
            if not callable(getattr(waiting, name, None)):
                problems.append(f"WaitingZmqRequest has no {name}()")
        http = getattr(receiver, "MMReceiverHTTP", None)
        src = _source(getattr(http, "process_waiting_requests", None))
        if "WaitingZmqRequest" not in src:
            problems.append(
                "MMReceiverHTTP.process_waiting_requests no longer looks up WaitingZmqRequest "
                "by name (a replacement would never be built)"
            )
    delivery_base = getattr(server, "EncoderDelivery", None)
    delivery = getattr(server, "ZmqDelivery", None)
    if delivery_base is None or delivery is None:
        problems.append(f"{SERVER} has no EncoderDelivery / ZmqDelivery")
    else:
        abstract: set[str] = set(getattr(delivery_base, "__abstractmethods__", set()))
        if abstract != _DELIVERY_ABSTRACT:
            problems.append(
                f"EncoderDelivery's abstract methods are {sorted(abstract)}, "
                f"expected {sorted(_DELIVERY_ABSTRACT)}"
            )
        params = list(inspect.signature(delivery.__init__).parameters)[1:]
        if params != ["encoder", "cleanup_receive_state"]:
            problems.append(
                f"ZmqDelivery.__init__ takes {params}, expected ['encoder', 'cleanup_receive_state']"
            )
        encoder = getattr(server, "MMEncoder", None)
        if "ZmqDelivery(" not in _source(getattr(encoder, "__init__", None)):
            problems.append(
                "MMEncoder.__init__ no longer builds ZmqDelivery by name "
                "(a replacement would never be built)"
            )
    data = getattr(receiver, "EmbeddingData", None)
    if data is None or not callable(getattr(data, "copy_without_embedding", None)):
        problems.append("EmbeddingData.copy_without_embedding() is gone")
    try:
        from sglang.srt.utils.common import safe_pickle_loads  # noqa: F401
    except ImportError as exc:
        problems.append(f"sglang.srt.utils.common.safe_pickle_loads is gone: {exc}")
    return problems


def _source(fn: object) -> str:
    try:
        return inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def register() -> None:
    """The plugin's entry point (SGLang calls it in each of its processes).
    Never raises: SGLang only logs a plugin's exceptions, so every refusal is
    one error line here instead, and SGLang's own classes stay."""
    if os.environ.get(ENABLE, "") != "1":
        log.debug("embedlink: SGLang plugin installed but off (set %s=1)", ENABLE)
        return
    try:
        have = metadata.version("sglang")
    except metadata.PackageNotFoundError:
        log.error("embedlink: %s=1 but SGLang is not installed; nothing replaced", ENABLE)
        return
    if have not in SUPPORTED:
        log.error(
            "embedlink: the SGLang plugin supports sglang %s, sglang %s is installed "
            "(pip install 'embedlink[sglang]'); nothing replaced, SGLang's own path stays",
            ", ".join(SUPPORTED),
            have,
        )
        return
    problems = check_seams()
    if problems:
        log.error(
            "embedlink: SGLang %s changed where the plugin hooks in; nothing replaced, "
            "SGLang's own path stays: %s",
            have,
            "; ".join(problems),
        )
        return
    from . import sglang as impl

    impl.install()
