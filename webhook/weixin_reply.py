"""Weixin's replies, checked: pure functions from a reply's bytes or dict to the values callers read.

A reply is trusted as little as a request from the Internet: it must be strict
UTF-8 JSON (no NaN, no duplicate keys, no lone surrogates, shallow), its
errcode a 32-bit int that is not one of this client's own, its errmsg is kept
only as short plain text without secrets, and the fields callers read must
have Weixin's types; anything else is WeixinAPIError(ERRCODE_BAD_RESPONSE),
never a parser's exception or a value that breaks a caller later. The typed
errors live here because a reply's errcode picks them; callers import them
from webhook.weixin_api, which re-exports them with the client.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# The client's logger: a bad reply is logged, by path and reason, as one of its calls.
log = logging.getLogger("wxcoupon.weixin")  # the client's logger: under wxcoupon's handlers

DEFAULT_EXPIRES_IN = 7200  # what Weixin grants when a reply omits expires_in
MAX_EXPIRES_IN = 86400  # a credential said to live longer than a day (12x Weixin's grant) is a broken reply
MAX_REPLY_DEPTH = 32  # nesting of a reply (Weixin's go 4 deep); callers and the JSON encoder recurse on it
MAX_ID_CHARS = 128  # codes, openids, card ids, statuses (Weixin's are far shorter); callers store and key on them
MAX_TEXT_CHARS = 2048  # access_token, ticket, url (Weixin reserves 512 for a token); they go into URLs and Redis
MAX_ERRMSG_CHARS = 300  # of Weixin's errmsg kept in an error (it is stored and shown to the Mini Program)

# errcodes this client makes up for failures that have no Weixin errcode.
# Weixin's own codes are -1, 0 and positive, so these never collide.
ERRCODE_NETWORK = -1001  # connection failed or was lost
ERRCODE_TIMEOUT = -1002  # no reply within the timeout
ERRCODE_HTTP = -1003  # HTTP status other than 200
ERRCODE_BAD_RESPONSE = -1004  # reply unusable: too long, not strict JSON, not an object, a field missing or malformed
ERRCODE_LOCK = -1005  # another process holds the refresh lock for too long
_OWN_ERRCODES = frozenset({ERRCODE_NETWORK, ERRCODE_TIMEOUT, ERRCODE_HTTP, ERRCODE_BAD_RESPONSE, ERRCODE_LOCK})


class WeixinAPIError(Exception):
    """A Weixin API call failed; `errcode`/`errmsg` say why, never a secret."""

    def __init__(self, errcode: int, errmsg: str, path: str = "") -> None:
        super().__init__(errcode, errmsg, path)
        self.errcode = errcode
        self.errmsg = errmsg
        self.path = path

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}errcode {self.errcode}: {self.errmsg}"


class TransientWeixinError(WeixinAPIError):
    """Worth retrying later: -1 system busy, HTTP 5xx, 408 or 429, network failure before sending."""


class TokenError(WeixinAPIError):
    """The access_token was refused (40001 not latest, 40014 invalid, 42001 expired)."""


class QuotaError(WeixinAPIError):
    """45009: the daily quota of this API is used up; retrying only makes it worse."""


class InvalidCodeError(WeixinAPIError):
    """40056/40116: Weixin does not know this code (or encrypt_code)."""


class CodeConsumedError(WeixinAPIError):
    """40099: the code has already been consumed."""


class CardUnavailableError(WeixinAPIError):
    """40127: the user deleted the card or is gifting it."""


class TicketExpiredError(WeixinAPIError):
    """72012: the activate_ticket has expired."""


_ERRORS_BY_CODE: dict[int, type[WeixinAPIError]] = {
    -1: TransientWeixinError,
    40001: TokenError,
    40014: TokenError,
    42001: TokenError,
    45009: QuotaError,
    40056: InvalidCodeError,
    40116: InvalidCodeError,
    40099: CodeConsumedError,
    40127: CardUnavailableError,
    72012: TicketExpiredError,
}


# Every errcode of Weixin's the project knows: success, those above, and those that change nothing here but
# that an operator acts on (weixin-protocol.md, README's runbooks, the fake Weixin's answers). The metrics
# count a call by these; any other errcode is one label, "other" (see webhook.metrics).
KNOWN_ERRCODES = frozenset({
    0, *_ERRORS_BY_CODE,
    40002,  # invalid grant_type
    40013,  # invalid appid
    40071,  # invalid card type
    40073,  # invalid card id
    40080,  # invalid cardExt
    40097,  # invalid args
    40125,  # invalid appsecret
    40164,  # the caller's IP is not in the account's whitelist
    41001,  # access_token missing
    41011,  # a required field missing
    45033,  # get_limit exceeded
    47001,  # data format error
})


def error_for(errcode: int, errmsg: str, path: str = "") -> WeixinAPIError:
    """The typed error for a Weixin errcode (WeixinAPIError when it has no class)."""
    return _ERRORS_BY_CODE.get(errcode, WeixinAPIError)(errcode, errmsg, path)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # PostgreSQL text refuses NUL; the rest breaks lines and logs
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a lone one fits no UTF-8 column, Redis key or log


def bad_reply(reason: str, path: str) -> WeixinAPIError:
    """The error for a reply that cannot be used, logged: `reason` is ours, never the reply's text."""
    log.warning("weixin %s errcode=%d: %s", path, ERRCODE_BAD_RESPONSE, reason)
    return WeixinAPIError(ERRCODE_BAD_RESPONSE, reason, path)


# -- strict JSON ------------------------------------------------------------------------------


