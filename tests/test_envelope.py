"""The push pipeline end to end: URL verification, the three modes, and hostile requests."""
from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from webhook import crypto
from webhook.config import Settings, decode_aes_key
from webhook.envelope import OpenedPush, open_push, seal_push, verify_url
from webhook.errors import (
    AppIdMismatchError,
    DecryptError,
    MalformedError,
    SignatureError,
    StaleTimestampError,
    WebhookError,
    XMLError,
)
from webhook.events import parse_push, sample_fields
from webhook.signature import sign
from webhook.xmlparse import build_xml, parse_xml

TOKEN = "tok3nValue"
APPID = "wxb11529c136998cb6"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
OLD_AES_KEY = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut"
OTHER_AES_KEY = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefg"
SETTINGS = Settings(token=TOKEN, appid=APPID, encoding_aes_key=AES_KEY, timestamp_tolerance=300)
PLAIN_SETTINGS = Settings(token=TOKEN, timestamp_tolerance=300)
KEY = decode_aes_key(AES_KEY)
MODES = ("plain", "compat", "safe")


def seal(
    fields: dict[str, Any], mode: str, key: bytes = KEY, appid: str = APPID, **kwargs: Any
) -> tuple[dict[str, str], bytes]:
    """seal_push with this module's token, key and appid."""
    return seal_push(fields, token=TOKEN, aes_key=key, appid=appid, mode=mode, **kwargs)


