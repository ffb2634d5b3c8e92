"""Signed feedback tokens: permission to give feedback on one trace, as one end user, until a deadline.

A token is ``v1.<payload>.<signature>``: the payload is base64url JSON naming the trace ID, the client
request ID, the end user (or null for an anonymous answer) and the expiry (Unix seconds); the signature
is HMAC-SHA256 over ``v1.<payload>`` with the service's secret. The IDs are not secret (they travel in
headers anyway); what the token adds is that nobody without the secret can make one, or change the
trace, user or expiry of one they were given.

Key rotation: the first secret signs, every secret verifies. Keep the previous secret in the list for
one token lifetime after a rotation, then drop it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

_VERSION = "v1"
_MIN_SECRET_BYTES = 16


class TokenError(Exception):
    """A token that grants nothing; `status` is 401 (missing, malformed, forged, expired) or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class FeedbackGrant:
    """What a valid token allows: feedback on `trace_id` by `user_id` (None: the answer was anonymous)."""

    trace_id: str
    client_request_id: str
    user_id: str | None
    expires_at: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Decode unpadded base64url strictly: only the one encoding `_b64` gives is accepted (no padding, no
    stray bits), so a token has exactly one spelling and a signature cannot be altered and still pass."""
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:
        raise ValueError("not the canonical encoding")
    return raw


def as_secret_list(secret: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    """The secrets as bytes, the signing one first; rejects short or empty ones."""
    items: Sequence[str | bytes] = [secret] if isinstance(secret, str | bytes) else secret
    keys = [s.encode() if isinstance(s, str) else bytes(s) for s in items]
    if not keys:
        raise ValueError("feedback_secret is an empty list")
    if any(len(k) < _MIN_SECRET_BYTES for k in keys):
        raise ValueError(f"feedback_secret must be at least {_MIN_SECRET_BYTES} bytes (use e.g. secrets.token_hex(32))")
    return keys


class FeedbackTokens:
    """Issues and checks feedback tokens with `secrets` (the first signs, all verify)."""

    def __init__(self, secrets: Sequence[bytes], ttl_seconds: float) -> None:
        self._keys = list(secrets)
        self.ttl_seconds = ttl_seconds

    def issue(self, trace_id: str, client_request_id: str, user_id: str | None, now: float | None = None) -> str:
        """A token for feedback on `trace_id` by `user_id`, valid for `ttl_seconds`."""
        expires = int((time.time() if now is None else now) + self.ttl_seconds)
        payload = json.dumps({"t": trace_id, "r": client_request_id, "u": user_id, "e": expires}, separators=(",", ":"))
        signed = f"{_VERSION}.{_b64(payload.encode())}"
        return f"{signed}.{_b64(self._sign(self._keys[0], signed.encode()))}"

    def verify(self, token: str, now: float | None = None) -> FeedbackGrant:
        """The grant a token carries; TokenError (401) if it is malformed, not ours, or expired."""
        if not token.isascii():  # before any encoding: a lone surrogate must be a 401, not a crash
            raise TokenError(401, "the feedback token is malformed")
        version, _, rest = token.partition(".")
        payload_b64, _, signature_b64 = rest.partition(".")
        if version != _VERSION or not payload_b64 or not signature_b64 or len(token) > 2048:
            raise TokenError(401, "the feedback token is malformed")
        try:
            signature = _unb64(signature_b64)
        except (binascii.Error, ValueError):
            raise TokenError(401, "the feedback token is malformed") from None
        signed = f"{version}.{payload_b64}".encode()
        # Every key is tried, each in constant time: how far a forgery got is never observable.
        matches = [hmac.compare_digest(self._sign(key, signed), signature) for key in self._keys]
        if not any(matches):
            raise TokenError(401, "the feedback token is not valid (forged, altered, or signed with a retired key)")
        try:
            claims = json.loads(_unb64(payload_b64))
            grant = FeedbackGrant(str(claims["t"]), str(claims["r"]), claims["u"], int(claims["e"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise TokenError(401, "the feedback token is malformed") from None
        if grant.expires_at < (time.time() if now is None else now):
            raise TokenError(401, "the feedback token has expired")
        return grant

    @staticmethod
    def _sign(key: bytes, signed: bytes) -> bytes:
        return hmac.new(key, signed, hashlib.sha256).digest()
