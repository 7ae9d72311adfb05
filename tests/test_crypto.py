"""Weixin message encryption: the known answer, round trips, and strict rejection of bad ciphertext."""
from __future__ import annotations

import base64
import struct

import pytest
from Crypto.Cipher import AES
from hypothesis import given, settings, strategies as st

from webhook.config import decode_aes_key
from webhook.crypto import decrypt, encrypt
from webhook.errors import AppIdMismatchError, DecryptError, WebhookError

KEY = decode_aes_key("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")
OLD_KEY = decode_aes_key("ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut")
APPID = "wxb11529c136998cb6"
PREFIX = b"aaaabbbbccccdddd"
MESSAGE = "我是中文abcd123".encode("utf-8")
VECTOR = "jn1L23DB+6ELqJ+6bruv21Y6MD7KeIfP82D6gU39rmkgczbWwt5+3bnyg5K55bgVtVzd832WzZGMhkP72vVOfg=="


def raw_encrypt(plain: bytes, key: bytes = KEY) -> str:
    """Encrypt an already framed and padded plaintext, to build hostile ciphertexts."""
    return base64.b64encode(AES.new(key, AES.MODE_CBC, iv=key[:16]).encrypt(plain)).decode()


def frame(message: bytes, appid: bytes = APPID.encode(), length: int | None = None) -> bytes:
    """Weixin's framing, with the declared length overridable; unpadded."""
    declared = len(message) if length is None else length
    return PREFIX + struct.pack(">I", declared) + message + appid


def pad32(data: bytes) -> bytes:
    n = 32 - len(data) % 32
    return data + bytes([n]) * n


def test_encrypt_known_answer() -> None:
    """With the protocol page's key, appid and random prefix, encrypt() gives the published ciphertext."""
    assert encrypt(MESSAGE, KEY, APPID, random_prefix=PREFIX) == VECTOR


def test_decrypt_known_answer() -> None:
    """The published ciphertext decrypts to the published message."""
    assert decrypt(VECTOR, [KEY], APPID) == MESSAGE
    assert decrypt(VECTOR.encode(), [KEY], APPID) == MESSAGE


def test_encrypt_uses_a_fresh_random_prefix() -> None:
    """Without a given prefix two encryptions of one message differ, and both decrypt."""
    first, second = encrypt(MESSAGE, KEY, APPID), encrypt(MESSAGE, KEY, APPID)
    assert first != second
    assert decrypt(first, [KEY], APPID) == decrypt(second, [KEY], APPID) == MESSAGE


def test_encrypt_pads_to_32_byte_blocks() -> None:
    """A framed plaintext of exactly 32 bytes gets a whole extra 32-byte block of padding."""
    message = b"x" * (64 - 20 - len(APPID))  # framed: exactly 64 bytes
    raw = base64.b64decode(encrypt(message, KEY, APPID, random_prefix=PREFIX))
    assert len(raw) == 20 + len(message) + len(APPID) + 32


def test_encrypt_rejects_a_prefix_of_the_wrong_size() -> None:
    """The random prefix is exactly 16 bytes; anything else is a programming error."""
    with pytest.raises(ValueError):
        encrypt(MESSAGE, KEY, APPID, random_prefix=b"short")


@settings(max_examples=150, deadline=None)
@given(message=st.binary(max_size=600), appid=st.text(max_size=40), key=st.binary(min_size=32, max_size=32))
def test_round_trip(message: bytes, appid: str, key: bytes) -> None:
    """decrypt(encrypt(m)) == m for any bytes, any appid and any key (also checks our CBC against pycryptodome's)."""
    assert decrypt(encrypt(message, key, appid), [key], appid) == message


def test_many_keys_in_one_process() -> None:
    """More distinct keys than the per-thread key-schedule cache holds still decrypt correctly."""
    for i in range(20):
        key = bytes([i]) * 32
        assert decrypt(encrypt(b"<xml/>", key, APPID), [key], APPID) == b"<xml/>"


