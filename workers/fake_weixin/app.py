"""HTTP routes of the fake Weixin: Weixin's own API paths, then /sandbox/ paths.

Weixin answers errors with HTTP 200 and a JSON errcode; so does this fake.
Sandbox paths answer 400 with an errcode when a request cannot be applied.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flask import Flask, Response, g, jsonify, request

from .pushes import Pusher
from .server import DROP_CONNECTION_KEY
from .state import Fault, FakeState, PushEvent, WeixinFailure, form_info

ApiHandler = Callable[[dict[str, Any]], dict[str, Any]]
SandboxAction = Callable[[FakeState, Mapping[str, Any]], tuple[dict[str, Any], list[PushEvent]]]

RAW_CHUNK = 64 * 1024  # bytes per chunk of a chunked raw reply


def _failure_json(failure: WeixinFailure) -> dict[str, Any]:
    # Weixin appends a request id to every errmsg.
    return {"errcode": failure.errcode, "errmsg": f"{failure.errmsg} rid: {secrets.token_hex(4)}-{secrets.token_hex(4)}"}


def _json_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise WeixinFailure(47001)
    return body


def _drop_connection() -> Response:
    """Close the connection without any reply, as a broken network path would."""
    request.get_data()  # read the request fully: the client must have sent it all
    drop = request.environ.get(DROP_CONNECTION_KEY)
    if not callable(drop):
        # Another WSGI server: a reply would tell the client something, so fail loudly.
        raise RuntimeError("dropped-connection faults need the fake's own server (workers.fake_weixin.server)")
    drop()
    # The server finds the connection shut and never writes this reply.
    return Response(b"", status=200)


def _flag(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1"))


# -- sandbox actions: the same functions back the HTTP paths and FakeWeixin's methods --

def _code_result(state: FakeState, code: str, card_id: str) -> dict[str, Any]:
    return {"card_id": card_id, "code": code, "encrypt_code": state.encrypt(code)}


def _add_card(state: FakeState, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[PushEvent]]:
    held, events = state.add_card(
        _req(body, "card_id"), _req(body, "openid"), code=_opt(body, "code"), outer_str=_opt(body, "outer_str"),
        unionid=_opt(body, "unionid"), card_ext=_opt(body, "card_ext"),
    )
    return _code_result(state, held.code, held.card_id), events


def _delete_card(state: FakeState, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[PushEvent]]:
    held, events = state.delete_card(_req(body, "card_id"), _req(body, "code"))
    return {"card_id": held.card_id, "code": held.code, "status": held.status}, events


def _consume_card(state: FakeState, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[PushEvent]]:
    source = _opt(body, "consume_source") or "FROM_API"
    held, events = state.consume_card(_req(body, "card_id"), _req(body, "code"), source)
    return {"card_id": held.card_id, "code": held.code, "status": held.status}, events


def _gift_card(state: FakeState, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[PushEvent]]:
    new, events = state.gift_card(_req(body, "card_id"), _req(body, "code"), _req(body, "to_openid"))
    return {**_code_result(state, new.code, new.card_id), "old_code": new.old_code}, events


def _activate_form(state: FakeState, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[PushEvent]]:
    card_id, code = _req(body, "card_id"), _req(body, "code")
    ttl = body.get("expires_in")
    ticket, events = state.submit_activation_form(card_id, code, body, ttl=int(ttl) if ttl is not None else None)
    # What the plug-in hands back in referrerInfo.extraData.
    return {"activate_ticket": ticket, "card_id": card_id, "encrypt_code": state.encrypt(code)}, events


def _submit_activation(state: FakeState, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[PushEvent]]:
    fields, custom = body.get("fields") or {}, body.get("custom_fields") or {}
    if not isinstance(fields, dict) or not isinstance(custom, dict):
        raise WeixinFailure(40097, "invalid args: fields and custom_fields are objects of name: value")
    ttl = body.get("expires_in")
    return state.submit_activation(
        _req(body, "card_id"), _req(body, "code"), _req(body, "openid"), form_info(fields, custom),
        ttl=int(ttl) if ttl is not None else None,
    )


def _set_status(state: FakeState, body: Mapping[str, Any]) -> tuple[dict[str, Any], list[PushEvent]]:
    held = state.set_status(_req(body, "card_id"), _req(body, "code"), _req(body, "status"))
    return {"card_id": held.card_id, "code": held.code, "status": held.status}, []


SANDBOX_ACTIONS: dict[str, SandboxAction] = {
    "add-card": _add_card,
    "delete-card": _delete_card,
    "consume-card": _consume_card,
    "gift-card": _gift_card,
    "activate-form": _activate_form,
    "submit-activation": _submit_activation,
    "set-status": _set_status,
}


def _req(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise WeixinFailure(41011, f"missing required field {name}")
    return value


def _opt(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WeixinFailure(40097, f"invalid args: {name} must be a string")
    return value


def run_sandbox_action(state: FakeState, pusher: Pusher | None, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a sandbox action and queue the pushes it causes; raises WeixinFailure."""
    action = SANDBOX_ACTIONS.get(name)
    if action is None:
        raise WeixinFailure(40097, f"unknown sandbox action {name}")
    result, events = action(state, body)
    if pusher is not None and events:
        result["push_ids"] = pusher.submit(events)
    return result


