"""embedlink: move multimodal embeddings from encoder processes to LLM prefill processes.

The public surface is what ``__all__`` lists; everything else is private and
may change. ``tests/unit/test_exported_members.py`` pins it.
"""

from .bootstrap import BootstrapClient, BootstrapError, BootstrapServer
from .embedding import Embedding
from .endpoints.encoder import EncoderEndpoint, Sender
from .endpoints.language import LanguageEndpoint, Receiver
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
    "BootstrapClient",
    "BootstrapError",
    "BootstrapServer",
    "BufferPool",
    "BufferSchema",
    "Embedding",
    "EmbedlinkError",
    "EncoderEndpoint",
    "FieldSpec",
    "LanguageEndpoint",
    "LocalProtocolError",
    "Receiver",
    "RemoteProtocolError",
    "Sender",
    "Status",
    "TransferError",
    "__version__",
]
