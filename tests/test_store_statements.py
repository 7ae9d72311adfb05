"""The batch statement helpers give the same rows on SQLite and PostgreSQL, for any batch size."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import webhook.cardstore  # noqa: F401  (registers its tables)
import webhook.members  # noqa: F401  (likewise)
from webhook import schema
from webhook.cardstore import cards
from webhook.store import among, insert_rows, make_engine, pairs_among, utcnow

from .conftest import make_settings


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(database_url)
    schema.upgrade(engine)
    yield engine
    engine.dispose()


def _card(card_id: str, code: str, **values: object) -> dict[str, object]:
    now = utcnow()
    row: dict[str, object] = {"card_id": card_id, "code": code, "created_at": now, "updated_at": now,
                              "status": None, "status_time": None, "oa_openid": None}  # fmt: skip
    row.update(values)
    return row


@pytest.mark.parametrize("count", [1, 50, 51, 400])
def test_insert_rows_returns_only_new_rows_and_keeps_the_old(engine: sa.Engine, count: int) -> None:
    """Rows already there are left as they were and not returned; every value of a new row is stored."""
    with engine.begin() as conn:
        insert_rows(conn, cards, [_card("pA", "0", oa_openid="first")], ["card_id", "code"], [cards.c.code])
    rows = [_card("pA", str(i), status="received", status_time=1700000000 + i, oa_openid=f"o{i}") for i in range(count)]
    with engine.begin() as conn:
        found = insert_rows(conn, cards, rows, ["card_id", "code"], [cards.c.card_id, cards.c.code])
        inserted = {(r.card_id, r.code) for r in found}
    assert inserted == {("pA", str(i)) for i in range(1, count)}
    with engine.connect() as conn:
        stored = {r.code: r for r in conn.execute(sa.select(cards))}
    assert stored["0"].oa_openid == "first" and stored["0"].status is None
    for i in range(1, count):
        assert (stored[str(i)].status, stored[str(i)].status_time, stored[str(i)].oa_openid) == (
            "received", 1700000000 + i, f"o{i}")  # fmt: skip


@pytest.mark.parametrize("count", [0, 1, 50, 51, 400])
def test_among_and_pairs_among_select_exactly_the_listed_rows(engine: sa.Engine, count: int) -> None:
    """`among` (ids) and `pairs_among` (card_id, code) match IN semantics, empty lists included."""
    with engine.begin() as conn:
        insert_rows(conn, cards, [_card("pB", str(i)) for i in range(600)], ["card_id", "code"], [cards.c.id])
        ids = [int(i) for i in conn.execute(sa.select(cards.c.id).order_by(cards.c.id)).scalars()]
    wanted_ids = ids[::7][:count]
    wanted_pairs = [("pB", str(i)) for i in range(0, 3 * count, 3)] + [("pB", "no-such-code"), ("pZ", "1")]
    with engine.connect() as conn:
        by_id = conn.execute(sa.select(cards.c.id).where(among(conn, cards.c.id, wanted_ids))).scalars().all()
        by_pair = conn.execute(
            sa.select(cards.c.card_id, cards.c.code).where(pairs_among(conn, cards.c.card_id, cards.c.code, wanted_pairs))
        ).all()
    assert sorted(by_id) == sorted(wanted_ids)
    stored = {("pB", str(i)) for i in range(600)}
    assert sorted((r.card_id, r.code) for r in by_pair) == sorted(p for p in wanted_pairs if p in stored)


def test_insert_rows_without_conflict_or_returning_stores_every_row(engine: sa.Engine) -> None:
    """Attempt rows (no unique key) all land, with their values, NULLs included."""
    from webhook.store import event_attempts, events

    now = utcnow()
    with engine.begin() as conn:
        event_ids = [r.id for r in conn.execute(sa.insert(events).returning(events.c.id), [
            {"dedupe_key": f"k{i}", "msg_type": "event", "mode": "safe", "raw_xml": "<xml/>", "fields": {},
             "status": "processing", "attempts": 1, "received_at": now, "updated_at": now} for i in range(120)
        ])]  # fmt: skip
    rows = [{"event_id": event_ids[i], "attempt": 1, "job_id": f"job{i % 3}", "worker": "w", "started_at": now,
             "finished_at": now, "outcome": "processed", "error": None if i % 2 else "boom"} for i in range(120)]  # fmt: skip
    with engine.begin() as conn:
        insert_rows(conn, event_attempts, rows)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(event_attempts.c.event_id, event_attempts.c.job_id, event_attempts.c.error)).all()
    assert sorted(stored, key=repr) == sorted(((r["event_id"], r["job_id"], r["error"]) for r in rows), key=repr)


@pytest.mark.parametrize("count", [1, 51])
def test_update_rows_sets_each_rows_values_and_nothing_else(engine: sa.Engine, count: int) -> None:
    """Each listed card gets its own values (NULLs included); the other cards are untouched."""
    from webhook.store import update_rows

    with engine.begin() as conn:
        insert_rows(conn, cards, [_card("pC", str(i), status="received", oa_openid=f"o{i}") for i in range(120)],
                    ["card_id", "code"])  # fmt: skip
        ids = {r.code: r.id for r in conn.execute(sa.select(cards.c.id, cards.c.code))}
    changes = [{"id": ids[str(i)], "status": "deleted", "status_time": 1700000000 + i, "oa_openid": None}
               for i in range(0, 2 * count, 2)]  # fmt: skip
    with engine.begin() as conn:
        update_rows(conn, cards, changes)
        update_rows(conn, cards, [])
    with engine.connect() as conn:
        stored = {r.code: r for r in conn.execute(sa.select(cards))}
    changed = {str(i) for i in range(0, 2 * count, 2)}
    for code, row in stored.items():
        if code in changed:
            assert (row.status, row.status_time, row.oa_openid) == ("deleted", 1700000000 + int(code), None)
        else:
            assert (row.status, row.status_time, row.oa_openid) == ("received", None, f"o{code}")


def test_database_errors_carry_no_parameter_values(tmp_path: Path, database_url: str) -> None:
    """An error of the product's engine names the statement, never its values: RQ logs and keeps in Redis
    the exception of a job that fails, and a batch's parameters are card codes and openids."""
    settings = make_settings(tmp_path, database_url, None)
    engine = make_engine(settings)
    schema.upgrade(engine)
    try:
        with pytest.raises(sa.exc.StatementError) as caught:
            with engine.begin() as conn:
                for _ in range(2):  # the second breaks the unique key
                    conn.execute(sa.insert(cards), [_card("pA", "secret-code-0001", oa_openid="oSecretOpenid")])
        assert "oSecretOpenid" not in str(caught.value) and "oSecretOpenid" not in repr(caught.value)
    finally:
        engine.dispose()
