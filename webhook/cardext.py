"""cardExt for wx.addCard: the signed JSON string the Mini Program passes along."""
from __future__ import annotations

import json
import secrets
import string
import time

from .signature import sign

_NONCE_ALPHABET = string.ascii_letters + string.digits


def card_signature(api_ticket: str, timestamp: str, card_id: str, code: str, openid: str, nonce_str: str) -> str:
    """SHA-1 of the sorted values; an empty code or openid contributes nothing."""
    return sign(*(part for part in (api_ticket, timestamp, card_id, code, openid, nonce_str) if part))


def build_card_ext(
    api_ticket: str,
    card_id: str,
    *,
    code: str | None = None,
    openid: str | None = None,
    outer_str: str | None = None,
    fixed_begintimestamp: int | None = None,
    timestamp: int | None = None,
    nonce_str: str | None = None,
) -> dict[str, str | int]:
    """The cardExt object for one card; `outer_str` is carried, not signed."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce_str or "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(16))
    ext: dict[str, str | int] = {"timestamp": ts, "nonce_str": nonce}
    if code:
        ext["code"] = code
    if openid:
        ext["openid"] = openid
    if fixed_begintimestamp is not None:
        ext["fixed_begintimestamp"] = int(fixed_begintimestamp)
    if outer_str:
        ext["outer_str"] = outer_str
    ext["signature"] = card_signature(api_ticket, ts, card_id, code or "", openid or "", nonce)
    return ext


def card_ext_json(ext: dict[str, str | int]) -> str:
    """cardExt as wx.addCard wants it: a JSON string."""
    return json.dumps(ext, separators=(",", ":"), ensure_ascii=False)
