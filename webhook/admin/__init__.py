"""The operators' page: event log, one event's history, failed/dead events with a
replay button, and the reconciliation report. Read-only but for the replay,
and only when WXCOUPON_ADMIN_KEY is set; without it there is no /admin at all.

`queries` is Flask-free (the filter and the revive statement it shares with the
replay command live in `webhook.eventfilter`); the Flask part is imported only
by `init_app`.
"""
from __future__ import annotations

from flask import Flask

from ..config import Settings


def init_app(app: Flask, settings: Settings) -> None:
    """Register /admin when an admin key is configured."""
    if not settings.admin_key:
        return
    from .views import bp, configure

    configure(app, settings.admin_key)
    app.register_blueprint(bp)
