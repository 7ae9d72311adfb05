"""The push endpoint: a short pipeline of pure steps, then one durable insert."""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Flask, Request, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from . import db, logs, metrics
from .envelope import open_push, verify_url
from .errors import PayloadTooLargeError, WebhookError
from .events import parse_push
from .intake import event_row

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


class CappedRequest(Request):
    """Flask's request, whose body is held to MAX_CONTENT_LENGTH (WXCOUPON_MAX_BODY) whether its length was
    declared or not; the app's request class, so every endpoint reading a body (get_data, get_json) has it.

    A declared Content-Length over the limit is refused before anything is read
    (413, by werkzeug). A chunked body declares no length: werkzeug cuts it at
    the limit and returns what it read, without a word on whether more
    followed. So a body that reached the limit is probed for one byte more,
    straight from the server's stream: 413 if there is one. (Form parsing reads
    werkzeug's stream directly and still only cuts: the admin's small forms.)
    """

    def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False) -> Any:
        """werkzeug's get_data, with the probe."""
        data: bytes = super().get_data(cache=cache, as_text=False, parse_form_data=parse_form_data)
        limit = self.max_content_length
        if (limit is not None and len(data) >= limit and self.content_length is None
                and self.environ["wsgi.input"].read(1)):
            raise RequestEntityTooLarge()
        return data.decode(errors="replace") if as_text else data


@bp.post("/wechat")
def receive() -> Response:
    """Accept one push: verify, decrypt, parse, commit, then answer `success`."""
    settings = db.get_settings()
    body = request.get_data(cache=False)
    opened = open_push(request.args, body, settings)
    push = parse_push(opened.fields)
    # Raises StoreUnavailableError (503) when the row is not committed: Weixin
    # retries, and nothing was half-written.
    event_id = db.get_writer().write(event_row(push, opened))
    event = push.event or push.msg_type
    metrics.count_push(event, "duplicate" if event_id is None else "stored")
    metrics.observe_ack(logs.request_elapsed())
    if event_id is None:
        logs.log_request(log, logging.INFO, "duplicate push acknowledged", 200, event=event)
    else:
        logs.log_request(log, logging.INFO, "push stored", 200, event_id=event_id, event=event)
    return _plain("success")


def handle_webhook_error(exc: WebhookError) -> Response:
    """Map a typed error to its status with a short reason; log it without payload."""
    logs.log_request(log, logging.WARNING, "push rejected", exc.status, reason=exc.reason,
                     remote=request.remote_addr)  # fmt: skip
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
