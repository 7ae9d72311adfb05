"""A push from the wire to its plaintext fields and back: signatures, modes, encryption."""
from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook import crypto
from webhook.config import Settings
from webhook.errors import MalformedError, SignatureError
from webhook.signature import check_timestamp, sign, verify_signature
from webhook.xmlparse import build_xml, parse_xml

MODES = ("plain", "compat", "safe")
_SAFE_OUTER_FIELDS = frozenset({"ToUserName", "Encrypt"})


@dataclass(frozen=True)
class OpenedPush:
    """A verified push: the plaintext message XML, its fields, and the account's mode."""

    xml: bytes
    fields: dict[str, Any]
    mode: str  # "plain" | "compat" | "safe"


def _check_query(args: Mapping[str, str], token: str, tolerance: int, now: float | None) -> tuple[str, str]:
    """Verify `signature` and the timestamp of a request from Weixin; returns (timestamp, nonce)."""
    timestamp = args.get("timestamp")
    nonce = args.get("nonce")
    if timestamp is None or nonce is None:
        raise MalformedError("missing timestamp or nonce")
    # The signature first: a forger learns nothing, not even the clock policy.
    verify_signature(args.get("signature"), token, timestamp, nonce)
    check_timestamp(timestamp, tolerance, now)
    return timestamp, nonce


def check_push_query(args: Mapping[str, str], settings: Settings, now: float | None = None) -> None:
    """Verify a push's query (`signature`, timestamp) before its body is read: a request that is not
    Weixin's is turned away without the server waiting for, or buffering, its body."""
    _check_query(args, settings.token, settings.timestamp_tolerance, now)


def verify_url(args: Mapping[str, str], token: str, now: float | None = None, tolerance: int = 0) -> str:
    """Check Weixin's GET URL verification and return the echostr to send back verbatim."""
    _check_query(args, token, tolerance, now)
    echostr = args.get("echostr")
    if echostr is None:
        raise MalformedError("missing echostr")
    return echostr


def open_push(args: Mapping[str, str], body: bytes, settings: Settings, now: float | None = None) -> OpenedPush:
    """Verify and, in compat/safe mode, decrypt a POSTed push; raises the WebhookError subclasses."""
    timestamp, nonce = _check_query(args, settings.token, settings.timestamp_tolerance, now)
    encrypt_type = args.get("encrypt_type")
    if encrypt_type is None or encrypt_type == "raw":
        # Plaintext mode: an <Encrypt> element, if any, is not ours to trust.
        return OpenedPush(xml=body, fields=parse_xml(body), mode="plain")
    if encrypt_type != "aes":
        raise MalformedError("unknown encrypt_type")
    keys = settings.aes_keys
    if not keys:
        raise MalformedError("encrypted push but WECHAT_AES_KEY is not set")
    if not settings.appid:
        raise MalformedError("encrypted push but WECHAT_APPID is not set")
    # Checked before parsing and decrypting: without msg_signature nothing below
    # can be reached, so a forger gets no padding oracle.
    msg_signature = args.get("msg_signature")
    if not msg_signature:
        raise SignatureError("missing msg_signature")
    outer = parse_xml(body)
    encrypted = outer.get("Encrypt")
    if not isinstance(encrypted, str) or not encrypted:
        raise MalformedError("missing Encrypt")
    verify_signature(msg_signature, settings.token, timestamp, nonce, encrypted)
    xml = crypto.decrypt(encrypted, keys, settings.appid)
    # In compat mode the outer plaintext copy is unauthenticated: use the inner one.
    mode = "safe" if outer.keys() <= _SAFE_OUTER_FIELDS else "compat"
    return OpenedPush(xml=xml, fields=parse_xml(xml), mode=mode)


def _nonce() -> str:
    """A nonce shaped like Weixin's: a decimal number of 9 to 10 digits."""
    return str(secrets.randbelow(9_000_000_000) + 100_000_000)


def seal_push(
    fields: Mapping[str, Any],
    *,
    token: str,
    aes_key: bytes | None,
    appid: str | None,
    mode: str = "safe",
    timestamp: int | None = None,
    nonce: str | None = None,
    openid: str | None = None,
) -> tuple[dict[str, str], bytes]:
    """Build exactly what Weixin sends for `fields` in `mode`: (query dict, body bytes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    once = _nonce() if nonce is None else nonce
    query = {"signature": sign(token, stamp, once), "timestamp": stamp, "nonce": once}
    user = openid if openid is not None else fields.get("FromUserName")
    if user:
        query["openid"] = str(user)
    xml = build_xml(fields)
    if mode == "plain":
        return query, xml
    if aes_key is None or not appid:
        raise ValueError(f"{mode} mode needs aes_key and appid")
    encrypted = crypto.encrypt(xml, aes_key, appid)
    query["encrypt_type"] = "aes"
    query["msg_signature"] = sign(token, stamp, once, encrypted)
    if mode == "safe":
        outer: dict[str, Any] = {"ToUserName": fields.get("ToUserName", ""), "Encrypt": encrypted}
    else:
        outer = {**fields, "Encrypt": encrypted}
    return query, build_xml(outer)
