"""Standard Webhooks signatures: what the relay sends verifies here and in the reference library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import orjson
import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as ReferenceVerificationError

from relay import signing
from relay.config import parse_signing_secret
from relay.signing import WebhookVerificationError

# The example secret and message of the Standard Webhooks specification.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1_614_265_330
BODY = b'{"test": 2432232314}'


def key(secret: str) -> bytes:
    return parse_signing_secret(secret)


def headers(
    *,
    body: bytes = BODY,
    timestamp: int = TIMESTAMP,
    msg_id: str = MSG_ID,
    secrets: tuple[str, ...] = (SECRET,),
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signing.sign(
            msg_id=msg_id, timestamp=timestamp, body=body, keys=[key(s) for s in secrets]
        ),
    }


def rejection(body: bytes, sent: dict[str, str], secret: str | list[str] = SECRET) -> str:
    with pytest.raises(WebhookVerificationError) as caught:
        signing.verify(body, sent, secret, now=TIMESTAMP)
    return str(caught.value)


def test_a_signed_callback_verifies() -> None:
    """What `sign` produces, `verify` accepts with the same secret."""
    signing.verify(BODY, headers(), SECRET, now=TIMESTAMP)


def test_the_signature_matches_an_independently_computed_hmac() -> None:
    """`v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), computed here from scratch."""
    raw_key = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(raw_key, f"{MSG_ID}.{TIMESTAMP}.".encode() + BODY, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    actual = signing.sign(msg_id=MSG_ID, timestamp=TIMESTAMP, body=BODY, keys=[key(SECRET)])
    assert expected == actual


def test_the_signature_matches_the_specifications_example() -> None:
    """The spec's published example signature comes out byte for byte."""
    actual = signing.sign(msg_id=MSG_ID, timestamp=TIMESTAMP, body=BODY, keys=[key(SECRET)])
    assert "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=" == actual


def test_the_reference_library_verifies_what_the_relay_signs() -> None:
    """The `standardwebhooks` package accepts a relay signature made just now."""
    body = orjson.dumps({"type": "task.success", "data": {"taskId": "tk-hiapi-1", "n": 1}})
    sent = headers(body=body, timestamp=int(time.time()), msg_id="msg_relay_w-1")
    assert orjson.loads(body) == Webhook(SECRET).verify(body, sent)


def test_the_reference_library_rejects_a_relay_signature_under_another_secret() -> None:
    """The reference check fails when the receiver holds a different secret."""
    sent = headers(timestamp=int(time.time()))
    with pytest.raises(ReferenceVerificationError):
        Webhook(OTHER_SECRET).verify(BODY, sent)


def test_rotation_signs_once_per_key_in_order() -> None:
    """Two keys give two space-separated `v1,` signatures, the first key's first."""
    both = signing.sign(
        msg_id=MSG_ID, timestamp=TIMESTAMP, body=BODY, keys=[key(SECRET), key(OTHER_SECRET)]
    )
    expected = " ".join(
        f"v1,{signing.signature(key(s), MSG_ID, TIMESTAMP, BODY)}" for s in (SECRET, OTHER_SECRET)
    )
    assert expected == both


@pytest.mark.parametrize("secret", [SECRET, OTHER_SECRET])
def test_a_rotated_signature_verifies_against_either_secret_alone(secret: str) -> None:
    """During rotation a receiver holding only the old or only the new secret accepts it."""
    signing.verify(BODY, headers(secrets=(SECRET, OTHER_SECRET)), secret, now=TIMESTAMP)


@pytest.mark.parametrize("secret", [SECRET, OTHER_SECRET])
def test_the_reference_library_accepts_a_rotated_signature_with_either_secret(
    secret: str,
) -> None:
    """The reference library finds its match among the rotated signatures."""
    sent = headers(timestamp=int(time.time()), secrets=(SECRET, OTHER_SECRET))
    assert orjson.loads(BODY) == Webhook(secret).verify(BODY, sent)


def test_a_receiver_may_hold_several_secrets() -> None:
    """Verification passes when any one of the receiver's secrets matches."""
    signing.verify(BODY, headers(), [OTHER_SECRET, SECRET], now=TIMESTAMP)


@pytest.mark.parametrize(
    "body",
    [
        b'{"test": 2432232315}',
        b'{"test":2432232314}',
        BODY + b"\n",
        b"",
    ],
)
def test_a_tampered_body_is_rejected(body: bytes) -> None:
    """Any change to the raw body, even whitespace, breaks the signature."""
    assert "no matching signature" == rejection(body, headers())


def test_a_changed_message_id_is_rejected() -> None:
    """The message id is part of what is signed."""
    sent = headers() | {"webhook-id": "msg_other"}
    assert "no matching signature" == rejection(BODY, sent)


def test_the_wrong_secret_is_rejected() -> None:
    """A signature made with one secret does not verify under another."""
    assert "no matching signature" == rejection(BODY, headers(), OTHER_SECRET)


def test_no_secret_at_all_is_rejected() -> None:
    """An empty list of secrets matches nothing."""
    assert "no matching signature" == rejection(BODY, headers(), [])


@pytest.mark.parametrize(
    "signature",
    [
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "v1,",
        "v1,AAAA",
        "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ],
)
def test_signatures_of_other_versions_or_shapes_do_not_match(signature: str) -> None:
    """Only `v1,` entries are compared, and only a full match counts."""
    sent = headers() | {"webhook-signature": signature}
    assert "no matching signature" == rejection(BODY, sent)


def test_a_matching_entry_anywhere_in_the_list_is_enough() -> None:
    """Unknown versions and stale signatures before the good one are skipped."""
    good = headers()["webhook-signature"]
    sent = headers() | {"webhook-signature": f"v2,xyz v1,AAAA {good} v1a,zzz"}
    signing.verify(BODY, sent, SECRET, now=TIMESTAMP)


def test_a_non_ascii_signature_is_rejected_not_raised() -> None:
    """A signature header with non-ASCII text is an ordinary verification failure."""
    sent = headers() | {"webhook-signature": "v1,é"}
    assert "no matching signature" == rejection(BODY, sent)


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-301, "webhook-timestamp is too old"),
        (-3600, "webhook-timestamp is too old"),
        (301, "webhook-timestamp is too far in the future"),
        (86_400, "webhook-timestamp is too far in the future"),
    ],
)
def test_a_timestamp_outside_five_minutes_is_rejected(offset: int, expected: str) -> None:
    """Stale and future messages are refused even when the signature is right."""
    sent = headers(timestamp=TIMESTAMP + offset)
    assert expected == rejection(BODY, sent)


@pytest.mark.parametrize("offset", [-300, -1, 0, 1, 300])
def test_a_timestamp_within_five_minutes_is_accepted(offset: int) -> None:
    """Clock skew up to the tolerance, either way, is fine."""
    signing.verify(BODY, headers(timestamp=TIMESTAMP + offset), SECRET, now=TIMESTAMP)


def test_the_tolerance_can_be_narrowed() -> None:
    """A receiver may demand fresher messages than the default five minutes."""
    sent = headers(timestamp=TIMESTAMP - 31)
    with pytest.raises(WebhookVerificationError) as caught:
        signing.verify(BODY, sent, SECRET, tolerance_s=30, now=TIMESTAMP)
    assert "webhook-timestamp is too old" == str(caught.value)


def test_a_non_integer_timestamp_is_rejected() -> None:
    """The timestamp header is whole epoch seconds."""
    sent = headers() | {"webhook-timestamp": "1614265330.5"}
    assert "webhook-timestamp is not an integer" == rejection(BODY, sent)


MISSING = "missing webhook-id, webhook-timestamp or webhook-signature"


@pytest.mark.parametrize("dropped", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_rejected(dropped: str) -> None:
    """All three headers are required."""
    sent = {k: v for k, v in headers().items() if k != dropped}
    assert MISSING == rejection(BODY, sent)


@pytest.mark.parametrize("emptied", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_an_empty_header_counts_as_missing(emptied: str) -> None:
    """An empty header value is as good as none."""
    assert MISSING == rejection(BODY, headers() | {emptied: ""})


def test_header_names_match_case_insensitively() -> None:
    """Headers as a framework capitalises them still verify."""
    sent = {k.title(): v for k, v in headers().items()}
    assert {"Webhook-Id", "Webhook-Timestamp", "Webhook-Signature"} == set(sent)
    signing.verify(BODY, sent, SECRET, now=TIMESTAMP)


def test_a_malformed_receiver_secret_is_reported_without_its_value() -> None:
    """A bad secret on the receiving side is named as such, and never echoed."""
    bad = "whsec_c2hvcnQ="
    message = rejection(BODY, headers(), bad)
    assert "bad signing secret: must decode to 24-64 bytes, got 5" == message
    assert bad not in message


def test_generated_secrets_parse_and_differ() -> None:
    """A new secret is `whsec_` plus 24 random bytes in base64, different every time."""
    first, second = signing.generate_secret(), signing.generate_secret()
    assert (True, 24, 24) == (
        first.startswith("whsec_"),
        len(parse_signing_secret(first)),
        len(parse_signing_secret(second)),
    )
    assert first != second


def test_the_reference_library_accepts_a_generated_secret() -> None:
    """A generated secret works with both this module and the reference library."""
    secret = signing.generate_secret()
    sent = headers(timestamp=int(time.time()), secrets=(secret,))
    assert orjson.loads(BODY) == Webhook(secret).verify(BODY, sent)
    signing.verify(BODY, sent, secret)
