"""embedlink: move multimodal embeddings from encoder processes to LLM prefill processes.

The public surface is what ``__all__`` lists; everything else is private and
may change. ``tests/unit/test_exported_members.py`` pins it.
"""

from .memory import BlockAllocator, BufferPool
from .protocol import (
    PROTOCOL_VERSION,
    BufferSchema,
    EmbedlinkError,
    FieldSpec,
    LocalProtocolError,
    RemoteProtocolError,
    Status,
    TransferError,
)

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "BlockAllocator",
    "BufferPool",
    "BufferSchema",
    "EmbedlinkError",
    "FieldSpec",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Status",
    "TransferError",
    "__version__",
]
