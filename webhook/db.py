"""The app's database engine: created once per process, disposed at exit."""
from __future__ import annotations

from flask import Flask, current_app
from sqlalchemy import Engine

from .config import Settings
from .store import make_engine

EXTENSION = "wxcoupon.engine"


def init_app(app: Flask, settings: Settings) -> None:
    """Attach an engine (no connection is made until the first request)."""
    app.extensions[EXTENSION] = make_engine(settings)


def get_engine() -> Engine:
    """The current app's engine."""
    engine: Engine = current_app.extensions[EXTENSION]
    return engine


def get_settings() -> Settings:
    """The current app's settings."""
    settings: Settings = current_app.config["WXCOUPON_SETTINGS"]
    return settings
