"""The set-based apply of a batch: the same card state as row-by-row, exact row status when it fails."""
from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from rq import Queue, SimpleWorker

from webhook.cardstore import CardStatus, RecordKind, cards, mp_records
from webhook.config import Settings
from webhook.store import events, finish_processing, list_attempts, utcnow, writing
from workers import batch, card_events, handlers
from workers.batch import BatchFailedError
from workers.context import EVENTS_QUEUE, WorkerContext
from workers.dispatch import dispatch_all
from workers.jobs import process_events, process_mp_records
from workers.mp_records import plan_code
from workers.reconcile import CardPlan, apply_plans, match_for, settle_waiting_records, update_card

from .pushes import make_push

CARD = "pCardBatch0000000000000001"
CODES = ["100000000001", "100000000002", "100000000003"]
T0 = 1_700_000_000


# ---------------------------------------------------------------- bulk == row by row, any order

def _event(i: int, kind: str, code: str, t: int) -> dict[str, Any]:
    # One holder and one channel per code, as Weixin sends them: fill-once fields
    # keep the first value, so only consistent values can be order independent.
    fields: dict[str, Any] = {}
    event, old_code = kind, None
    if kind == "gift":  # a friend received it: user_get_card of the new code, from the code before it
        event, fields, old_code = "user_get_card", {"IsGiveByFriend": "1"}, CODES[CODES.index(code) - 1]
    elif kind == "return":
        event, fields = "user_gifting_card", {"IsReturnBack": "1"}
    return {
        "id": i, "event": event, "card_id": CARD, "code": code, "old_code": old_code, "openid": f"oOA_{code}",
        "unionid": f"u_{code}" if code != CODES[1] else None, "outer_str": f"ch{code[-1]}", "create_time": t,
        "fields": fields,
    }  # fmt: skip


def _record(record_id: int, code: str, kind: str) -> dict[str, Any]:
    return {"id": record_id, "card_id": CARD, "code": None, "mp_openid": f"oMP_{code}", "unionid": f"u_{code}",
            "oa_openid": f"oOA_{code}" if kind == RecordKind.ENTRY.value else None, "kind": kind,
            "decoded_at": None, "is_success": True}  # fmt: skip


KINDS = ["user_get_card", "gift", "user_gifting_card", "return", "user_del_card", "user_consume_card"]
EVENT = st.tuples(st.sampled_from(KINDS), st.sampled_from(CODES), st.integers(0, 3))
RECORD = st.tuples(st.sampled_from(CODES), st.sampled_from([k.value for k in RecordKind]))
ITEMS = st.lists(st.one_of(EVENT.map(lambda e: ("event", e)), RECORD.map(lambda r: ("record", r))), min_size=1, max_size=14)


