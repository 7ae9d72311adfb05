"""Pytest plugin: a fake Weixin server per test and a WeixinClient against it on real Redis.

Redis comes from conftest.py's `redis_url`/`redis_client` fixtures (the
machine's Redis in CI, else an embedded one), flushed around each test.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from workers.fake_weixin import FakeWeixin
from webhook.weixin_api import WeixinClient

FAKE_APPID = "wxfa4e5eed00000001"
FAKE_APPSECRET = "fa4e5ecre70000000000000000000001"


@pytest.fixture
def fake_weixin() -> Iterator[FakeWeixin]:
    """A fake Weixin on a loopback ephemeral port, fresh for each test."""
    fake = FakeWeixin(appid=FAKE_APPID, appsecret=FAKE_APPSECRET).start()
    try:
        yield fake
    finally:
        fake.stop()


def make_weixin_client(fake: FakeWeixin, conn: redis.Redis, **options: Any) -> WeixinClient:
    """A client for `fake`'s account, with short timeouts and backoffs suited to tests."""
    options.setdefault("timeout", 2.0)
    options.setdefault("backoff_base", 0.01)
    options.setdefault("backoff_max", 0.05)
    return WeixinClient(fake.url, fake.appid, fake.appsecret, conn, **options)


@pytest.fixture
def weixin_client(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> WeixinClient:
    """A WeixinClient against the test's fake Weixin, sharing tokens through the test Redis."""
    return make_weixin_client(fake_weixin, redis_client)
