"""Data-plane backends, chosen by name; each is imported only when chosen, so a
missing native library matters only to whoever picks that backend (after
vLLM's ``kv_connector/factory.py``)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol

from ..memory import BufferPool
from ..protocol import TransportOffer
from .base import (
    DataPlaneError,
    PeerWriter,
    TransportError,
    TransportServer,
    TransportUnavailable,
    WriteOutOfBounds,
)

__all__ = [
    "Backend",
    "DataPlaneError",
    "PeerWriter",
    "TransportError",
    "TransportServer",
    "TransportUnavailable",
    "WriteOutOfBounds",
    "available",
    "get_backend",
    "register_backend",
    "unregister_backend",
]


class Backend(Protocol):
    """What a backend module provides (as ``BACKEND``)."""

    name: str
    #: True when both pools must be host memory (the sender reads them on the CPU)
    host_memory_only: bool

    def server(
        self, pool: BufferPool, *, host: str, options: Mapping[str, str] | None = None
    ) -> TransportServer:
        """The receiving half for ``pool``, reachable at ``host``."""
        ...

    def reachable(self, offer: TransportOffer, *, host_id: str) -> bool:
        """Whether this process can write to the peer behind ``offer``; never raises."""
        ...

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
        """A writer into the peer's pool (``regions``: field -> bytes)."""
        ...


_REGISTRY: dict[str, str] = {
    "tcp": "embedlink.transports.tcp",
    "shm": "embedlink.transports.shm",
    "mooncake": "embedlink.transports.mooncake",
    "cuda_ipc": "embedlink.transports.cuda_ipc",
    "nixl": "embedlink.transports.nixl",
}


#: backends registered at run time (register_backend), by name
_REGISTERED: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Make ``backend`` (an object with a backend module's ``BACKEND``
    interface) choosable by its ``name`` in ``transports=``, in this process:
    an out-of-tree data plane, or ``embedlink.testing.memory``'s. ValueError
    when the name is taken, unless ``replace``. Both endpoints of a pair must
    have it registered."""
    name = backend.name
    if not replace and (name in _REGISTRY or name in _REGISTERED):
        raise ValueError(f"a transport called {name!r} is already registered")
    _REGISTERED[name] = backend


def unregister_backend(name: str) -> None:
    """Undo :func:`register_backend` (no-op for a name it did not register)."""
    _REGISTERED.pop(name, None)


def available() -> list[str]:
    """Names of every registered backend (whether or not its library is installed)."""
    return [*_REGISTRY, *(n for n in _REGISTERED if n not in _REGISTRY)]


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError for an unknown name,
    TransportUnavailable (with an install hint) when its library is missing."""
    registered = _REGISTERED.get(name)
    if registered is not None:
        return registered
    mod_name = _REGISTRY.get(name)
    if mod_name is None:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(available())}")
    mod = importlib.import_module(mod_name)
    backend: Backend = mod.BACKEND
    return backend
