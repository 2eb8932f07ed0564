"""Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).

`sign` is what the relay sends; `verify` is for receivers written in Python and checks exactly what
any Standard Webhooks library checks, so either side can be swapped for another implementation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

from relay.config import parse_signing_secret

DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """The callback is not authentic or not fresh; the message never contains a secret."""


def generate_secret() -> str:
    """A new random signing secret in `whsec_<base64>` form (24 bytes, as the spec's libraries make)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The base64 HMAC for one key (without the `v1,` prefix)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(*, msg_id: str, timestamp: int, body: bytes, keys: Sequence[bytes]) -> str:
    """The `webhook-signature` header value: one `v1,<sig>` per key, space-separated (rotation)."""
    return " ".join(f"v1,{signature(key, msg_id, timestamp, body)}" for key in keys)


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received callback; raise WebhookVerificationError unless it is authentic and fresh.

    `body` must be the raw request bytes. `secret` is one `whsec_...` string, or several (any one
    matching is enough, so receivers can rotate too). Header names are matched case-insensitively.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    raw_timestamp = lowered.get("webhook-timestamp")
    raw_signature = lowered.get("webhook-signature")
    if not msg_id or not raw_timestamp or not raw_signature:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")

    secret_list = [secret] if isinstance(secret, str) else list(secret)
    try:
        keys = [parse_signing_secret(s) for s in secret_list]
    except ValueError as exc:
        raise WebhookVerificationError(f"bad signing secret: {exc}") from None
    # Compare bytes: compare_digest refuses str with non-ASCII text, which a peer may send.
    expected = [signature(key, msg_id, timestamp, body).encode() for key in keys]
    for entry in raw_signature.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        presented = value.encode()
        if any(hmac.compare_digest(presented, candidate) for candidate in expected):
            return
    raise WebhookVerificationError("no matching signature")
