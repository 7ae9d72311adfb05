"""Logging: readable lines in development, one JSON object per line in production.

Every line carries the context it was written in: `request_id` in the web
(from nginx's X-Request-Id, or made here), `job_id` in an RQ job, and
`event_id` where code binds one. Values that must never reach a log are
redacted by the formatters, whatever the caller passed: secrets and tokens
entirely, card codes down to their last four digits, user ids to a stable
pseudonym.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, request

from .config import Settings

# Attributes every LogRecord has; anything else was passed with `extra=` and is
# emitted as a field of the line.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("wxcoupon_log_context", default={})

# Field names whose values never appear in a log, in whole or in part.
SECRET_FIELDS = frozenset({
    "token", "access_token", "appsecret", "secret", "aes_key", "encoding_aes_key", "admin_key", "password",
    "signature", "msg_signature", "encrypt", "raw_xml", "body", "payload", "authorization", "cookie", "ticket",
    "api_ticket", "echostr", "key",
})  # fmt: skip
# Card codes are bearer values: the last four digits are enough to find one.
CODE_FIELDS = frozenset({"code", "old_code", "new_code", "card_code", "usercardcode", "encrypt_code"})
# Personal data: replaced by a stable pseudonym, so lines about one user still correlate.
PERSON_FIELDS = frozenset({
    "openid", "unionid", "from_user", "fromusername", "friendusername", "mp_openid", "oa_openid", "phone", "mobile",
})  # fmt: skip
# The same secrets inside free text (URLs in exception messages, mostly).
_SECRET_IN_TEXT = re.compile(
    r"(?i)\b(access_token|appsecret|secret|ticket|msg_signature|signature|echostr|encrypt_code|code)=([^&\s\"'<>]+)"
)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def mask_code(value: object) -> str:
    """A card code reduced to its last four characters."""
    text = str(value)
    return f"…{text[-4:]}" if len(text) > 6 else "…"


def pseudonym(value: object) -> str:
    """A stable, non-reversible stand-in for a user id."""
    return "~" + hashlib.sha256(str(value).encode()).hexdigest()[:10]


def redact_value(key: str, value: Any) -> Any:
    """The loggable form of field `key`."""
    if value is None or value == "":
        return value
    name = key.lower()
    if name in SECRET_FIELDS:
        return "[redacted]"
    if name in CODE_FIELDS:
        return mask_code(value)
    if name in PERSON_FIELDS:
        return pseudonym(value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """Free text with `name=value` secrets (in URLs, messages) replaced."""
    return _SECRET_IN_TEXT.sub(lambda m: f"{m.group(1)}=[redacted]", text)


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Stamp these fields (e.g. event_id) on every line logged inside the block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    """The fields bound now, plus the RQ job id when inside a job."""
    fields = dict(_context.get())
    rq_job = sys.modules.get("rq.job")  # only where RQ is in use: never imported here
    if rq_job is not None and "job_id" not in fields:
        job = rq_job.get_current_job()
        if job is not None:
            fields["job_id"] = job.id
    return fields


class ContextFilter(logging.Filter):
    """Add the bound context (request_id, job_id, event_id) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp the fields the record does not already carry."""
        for key, value in current_context().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: redact_value(k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")
    }


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a JSON line."""
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        data.update(_extras(record))
        if record.exc_info:
            data["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(data, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A readable line with the extra fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with its extra fields."""
        line = redact_text(super().format(record))
        extras = [f"{k}={v}" for k, v in _extras(record).items()]
        return f"{line} {' '.join(extras)}" if extras else line


def make_handler(log_format: str) -> logging.Handler:
    """A stderr handler with the chosen formatter and the context filter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send wxcoupon's and RQ's logs to stderr in the chosen format (idempotent)."""
    root = logging.getLogger("wxcoupon")
    if getattr(root, "_wxcoupon_configured", False):
        return
    handler = make_handler(log_format)
    # RQ adds its own handler only when its logger has none, so ours is used.
    for name in ("wxcoupon", "rq"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    root._wxcoupon_configured = True  # type: ignore[attr-defined]


# Probes and scrapes are frequent and uninteresting when they succeed.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
request_log = logging.getLogger("wxcoupon.request")


def _start_request() -> None:
    incoming = request.headers.get("X-Request-Id", "")
    g.request_id = incoming if _REQUEST_ID_RE.match(incoming) else secrets.token_hex(8)
    g.request_started = time.perf_counter()
    g.log_token = _context.set({**_context.get(), "request_id": g.request_id})


def _finish_request(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers["X-Request-Id"] = request_id
        elapsed = time.perf_counter() - g.get("request_started", time.perf_counter())
        level = logging.DEBUG if request.path in _QUIET_PATHS and response.status_code < 400 else logging.INFO
        # The path only: Weixin's query string carries signatures and openids.
        request_log.log(level, "request", extra={
            "method": request.method, "path": request.path, "status": response.status_code,
            "ms": round(elapsed * 1000, 1),
        })  # fmt: skip
    return response


def _end_context(_exc: BaseException | None) -> None:
    token = g.pop("log_token", None)
    if token is not None:
        with contextlib.suppress(ValueError):  # a token from another context: nothing to undo here
            _context.reset(token)


def init_app(app: Flask, settings: Settings) -> None:
    """Configure logging for the web process and stamp a request id on each request."""
    configure_logging(settings.log_format)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_context)
