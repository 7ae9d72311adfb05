"""The Alembic migrations build exactly the schema the code declares, and can be undone."""
from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import webhook.cardstore  # noqa: F401  (registers its tables)
import webhook.members  # noqa: F401  (likewise)
from webhook import schema
from webhook.store import metadata


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
