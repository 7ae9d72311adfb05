"""The Mini Program API for member cards: activation plug-in parameters, activations, registrations.

Same bearer key, JSON bodies and 400-with-field errors as mp_api.py. Requests
are recorded at once (202) and handled by a worker (workers/activation.py);
the Mini Program polls GET /api/mp/activations/<id> for the result.
"""
from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Flask, Response, jsonify, request
from redis import RedisError

from . import db
from .config import ConfigError
from .members import (
    COMMON_FIELD_IDS,
    FIELD_ID_ALIASES,
    MAX_CARD_ID,
    PLUGIN_APPID,
    ActivationKind,
    ActivationResult,
    activation_key,
    get_activation,
    insert_activation,
)
from .mp_api import (
    MAX_ENCRYPTED,
    MAX_ID,
    InvalidRequestError,
    _authorize,
    _error,
    _json_body,
    _text,
    printable,
    redis_down,
)
from .pii import DATA_KEY_VARIABLE, cipher_for
from .store import ROW_ID_CONVERTER, EventStatus, utcnow

log = logging.getLogger("wxcoupon.mp_members")
bp = Blueprint("mp_members", __name__, url_prefix="/api/mp")

MAX_TICKET = 512
MAX_FIELD_VALUE = 256  # characters of one form value (an address is the longest)
MAX_CUSTOM_FIELDS = 20
PLUGIN_PARAMS = ("encrypt_card_id", "outer_str", "biz")


def plugin_params(url: str) -> dict[str, str]:
    """encrypt_card_id, outer_str and biz from activate/geturl's URL, URL-decoded.

    Decoded with `unquote`, not as a form: a raw `+` in base64 stays a `+`.
    """
    found: dict[str, str] = {}
    for part in urlsplit(url).query.split("&"):
        name, _, value = part.partition("=")
        name = unquote(name)
        if name in PLUGIN_PARAMS and name not in found:
            found[name] = unquote(value)
    return found


