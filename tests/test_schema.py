"""The Alembic migrations build exactly the schema the code declares, and can be undone."""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

import webhook.cardstore  # noqa: F401  (registers its tables)
import webhook.members  # noqa: F401  (likewise)
from webhook import schema
from webhook.store import events, make_engine, metadata

from .conftest import make_settings


def test_migrations_match_the_declared_tables(database_url: str) -> None:
    """After `db upgrade` there is no difference between the database and the metadata."""
    engine = sa.create_engine(database_url)
    schema.upgrade(engine)
    schema.upgrade(engine)  # idempotent
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert schema.current_revision(engine) is not None
    engine.dispose()


def test_downgrade_to_base_removes_every_table(database_url: str) -> None:
    """Each migration's downgrade undoes it (deploys can roll back)."""
    engine = sa.create_engine(database_url)
    schema.upgrade(engine)
    schema.downgrade(engine, "base")
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names()) - {"alembic_version"}
    assert tables == set()
    engine.dispose()


# A revision on top of the product's, written into a test-only version location.
ONLINE_INDEX_REVISION = '''"""test only: an index built online

Revision ID: 9001
Revises: 0003
"""
from alembic import op

from webhook.migrations.online import create_index_online, drop_index_online

revision = "9001"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():  # on every database, not only in the helper's PostgreSQL branch
        op.execute("SELECT 1")
    create_index_online("ix_events_openid", "events", ["openid"])


def downgrade() -> None:
    drop_index_online("ix_events_openid", "events")
'''

FAILING_REVISION = '''"""test only: a migration that fails half-way

Revision ID: 9002
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "9002"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("scratch", sa.Column("id", sa.Integer(), primary_key=True))
    raise RuntimeError("this migration fails after its first statement")


def downgrade() -> None:
    op.drop_table("scratch")
'''


def with_test_revision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str) -> None:
    """Make `schema` see the product's migrations plus one test-only revision."""
    versions = tmp_path / "test_versions"
    versions.mkdir()
    (versions / "9000_test_only.py").write_text(source)
    add_version_location(monkeypatch, versions)


def add_version_location(monkeypatch: pytest.MonkeyPatch, versions: Path) -> None:
    """Patch schema.alembic_config to read `versions` too (here and in a child process alike)."""
    packaged = schema.alembic_config

    def alembic_config(engine: sa.Engine) -> Config:
        cfg = packaged(engine)
        cfg.set_main_option("path_separator", "os")
        cfg.set_main_option("version_locations", f"{schema.MIGRATIONS / 'versions'}{os.pathsep}{versions}")
        return cfg

    monkeypatch.setattr(schema, "alembic_config", alembic_config)


def index_names(engine: sa.Engine, table: str) -> set[str]:
    """The names of the indexes on `table`."""
    with engine.connect() as conn:
        return {str(ix["name"]) for ix in sa.inspect(conn).get_indexes(table)}


def test_a_migration_can_build_an_index_online_and_be_undone(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration may leave its transaction (autocommit block, CONCURRENTLY); its stamp, downgrade and rerun still work."""
    with_test_revision(monkeypatch, tmp_path, ONLINE_INDEX_REVISION)
    engine = make_engine(make_settings(tmp_path, database_url, None))
    schema.upgrade(engine, "0003")
    with engine.begin() as conn:
        conn.execute(events.insert(), [event_row(i) for i in range(50)])
    schema.upgrade(engine)
    assert schema.current_revision(engine) == "9001"
    assert "ix_events_openid" in index_names(engine, "events")
    schema.upgrade(engine)  # at head: nothing to do
    schema.downgrade(engine, "0003")
    assert schema.current_revision(engine) == "0003"
    assert "ix_events_openid" not in index_names(engine, "events")
    schema.upgrade(engine)
    assert schema.current_revision(engine) == "9001"
    schema.downgrade(engine, "base")
    with engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) - {"alembic_version"} == set()
    engine.dispose()


def test_a_failing_migration_is_undone_alone(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each migration is one transaction: a failure undoes it entirely and keeps the ones before it applied."""
    with_test_revision(monkeypatch, tmp_path, FAILING_REVISION)
    engine = make_engine(make_settings(tmp_path, database_url, None))
    with pytest.raises(RuntimeError, match="fails after its first statement"):
        schema.upgrade(engine)
    assert schema.current_revision(engine) == "0003"
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert "events" in tables and "scratch" not in tables
    engine.dispose()


def event_row(i: int, **values: object) -> dict[str, object]:
    """An events row with every required column."""
    now = datetime.now(timezone.utc)
    row: dict[str, object] = dict(
        dedupe_key=f"test-{i}", msg_type="event", event="user_get_card", openid=f"openid-{i % 7}", mode="plain",
        raw_xml="<xml/>", fields={}, status="processed", received_at=now, updated_at=now,
    )
    row.update(values)
    return row
