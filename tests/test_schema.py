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


def test_job_id_indexes_leave_out_rows_without_a_job(database_url: str) -> None:
    """A push's INSERT (job_id NULL) updates no job_id index, and lookups by job still use it."""
    engine = sa.create_engine(database_url)
    schema.upgrade(engine)
    option = f"{engine.dialect.name}_where"
    with engine.begin() as conn:
        for table in ("events", "mp_records", "activations"):
            [index] = [i for i in sa.inspect(conn).get_indexes(table) if i["name"] == f"ix_{table}_job_id"]
            where = str(index["dialect_options"][option])
            assert "job_id IS NOT NULL" in where.replace("(", "").replace(")", "")
        if engine.dialect.name == "sqlite":
            for lookup in ("job_id = 'j1'", "job_id IN ('j1', 'j2')"):
                plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN SELECT id FROM events WHERE {lookup}").fetchall()
                assert "ix_events_job_id" in " ".join(str(row[-1]) for row in plan), plan
    schema.downgrade(engine, "0003")
    with engine.connect() as conn:
        [index] = [i for i in sa.inspect(conn).get_indexes("events") if i["name"] == "ix_events_job_id"]
        assert not index.get("dialect_options", {}).get(option)
    engine.dispose()