def make_fault(body: Mapping[str, Any]) -> tuple[str, Fault]:
    """The (path, Fault) described by a POST /sandbox/faults body."""
    path = body.get("path")
    if not isinstance(path, str) or not path:
        raise WeixinFailure(41011, "missing required field path")
    errcode, status = body.get("errcode"), body.get("http_status")
    encoding = body.get("content_encoding")
    if encoding is not None and (not isinstance(encoding, str) or not encoding.isascii() or not encoding.isprintable()):
        raise WeixinFailure(40097, "invalid args: content_encoding is a header value")
    try:
        fault = Fault(
            remaining=int(body.get("count", 1)),
            errcode=int(errcode) if errcode is not None else None,
            errmsg=str(body["errmsg"]) if body.get("errmsg") else None,
            latency_ms=int(body.get("latency_ms", 0)),
            drop=_flag(body.get("drop", False)),
            http_status=int(status) if status is not None else None,
            raw=_raw_body(body),
            chunked=_flag(body.get("chunked", False)),
            content_encoding=encoding,
            applied=_flag(body.get("applied", False)),
        )
    except (TypeError, ValueError):
        raise WeixinFailure(40097, "invalid args: count, errcode, latency_ms and http_status are integers") from None
    if fault.remaining < 1:
        raise WeixinFailure(40097, "invalid args: count must be at least 1")
    if (fault.chunked or fault.content_encoding is not None) and fault.raw is None:
        raise WeixinFailure(40097, "invalid args: chunked and content_encoding go with raw or raw_base64")
    if fault.applied and not (fault.drop or fault.errcode is not None or fault.http_status is not None
                              or fault.raw is not None):
        raise WeixinFailure(40097, "invalid args: applied goes with drop, errcode, http_status or raw")
    return "/" + path.lstrip("/"), fault


def _raw_body(body: Mapping[str, Any]) -> bytes | None:
    """The raw reply of a fault: `raw` as text (sent UTF-8), or `raw_base64` for bytes JSON cannot carry."""
    raw, encoded = body.get("raw"), body.get("raw_base64")
    if raw is not None and encoded is not None:
        raise WeixinFailure(40097, "invalid args: raw or raw_base64, not both")
    if isinstance(raw, bytes):  # FakeWeixin.inject_fault, in process
        return raw
    if isinstance(raw, str):
        try:
            return raw.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not text; raw_base64 sends any bytes
            raise WeixinFailure(40097, "invalid args: raw is text (raw_base64 for other bytes)") from None
    if raw is not None:
        raise WeixinFailure(40097, "invalid args: raw is a string")
    if encoded is None:
        return None
    if isinstance(encoded, str):
        with contextlib.suppress(binascii.Error):
            return base64.b64decode(encoded, validate=True)
    raise WeixinFailure(40097, "invalid args: raw_base64 is base64")


def _raw_reply(fault: Fault) -> Response:
    """The fault's raw body with the status it asks for (200 by default), unchecked by anything."""
    raw = fault.raw or b""
    body: bytes | Iterator[bytes] = raw
    if fault.chunked:
        # An iterable body has no Content-Length: the server sends it chunked (HTTP/1.1).
        body = (raw[i:i + RAW_CHUNK] for i in range(0, len(raw), RAW_CHUNK))
    response = Response(body, status=fault.http_status or 200, content_type="application/json")
    if fault.content_encoding is not None:
        response.headers["Content-Encoding"] = fault.content_encoding
    return response


def _fault_reply(fault: Fault) -> Response:
    """What a misbehaving Weixin answers: no answer at all, a raw body, a bare HTTP error, or an errcode."""
    if fault.drop:
        return _drop_connection()
    if fault.raw is not None:
        return _raw_reply(fault)
    if fault.http_status is not None:
        return Response("fake upstream failure", status=fault.http_status, mimetype="text/plain")
    return jsonify(_failure_json(WeixinFailure(int(fault.errcode or 0), fault.errmsg)))


# -- the app ---------------------------------------------------------------------

