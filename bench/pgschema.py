"""A fresh PostgreSQL schema per benchmark run (the search_path trick of tests/conftest.py)."""
from __future__ import annotations

import urllib.parse

import sqlalchemy as sa


def pg_schema_url(base: str, schema: str) -> str:
    """The PostgreSQL URL whose connections use `schema`."""
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={urllib.parse.quote(f'-csearch_path={schema}')}"


def _admin(base: str, sql: str) -> None:
    engine = sa.create_engine(base, connect_args={"connect_timeout": 5})
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
    finally:
        engine.dispose()


def create_pg_schema(base: str, schema: str) -> None:
    """A fresh, empty schema for one run."""
    _admin(base, f'CREATE SCHEMA "{schema}"')


def drop_pg_schema(base: str, schema: str) -> None:
    """Drop a run's schema and everything in it."""
    _admin(base, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
