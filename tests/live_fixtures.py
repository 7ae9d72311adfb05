"""Pytest plugin: the app on a loopback port, a fake Weixin pushing to it, and workers to run.

    def test_x(live, ctx):
        base, settings, fake = live        # base URL of the app, its settings, the fake Weixin
        fake.add_card(...)                 # pushes user_get_card to the app over real HTTP
        work(ctx)                          # dispatch and run the queues dry

A test module changes the app's settings by overriding `live_overrides`.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from rq import Queue, SimpleWorker
from werkzeug.serving import make_server

from webhook import create_app
from webhook.config import Settings
from workers.context import API_QUEUE, EVENTS_QUEUE, WorkerContext, install
from workers.dispatch import dispatch_all
from workers.fake_weixin import FakeWeixin

MP_KEY = "mp-test-key-0123456789abcdef"

Live = tuple[str, Settings, FakeWeixin]


@pytest.fixture
def live_overrides() -> dict[str, Any]:
    """Extra settings for the live app and its workers (override in a test module)."""
    return {}


@pytest.fixture
def live(settings: Settings, live_overrides: dict[str, Any]) -> Iterator[Live]:
    """The app on a loopback port and a fake Weixin that pushes to it; yields (base URL, settings, fake)."""
    holder: dict[str, Any] = {}

    def wsgi(environ: Any, start_response: Any) -> Any:
        return holder["app"](environ, start_response)

    server = make_server("127.0.0.1", 0, wsgi, threaded=True)
    base = f"http://127.0.0.1:{server.server_port}"
    fake = FakeWeixin(
        appid=settings.appid or "", appsecret=settings.appsecret or "", push_to=f"{base}/wechat",
        token=settings.token, aes_key=settings.aes_key, push_retry_delay=0.0,
    ).start()
    s = settings.with_overrides(api_base=fake.url, mp_api_key=MP_KEY, recovery_delay=0.0, **live_overrides)
    holder["app"] = create_app(s)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield base, s, fake
    fake.stop()
    server.shutdown()
    holder["app"].extensions["wxcoupon.engine"].dispose()


@pytest.fixture
def ctx(live: Live, redis_url: str) -> Iterator[WorkerContext]:
    """A worker context on the live settings (the fake Weixin as the API)."""
    import redis

    from webhook.store import make_engine

    _, s, _ = live
    context = WorkerContext(settings=s, engine=make_engine(s), redis=redis.Redis.from_url(redis_url))
    install(context)
    yield context
    context.engine.dispose()


def work(ctx: WorkerContext) -> None:
    """Dispatch everything pending and run the queues dry, as a burst worker does."""
    dispatch_all(ctx)
    queues = [Queue(ctx.queue_name(n), connection=ctx.redis) for n in (EVENTS_QUEUE, API_QUEUE)]
    SimpleWorker(queues, connection=ctx.redis).work(burst=True)


def mp_post(base: str, path: str, body: dict[str, Any], key: str = MP_KEY) -> requests.Response:
    """POST a JSON body to the Mini Program API with the bearer key."""
    return requests.post(f"{base}/api/mp/{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def mp_get(base: str, path: str, key: str = MP_KEY, **params: str) -> requests.Response:
    """GET from the Mini Program API with the bearer key."""
    return requests.get(f"{base}/api/mp/{path}", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10)