def _value(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(at, "must be a non-empty string")
    if len(value) > MAX_FIELD_VALUE or not printable(value):
        raise InvalidRequestError(at, f"must be at most {MAX_FIELD_VALUE} printable characters")
    return value


def _form_values(data: dict[str, Any], name: str, *, ids: bool) -> dict[str, Any]:
    """A {field: value} object of a registration: Weixin's field ids (`ids`) or custom field names."""
    raw = data.get(name)
    if raw is None and not ids:
        return {}
    if not isinstance(raw, dict) or (ids and not raw):
        raise InvalidRequestError(name, "must be a non-empty object of field: value" if ids else "must be an object")
    if len(raw) > MAX_CUSTOM_FIELDS:
        raise InvalidRequestError(name, f"has more than {MAX_CUSTOM_FIELDS} fields")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        at = f"{name}.{key}"
        if ids:
            key = FIELD_ID_ALIASES.get(key, key)
            if key not in COMMON_FIELD_IDS:
                raise InvalidRequestError(at, "is not a USER_FORM_INFO_FLAG_* field id")
            if key in out:  # ..._EDUCATION_BACKGROUND and ..._BACKGRO both: one value would be dropped
                raise InvalidRequestError(at, f"is {key} again (one field, two names)")
        elif len(key) > MAX_ID or not printable(key):
            raise InvalidRequestError(at, f"must be a name of at most {MAX_ID} printable characters")
        if isinstance(value, list) and not ids:
            out[key] = [_value(v, f"{at}[{i}]") for i, v in enumerate(value)]
        else:
            out[key] = _value(value, at)
    return out


def _data_key_missing() -> Response | None:
    """503 while member data cannot be stored (no WXCOUPON_DATA_KEY)."""
    if db.get_settings().data_keys:
        return None
    return _error(503, f"member data storage disabled: {DATA_KEY_VARIABLE} is not set", None)


def _new_row(kind: ActivationKind, card_id: str, encrypt_code: str, mp_openid: str, **extra: Any) -> dict[str, Any]:
    now = utcnow()
    return {
        "kind": kind.value, "card_id": card_id, "encrypt_code": encrypt_code, "mp_openid": mp_openid,
        "status": EventStatus.PENDING.value, "attempts": 0, "created_at": now, "updated_at": now, **extra,
    }  # fmt: skip


def _accepted(activation_id: int) -> Response:
    resp = jsonify({"id": activation_id, "status": "accepted"})
    resp.status_code = 202
    resp.headers["Location"] = f"/api/mp/activations/{activation_id}"
    return resp


@bp.before_request
def _check_key() -> Response | None:
    return _authorize()


@bp.get("/activation-params")
def activation_params() -> Response:
    """What wx.navigateToMiniProgram needs to open the activation plug-in (appId and extraData)."""
    from .weixin_api import WeixinAPIError

    card_id = _text(request.args, "card_id", max_len=MAX_CARD_ID)
    outer_str = _text(request.args, "outer_str", required=False)
    assert card_id is not None  # narrowed by required=True
    try:
        url = db.get_weixin().get_activate_url(card_id, outer_str)
    except ConfigError as exc:  # no WECHAT_APPID / WECHAT_APPSECRET on this host
        return _error(503, f"weixin api not configured: {exc}", None)
    except RedisError as exc:
        return redis_down(exc)
    except WeixinAPIError as exc:
        log.warning("activate/geturl failed", extra={"errcode": exc.errcode})
        resp = jsonify({"error": f"weixin activate/geturl failed: {exc.errmsg}", "errcode": exc.errcode})
        resp.status_code = 502
        return resp
    params = plugin_params(url)
    missing = [name for name in ("encrypt_card_id", "biz") if not params.get(name)]
    if missing:
        return _error(502, f"weixin's activation URL lacks {', '.join(missing)}", None)
    params.setdefault("outer_str", outer_str or "")
    return jsonify({"appId": PLUGIN_APPID, "extraData": params})


@bp.post("/activations")
def activations_post() -> Response:
    """The plug-in's extraData (redirect-based activation): recorded now, activated by a worker."""
    data = _json_body()
    ticket = _text(data, "activate_ticket", max_len=MAX_TICKET)
    card_id = _text(data, "card_id", max_len=MAX_CARD_ID)
    encrypt_code = _text(data, "encrypt_code", max_len=MAX_ENCRYPTED)
    mp_openid = _text(data, "mp_openid")
    assert ticket and card_id and encrypt_code and mp_openid  # narrowed by required=True
    refused = _data_key_missing()
    if refused is not None:
        return refused
    key = activation_key(ActivationKind.REDIRECT, card_id, encrypt_code, mp_openid, ticket)
    row = _new_row(ActivationKind.REDIRECT, card_id, encrypt_code, mp_openid, activate_ticket=ticket, dedupe_key=key)
    with db.get_engine().begin() as conn:
        activation_id = insert_activation(conn, row)
    return _accepted(activation_id)


@bp.post("/registrations")
def registrations_post() -> Response:
    """The Mini Program's own registration page (Weixin too old for the plug-in): register and activate."""
    data = _json_body()
    card_id = _text(data, "card_id", max_len=MAX_CARD_ID)
    encrypt_code = _text(data, "encrypt_code", max_len=MAX_ENCRYPTED)
    mp_openid = _text(data, "mp_openid")
    fields = _form_values(data, "fields", ids=True)
    custom = _form_values(data, "custom_fields", ids=False)
    assert card_id and encrypt_code and mp_openid  # narrowed by required=True
    refused = _data_key_missing()
    if refused is not None:
        return refused
    cipher = cipher_for(db.get_settings())
    form = {"fields": fields, "custom_fields": custom}
    # The form is part of the key (a corrected resubmission is a new request), as a
    # keyed digest: a plain hash of a mobile number could be reversed by trying them all.
    key = activation_key(ActivationKind.REGISTRATION, card_id, encrypt_code, mp_openid, cipher.digest_json(form))
    row = _new_row(ActivationKind.REGISTRATION, card_id, encrypt_code, mp_openid,
                   fields_enc=cipher.encrypt_json(form), dedupe_key=key)
    with db.get_engine().begin() as conn:
        activation_id = insert_activation(conn, row)
    return _accepted(activation_id)


@bp.get(f"/activations/<{ROW_ID_CONVERTER}:activation_id>")
def activation_get(activation_id: int) -> Response:
    """Where an activation or registration request stands: status, result, errcode/errmsg, membership number."""
    with db.get_engine().connect() as conn:
        row = get_activation(conn, activation_id)
    if row is None:
        return _error(404, "no such activation", None)
    status = str(row["status"])
    result = row["result"]
    errmsg = row["errmsg"]
    if result is None and status in (EventStatus.FAILED.value, EventStatus.DEAD.value):
        result = ActivationResult.FAILED.value  # failed before its result was written
        errmsg = errmsg or "activation failed"
    return jsonify({
        "id": row["id"], "kind": row["kind"], "status": status, "result": result,
        "done": result is not None, "errcode": row["errcode"], "errmsg": errmsg,
        "card_id": row["card_id"], "code": row["code"] if result == ActivationResult.ACTIVATED.value else None,
        "membership_number": row["membership_number"],
    })  # fmt: skip


def init_app(app: Flask) -> None:
    """Register the member-card endpoints (errors are mapped by mp_api.init_app)."""
    app.register_blueprint(bp)
    settings = db.settings_of(app)
    if settings.mp_api_key and not settings.data_keys:
        log.warning(f"{DATA_KEY_VARIABLE} is not set: member activations and registrations answer 503")
