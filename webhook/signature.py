"""Weixin's SHA-1 signatures over sorted strings, and the timestamp freshness check."""
from __future__ import annotations

import hashlib
import hmac
import time

from webhook.errors import MalformedError, SignatureError, StaleTimestampError

# Unix seconds have 10 digits until 2286; the cap keeps int() away from huge inputs.
_MAX_TIMESTAMP_DIGITS = 12


def sign(*parts: str) -> str:
    """SHA-1 hex of the parts sorted lexicographically and concatenated."""
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def verify_signature(signature: str | None, *parts: str) -> None:
    """Raise SignatureError unless `signature` is sign(*parts); parts include the token."""
    if not signature:
        raise SignatureError("missing signature")
    expected = sign(*parts).encode("ascii")
    # compare_digest refuses non-ASCII str, so compare bytes: a hostile query
    # value must fail the check, never raise TypeError.
    if not hmac.compare_digest(expected, signature.encode("utf-8", "surrogatepass")):
        raise SignatureError()


def check_timestamp(timestamp: str | None, tolerance: int, now: float | None = None) -> int:
    """Parse a unix-seconds timestamp; raise StaleTimestampError if off by more than tolerance (0 disables)."""
    # isdigit() alone accepts non-ASCII digits and int() accepts "+1", " 1", "1_0";
    # Weixin sends plain ASCII digits, so anything else is malformed.
    if (
        not timestamp
        or len(timestamp) > _MAX_TIMESTAMP_DIGITS
        or not timestamp.isascii()
        or not timestamp.isdigit()
    ):
        raise MalformedError("bad timestamp")
    value = int(timestamp)
    if tolerance:
        current = time.time() if now is None else now
        if abs(current - value) > tolerance:
            raise StaleTimestampError()
    return value
