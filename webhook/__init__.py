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
    app = Flask(__name__, instance_path=str(settings.instance_path.resolve()))
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body, WXCOUPON_SETTINGS=settings)
    if test_config:
        app.config.update(test_config)

    from . import db, logs, mp_api, views

    logs.init_app(app, settings)
    db.init_app(app, settings)
    views.init_app(app)
    mp_api.init_app(app)
    return app
