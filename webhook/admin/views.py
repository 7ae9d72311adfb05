"""The admin blueprint: key login, read-only pages, and the replay action.

Authentication is the admin key, typed once into a login form (kept in a
signed, HttpOnly, SameSite=Strict session cookie) or sent by scripts as
`Authorization: Bearer KEY`. Every POST from a session must carry the
session's CSRF token and, when the browser sends one, a same-host Origin.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.wrappers import Response as BaseResponse

from .. import db
from ..eventfilter import REPLAYABLE, EventFilter, revive_events
from ..logs import mask_code
from ..reports import REPORT_COUNTS, reconciliation_report
from ..store import ROW_ID_CONVERTER, ROW_ID_MAX, EventStatus, get_event, list_attempts
from .queries import PAGE_SIZE, backlog, event_log

log = logging.getLogger("wxcoupon.admin")
bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates", static_folder="static")
KEY_CONFIG = "WXCOUPON_ADMIN_KEY_DIGEST"
SESSION_HOURS = 12


class AdminSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure behind TLS (nginx sets X-Forwarded-Proto), not on a plain-HTTP dev server."""
        return bool(request.is_secure)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def configure(app: Flask, admin_key: str) -> None:
    """Derive the session signing key from the admin key; set the cookie's flags."""
    # Rotating the admin key also ends every session signed with the old one.
    app.secret_key = hmac.new(admin_key.encode(), b"wxcoupon admin session", hashlib.sha256).hexdigest()
    app.config.update(
        {KEY_CONFIG: _digest(admin_key)},
        SESSION_COOKIE_NAME="wxcoupon_admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PATH="/admin",
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=SESSION_HOURS),
    )
    app.session_interface = AdminSessionInterface()


def _key_matches(candidate: str) -> bool:
    expected: bytes = current_app.config[KEY_CONFIG]
    return hmac.compare_digest(_digest(candidate), expected)


@bp.before_request
def require_key() -> BaseResponse | None:
    """Let in a Bearer key or a logged-in session; send browsers to the login form."""
    if request.endpoint in ("admin.login", "admin.static"):
        return None
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        if _key_matches(auth[7:].strip()):
            g.admin_bearer = True
            return None
        abort(403)
    if session.get("admin"):
        if request.method == "POST":
            _check_csrf()
        return None
    if request.method != "GET":
        abort(403)
    return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))


def _check_csrf() -> None:
    token = request.form.get("csrf", "")
    if not hmac.compare_digest(token.encode(), str(session.get("csrf", "")).encode()) or not token:
        log.warning("admin post without a valid csrf token", extra={"path": request.path})
        abort(403)
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        log.warning("admin post from another origin", extra={"path": request.path})
        abort(403)


def _safe_next(target: str | None, default: str) -> str:
    """Only same-site relative paths under /admin: never an open redirect."""
    if target and target.startswith("/admin") and not target.startswith("//") and "\\" not in target:
        return target
    return default


@bp.app_template_global()
def csrf_token() -> str:
    """The session's CSRF token for forms."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(24)
    return str(token)


@bp.app_template_filter("masked")
def masked(value: Any) -> str:
    """A card code cut to its last digits for list views."""
    return mask_code(value) if value else "-"


@bp.app_template_filter("when")
def when(value: Any) -> str:
    """A timestamp as UTC, to the second."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return "-" if value is None else str(value)


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str:
    """The key form; a correct key starts a session."""
    next_url = _safe_next(request.values.get("next"), url_for("admin.event_list"))
    if request.method == "POST":
        if _key_matches(request.form.get("key", "")):
            session.clear()
            session.permanent = True
            session["admin"] = True
            session["csrf"] = secrets.token_urlsafe(24)
            log.info("admin login", extra={"remote": request.remote_addr})
            return redirect(next_url)
        log.warning("admin login refused", extra={"remote": request.remote_addr})
        flash("That key is not the admin key.", "error")
        return Response(render_template("admin/login.html", next_url=next_url), status=403)
    return render_template("admin/login.html", next_url=next_url)