def create_app(state: FakeState, pusher: Pusher | None = None) -> Flask:
    """The fake's WSGI app over `state`, pushing through `pusher` when given."""
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]

    @app.before_request
    def count_and_misbehave() -> Response | None:
        if request.path.startswith("/sandbox/"):
            return None
        state.count_call(request.path)
        fault = state.take_fault(request.path)
        if fault is None:
            return None
        if fault.applied or not (fault.drop or fault.errcode is not None or fault.http_status is not None
                                 or fault.raw is not None):
            # The call itself happens; a slow reply, or (applied) its reply replaced afterwards.
            g.latency_ms = fault.latency_ms
            g.fault_after = fault if fault.applied else None
            return None
        time.sleep(fault.latency_ms / 1000)
        return _fault_reply(fault)

    @app.after_request
    def slow_down(response: Response) -> Response:
        latency = g.pop("latency_ms", 0)
        if latency:
            time.sleep(latency / 1000)
        fault = g.pop("fault_after", None)
        return response if fault is None else _fault_reply(fault)

    def api(path: str, methods: tuple[str, ...], authenticated: bool = True) -> Callable[[ApiHandler], ApiHandler]:
        def register(handler: ApiHandler) -> ApiHandler:
            def view() -> Response:
                try:
                    if authenticated:
                        state.check_token(request.args.get("access_token"))
                    body = _json_body() if request.method == "POST" else dict(request.args)
                    return jsonify({"errcode": 0, "errmsg": "ok", **handler(body)})
                except WeixinFailure as failure:
                    return jsonify(_failure_json(failure))

            app.add_url_rule(path, endpoint=path, view_func=view, methods=list(methods))
            return handler

        return register

    @api("/cgi-bin/token", ("GET",), authenticated=False)
    def token(args: dict[str, Any]) -> dict[str, Any]:
        value, expires_in = state.issue_token(
            str(args.get("grant_type", "")), str(args.get("appid", "")), str(args.get("secret", ""))
        )
        return {"access_token": value, "expires_in": expires_in}

    @api("/cgi-bin/stable_token", ("POST",), authenticated=False)
    def stable_token(body: dict[str, Any]) -> dict[str, Any]:
        value, expires_in = state.issue_stable_token(
            str(body.get("grant_type", "")), str(body.get("appid", "")), str(body.get("secret", "")),
            _flag(body.get("force_refresh", False)),
        )
        return {"access_token": value, "expires_in": expires_in}

    @api("/cgi-bin/ticket/getticket", ("GET",))
    def getticket(args: dict[str, Any]) -> dict[str, Any]:
        ticket, expires_in = state.card_ticket(str(args.get("type", "")))
        return {"ticket": ticket, "expires_in": expires_in}

    @api("/card/code/decrypt", ("POST",))
    def decrypt(body: dict[str, Any]) -> dict[str, Any]:
        return {"code": state.decrypt_code(_req(body, "encrypt_code"))}

    @api("/card/code/get", ("POST",))
    def get_code(body: dict[str, Any]) -> dict[str, Any]:
        # Weixin checks the consume status unless told not to.
        check = body.get("check_consume", True)
        return state.get_code(_req(body, "code"), _opt(body, "card_id"), check is not False)

    @api("/card/membercard/activatetempinfo/get", ("POST",))
    def activate_temp_info(body: dict[str, Any]) -> dict[str, Any]:
        return state.activate_temp_info(_req(body, "activate_ticket"))

    @api("/card/membercard/activate", ("POST",))
    def activate(body: dict[str, Any]) -> dict[str, Any]:
        state.activate(body)
        return {}

    @api("/card/membercard/activate/geturl", ("POST",))
    def activate_url(body: dict[str, Any]) -> dict[str, Any]:
        return {"url": state.activate_url(_req(body, "card_id"), _opt(body, "outer_str"))}

    @api("/card/membercard/activateuserform/set", ("POST",))
    def set_user_form(body: dict[str, Any]) -> dict[str, Any]:
        state.set_user_form(body)
        return {}

    @api("/card/create", ("POST",))
    def create_card(body: dict[str, Any]) -> dict[str, Any]:
        return {"card_id": state.create_card(body.get("card"))}

    @api("/card/update", ("POST",))
    def update_card(body: dict[str, Any]) -> dict[str, Any]:
        return state.update_card(body)

    # -- sandbox ---------------------------------------------------------------

    def sandbox_failure(failure: WeixinFailure) -> tuple[Response, int]:
        return jsonify({"errcode": failure.errcode, "errmsg": failure.errmsg}), 400

    @app.post("/sandbox/faults")
    def add_fault() -> Any:
        try:
            path, fault = make_fault(_json_body())
        except WeixinFailure as failure:
            return sandbox_failure(failure)
        state.add_fault(path, fault)
        return jsonify({"errcode": 0, "errmsg": "ok", "path": path})

    @app.post("/sandbox/reset")
    def reset() -> Any:
        state.reset()
        if pusher is not None:
            pusher.clear()
        return jsonify({"errcode": 0, "errmsg": "ok"})

    @app.get("/sandbox/stats")
    def stats() -> Any:
        with state.lock:
            return jsonify({"errcode": 0, "errmsg": "ok", "calls": dict(state.calls)})

    @app.get("/sandbox/pushes")
    def pushes() -> Any:
        return jsonify({
            "errcode": 0, "errmsg": "ok", "push_to": pusher.url if pusher else None,
            "pushes": pusher.deliveries() if pusher else [],
        })

    @app.post("/sandbox/<action>")
    def sandbox_action(action: str) -> Any:
        try:
            result = run_sandbox_action(state, pusher, action, _json_body())
        except WeixinFailure as failure:
            return sandbox_failure(failure)
        return jsonify({"errcode": 0, "errmsg": "ok", **result})

    return app