def as_text(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as they come back from XML: every value as text."""
    return {key: str(value) for key, value in fields.items()}


# --- URL verification -------------------------------------------------------

URL_ARGS = {"signature": "f464b24fc39322e44b38aa78f5edd27bd1441696", "timestamp": "1714036504",
            "nonce": "1514711492", "echostr": "7061393459286497133"}


def test_verify_url_known_answer() -> None:
    """The protocol page's URL-verification vector returns echostr verbatim."""
    assert verify_url(URL_ARGS, "AAAAA") == "7061393459286497133"


def test_verify_url_checks_freshness_when_asked() -> None:
    """With a tolerance the same request is accepted near its time and rejected a day later."""
    assert verify_url(URL_ARGS, "AAAAA", now=1714036504 + 10, tolerance=300) == "7061393459286497133"
    with pytest.raises(StaleTimestampError):
        verify_url(URL_ARGS, "AAAAA", now=1714036504 + 86_400, tolerance=300)


@pytest.mark.parametrize(
    "args, token, error",
    [
        (URL_ARGS, "BBBBB", SignatureError),
        ({**URL_ARGS, "signature": ""}, "AAAAA", SignatureError),
        ({k: v for k, v in URL_ARGS.items() if k != "signature"}, "AAAAA", SignatureError),
        ({**URL_ARGS, "nonce": "1514711493"}, "AAAAA", SignatureError),
        ({k: v for k, v in URL_ARGS.items() if k != "echostr"}, "AAAAA", MalformedError),
        ({k: v for k, v in URL_ARGS.items() if k != "nonce"}, "AAAAA", MalformedError),
    ],
)
def test_verify_url_rejects(args: dict[str, str], token: str, error: type[Exception]) -> None:
    """Wrong token, missing or wrong signature: SignatureError; missing echostr or nonce: MalformedError."""
    with pytest.raises(error):
        verify_url(args, token)


# --- the three modes --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_seal_then_open_each_mode(mode: str) -> None:
    """What seal_push builds, open_push opens: same fields, the mode detected from the envelope."""
    fields = sample_fields("user_get_card")
    query, body = seal(fields, mode)
    opened = open_push(query, body, SETTINGS)
    assert opened == OpenedPush(xml=build_xml(fields), fields=as_text(fields), mode=mode)
    assert parse_push(opened.fields).code == "226009850808"


def test_seal_push_query_is_what_weixin_sends() -> None:
    """Query: signature over token/timestamp/nonce, openid from FromUserName, and for aes the msg_signature."""
    fields = sample_fields("user_del_card")
    query, body = seal(fields, "safe", timestamp=1472551036, nonce="123456789")
    assert set(query) == {"signature", "timestamp", "nonce", "openid", "encrypt_type", "msg_signature"}
    assert query["signature"] == sign(TOKEN, "1472551036", "123456789")
    assert query["openid"] == fields["FromUserName"] and query["encrypt_type"] == "aes"
    outer = parse_xml(body)
    assert set(outer) == {"ToUserName", "Encrypt"} and outer["ToUserName"] == fields["ToUserName"]
    assert query["msg_signature"] == sign(TOKEN, "1472551036", "123456789", outer["Encrypt"])
    plain_query, plain_body = seal(fields, "plain", openid="oExplicit")
    assert set(plain_query) == {"signature", "timestamp", "nonce", "openid"} and plain_query["openid"] == "oExplicit"
    assert plain_body == build_xml(fields)


def test_compat_body_carries_plaintext_and_encrypt() -> None:
    """Compat mode: the outer body has every plaintext field plus Encrypt."""
    fields = sample_fields("user_view_card")
    _, body = seal(fields, "compat")
    outer = parse_xml(body)
    assert set(outer) == set(fields) | {"Encrypt"}


def test_seal_push_draws_fresh_numeric_nonces() -> None:
    """Nonces look like Weixin's (digits) and differ between pushes."""
    nonces = {seal(sample_fields("user_del_card"), "plain")[0]["nonce"] for _ in range(20)}
    assert len(nonces) == 20 and all(n.isdigit() for n in nonces)


def test_seal_push_refuses_bad_arguments() -> None:
    """An unknown mode, or safe/compat without key or appid, is a programming error."""
    fields = sample_fields("user_del_card")
    with pytest.raises(ValueError):
        seal(fields, "secret")
    with pytest.raises(ValueError):
        seal_push(fields, token=TOKEN, aes_key=None, appid=APPID, mode="safe")
    with pytest.raises(ValueError):
        seal_push(fields, token=TOKEN, aes_key=KEY, appid=None, mode="compat")


def test_raw_encrypt_type_is_plaintext() -> None:
    """encrypt_type=raw is plaintext mode."""
    query, body = seal(sample_fields("user_del_card"), "plain")
    assert open_push({**query, "encrypt_type": "raw"}, body, PLAIN_SETTINGS).mode == "plain"


def test_plaintext_with_an_encrypt_element_is_not_decrypted() -> None:
    """Without encrypt_type the body is the message, even if it holds an Encrypt element (kept, not opened)."""
    fields = {**sample_fields("user_del_card"), "Encrypt": "not even base64"}
    query, body = seal(fields, "plain")
    opened = open_push(query, body, PLAIN_SETTINGS)
    assert opened.mode == "plain" and opened.fields["Encrypt"] == "not even base64"


def test_compat_mode_trusts_only_the_encrypted_copy() -> None:
    """A tampered plaintext copy in a compat body is ignored: fields come from the decrypted message."""
    fields = sample_fields("user_get_card")
    query, body = seal(fields, "compat")
    tampered = body.replace(b"226009850808", b"666666666666")
    assert tampered != body
    assert open_push(query, tampered, SETTINGS).fields["UserCardCode"] == "226009850808"


def test_previous_key_opens_during_rotation() -> None:
    """A push sealed with the previous EncodingAESKey opens when it is configured as previous."""
    rotated = SETTINGS.with_overrides(previous_encoding_aes_key=OLD_AES_KEY)
    query, body = seal(sample_fields("user_del_card"), "safe", key=decode_aes_key(OLD_AES_KEY))
    assert open_push(query, body, rotated).fields["Event"] == "user_del_card"
    with pytest.raises(DecryptError):
        open_push(query, body, SETTINGS)


def test_unknown_key_is_rejected() -> None:
    """A push sealed with a key we do not hold (current nor previous) is DecryptError."""
    rotated = SETTINGS.with_overrides(previous_encoding_aes_key=OLD_AES_KEY)
    query, body = seal(sample_fields("user_del_card"), "safe", key=decode_aes_key(OTHER_AES_KEY))
    with pytest.raises(DecryptError):
        open_push(query, body, rotated)


def test_wrong_appid_is_rejected() -> None:
    """A push encrypted for another appid is AppIdMismatchError."""
    query, body = seal(sample_fields("user_del_card"), "safe", appid="wxsomeoneelse")
    with pytest.raises(AppIdMismatchError):
        open_push(query, body, SETTINGS)


# --- hostile requests -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_wrong_token_is_rejected(mode: str) -> None:
    """A push signed with another token fails the query signature in every mode."""
    query, body = seal_push(sample_fields("user_del_card"), token="another", aes_key=KEY, appid=APPID, mode=mode)
    with pytest.raises(SignatureError):
        open_push(query, body, SETTINGS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("change", [{"signature": "0" * 40}, {"signature": ""}, {"nonce": "1"}, {"timestamp": "1"}])
def test_tampered_query_is_rejected(mode: str, change: dict[str, str]) -> None:
    """Changing the signature, nonce or timestamp of a sealed push invalidates it."""
    query, body = seal(sample_fields("user_del_card"), mode)
    with pytest.raises(SignatureError):
        open_push({**query, **change}, body, SETTINGS)


def test_missing_signature_is_rejected() -> None:
    """No signature at all is SignatureError."""
    query, body = seal(sample_fields("user_del_card"), "plain")
    del query["signature"]
    with pytest.raises(SignatureError):
        open_push(query, body, SETTINGS)


@pytest.mark.parametrize("mode", ["compat", "safe"])
def test_wrong_or_missing_msg_signature_is_rejected(mode: str) -> None:
    """In encrypted modes msg_signature must be present and match, even when signature is right."""
    query, body = seal(sample_fields("user_del_card"), mode)
    with pytest.raises(SignatureError):
        open_push({**query, "msg_signature": "0" * 40}, body, SETTINGS)
    with pytest.raises(SignatureError):
        open_push({k: v for k, v in query.items() if k != "msg_signature"}, body, SETTINGS)


def test_signature_is_not_accepted_as_msg_signature() -> None:
    """The classic bug: `signature` (over token, timestamp, nonce) is not a valid msg_signature."""
    query, body = seal(sample_fields("user_del_card"), "safe")
    with pytest.raises(SignatureError):
        open_push({**query, "msg_signature": query["signature"]}, body, SETTINGS)


def test_msg_signature_covers_the_ciphertext() -> None:
    """Swapping in another genuine ciphertext (say, a different card) under the same query is rejected."""
    query, body = seal(sample_fields("user_del_card"), "safe")
    other = crypto.encrypt(build_xml(sample_fields("user_del_card", UserCardCode="999")), KEY, APPID)
    forged = build_xml({"ToUserName": "gh_fc0a06a20993", "Encrypt": other})
    with pytest.raises(SignatureError):
        open_push(query, forged, SETTINGS)


@pytest.mark.parametrize("mode", MODES)
def test_signature_is_checked_before_parsing(mode: str) -> None:
    """A forged request with a garbage body fails on the signature: it never reaches the XML parser."""
    query, _ = seal(sample_fields("user_del_card"), mode)
    with pytest.raises(SignatureError):
        open_push({**query, "signature": "0" * 40}, b"<!DOCTYPE garbage", SETTINGS)


@pytest.mark.parametrize("mode", ["compat", "safe"])
def test_msg_signature_is_checked_before_decrypting(mode: str) -> None:
    """A bad msg_signature over undecryptable Encrypt is SignatureError, not DecryptError: no padding oracle."""
    query, _ = seal(sample_fields("user_del_card"), mode)
    with pytest.raises(SignatureError):
        open_push({**query, "msg_signature": "0" * 40}, b"<xml><Encrypt>bad</Encrypt></xml>", SETTINGS)


@pytest.mark.parametrize("offset", [-301, 301, -3600])
def test_stale_and_future_timestamps_are_rejected(offset: int) -> None:
    """A correctly signed push outside the tolerance (replayed or from the future) is StaleTimestampError."""
    stamp = int(time.time()) + offset
    query, body = seal(sample_fields("user_del_card"), "safe", timestamp=stamp)
    with pytest.raises(StaleTimestampError):
        open_push(query, body, SETTINGS)
    assert open_push(query, body, SETTINGS, now=stamp + 5).mode == "safe"


def test_tolerance_zero_accepts_old_pushes() -> None:
    """WECHAT_TIMESTAMP_TOLERANCE=0 turns the freshness check off."""
    query, body = seal(sample_fields("user_del_card"), "safe", timestamp=1410685589)
    assert open_push(query, body, SETTINGS.with_overrides(timestamp_tolerance=0)).mode == "safe"


def test_signed_garbage_timestamp_is_malformed() -> None:
    """A timestamp that is not an integer is MalformedError even when correctly signed."""
    query, body = seal(sample_fields("user_del_card"), "plain")
    stamp = "yesterday"
    query = {**query, "timestamp": stamp, "signature": sign(TOKEN, stamp, query["nonce"])}
    with pytest.raises(MalformedError, match="bad timestamp"):
        open_push(query, body, SETTINGS)


def test_unknown_encrypt_type_is_malformed() -> None:
    """encrypt_type other than absent, raw or aes is MalformedError."""
    query, body = seal(sample_fields("user_del_card"), "safe")
    with pytest.raises(MalformedError, match="encrypt_type"):
        open_push({**query, "encrypt_type": "des"}, body, SETTINGS)


def test_encrypted_push_without_a_configured_key() -> None:
    """An encrypted push to a plaintext-only setup names the missing setting."""
    query, body = seal(sample_fields("user_del_card"), "safe")
    with pytest.raises(MalformedError) as caught:
        open_push(query, body, PLAIN_SETTINGS)
    assert caught.value.reason == "encrypted push but WECHAT_AES_KEY is not set"


@pytest.mark.parametrize("outer", [b"<xml><ToUserName>gh_x</ToUserName></xml>", b"<xml><Encrypt></Encrypt></xml>",
                                   b"<xml><Encrypt><A>1</A></Encrypt></xml>"])
def test_encrypted_push_without_encrypt_element(outer: bytes) -> None:
    """encrypt_type=aes but no usable Encrypt element: MalformedError."""
    query, _ = seal(sample_fields("user_del_card"), "safe")
    with pytest.raises(MalformedError, match="Encrypt"):
        open_push(query, outer, SETTINGS)


def test_decrypted_garbage_is_xml_error() -> None:
    """A correctly encrypted and signed message that is not XML is XMLError."""
    encrypted = crypto.encrypt(b"not xml at all", KEY, APPID)
    body = build_xml({"ToUserName": "gh_x", "Encrypt": encrypted})
    stamp, nonce = str(int(time.time())), "1"
    query = {"signature": sign(TOKEN, stamp, nonce), "timestamp": stamp, "nonce": nonce, "encrypt_type": "aes",
             "msg_signature": sign(TOKEN, stamp, nonce, encrypted)}
    with pytest.raises(XMLError):
        open_push(query, body, SETTINGS)


# --- properties ---------------------------------------------------------------

XML_TEXT = st.text(
    st.one_of(
        st.characters(min_codepoint=0x20, exclude_characters="\ufffe\uffff", exclude_categories=("Cs",)),
        st.sampled_from("\t\n"),
    ),
    max_size=20,
)
_NAME_START = "ABCDEFGHIJKLMNOPQRSTUVWabcdefghijklmnopqrstuvw_"  # no X/x: names starting "xml" are reserved
TAGS = st.builds(str.__add__, st.sampled_from(_NAME_START), st.text(_NAME_START + "XYZ0123456789", max_size=10))
ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
FIELDS = st.dictionaries(TAGS.filter(lambda t: t not in ("Encrypt", "ToUserName", "MsgType")),
                         st.one_of(XML_TEXT, st.integers()), max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    extra=FIELDS,
    to_user=XML_TEXT,
    appid=st.from_regex(r"[A-Za-z0-9_]{1,32}", fullmatch=True),
    aes=st.text(ALNUM, min_size=43, max_size=43),
)
def test_seal_open_round_trip(mode: str, extra: dict[str, Any], to_user: str, appid: str, aes: str) -> None:
    """For any fields, appid and EncodingAESKey, open_push(seal_push(f)) returns f (as stripped text) in every mode."""
    config = Settings(token=TOKEN, appid=appid, encoding_aes_key=aes, timestamp_tolerance=300)
    fields = {"ToUserName": to_user, "MsgType": "event", **extra}
    query, body = seal_push(fields, token=TOKEN, aes_key=decode_aes_key(aes), appid=appid, mode=mode)
    opened = open_push(query, body, config)
    assert opened.fields == {name: str(value).strip(" \t\n") for name, value in fields.items()}
    assert opened.mode == mode


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300),
    args=st.dictionaries(
        st.sampled_from(["signature", "timestamp", "nonce", "encrypt_type", "msg_signature", "openid"]),
        st.text(max_size=50),
    ),
)
def test_fuzz_random_requests_only_raise_webhook_errors(body: bytes, args: dict[str, str]) -> None:
    """Random queries and bodies never escape as anything but a WebhookError."""
    try:
        open_push(args, body, SETTINGS)
    except WebhookError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.builds(lambda t: b"<xml><Encrypt>" + t + b"</Encrypt></xml>", st.binary(max_size=200)),
    ),
    encrypt_type=st.sampled_from([None, "raw", "aes"]),
)
def test_fuzz_signed_garbage_only_raises_webhook_errors(body: bytes, encrypt_type: str | None) -> None:
    """Correctly signed queries (so the fuzz reaches XML and AES) with random bodies raise only WebhookErrors."""
    stamp, nonce = str(int(time.time())), "42"
    query = {"signature": sign(TOKEN, stamp, nonce), "timestamp": stamp, "nonce": nonce}
    if encrypt_type:
        query["encrypt_type"] = encrypt_type
    try:
        outer = parse_xml(body)
        encrypted = outer.get("Encrypt")
        if isinstance(encrypted, str):
            query["msg_signature"] = sign(TOKEN, stamp, nonce, encrypted)
    except WebhookError:
        pass
    try:
        open_push(query, body, SETTINGS)
    except WebhookError:
        pass


@settings(max_examples=200, deadline=None)
@given(ciphertext=st.one_of(st.text(alphabet=ALNUM + "+/=", max_size=200),
                            st.binary(max_size=150).map(lambda b: base64.b64encode(b).decode())))
def test_fuzz_signed_ciphertext_only_raises_webhook_errors(ciphertext: str) -> None:
    """Random (base64) ciphertext under a valid msg_signature reaches decrypt and raises only WebhookErrors."""
    stamp, nonce = str(int(time.time())), "42"
    query = {"signature": sign(TOKEN, stamp, nonce), "timestamp": stamp, "nonce": nonce, "encrypt_type": "aes",
             "msg_signature": sign(TOKEN, stamp, nonce, ciphertext.strip(" \t\n"))}
    body = build_xml({"ToUserName": "gh_x", "Encrypt": ciphertext})
    with pytest.raises(WebhookError):
        open_push(query, body, SETTINGS)
