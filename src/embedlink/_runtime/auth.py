"""Optional shared-secret authentication (HMAC-SHA256).

With a secret set (``auth_secret=`` on the endpoints and the bootstrap server,
or the ``EMBEDLINK_AUTH_SECRET`` environment variable), every control message
travels as ``tag || payload`` where ``tag`` is the 32-byte HMAC-SHA256 of the
payload, and every bootstrap registration carries the hex tag of its body in
the ``X-Embedlink-Auth`` header. Anything whose tag does not verify is dropped
(control plane) or refused with 401 (bootstrap), and counted. Both sides of a
deployment must share the secret; it authenticates, it does not encrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import os

__all__ = ["AUTH_HEADER", "Authenticator", "resolve_secret"]

AUTH_HEADER = "X-Embedlink-Auth"
_TAG = 32


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """The secret to use: the argument, else ``EMBEDLINK_AUTH_SECRET``, else none."""
    if secret is None:
        secret = os.environ.get("EMBEDLINK_AUTH_SECRET") or None
    if secret is None:
        return None
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("auth secret must not be empty")
    return key


class Authenticator:
    """Seals and opens control frames; a no-op without a secret."""

    def __init__(self, secret: str | bytes | None) -> None:
        self.key = resolve_secret(secret)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def tag(self, payload: bytes) -> bytes:
        assert self.key is not None
        return hmac.new(self.key, payload, hashlib.sha256).digest()

    def seal(self, payload: bytes) -> bytes:
        return payload if self.key is None else self.tag(payload) + payload

    def open(self, frame: bytes) -> bytes | None:
        """The payload, or ``None`` when the frame's tag does not verify."""
        if self.key is None:
            return frame
        if len(frame) < _TAG:
            return None
        tag, payload = frame[:_TAG], frame[_TAG:]
        return payload if hmac.compare_digest(tag, self.tag(payload)) else None

    def header(self, body: bytes) -> dict[str, str]:
        return {} if self.key is None else {AUTH_HEADER: self.tag(body).hex()}

    def verify_header(self, body: bytes, value: str | None) -> bool:
        if self.key is None:
            return True
        return value is not None and hmac.compare_digest(value, self.tag(body).hex())