def _rows(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for i, (kind, value) in enumerate(items, start=1):
        if kind == "event":
            what, code, later = value
            if what in ("user_get_card", "gift"):
                later = 0  # a code is received once: its copies are the same push
            rows.append(("event", _event(i, what, code, T0 + later)))
        else:
            code, record_kind = value
            rows.append(("record", (_record(i, code, record_kind), code)))
    return rows


def _plan(ctx: WorkerContext, kind: str, row: Any) -> CardPlan:
    if kind == "event":
        plan = handlers.handler_for(row).plan
        assert plan is not None
        return plan(ctx, row, None)
    record, code = row
    return plan_code(ctx, record, code)


def _reference(conn: sa.Connection, kind: str, row: Any) -> None:
    """Row by row, written the way the handlers wrote before the set-based apply (update_card per change)."""
    if kind == "record":
        record, code = row
        oa = record["oa_openid"] if record["kind"] == RecordKind.ENTRY.value else None
        card = update_card(conn, CARD, code, mp_openid=record["mp_openid"], unionid=record["unionid"], oa_openid=oa)
        conn.execute(sa.update(mp_records).where(mp_records.c.id == record["id"])
                     .values(code=code, match=match_for(card).value, updated_at=utcnow()))  # fmt: skip
        return
    code, t = row["code"], row["create_time"]
    if row["event"] == "user_get_card":
        gifted = row["old_code"] if row["fields"].get("IsGiveByFriend") == "1" else None
        card = update_card(conn, CARD, code, status=CardStatus.RECEIVED, status_time=t, oa_openid=row["openid"],
                           unionid=row["unionid"], outer_str=row["outer_str"], old_code=gifted, origin="push",
                           received_time=t)  # fmt: skip
        if gifted:
            update_card(conn, CARD, gifted, status=CardStatus.GIFTED, status_time=t, new_code=code)
        settle_waiting_records(conn, card)
    elif row["event"] == "user_gifting_card":
        back = row["fields"].get("IsReturnBack") == "1"
        update_card(conn, CARD, code, status=CardStatus.RECEIVED if back else CardStatus.GIFTING, status_time=t)
    else:
        status = CardStatus.DELETED if row["event"] == "user_del_card" else CardStatus.CONSUMED
        update_card(conn, CARD, code, status=status, status_time=t)


def _reset(ctx: WorkerContext, rows: list[tuple[str, Any]]) -> None:
    now = utcnow()
    with ctx.engine.begin() as conn:
        conn.execute(mp_records.delete())
        conn.execute(cards.delete())
        for kind, row in rows:
            if kind == "record":
                record = row[0]
                conn.execute(sa.insert(mp_records).values(
                    id=record["id"], dedupe_key=f"k{record['id']}", kind=record["kind"], card_id=CARD,
                    encrypt_code=f"enc{record['id']}", mp_openid=record["mp_openid"], oa_openid=record["oa_openid"],
                    is_success=True, status="processing", attempts=1, created_at=now, updated_at=now,
                ))  # fmt: skip


def _state(ctx: WorkerContext) -> tuple[Any, Any]:
    skip = {"id", "created_at", "updated_at"}
    with ctx.engine.connect() as conn:
        found = [{k: v for k, v in r.items() if k not in skip}
                 for r in conn.execute(sa.select(cards).order_by(cards.c.card_id, cards.c.code)).mappings()]  # fmt: skip
        records = conn.execute(sa.select(mp_records.c.id, mp_records.c.code, mp_records.c.match)
                               .order_by(mp_records.c.id)).all()  # fmt: skip
    return found, [tuple(r) for r in records]


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=ITEMS, data=st.data())
def test_set_based_apply_equals_row_by_row_in_any_order(worker_ctx: WorkerContext, items: Any, data: Any) -> None:
    """One set-based apply of a batch leaves the cards and records exactly as applying its rows one by one
    (the former way) does, and as the same rows in any other order do."""
    rows = _rows(items)
    _reset(worker_ctx, rows)
    with writing(worker_ctx.engine) as conn:
        for kind, row in rows:
            _reference(conn, kind, row)
    expected = _state(worker_ctx)

    _reset(worker_ctx, rows)
    with writing(worker_ctx.engine) as conn:
        apply_plans(conn, [_plan(worker_ctx, kind, row) for kind, row in rows])
    assert _state(worker_ctx) == expected

    shuffled = data.draw(st.permutations(rows))
    _reset(worker_ctx, rows)
    with writing(worker_ctx.engine) as conn:
        apply_plans(conn, [_plan(worker_ctx, kind, row) for kind, row in shuffled])
    assert _state(worker_ctx)[0] == expected[0]  # the cards: independent of the order


# ---------------------------------------------------------------- a row that breaks the set-based apply


def _push(client: Any, settings: Settings, event: str = "user_get_card", **fields: Any) -> None:
    query, body = make_push(settings, event, **fields)
    assert client.post("/wechat", query_string=query, data=body).status_code == 200


def _statuses(ctx: WorkerContext) -> list[tuple[str, int]]:
    with ctx.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(events.c.status, events.c.attempts).order_by(events.c.id))]  # type: ignore[misc]


def _outcomes(ctx: WorkerContext, event_id: int) -> list[str]:
    with ctx.engine.connect() as conn:
        return [a["outcome"] for a in list_attempts(conn, event_id)]


