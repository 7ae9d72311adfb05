"""The push endpoint: a short pipeline of pure steps, then one durable insert."""
from __future__ import annotations

import logging
import time

from flask import Blueprint, Flask, Response, g, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from . import db, metrics
from .envelope import open_push, verify_url
from .errors import PayloadTooLargeError, StoreUnavailableError, WebhookError
from .events import parse_push
from .intake import record

log = logging.getLogger("wxcoupon.webhook")
bp = Blueprint("wechat", __name__)


def _plain(text: str, status: int = 200) -> Response:
    return Response(text, status=status, mimetype="text/plain")


@bp.get("/wechat")
def verify() -> Response:
    """URL verification: echo `echostr` when the signature is Weixin's."""
    settings = db.get_settings()
    echostr = verify_url(request.args, settings.token, tolerance=settings.timestamp_tolerance)
    return _plain(echostr)


@bp.post("/wechat")
def receive() -> Response:
    """Accept one push: verify, decrypt, parse, commit, then answer `success`."""
    started = g.get("request_started") or time.perf_counter()
    settings = db.get_settings()
    body = request.get_data(cache=False)
    opened = open_push(request.args, body, settings)
    push = parse_push(opened.fields)
    try:
        event_id = record(db.get_engine(), push, opened)
    except SQLAlchemyError as exc:
        # Not acknowledged: Weixin retries, and nothing was half-written.
        log.error("store unavailable", extra={"error": type(exc).__name__})
        raise StoreUnavailableError() from None
    if event_id is None:
        log.info("duplicate push acknowledged", extra={"event": push.event or push.msg_type})
    else:
        log.info("push stored", extra={"event_id": event_id, "event": push.event or push.msg_type})
    metrics.count_push(push.event or push.msg_type, "duplicate" if event_id is None else "stored")
    metrics.observe_ack(time.perf_counter() - started)
    return _plain("success")


def handle_webhook_error(exc: WebhookError) -> Response:
    """Map a typed error to its status with a short reason; log it without payload."""
    log.warning(
        "push rejected",
        extra={"reason": exc.reason, "status": exc.status, "remote": request.remote_addr, "path": request.path},
    )
    metrics.count_rejection(exc.reason)
    return _plain(exc.reason, exc.status)


def handle_too_large(_exc: RequestEntityTooLarge) -> Response:
    """A body over WXCOUPON_MAX_BODY is refused before it is read."""
    return handle_webhook_error(PayloadTooLargeError())


def init_app(app: Flask) -> None:
    """Register the endpoint and its error handlers."""
    app.register_blueprint(bp)
    app.register_error_handler(WebhookError, handle_webhook_error)
    app.register_error_handler(RequestEntityTooLarge, handle_too_large)
