"""What a worker process holds: settings, engine and Redis, made once, passed on."""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from sqlalchemy import Engine

from webhook.config import Settings, load_settings
from webhook.redisconn import connect_redis
from webhook.store import make_engine

if TYPE_CHECKING:
    from webhook.weixin_api import WeixinClient

# Queues split by purpose: intake events never wait behind slow API work.
EVENTS_QUEUE = "events"
API_QUEUE = "api"


@dataclass(frozen=True)
class WorkerContext:
    """The resources a job needs, created by the worker process at start."""

    settings: Settings
    engine: Engine
    redis: redis.Redis

    @functools.cached_property
    def weixin(self) -> WeixinClient:
        """The Weixin API client of this account (tokens shared through Redis)."""
        from webhook.weixin_api import WeixinClient

        return WeixinClient.from_settings(self.settings, self.redis)

    def queue_name(self, purpose: str) -> str:
        """The RQ queue name for a purpose, under this deployment's prefix."""
        return f"{self.settings.queue_prefix}-{purpose}"


def build_context(settings: Settings | None = None) -> WorkerContext:
    """Create engine and Redis client for these settings (no connection yet)."""
    settings = settings or load_settings()
    return WorkerContext(settings=settings, engine=make_engine(settings), redis=connect_redis(settings))


_lock = threading.Lock()
_current: WorkerContext | None = None


def install(ctx: WorkerContext) -> None:
    """Make `ctx` the one jobs in this process use (the worker command calls it)."""
    global _current
    with _lock:
        _current = ctx


def current() -> WorkerContext:
    """The process's worker context; built from the environment on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = build_context()
        return _current