class _UnusableJSONError(ValueError):
    """JSON the standard parser takes but no caller can use; the message is ours, never the reply's."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as inf, which no int() or column takes
        raise _UnusableJSONError("a number out of range")
    return value


def _no_constant(name: str) -> Any:
    raise _UnusableJSONError("NaN or Infinity")  # Python's extension of JSON


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # which one counts depends on the parser: the reply means nothing for sure
        raise _UnusableJSONError("a duplicate key")
    return obj


_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def parse_reply(raw: bytes, path: str) -> dict[str, Any]:
    """A reply body as a JSON object every caller can use, or the bad-reply error."""
    try:
        # Strict UTF-8: json.loads of bytes would also take UTF-16 and UTF-8-encoded surrogates.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise bad_reply("reply is not UTF-8", path) from None
    try:
        reply = _DECODER.decode(text)
    except _UnusableJSONError as exc:
        raise bad_reply(f"reply has {exc}", path) from None
    except RecursionError:  # not a ValueError: it escaped the old `except ValueError`
        raise bad_reply("reply is nested too deep", path) from None
    except ValueError:
        raise bad_reply("reply is not JSON", path) from None
    if not isinstance(reply, dict):
        raise bad_reply("reply is not a JSON object", path)
    level: list[Any] = [reply]
    depth = 1
    while level:  # level by level, not recursively: the parser may have nearly exhausted the stack
        if depth > MAX_REPLY_DEPTH:
            raise bad_reply("reply is nested too deep", path)
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        depth += 1
    # Strict UTF-8 bytes hold no surrogate: only a \uD800-\uDFFF escape makes one (a pair is a character).
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(reply, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_reply("reply has a lone surrogate", path) from None
    return reply


# -- errcode and errmsg ------------------------------------------------------------------------


def reply_errcode(reply: Mapping[str, Any], path: str) -> int:
    """The reply's errcode, 0 for success (a successful cgi-bin/token reply has none), or the bad-reply error."""
    errcode = reply.get("errcode", 0)
    # type(): bool is an int. Our own codes would pass for a failure that never reached Weixin; an errcode
    # past 32 bits does not fit the column callers store it in. (null and "" once read as 0: success.)
    if type(errcode) is not int or not -(2**31) <= errcode < 2**31 or errcode in _OWN_ERRCODES:
        raise bad_reply("reply has a malformed errcode", path)
    return errcode


def reply_errmsg(value: Any, secrets: Iterable[str | None]) -> str:
    """errmsg as Weixin wrote it, minus `secrets`, kept short, as text any column can hold.

    It reaches the Mini Program (activation results): anything but a string
    is not Weixin's message and could carry anything, so it is dropped.
    """
    if not isinstance(value, str):
        return ""
    for secret in secrets:
        if secret:
            value = value.replace(secret, "***")
    return _CONTROL.sub(" ", value[:MAX_ERRMSG_CHARS])


# -- the fields callers read ---------------------------------------------------------------------


def reply_expires_in(data: Mapping[str, Any], path: str) -> int:
    """Seconds a credential lives: Weixin's grant when the reply omits it. Zero or less, a float, a
    string or past MAX_EXPIRES_IN is a broken reply (cached forever, or a TTL Redis refuses)."""
    value = data.get("expires_in", DEFAULT_EXPIRES_IN)
    if type(value) is not int or not 1 <= value <= MAX_EXPIRES_IN:  # type(): bool is an int too
        raise bad_reply("reply has a malformed expires_in", path)
    return value


def reply_text(data: Mapping[str, Any], name: str, path: str, max_chars: int = MAX_ID_CHARS) -> str:
    """The reply's field `name`: a non-empty string of plain text of at most `max_chars`, or the bad-reply error."""
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise bad_reply(f"reply has no {name}", path)
    if not _is_text(value, max_chars):
        raise bad_reply(f"reply has a malformed {name}", path)
    return value


def _is_text(value: Any, max_chars: int) -> bool:
    """A string a column, a Redis key, a URL or a log line can hold."""
    return isinstance(value, str) and len(value) <= max_chars and not _CONTROL.search(value)


def _is_id(value: Any) -> bool:
    return _is_text(value, MAX_ID_CHARS)


def _is_int64(value: Any) -> bool:
    return type(value) is int and -(2**63) <= value < 2**63  # the BIGINT columns bonus and balance


def _is_form(value: Any) -> bool:
    """{common_field_list, custom_field_list}: lists of {name, ...} objects, as member data is kept."""
    if not isinstance(value, dict):
        return False
    for name in ("common_field_list", "custom_field_list"):
        items = value.get(name)
        if items is not None and not (
            isinstance(items, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items)
        ):
            return False
    return True


# card/code/get: the fields the workers read and store, each with its check when present (null: absent).
_CODE_FIELDS: dict[str, Callable[[Any], bool]] = {
    "openid": _is_id,
    "user_card_status": _is_id,
    "membership_number": _is_id,
    "nickname": lambda value: isinstance(value, str),
    "sex": lambda value: isinstance(value, str),
    "bonus": _is_int64,
    "balance": _is_int64,
    "user_info": _is_form,
}


def _check_fields(data: Mapping[str, Any], checks: Mapping[str, Callable[[Any], bool]], path: str) -> None:
    for name, check in checks.items():
        value = data.get(name)
        if value is not None and not check(value):
            raise bad_reply(f"reply has a malformed {name}", path)


def check_code_reply(data: Mapping[str, Any], path: str) -> None:
    """A card/code/get reply's fields the workers read have Weixin's types, or the bad-reply error."""
    _check_fields(data, _CODE_FIELDS, path)


def check_activate_temp_info_reply(data: Mapping[str, Any], path: str) -> None:
    """An activatetempinfo/get reply has a well-formed `info` form, or the bad-reply error."""
    if data.get("info") is None:
        raise bad_reply("reply has no info", path)
    _check_fields(data, {"info": _is_form}, path)
