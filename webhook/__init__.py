"""The Flask side of wxcoupon: the Weixin push endpoint and its store."""
from __future__ import annotations

from typing import Any

from flask import Flask

from .config import Settings, load_settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app; settings are read from the environment unless given."""
    if settings is None:
        settings = load_settings()
    from .views import CappedRequest

    app = Flask(__name__, instance_path=str(settings.instance_path.resolve()))
    app.request_class = CappedRequest  # the body cap holds for chunked bodies too
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body, WXCOUPON_SETTINGS=settings)
    if test_config:
        app.config.update(test_config)

    from . import admin, db, health, logs, mp_api, mp_members, views

    if settings.proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # Trust X-Forwarded-For/-Proto from exactly that many proxies (nginx: 1).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxies, x_proto=settings.proxies)  # type: ignore[method-assign]
    logs.init_app(app, settings)
    db.init_app(app, settings)
    views.init_app(app)
    mp_api.init_app(app)
    mp_members.init_app(app)
    health.init_app(app)
    admin.init_app(app, settings)
    return app
