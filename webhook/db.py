"""The app's database engine: created once per process, disposed at exit."""
from __future__ import annotations

import threading

import redis
from flask import Flask, current_app
from sqlalchemy import Engine

from .config import Settings
from .intake import EventWriter, sqlite_write_lock
from .redisconn import connect_redis
from .store import make_engine
from .weixin_api import WeixinClient

EXTENSION = "wxcoupon.engine"
WRITER_EXTENSION = "wxcoupon.writer"
REDIS_EXTENSION = "wxcoupon.redis"
WEIXIN_EXTENSION = "wxcoupon.weixin"
_lock = threading.Lock()


def init_app(app: Flask, settings: Settings) -> None:
    """Attach an engine and the push path's writer (no connection is made until the first request)."""
    engine = make_engine(settings)
    app.extensions[EXTENSION] = engine
    app.extensions[WRITER_EXTENSION] = EventWriter(engine, sqlite_write_lock(engine))


def get_engine() -> Engine:
    """The current app's engine."""
    engine: Engine = current_app.extensions[EXTENSION]
    return engine


def get_writer() -> EventWriter:
    """The current app's event writer (the push path's inserts)."""
    writer: EventWriter = current_app.extensions[WRITER_EXTENSION]
    return writer


def get_settings() -> Settings:
    """The current app's settings."""
    return settings_of(current_app)


def settings_of(app: Flask) -> Settings:
    """An app's settings."""
    settings: Settings = app.config["WXCOUPON_SETTINGS"]
    return settings


def get_redis() -> redis.Redis:
    """The app's Redis client, created on first use (the push path never needs it)."""
    with _lock:
        client: redis.Redis | None = current_app.extensions.get(REDIS_EXTENSION)
        if client is None:
            client = connect_redis(get_settings())
            current_app.extensions[REDIS_EXTENSION] = client
        return client


def get_weixin() -> WeixinClient:
    """The app's Weixin API client (tokens and tickets shared through Redis)."""
    with _lock:
        client: WeixinClient | None = current_app.extensions.get(WEIXIN_EXTENSION)
    if client is None:
        client = WeixinClient.from_settings(get_settings(), get_redis())
        with _lock:
            current_app.extensions[WEIXIN_EXTENSION] = client
    return client
