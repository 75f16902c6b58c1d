"""SGLang's ``KVPoll`` values and embedlink's :class:`~embedlink.Status`.

SGLang's disaggregation code polls senders and receivers for a ``KVPoll``
whose numbering differs from the seed's (it counts ``Failed`` first)::

    KVPoll:  Failed=0  Bootstrapping=1  WaitingForInput=2  Transferring=3  Success=4
    Status:  Bootstrapping=0  WaitingForInput=1  Transferring=2  Success=3  Failed=4

The names mean the same things, so the mapping is by name. Wiring a serving
engine's request lifecycle to embedlink:

* encode side: ``tx = encoder_endpoint.sender(room=req.bootstrap_room)``; after
  the vision tower ran, ``tx.send(Embedding(...))`` (or ``tx.buffer(n)`` then
  ``tx.commit()``); the scheduler's poll loop calls ``to_kvpoll(tx.poll())``
  and releases the request on ``Success`` or ``Failed`` (``tx.failure_reason``),
  then ``tx.clear()``.
* prefill side: ``rx = language_endpoint.receiver(bootstrap=addr,
  room=req.bootstrap_room)`` when the request is admitted; poll
  ``to_kvpoll(rx.poll())``; on ``Success`` take ``rx.wait(0)`` (the reassembled
  embedding; resumes already happened inside embedlink), on ``Failed`` abort
  the request with ``rx.failure_reason``; ``rx.clear()`` when done.
"""

from __future__ import annotations

import enum

from ..protocol import Status

__all__ = ["KVPoll", "from_kvpoll", "to_kvpoll"]


class KVPoll(enum.IntEnum):
    """SGLang's poll values (``sglang.srt.disaggregation.base.conn.KVPoll``)."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


def to_kvpoll(status: Status) -> KVPoll:
    """The ``KVPoll`` SGLang expects for an embedlink status."""
    return KVPoll[Status(status).name]


def from_kvpoll(value: int) -> Status:
    """The embedlink status for a ``KVPoll`` value; ValueError for anything else."""
    try:
        return Status[KVPoll(value).name]
    except ValueError:
        raise ValueError(f"{value!r} is not a KVPoll value (0..4)") from None