@bp.post("/logout")
def logout() -> BaseResponse:
    """End the session."""
    session.clear()
    return redirect(url_for("admin.login"))


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        flash(f"Ignored the time {value!r}: use 2026-11-25 or 2026-11-25T10:00.", "error")
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _filter_from_args() -> EventFilter:
    status = request.args.get("status", "")
    statuses = tuple(s for s in status.split(",") if s in {e.value for e in EventStatus})
    return EventFilter(
        statuses=statuses,
        event=request.args.get("event") or None,
        card_id=request.args.get("card_id") or None,
        since=_parse_time(request.args.get("since")),
        until=_parse_time(request.args.get("until")),
        search=request.args.get("q") or None,
    )


def _page(view: str, flt: EventFilter, title: str) -> str:
    before = request.args.get("before", type=int)
    if before is not None and not 1 <= before <= ROW_ID_MAX:
        before = None  # a hand-edited link: the first page
    with db.get_engine().connect() as conn:
        rows = event_log(conn, flt, before_id=before)
        counts = backlog(conn)
    args: dict[str, Any] = {k: v for k, v in request.args.items() if k != "before" and v}
    older = url_for(view, **args, before=rows[-1]["id"]) if len(rows) == PAGE_SIZE else None
    return render_template(
        "admin/events.html", rows=rows, counts=counts, args=request.args, older=older, title=title, view=view,
        statuses=[s.value for s in EventStatus], replayable={s.value for s in REPLAYABLE},
    )  # fmt: skip


@bp.get("/")
def event_list() -> str:
    """The event log, newest first, with filters and search."""
    return _page("admin.event_list", _filter_from_args(), "Events")


@bp.get("/failed")
def failed_list() -> str:
    """Failed and dead events, each with a replay button."""
    flt = _filter_from_args()
    if not flt.statuses:
        flt = replace(flt, statuses=(EventStatus.FAILED.value, EventStatus.DEAD.value))
    return _page("admin.failed_list", flt, "Failed and dead events")


@bp.get(f"/events/<{ROW_ID_CONVERTER}:event_id>")
def event_detail(event_id: int) -> str:
    """One event: its columns, parsed fields, raw XML and every attempt."""
    with db.get_engine().connect() as conn:
        event = get_event(conn, event_id)
        if event is None:
            abort(404)
        attempts = list_attempts(conn, event_id)
    return render_template(
        "admin/event.html", event=event, attempts=attempts, replayable=event["status"] in {s.value for s in REPLAYABLE}
    )


def _replay(ids: list[int]) -> BaseResponse:
    with db.get_engine().begin() as conn:
        revived = revive_events(conn, ids)
    log.info("admin replay", extra={"requested": len(ids), "revived": revived})
    if revived:
        flash(f"{revived} event(s) will be replayed: they are pending and the workers will queue them.", "ok")
    if revived < len(ids):
        flash(f"{len(ids) - revived} event(s) left unchanged: processed or in flight.", "note")
    if g.get("admin_bearer"):
        return Response(f"revived {revived}\n", mimetype="text/plain")
    return redirect(_safe_next(request.form.get("next"), url_for("admin.failed_list")))


@bp.post(f"/events/<{ROW_ID_CONVERTER}:event_id>/replay")
def replay_one(event_id: int) -> BaseResponse:
    """Put one failed, dead or pending event back to the outbox."""
    return _replay([event_id])


@bp.post("/replay")
def replay_many() -> BaseResponse:
    """Put the listed events back to the outbox (the failed list's "replay all shown")."""
    try:
        ids = sorted({int(i) for i in request.form.getlist("id")})[:500]
    except ValueError:
        abort(400)
    if not all(1 <= i <= ROW_ID_MAX for i in ids):
        abort(400)
    return _replay(ids)


@bp.get("/reconciliation")
def reconciliation() -> str:
    """The reconciliation report: its counts and the unmatched Mini Program records."""
    with db.get_engine().connect() as conn:
        report = reconciliation_report(conn, db.get_settings(), unmatched_limit=200)
    counts = [(name, report[name]) for name in REPORT_COUNTS]
    return render_template("admin/reconciliation.html", counts=counts, unmatched=report["unmatched_items"],
                           given_up=report["given_up_items"])


@bp.after_request
def no_store(response: Response) -> Response:
    """Admin pages are never cached, framed, or sniffed."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'; form-action 'self'"
    response.headers["Referrer-Policy"] = "same-origin"
    return response