def test_a_row_that_breaks_the_set_based_apply_fails_alone(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses one row's card (NOT NULL): the batch falls back to row by row, that row fails, the rest commit."""

    def broken(ctx: WorkerContext, row: dict[str, Any], fetched: Any) -> CardPlan:
        plan = card_events.plan_user_del_card(ctx, row, fetched)
        return CardPlan(tuple(type(c)(None, c.code, c.status, c.status_time) for c in plan.changes))  # type: ignore[arg-type]

    monkeypatch.setitem(handlers.HANDLERS, "user_del_card", handlers.Handler(plan=broken))
    for i, code in enumerate(CODES):
        _push(client, settings, FromUserName=f"oUser{i}", CardId=CARD, UserCardCode=code)
    _push(client, settings, "user_del_card", CardId=CARD, UserCardCode=CODES[0])
    with pytest.raises(BatchFailedError) as raised:
        process_events([1, 2, 3, 4])
    assert list(raised.value.failed) == [4]
    assert _statuses(worker_ctx) == [("processed", 1)] * 3 + [("failed", 1)]
    with worker_ctx.engine.connect() as conn:
        got = conn.execute(sa.select(cards.c.code, cards.c.status).order_by(cards.c.code)).all()
    assert [tuple(g) for g in got] == [(code, "received") for code in CODES]
    assert [_outcomes(worker_ctx, i) for i in (1, 2, 3, 4)] == [["processed"]] * 3 + [["failed"]]


# ---------------------------------------------------------------- the write phase refused


def _refuse(times: int) -> Any:
    calls = {"n": 0}
    original = batch._write

    def write(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise sa.exc.OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked"))
        return original(*args)

    return write


@pytest.mark.parametrize("refusals", [1, 3, 99])
def test_a_refused_write_phase_is_retried_then_its_rows_go_back_to_rq(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch, refusals: int
) -> None:
    """The Weixin answers are in hand: a refused write is tried again at once; if it keeps failing the rows
    go back to queued for RQ's retry (not `processing` until the reaper), and dead after the last try."""
    fetched: list[int] = []

    def fetch(ctx: WorkerContext, row: dict[str, Any]) -> str:
        fetched.append(row["id"])
        return str(row["code"])

    monkeypatch.setitem(handlers.HANDLERS, "user_get_card",
                        handlers.Handler(fetch=fetch, plan=card_events.plan_user_get_card))  # fmt: skip
    monkeypatch.setattr(batch, "WRITE_BACKOFF", (0.0,))
    monkeypatch.setattr(batch, "_write", _refuse(refusals))
    ctx = WorkerContext(settings=settings.with_overrides(retry_intervals=(0,)), engine=worker_ctx.engine,
                        redis=worker_ctx.redis)  # fmt: skip
    _push(client, settings, CardId=CARD, UserCardCode=CODES[0])
    dispatch_all(ctx)
    SimpleWorker([Queue(ctx.queue_name(EVENTS_QUEUE), connection=ctx.redis)], connection=ctx.redis).work(
        burst=True, with_scheduler=False
    )
    if refusals < batch.WRITE_TRIES:  # the second try of the write phase worked: one attempt, one call
        assert (_statuses(worker_ctx), _outcomes(worker_ctx, 1), fetched) == ([("processed", 1)], ["processed"], [1])
    elif refusals == batch.WRITE_TRIES:  # RQ's retry took the row again and wrote it
        assert (_statuses(worker_ctx), _outcomes(worker_ctx, 1), fetched) == (
            [("processed", 2)], ["retrying", "processed"], [1, 1])
    else:
        assert (_statuses(worker_ctx), _outcomes(worker_ctx, 1)) == ([("dead", 2)], ["retrying", "dead"])
        with worker_ctx.engine.connect() as conn:
            assert "database is locked" in conn.execute(sa.select(events.c.last_error)).scalar_one()


# ---------------------------------------------------------------- a stale job, and the metrics


def test_a_stale_job_cannot_finish_a_row_another_job_holds(settings: Settings, worker_ctx: WorkerContext, client: Any) -> None:
    """finish_processing with a job id moves only that job's rows."""
    _push(client, settings, CardId=CARD, UserCardCode=CODES[0])
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).values(status="processing", job_id="evt-new"))
        assert finish_processing(conn, [1], events, job_id="evt-old") == 0
        assert finish_processing(conn, [1], events, job_id="evt-new") == 1


