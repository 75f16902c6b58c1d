"""Type aliases for identifiers, after vLLM's ``ReqId``."""

from __future__ import annotations

#: A request id, chosen by the serving engine; unique among live requests.
RoomId = int
#: A per-process, per-endpoint identifier, stable for the endpoint's lifetime.
SessionId = str
#: A nonce for one reservation of one room on one language rank. Data or status
#: carrying an old epoch belongs to an earlier request that used the same room
#: id and is refused.
Epoch = int
#: Index of a block in a :class:`~embedlink.memory.BufferPool`.
BlockId = int

__all__ = ["BlockId", "Epoch", "RoomId", "SessionId"]
