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
from urllib.parse import quote

from flask import Flask, request

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
    if "=" not in text:  # most lines: no need to run the pattern over them
        return text
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


class _SecondCache:
    """The formatted second of a timestamp, formatted once per second rather than once per line."""

    def __init__(self, fmt: str, convert: Any) -> None:
        self.fmt, self.convert = fmt, convert
        self.second, self.text = -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:  # a race here only formats the same second twice
            self.text, self.second = time.strftime(self.fmt, self.convert(second)), second
        return self.text


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and extra fields."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._second = _SecondCache("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a JSON line."""
        data: dict[str, Any] = {
            "ts": f"{self._second(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        data.update(_extras(record))
        if record.exc_info:
            data["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(data, default=str, ensure_ascii=False)


# Characters that would end or rewrite a text log line (a path may carry them percent-encoded).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(found: re.Match[str]) -> str:
    return found.group().encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    """A readable line with the extra fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = _SecondCache(self.default_time_format, time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        """logging's default time format, with the second formatted once per second."""
        if datefmt:
            return super().formatTime(record, datefmt)
        return f"{self._second(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with its extra fields on its first line, then any traceback or stack."""
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = redact_text(self.formatMessage(record))
        extras = [f"{k}={v}" for k, v in _extras(record).items()]
        if extras:  # already redacted, field by field
            line = f"{line} {' '.join(extras)}"
        # One record, one first line: a value holding a line break (a client's text, an exception's
        # message) must not start a line of its own making. (JSON lines escape them already.)
        line = _CONTROL.sub(_escaped, line)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for text in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if text:
                line = f"{line}\n{redact_text(text)}"
        return line


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
    # logging's documented switches for what no line here shows: every record
    # (one per push) would otherwise look up its thread's and process's names.
    # The process id stays: gunicorn's own lines print it.
    logging.logThreads = False
    logging.logMultiprocessing = False
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
_STATE_KEY = "wxcoupon.request_log"


class _RequestState:
    """What the middleware keeps about one request, in its WSGI environ."""

    __slots__ = ("request_id", "started", "status", "logged")

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.status = 0
        self.logged = False  # the request wrote its own line: no separate access line


class RequestLogMiddleware:
    """WSGI middleware: a request id on every request's log lines and answer, and one line per request.

    The id is nginx's X-Request-Id when it is well-formed, else a new one. A
    request that logs its own outcome with `log_request` (a push) has that as
    its only line; any other gets an access line. A WSGI wrapper rather than
    Flask hooks: the three hooks cost more than the rest of Flask's dispatch.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        """Serve one request with its id bound."""
        incoming = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if incoming and _REQUEST_ID_RE.match(incoming) else secrets.token_hex(8)
        state = environ[_STATE_KEY] = _RequestState(request_id, time.perf_counter())

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            state.status = int(status[:3])
            headers.append(("X-Request-Id", request_id))
            return start_response(status, headers, exc_info)

        token = _context.set({**_context.get(), "request_id": request_id})
        try:
            result = self.app(environ, start)
            if not state.logged:
                _access_line(environ, state)
        finally:
            _context.reset(token)
        return result


# A path segment that is a user id: the Mini Program API's /api/mp/users/<mp_openid>/...
_USER_PATH = "/api/mp/users/"


def _path(environ: dict[str, Any]) -> str:
    # The path only: Weixin's query string carries signatures and openids.
    raw: str = environ.get("PATH_INFO", "")
    path = raw.encode("latin-1", "replace").decode("utf-8", "replace") or "/"
    if path.startswith(_USER_PATH):
        user, slash, rest = path[len(_USER_PATH):].partition("/")
        path = f"{_USER_PATH}{pseudonym(user) if user else ''}{slash}{rest}"
    # Anyone can send %0A: logged as is, it would start a line of the client's making.
    return _CONTROL.sub(lambda m: quote(m.group()), path)


def _access_line(environ: dict[str, Any], state: _RequestState) -> None:
    path = _path(environ)
    level = logging.DEBUG if path in _QUIET_PATHS and state.status < 400 else logging.INFO
    if request_log.isEnabledFor(level):
        request_log.log(level, "request", extra={
            "method": environ.get("REQUEST_METHOD"), "path": path, "status": state.status,
            "ms": round((time.perf_counter() - state.started) * 1000, 1),
        })  # fmt: skip


def request_elapsed() -> float:
    """Seconds since the current request began (0 outside the middleware)."""
    state: _RequestState | None = request.environ.get(_STATE_KEY)
    return time.perf_counter() - state.started if state is not None else 0.0


def log_request(logger: logging.Logger, level: int, message: str, status: int, **fields: Any) -> None:
    """Write the current request's one line: `message` and `fields` plus method, path, status and ms.

    The access line of the request is then left out, so a push costs one line.
    """
    environ = request.environ
    state: _RequestState | None = environ.get(_STATE_KEY)
    fields.update(method=environ.get("REQUEST_METHOD"), path=_path(environ), status=status)
    if state is not None:
        fields["ms"] = round((time.perf_counter() - state.started) * 1000, 1)
        state.logged = True
    logger.log(level, message, extra=fields)


class _ToWxcoupon(logging.Handler):
    """Hands a record to the `wxcoupon` logger's handlers, whatever they are when it is logged."""

    def emit(self, record: logging.LogRecord) -> None:
        """Let the wxcoupon logger handle it (its filters, then its handlers)."""
        logging.getLogger("wxcoupon").handle(record)


def init_app(app: Flask, settings: Settings) -> None:
    """Configure logging for the web process and stamp a request id on each request."""
    configure_logging(settings.log_format)
    # Flask logs an unhandled exception ("Exception on /path [POST]" and its
    # traceback) on app.logger, through a stderr handler of its own: send it
    # through wxcoupon's, for the same format, the request id and the redaction.
    from flask.logging import default_handler

    app.logger.removeHandler(default_handler)

    def log_exception(exc_info: Any) -> None:
        # Flask's own line names request.path as is: a user's openid, a client's control characters.
        app.logger.error("Exception on %s [%s]", _path(request.environ), request.method, exc_info=exc_info)

    app.log_exception = log_exception  # type: ignore[method-assign]
    if not any(isinstance(h, _ToWxcoupon) for h in app.logger.handlers):  # one logger for every app of the process
        app.logger.addHandler(_ToWxcoupon())
    app.logger.propagate = False
    app.wsgi_app = RequestLogMiddleware(app.wsgi_app)  # type: ignore[method-assign]