def test_reconciliation_outcomes_are_counted_once_per_batch(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded records waiting for their push, then matched by it: counted per batch, not per row."""
    from workers import reconcile

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(reconcile.metrics, "count_reconcile", lambda outcome, n=1: calls.append((outcome, n)))
    now = utcnow()
    with worker_ctx.engine.begin() as conn:
        for i, code in enumerate(CODES[:2], start=1):
            conn.execute(sa.insert(mp_records).values(
                dedupe_key=f"k{i}", kind="receipt", card_id=CARD, encrypt_code=f"e{i}", code=code,
                mp_openid=f"oMP{i}", is_success=True, status="queued", attempts=0, created_at=now, updated_at=now,
            ))  # fmt: skip
    process_mp_records([1, 2])
    assert calls == [("waiting", 2)]
    for code in CODES[:2]:
        _push(client, settings, CardId=CARD, UserCardCode=code, CreateTime=T0 + int(code[-1]))
    calls.clear()
    process_events([1, 2])
    assert calls == [("matched", 2)]
    with worker_ctx.engine.connect() as conn:
        assert list(conn.execute(sa.select(mp_records.c.match).order_by(mp_records.c.id)).scalars()) == ["matched"] * 2


def test_a_card_created_by_another_worker_meanwhile_is_merged_not_lost(
    worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the batch's lock of the existing cards and its insert of the missing ones another worker
    created one: the insert skips it, and the batch merges its changes into that card instead."""
    from workers import reconcile

    rows = _rows([("record", (CODES[0], "receipt")), ("event", ("user_del_card", CODES[0], 3)),
                  ("event", ("user_get_card", CODES[1], 0))])  # fmt: skip
    _reset(worker_ctx, rows)
    with writing(worker_ctx.engine) as conn:  # the other worker's card: received, holder known
        update_card(conn, CARD, CODES[0], status=CardStatus.RECEIVED, status_time=T0, oa_openid="oOA_other", origin="push")
    original = reconcile._select_locked
    calls = {"n": 0}

    def blind_first(conn: Any, keys: Any) -> Any:
        calls["n"] += 1
        return {} if calls["n"] == 1 else original(conn, keys)

    monkeypatch.setattr(reconcile, "_select_locked", blind_first)
    with writing(worker_ctx.engine) as conn:
        apply_plans(conn, [_plan(worker_ctx, kind, row) for kind, row in rows])
    found, records = _state(worker_ctx)
    first = next(c for c in found if c["code"] == CODES[0])
    assert (first["status"], first["oa_openid"], first["mp_openid"]) == ("deleted", "oOA_other", f"oMP_{CODES[0]}")
    assert records == [(1, CODES[0], "matched")]
    assert [c["code"] for c in found] == CODES[:2] and calls["n"] == 2


def test_the_workers_sqlite_write_lock_is_not_kept_by_a_forked_child(sqlite_url: str, tmp_path: Any) -> None:
    """RQ forks its scheduler from the worker; a child forked while the lock is held must not keep it."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import make_settings
    from webhook.store import make_engine, worker_writing

    engine = make_engine(make_settings(tmp_path, sqlite_url, None))
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")  # fmt: skip
    lock_file = str(tmp_path / "events.sqlite3") + ".workers.lock"
    with worker_writing(engine):
        child = os.fork()
        if child == 0:  # pragma: no cover - the child only sleeps, holding what it inherited
            time.sleep(3)
            os._exit(0)
        held = subprocess.run([sys.executable, "-c", probe, lock_file], capture_output=True)
        assert held.returncode != 0  # held now, by this process
    try:
        free = subprocess.run([sys.executable, "-c", probe, lock_file], capture_output=True, text=True)
        assert free.returncode == 0, free.stderr
    finally:
        os.waitpid(child, 0)
        engine.dispose()
