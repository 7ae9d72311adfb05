"""Signatures and timestamp freshness: known answers, constant-time rejection, strict parsing."""
from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from webhook.errors import MalformedError, SignatureError, StaleTimestampError
from webhook.signature import check_timestamp, sign, verify_signature

URL_VECTOR = ("AAAAA", "1714036504", "1514711492", "f464b24fc39322e44b38aa78f5edd27bd1441696")
PUSH_VECTOR = ("test", "1410685589", "test", "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff")


@pytest.mark.parametrize("token, timestamp, nonce, expected", [URL_VECTOR, PUSH_VECTOR])
def test_sign_matches_known_answers_in_any_argument_order(
    token: str, timestamp: str, nonce: str, expected: str
) -> None:
    """sign() reproduces the protocol page's vectors, whatever order the parts are given in."""
    for parts in itertools.permutations((token, timestamp, nonce)):
        assert sign(*parts) == expected


def test_sign_sorts_lexicographically_then_concatenates() -> None:
    """Parts are sorted as strings ("10" < "9"), joined without separator, SHA-1 hex."""
    assert sign("9", "10", "b") == hashlib.sha1(b"109b").hexdigest()


def test_verify_signature_accepts_the_right_signature() -> None:
    """A correct signature passes silently."""
    token, timestamp, nonce, expected = PUSH_VECTOR
    verify_signature(expected, token, timestamp, nonce)


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "f21891de399b4e33a1a93c9a7b8a8fffb5a443fe",  # last digit changed
        "F21891DE399B4E33A1A93C9A7B8A8FFFB5A443FF",  # Weixin sends lowercase; no normalising
        "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff0",  # a prefix match is not a match
        "f21891de399b4e33a1a93c9a7b8a8fffb5a443f",
        "中文",  # non-ASCII must be rejected, not raise TypeError from compare_digest
        "\udcff",  # a lone surrogate from a badly decoded query string
    ],
)
def test_verify_signature_rejects_missing_or_wrong(signature: str | None) -> None:
    """Anything other than the exact hex digest raises SignatureError."""
    token, timestamp, nonce, _ = PUSH_VECTOR
    with pytest.raises(SignatureError):
        verify_signature(signature, token, timestamp, nonce)


def test_verify_signature_binds_the_token() -> None:
    """A signature made with another token is rejected."""
    _, timestamp, nonce, _ = PUSH_VECTOR
    with pytest.raises(SignatureError):
        verify_signature(sign("other", timestamp, nonce), "test", timestamp, nonce)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.text(max_size=40), min_size=1, max_size=5),
    forged=st.from_regex(r"[0-9a-f]{40}", fullmatch=True),
)
def test_verify_signature_property(parts: list[str], forged: str) -> None:
    """For any parts, sign() verifies, and any other 40-hex string does not."""
    verify_signature(sign(*parts), *parts)
    if forged != sign(*parts):
        with pytest.raises(SignatureError):
            verify_signature(forged, *parts)


NOW = 1_700_000_000.0


@pytest.mark.parametrize("offset", [0, 299, 300, -300, -12])
def test_check_timestamp_accepts_within_tolerance(offset: int) -> None:
    """A timestamp up to `tolerance` seconds away (either side, inclusive) is returned as int."""
    assert check_timestamp(str(int(NOW) + offset), 300, now=NOW) == int(NOW) + offset


@pytest.mark.parametrize("offset", [-301, 301, -86_400, 10**9])
def test_check_timestamp_rejects_stale_and_future(offset: int) -> None:
    """Past the tolerance, in the past (replay) or the future, raises StaleTimestampError."""
    with pytest.raises(StaleTimestampError):
        check_timestamp(str(int(NOW) + offset), 300, now=NOW)


def test_tolerance_zero_disables_the_freshness_check() -> None:
    """With tolerance 0 an ancient timestamp is accepted (still parsed)."""
    assert check_timestamp("1410685589", 0, now=NOW) == 1410685589


def test_check_timestamp_defaults_to_the_clock() -> None:
    """Without `now`, the real clock is used: a 1970 timestamp is stale."""
    with pytest.raises(StaleTimestampError):
        check_timestamp("1", 300)


@pytest.mark.parametrize(
    "timestamp",
    [None, "", "abc", "12.5", "-1700000000", "+1700000000", " 1700000000", "1700000000 ", "1_700_000_000",
     "١٧٠٠٠٠٠٠٠٠", "1" * 13, "0x10"],
)
@pytest.mark.parametrize("tolerance", [0, 300])
def test_check_timestamp_rejects_non_integers(timestamp: str | None, tolerance: int) -> None:
    """Missing or non-plain-digit timestamps are MalformedError, whatever the tolerance."""
    with pytest.raises(MalformedError, match="bad timestamp"):
        check_timestamp(timestamp, tolerance, now=NOW)
