"""The encoder endpoint's plain counters (:class:`EndpointStats`), which every
part adds to. Counted on the loop thread (one writer), read by anyone."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EndpointStats"]


@dataclass
class EndpointStats:
    """Counters an operator (and the tests) can read."""

    dropped_messages: int = 0
    ignored_inputs: int = 0
    bytes_written: int = 0
    chunks_written: int = 0
    write_failures: int = 0
    dead_sessions: int = 0
    collected_rooms: int = 0
    unauthenticated_messages: int = 0
