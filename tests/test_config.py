"""DATABASE_URL and REDIS_URL: checked at start, naming the variable; the URL forms operators are given work as they are."""
from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from webhook.config import ConfigError, Settings, load_settings
from webhook.store import make_engine
from workers.cli.dev import without_password

from . import procs

BASE_ENV = {"WECHAT_TOKEN": "wxcoupontesttoken"}


@pytest.mark.parametrize(
    ("given", "used"),
    [
        # libpq's and hosting providers' forms get the driver wxcoupon installs (psycopg 3),
        # whatever SQLAlchemy's default for the bare name (psycopg2 before SQLAlchemy 2.1).
        ("postgres://app:p%40ss@db.internal:5432/coupons?sslmode=require",
         "postgresql+psycopg://app:p%40ss@db.internal:5432/coupons?sslmode=require"),
        ("postgresql://app@db.internal/coupons", "postgresql+psycopg://app@db.internal/coupons"),
        ("postgresql+psycopg://app@db.internal/coupons", "postgresql+psycopg://app@db.internal/coupons"),
        ("sqlite:////var/lib/wxcoupon/events.sqlite3", "sqlite:////var/lib/wxcoupon/events.sqlite3"),
        ("sqlite+pysqlite:///events.sqlite3", "sqlite+pysqlite:///events.sqlite3"),
    ],
)
def test_database_urls_operators_are_given_work_as_they_are(given: str, used: str) -> None:
    """The password stays as written (percent-escapes included); only PostgreSQL's driver is made explicit."""
    assert load_settings({**BASE_ENV, "DATABASE_URL": given}, dotenv=False).database_url == used


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("notaurl", "is not a database URL"),
        ("mysql://app@db/coupons", "SQLite or PostgreSQL"),
        ("postgresql+psycopg2://app@db/coupons", "uses psycopg"),
        ("postgresql+asyncpg://app@db/coupons", "uses psycopg"),
        ("sqlite+aiosqlite:///x.sqlite3", "uses pysqlite"),
    ],
)
def test_a_database_url_wxcoupon_cannot_use_stops_at_start_naming_it(given: str, says: str) -> None:
    """Before: a traceback from SQLAlchemy at the first connection (or none until then)."""
    with pytest.raises(ConfigError, match=f"DATABASE_URL.*{says}"):
        load_settings({**BASE_ENV, "DATABASE_URL": given}, dotenv=False)


@pytest.mark.parametrize(("given", "says"), [
    ("localhost:6379", "Redis URL must specify one of the following schemes"),
    ("redis://cache:sixthousand/0", "Port could not be cast"),
])
def test_a_malformed_redis_url_stops_at_start_naming_it(given: str, says: str) -> None:
    """Before: redis-py's ValueError and its traceback, from the first command that connected."""
    with pytest.raises(ConfigError, match=f"REDIS_URL is malformed: {says}"):
        load_settings({**BASE_ENV, "REDIS_URL": given}, dotenv=False)
    for fine in ("redis://127.0.0.1:6379/0", "rediss://:pw@cache:6380/1", "unix:///run/redis.sock"):
        assert load_settings({**BASE_ENV, "REDIS_URL": fine}, dotenv=False).redis_url == fine


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("name", ["WXCOUPON_DISPATCH_INTERVAL", "WXCOUPON_RECOVERY_DELAY", "WXCOUPON_REAP_INTERVAL",
                                  "WXCOUPON_HEARTBEAT_TTL", "WXCOUPON_RECOVERY_GIVE_UP"])  # fmt: skip
def test_a_duration_that_is_no_number_stops_at_start_naming_it(name: str, raw: str) -> None:
    """Before: nan and inf were taken (nan passes 'must be positive'), and failed in a worker's loop much later
    (timedelta(seconds=nan), time.sleep(inf))."""
    with pytest.raises(ConfigError, match=f"{name} must be a number of seconds"):
        load_settings({**BASE_ENV, name: raw}, dotenv=False)


def test_recovery_give_up_must_outlast_the_delay() -> None:
    """A give-up age no longer than the delay would look nothing up: refused at start, naming both."""
    with pytest.raises(ConfigError, match="WXCOUPON_RECOVERY_GIVE_UP .* must be longer than WXCOUPON_RECOVERY_DELAY"):
        load_settings({**BASE_ENV, "WXCOUPON_RECOVERY_DELAY": "3600", "WXCOUPON_RECOVERY_GIVE_UP": "3600"},
                      dotenv=False)  # fmt: skip
    assert load_settings({**BASE_ENV, "WXCOUPON_RECOVERY_GIVE_UP": "86400"}, dotenv=False).recovery_give_up == 86400


def test_a_postgres_url_connects(settings: Settings) -> None:
    """`postgres://…`, as pg_dump and providers write it, reaches the machine's PostgreSQL."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL")
    url = sa.engine.make_url(settings.database_url)
    given = url.set(drivername="postgres").render_as_string(hide_password=False)
    engine = make_engine(load_settings({**BASE_ENV, "DATABASE_URL": given}, dotenv=False))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://app:hunter2secret@127.0.0.1:{port}/coupons", "port {port} failed"),
        ("sqlite:////nonexistent-wxcoupon-dir/events.sqlite3", "unable to open database file"),
    ],
    ids=["postgres down", "sqlite folder missing"],
)
def test_db_commands_on_an_unusable_database_say_so_in_one_line(settings: Settings, url: str, says: str) -> None:
    """`db upgrade` and `db current`: one line naming DATABASE_URL and the driver's reason, exit 1;
    no traceback, no password."""
    port = procs.free_port()  # nothing listens there
    env = procs.settings_env(settings, DATABASE_URL=url.format(port=port))
    for command in (["db", "upgrade"], ["db", "current"]):
        result = procs.wxcoupon(command, env, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Error: cannot use the database of DATABASE_URL" in result.stderr and says.format(port=port) in result.stderr
        assert "Traceback" not in result.stderr and "hunter2secret" not in result.stderr


def test_urls_are_printed_without_their_password(tmp_path: Path) -> None:
    """What `wxcoupon dev` prints of DATABASE_URL and REDIS_URL."""
    assert without_password("postgresql+psycopg://app:p%40ss@db:5432/c") == "postgresql+psycopg://app:***@db:5432/c"
    assert without_password("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert without_password("redis://cache:6379/0") == "redis://cache:6379/0"
    assert without_password(f"sqlite:///{tmp_path}/x.sqlite3") == f"sqlite:///{tmp_path}/x.sqlite3"
    assert without_password(None) is None
