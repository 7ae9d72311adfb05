"""The push endpoint: a short pipeline of pure steps, then one durable insert."""
from __future__ import annotations

import logging
from typing import IO, Any, cast

from flask import Blueprint, Flask, Request, Response, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

from . import db, logs, metrics
from .envelope import check_push_query, open_push, verify_url
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


class _CappedStream(LimitedStream):
    """A body of undeclared length (chunked) held to the cap: at the cap, one more byte means 413."""

    def on_exhausted(self) -> None:
        """Probe the server's stream for one byte past the cap: if there is one, the body is over it."""
        if self._stream.read(1):
            raise RequestEntityTooLarge()

    def readall(self) -> bytes:
        """The whole body; werkzeug's readall stops at the cap without asking whether more followed."""
        data = super().readall()
        if self.is_exhausted:
            self.on_exhausted()
        return data


class CappedRequest(Request):
    """Flask's request, whose body is held to MAX_CONTENT_LENGTH (WXCOUPON_MAX_BODY) whether its length was
    declared or not; the app's request class, so every reader of the body (get_data, get_json, the
    admin's form parsing) is held to it.

    A declared Content-Length over the limit is refused before anything is read
    (413, by werkzeug). A chunked body declares no length: werkzeug's stream
    stops at the limit and reads as ended, without a word on whether more
    followed, so a push one byte over the cap would be cut and stored. Here the
    stream of such a body, once at the limit, probes the server's stream for one
    byte more and answers 413 if there is one.
    """

    @cached_property
    def stream(self) -> IO[bytes]:
        """werkzeug's guarded input stream; for an undeclared length under a cap, the probing one."""
        limit = self.max_content_length
        if (not self.shallow and limit is not None and self.content_length is None
                and "wsgi.input_terminated" in self.environ):
            return cast(IO[bytes], _CappedStream(self.environ["wsgi.input"], limit, is_max=True))
        return super().stream


@bp.post("/wechat")
def receive() -> Response:
    """Accept one push: verify, decrypt, parse, commit, then answer `success`."""
    settings = db.get_settings()
    check_push_query(request.args, settings)
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


@bp.errorhandler(RequestEntityTooLarge)
def handle_too_large(_exc: RequestEntityTooLarge) -> Response:
    """A push over WXCOUPON_MAX_BODY: 413 with the push path's short reason (other paths answer in
    their own format: the Mini Program API's JSON error, Flask's page elsewhere)."""
    return handle_webhook_error(PayloadTooLargeError())


def init_app(app: Flask) -> None:
    """Register the endpoint and its error handlers."""
    app.register_blueprint(bp)
    app.register_error_handler(WebhookError, handle_webhook_error)