@pytest.mark.parametrize(
    "plain, reason",
    [
        (frame(MESSAGE) + b"\x00" * 7, "bad padding"),  # pad byte 0
        (pad32(frame(MESSAGE))[:-1] + b"\x21", "bad padding"),  # pad byte 33 > block
        (frame(b"123456789") + b"\x21" * 33, "bad padding"),  # 33 consistent bytes of 33: still > block
        (frame(MESSAGE) + b"\x06" * 6 + b"\x07", "bad padding"),  # inconsistent pad bytes
        (frame(MESSAGE) + b"\x07" * 7, None),  # control: the same frame, validly padded
        (pad32(frame(MESSAGE, length=len(MESSAGE) + len(APPID) + 1)), "bad length"),  # declared too long
        (pad32(frame(MESSAGE, length=2**32 - 1)), "bad length"),
        (b"\x20" * 32, "bad length"),  # all padding: not even a header left
        (PREFIX + b"\x00\x00" + b"\x0e" * 14, "bad length"),  # header cut by padding
    ],
)
def test_decrypt_rejects_malformed_plaintext(plain: bytes, reason: str | None) -> None:
    """Padding outside 1..32, unequal pad bytes, or a length beyond the data: DecryptError with the reason."""
    ciphertext = raw_encrypt(plain)
    if reason is None:
        assert decrypt(ciphertext, [KEY], APPID) == MESSAGE
        return
    with pytest.raises(DecryptError) as caught:
        decrypt(ciphertext, [KEY], APPID)
    assert caught.value.reason == reason
    assert type(caught.value) is DecryptError


def test_declared_length_of_exactly_the_remaining_data_means_no_appid() -> None:
    """The length may swallow the appid: the frame is valid, and the (empty) appid then mismatches."""
    with pytest.raises(AppIdMismatchError):
        decrypt(raw_encrypt(pad32(frame(MESSAGE, length=len(MESSAGE) + len(APPID)))), [KEY], APPID)


@pytest.mark.parametrize(
    "ciphertext, reason",
    [
        (base64.b64encode(base64.b64decode(VECTOR)[:-16]).decode(), "bad padding"),  # truncated by a block
        (base64.b64encode(base64.b64decode(VECTOR)[:-1]).decode(), "bad ciphertext length"),
        (base64.b64encode(b"\x01" * 17).decode(), "bad ciphertext length"),
        ("", "bad ciphertext length"),
        ("not base64!", "invalid base64"),
        (VECTOR[:-2], "invalid base64"),  # missing padding
        (VECTOR[:40] + "\n" + VECTOR[40:], "invalid base64"),  # validate=True: no stray characters
        ("中文", "invalid base64"),
        (b"\xff\xfe", "invalid base64"),
    ],
)
def test_decrypt_rejects_bad_ciphertext(ciphertext: str | bytes, reason: str) -> None:
    """Truncated, misaligned, empty or non-base64 input: DecryptError, never a crash."""
    with pytest.raises(DecryptError) as caught:
        decrypt(ciphertext, [KEY], APPID)
    assert caught.value.reason == reason


@pytest.mark.parametrize("appid", ["wxb11529c136998cb7", "wxb11529c136998cb", "wxb11529c136998cb66", ""])
def test_decrypt_rejects_another_appid(appid: str) -> None:
    """A message for another appid (even a prefix or extension of ours) raises AppIdMismatchError."""
    with pytest.raises(AppIdMismatchError):
        decrypt(VECTOR, [KEY], appid)


def test_previous_key_is_accepted_during_rotation() -> None:
    """A push still encrypted with the previous key opens when keys = (current, previous)."""
    ciphertext = encrypt(MESSAGE, OLD_KEY, APPID, random_prefix=PREFIX)
    assert decrypt(ciphertext, [KEY, OLD_KEY], APPID) == MESSAGE


def test_unknown_key_is_rejected() -> None:
    """A push encrypted with a key we do not hold raises DecryptError."""
    ciphertext = encrypt(MESSAGE, OLD_KEY, APPID, random_prefix=PREFIX)
    with pytest.raises(DecryptError):
        decrypt(ciphertext, [KEY], APPID)


def test_wrong_appid_under_the_previous_key_is_reported_as_mismatch() -> None:
    """If only the previous key fits but the appid is foreign, the error is AppIdMismatchError."""
    ciphertext = encrypt(MESSAGE, OLD_KEY, "wxforeign", random_prefix=PREFIX)
    with pytest.raises(AppIdMismatchError):
        decrypt(ciphertext, [KEY, OLD_KEY], APPID)


def test_decrypt_needs_a_key() -> None:
    """An empty key list is a programming error, not a bad push."""
    with pytest.raises(ValueError):
        decrypt(VECTOR, [], APPID)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_ciphertext_only_raises_webhook_errors(data: bytes) -> None:
    """Random ciphertext (as base64 and raw) is rejected with a WebhookError, never anything else."""
    for value in (base64.b64encode(data), data):
        try:
            decrypt(value, [KEY, OLD_KEY], APPID)
        except WebhookError:
            pass
