"""The Mini Program side API: called server-to-server by the merchant's Mini Program backend."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from redis import RedisError
from werkzeug.exceptions import HTTPException
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .cardext import build_card_ext, card_ext_json
from .cardstore import RecordKind, cards, mp_records
from .config import ConfigError
from .store import EventStatus, insert_once, utcnow

log = logging.getLogger("wxcoupon.mp_api")
bp = Blueprint("mp_api", __name__, url_prefix="/api/mp")

MAX_CARDS_PER_RECEIPT = 50  # wx.addCard takes at most this many in one call
MAX_ID = 128  # openids, card ids and codes are far shorter; this bounds what we store
MAX_ENCRYPTED = 512


class InvalidRequestError(Exception):
    """A request body that does not fit; names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def printable(text: str) -> bool:
    """No control characters and no lone surrogates: JSON's \\ud800 escapes decode to those, and no
    UTF-8 key, digest or column can hold them."""
    return not any(c < " " or "\ud800" <= c <= "\udfff" for c in text)


def _text(data: Mapping[str, Any], name: str, *, required: bool = True, max_len: int = MAX_ID, at: str = "") -> str | None:
    field = f"{at}{name}"
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequestError(field, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(field, "must be a string")
    if len(value) > max_len or not printable(value):
        raise InvalidRequestError(field, f"must be at most {max_len} printable characters")
    return value


def _json_body() -> dict[str, Any]:
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser goes: not a ValueError, so not silenced
        data = None
    if not isinstance(data, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    return data


def _authorize() -> Response | None:
    """401 unless the bearer key is MP_API_KEY (constant-time compare)."""
    key: str | None = db.get_settings().mp_api_key
    if not key:
        return _error(503, "mp api disabled: MP_API_KEY is not set", None)
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        resp = _error(401, "missing or wrong bearer key", None)
        resp.headers["WWW-Authenticate"] = 'Bearer realm="wxcoupon"'
        return resp
    return None


def _error(status: int, message: str, field: str | None) -> Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    resp = jsonify(body)
    resp.status_code = status
    return resp


def record_key(kind: RecordKind, card_id: str, encrypt_code: str, mp_openid: str) -> str:
    """Dedupe key of a Mini Program record: a retried call stores nothing new."""
    raw = json.dumps([kind.value, card_id, encrypt_code, mp_openid], ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def insert_record(conn: Connection, row: dict[str, Any]) -> int:
    """Insert a record unless its dedupe key exists; return its id either way."""
    return insert_once(conn, mp_records, row)


def _record_row(kind: RecordKind, card_id: str, encrypt_code: str, mp_openid: str, **extra: Any) -> dict[str, Any]:
    now = utcnow()
    return {
        "dedupe_key": record_key(kind, card_id, encrypt_code, mp_openid),
        "kind": kind.value,
        "card_id": card_id,
        "encrypt_code": encrypt_code,
        "mp_openid": mp_openid,
        "status": EventStatus.PENDING.value,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        "is_success": True,
        **extra,
    }


@bp.before_request
def _check_key() -> Response | None:
    return _authorize()


@bp.post("/card-receipts")
def card_receipts() -> Response:
    """Store the result of wx.addCard; a worker decodes the codes and joins them."""
    data = _json_body()
    mp_openid = _text(data, "mp_openid")
    unionid = _text(data, "unionid", required=False)
    card_list = data.get("card_list")
    if not isinstance(card_list, list) or not card_list:
        raise InvalidRequestError("card_list", "must be a non-empty list")
    if len(card_list) > MAX_CARDS_PER_RECEIPT:
        raise InvalidRequestError("card_list", f"has more than {MAX_CARDS_PER_RECEIPT} cards")
    rows = []
    for i, item in enumerate(card_list):
        at = f"card_list[{i}]."
        if not isinstance(item, dict):
            raise InvalidRequestError(f"card_list[{i}]", "must be an object")
        card_id = _text(item, "card_id", at=at)
        code = _text(item, "code", max_len=MAX_ENCRYPTED, at=at)
        is_success = item.get("is_success", True)
        if not isinstance(is_success, bool):
            raise InvalidRequestError(f"{at}is_success", "must be true or false")
        assert card_id is not None and code is not None and mp_openid is not None  # narrowed by required=True
        rows.append(_record_row(RecordKind.RECEIPT, card_id, code, mp_openid, unionid=unionid, is_success=is_success))
    # Inserted in key order, whatever the list's: two receipts naming the same codes in different orders
    # would otherwise each hold a key the other waits for, and PostgreSQL would abort one as a deadlock.
    ids: dict[str, int] = {}
    with db.get_engine().begin() as conn:
        for row in sorted(rows, key=lambda r: str(r["dedupe_key"])):
            if row["dedupe_key"] not in ids:
                ids[row["dedupe_key"]] = insert_record(conn, row)
    return _accepted([ids[row["dedupe_key"]] for row in rows])


@bp.post("/coupon-entries")
def coupon_entries() -> Response:
    """A user arrived from a coupon's Mini Program entry: link the two openids through the code."""
    data = _json_body()
    card_id = _text(data, "card_id")
    encrypt_code = _text(data, "encrypt_code", max_len=MAX_ENCRYPTED)
    oa_openid = _text(data, "oa_openid")
    mp_openid = _text(data, "mp_openid")
    assert card_id and encrypt_code and oa_openid and mp_openid
    row = _record_row(RecordKind.ENTRY, card_id, encrypt_code, mp_openid, oa_openid=oa_openid)
    with db.get_engine().begin() as conn:
        record_id = insert_record(conn, row)
    return _accepted([record_id])


def _accepted(ids: list[int]) -> Response:
    resp = jsonify({"records": ids, "status": "accepted"})
    resp.status_code = 202
    return resp


@bp.get("/users/<mp_openid>/cards")
def user_cards(mp_openid: str) -> Response:
    """The user's cards with real codes and status, ready for wx.openCard."""
    # Checked like a body's openid: PostgreSQL refuses a NUL in a query's text (which read as "store unavailable").
    if len(mp_openid) > MAX_ID or not printable(mp_openid):
        raise InvalidRequestError("mp_openid", f"must be at most {MAX_ID} printable characters")
    with db.get_engine().connect() as conn:
        rows = conn.execute(
            select(cards.c.card_id, cards.c.code, cards.c.status, cards.c.outer_str, cards.c.updated_at)
            .where(cards.c.mp_openid == mp_openid)
            .order_by(cards.c.id)
        ).mappings()
        found = [
            {**dict(r), "updated_at": r["updated_at"].isoformat() if r["updated_at"] else None, "status": r["status"]}
            for r in rows
        ]
        undecoded = conn.execute(
            select(func.count())
            .select_from(mp_records)
            .where(mp_records.c.mp_openid == mp_openid, mp_records.c.code.is_(None), mp_records.c.is_success.is_(True))
        ).scalar_one()
    return jsonify({"cards": found, "undecoded": int(undecoded)})


@bp.post("/card-ext")
def card_ext() -> Response:
    """A signed cardExt for wx.addCard, with the shared `wx_card` api_ticket."""
    from .weixin_api import WeixinAPIError

    data = _json_body()
    card_id = _text(data, "card_id")
    code = _text(data, "code", required=False)
    openid = _text(data, "openid", required=False)
    outer_str = _text(data, "outer_str", required=False)
    begin = data.get("fixed_begintimestamp")
    if begin is not None and (not isinstance(begin, int) or isinstance(begin, bool) or begin < 0):
        raise InvalidRequestError("fixed_begintimestamp", "must be a unix time in seconds")
    assert card_id is not None
    try:
        ticket = db.get_weixin().get_card_api_ticket()
    except ConfigError as exc:  # no WECHAT_APPID / WECHAT_APPSECRET on this host
        return _error(503, f"weixin api not configured: {exc}", None)
    except RedisError as exc:
        return redis_down(exc)
    except WeixinAPIError as exc:
        log.warning("api_ticket unavailable", extra={"errcode": exc.errcode})
        return _error(502, f"weixin api_ticket unavailable (errcode {exc.errcode})", None)
    ext = build_card_ext(ticket, card_id, code=code, openid=openid, outer_str=outer_str, fixed_begintimestamp=begin)
    return jsonify({"card_id": card_id, "card_ext": card_ext_json(ext)})


def redis_down(exc: RedisError) -> Response:
    """503 for a call that needs Weixin's shared access_token or api_ticket while Redis, which holds them,
    does not answer: the caller may retry, as for the store."""
    log.error("redis unavailable", extra={"error": type(exc).__name__})
    return _error(503, "weixin credentials unavailable: redis unreachable", None)


def _invalid(exc: InvalidRequestError) -> Response:
    return _error(400, f"{exc.field} {exc.problem}", exc.field)


def _store_down(exc: SQLAlchemyError) -> Response:
    log.error("store unavailable", extra={"error": type(exc).__name__})
    return _error(503, "store unavailable", None)


def _http_error(exc: HTTPException) -> Response | HTTPException:
    """Under /api/mp, an HTTP error (unknown path or id, wrong method, an unhandled exception's 500) as
    the API's JSON error, which the Mini Program's backend parses; elsewhere Flask's own page."""
    if not request.path.startswith(f"{bp.url_prefix}/"):
        return exc
    return _error(exc.code or 500, (exc.name or "error").lower(), None)


def init_app(app: Flask) -> None:
    """Register the Mini Program API."""
    app.register_blueprint(bp)
    app.register_error_handler(InvalidRequestError, _invalid)
    app.register_error_handler(SQLAlchemyError, _store_down)
    app.register_error_handler(HTTPException, _http_error)
    if not db.settings_of(app).mp_api_key:
        log.info("MP_API_KEY is not set: /api/mp answers 503")
