"""Reconciliation over real HTTP: the fake Weixin pushes to the app, the Mini Program API records, workers join."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
import sqlalchemy as sa
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue

from webhook import metrics
from webhook.cardstore import cards, mp_records
from webhook.config import Settings
from webhook.logs import JSONFormatter, TextFormatter, pseudonym
from webhook.store import event_attempts, events, utcnow
from workers.context import API_QUEUE, WorkerContext
from workers.dispatch import dispatch_all
from workers.fake_weixin import FakeWeixin
from workers.fake_weixin.state import PushEvent
from workers.cli import main
from workers.jobs import process_events
from webhook.reports import reconciliation_report as report
from workers.recovery import recover_records, schedule_recovery

from . import procs
from .live_fixtures import MP_KEY, mp_post, work  # the `live` and `ctx` fixtures live there too
from .pushes import make_push

CARD = "pCardReconcile000000000001"


def receipt(base: str, mp_openid: str, encrypt_code: str, card_id: str = CARD) -> requests.Response:
    return mp_post(base, "card-receipts", {"mp_openid": mp_openid, "card_list": [
        {"card_id": card_id, "code": encrypt_code, "is_success": True}]})


def card_row(ctx: WorkerContext, code: str, card_id: str = CARD) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        row = conn.execute(sa.select(cards).where(cards.c.card_id == card_id, cards.c.code == code)).mappings().one()
    return dict(row)


def matches(ctx: WorkerContext) -> list[str | None]:
    with ctx.engine.connect() as conn:
        return list(conn.execute(sa.select(mp_records.c.match).order_by(mp_records.c.id)).scalars())


@pytest.mark.parametrize("order", ["push first", "mini program first"])
def test_receipt_joins_both_openids_in_either_order(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext, order: str
) -> None:
    """wx.addCard in the Mini Program and Weixin's user_get_card push meet on the real code, whichever comes first."""
    base, _, fake = live
    if order == "push first":
        added = fake.add_card(CARD, "oOA_user1", outer_str="poster-7")
        fake.wait_for_pushes(1)
        work(ctx)
        assert receipt(base, "oMP_user1", added["encrypt_code"]).status_code == 202
        work(ctx)
    else:
        added = fake.add_card(CARD, "oOA_user1", outer_str="poster-7")
        assert receipt(base, "oMP_user1", added["encrypt_code"]).status_code == 202
        # Only the Mini Program side is processed first (the push is held back).
        fake.wait_for_pushes(1)
        with ctx.engine.begin() as conn:
            conn.execute(sa.text("UPDATE events SET status = 'failed'"))  # parked: not dispatched yet
        work(ctx)
        assert matches(ctx) == ["waiting"]
        with ctx.engine.begin() as conn:
            conn.execute(sa.text("UPDATE events SET status = 'pending'"))
        work(ctx)
    card = card_row(ctx, added["code"])
    assert (card["oa_openid"], card["mp_openid"], card["outer_str"], card["status"]) == (
        "oOA_user1", "oMP_user1", "poster-7", "received"
    )
    assert matches(ctx) == ["matched"]
    listed = requests.get(f"{base}/api/mp/users/oMP_user1/cards", headers={"Authorization": f"Bearer {MP_KEY}"}, timeout=5)
    assert listed.status_code == 200
    assert [(c["card_id"], c["code"], c["status"]) for c in listed.json()["cards"]] == [(CARD, added["code"], "received")]


def stored_rows(ctx: WorkerContext) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a push or a receipt can change, as they are now."""
    with ctx.engine.connect() as conn:
        return {table.name: [tuple(row) for row in conn.execute(sa.select(table).order_by(*table.primary_key))]
                for table in (events, event_attempts, mp_records, cards)}  # fmt: skip


def pushes_counted(outcome: str, event: str = "user_get_card") -> float:
    """Pushes the app answered so far with this outcome (`stored` or `duplicate`)."""
    found = metrics.metrics().registry.get_sample_value("wxcoupon_pushes_total", {"event": event, "outcome": outcome})
    return found or 0.0


def test_duplicates_on_both_sides_change_nothing(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same receipt posted three times and the push retried after it was handled: one event, handled once,
    one record, one card, one match."""
    base, _, fake = live
    pusher = fake.pusher
    assert pusher is not None
    sent: list[PushEvent] = []
    submit = pusher.submit

    def keep(pushed: list[PushEvent]) -> list[int]:
        sent.extend(pushed)
        return submit(pushed)

    monkeypatch.setattr(pusher, "submit", keep)
    added = fake.add_card(CARD, "oOA_dup")
    fake.wait_for_pushes(1)
    assert [push.event for push in sent] == ["user_get_card"]
    ids = {tuple(receipt(base, "oMP_dup", added["encrypt_code"]).json()["records"]) for _ in range(3)}
    assert len(ids) == 1
    work(ctx)
    work(ctx)
    handled = stored_rows(ctx)
    assert (len(handled["events"]), len(handled["event_attempts"])) == (1, 1)  # the push, handled once
    duplicates = pushes_counted("duplicate")
    # Weixin's retry: the same message (same CreateTime, so the same dedupe key), sealed afresh with a
    # new timestamp and nonce, POSTed by the fake's pusher to /wechat as the first one was.
    submit(sent)
    assert [p["state"] for p in fake.wait_for_pushes(2)] == ["delivered", "delivered"]
    assert pushes_counted("duplicate") == duplicates + 1  # it reached the app, which knew it
    assert dispatch_all(ctx) == 0  # no row, so no job
    work(ctx)
    assert stored_rows(ctx) == handled  # no second event, no second attempt, nothing changed
    with ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(cards)).scalar_one() == 1
        assert conn.execute(sa.select(sa.func.count()).select_from(mp_records)).scalar_one() == 1
    assert matches(ctx) == ["matched"]
    assert fake.calls("/card/code/decrypt") == 1


def test_concurrent_receipts_listing_the_same_codes_in_any_order_all_succeed(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext
) -> None:
    """Receipts naming the same codes in opposite orders, posted at once, are all accepted with the ids in
    their own order, one record per code (before: on PostgreSQL each transaction held some codes' keys while
    waiting for the others', deadlocked, and most requests answered 503 "store unavailable")."""
    base, _, _ = live
    listed = [{"card_id": CARD, "code": f"enc-{i:02d}"} for i in range(30)]
    bodies = [{"mp_openid": "oMP_many", "card_list": listed if n % 2 else listed[::-1]} for n in range(8)]
    answers: list[requests.Response | None] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def post(n: int) -> None:
        start.wait()
        answers[n] = mp_post(base, "card-receipts", bodies[n])

    threads = [threading.Thread(target=post, args=(n,)) for n in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code if a is not None else None for a in answers] == [202] * len(bodies)
    forward = {tuple(a.json()["records"]) for a in answers[1::2] if a is not None}
    backward = {tuple(a.json()["records"]) for a in answers[0::2] if a is not None}
    assert len(forward) == 1 and backward == {tuple(reversed(next(iter(forward))))}
    with ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(mp_records)).scalar_one() == len(listed)


def test_gift_moves_the_card_to_the_new_code_and_holder(live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext) -> None:
    """A gift: the old code ends as gifted pointing at the new one, which the friend holds."""
    _, _, fake = live
    added = fake.add_card(CARD, "oOA_giver")
    gifted = fake.gift_card(CARD, added["code"], "oOA_friend")
    pushes = fake.wait_for_pushes(3)
    assert [p["state"] for p in pushes] == ["delivered"] * 3
    work(ctx)
    old, new = card_row(ctx, added["code"]), card_row(ctx, gifted["code"])
    assert (old["status"], old["new_code"], old["oa_openid"]) == ("gifted", gifted["code"], "oOA_giver")
    assert (new["status"], new["old_code"], new["oa_openid"]) == ("received", added["code"], "oOA_friend")


def _status_events(settings: Settings) -> list[tuple[dict[str, str], bytes]]:
    t = int(time.time())
    code = "880000000001"
    common = {"FromUserName": "oOA_order", "CardId": CARD, "UserCardCode": code}
    return [
        make_push(settings, "user_get_card", CreateTime=t, **common),
        make_push(settings, "user_gifting_card", CreateTime=t + 1, IsReturnBack=0, **common),
        make_push(settings, "user_gifting_card", CreateTime=t + 2, IsReturnBack=1, **common),
        make_push(settings, "user_consume_card", CreateTime=t + 3, **common),
    ]


def test_every_arrival_order_ends_in_the_same_card_state(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """All 24 orders of receive / gifting / gift returned / consume leave the card consumed with the same holder."""
    pushes = _status_events(settings)
    finals = set()
    for order in itertools.permutations(range(4)):
        with worker_ctx.engine.begin() as conn:
            conn.execute(cards.delete())
            conn.execute(sa.text("DELETE FROM event_attempts"))
            conn.execute(sa.text("DELETE FROM events"))
        for i in order:
            assert client.post("/wechat", query_string=pushes[i][0], data=pushes[i][1]).status_code == 200
            with worker_ctx.engine.connect() as conn:
                last = conn.execute(sa.text("SELECT max(id) FROM events")).scalar_one()
            process_events([int(last)])  # one at a time, in this arrival order
        card = card_row(worker_ctx, "880000000001")
        finals.add((card["status"], card["oa_openid"], card["origin"]))
    assert finals == {("consumed", "oOA_order", "push")}


def test_late_events_never_move_a_card_backwards(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """A replayed older event after a deletion leaves the card deleted."""
    t = int(time.time())
    common = {"FromUserName": "oOA_late", "CardId": CARD, "UserCardCode": "880000000002"}
    for event, when in (("user_get_card", t), ("user_del_card", t + 5), ("user_gifting_card", t + 2)):
        query, body = make_push(settings, event, CreateTime=when, **common)
        client.post("/wechat", query_string=query, data=body)
    process_events([1, 2, 3])
    assert card_row(worker_ctx, "880000000002")["status"] == "deleted"


def test_concurrent_workers_on_one_card_agree(client: Any, settings: Settings, worker_ctx: WorkerContext) -> None:
    """Two workers handling events of the same card at the same moment end in one consistent row."""
    t = int(time.time())
    common = {"FromUserName": "oOA_race", "CardId": CARD, "UserCardCode": "880000000003"}
    for i in range(20):
        event = "user_get_card" if i % 2 == 0 else "user_gifting_card"
        query, body = make_push(settings, event, CreateTime=t + i, **common)
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    errors: list[BaseException] = []

    def run(ids: list[int]) -> None:
        try:
            process_events(ids)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=([i for i in range(1, 21) if i % 2 == k],)) for k in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    card = card_row(worker_ctx, "880000000003")
    # The latest event (t+19, a gifting) wins, whichever worker applied it.
    assert (card["status"], card["status_time"], card["oa_openid"]) == ("gifting", t + 19, "oOA_race")
    with worker_ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(cards)).scalar_one() == 1


def test_gap_recovery_records_a_receipt_whose_push_was_lost(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext
) -> None:
    """No push ever came (Weixin gave up): card/code/get confirms the code, the card is recovered."""
    base, _, fake = live
    added = fake.add_card(CARD, "oOA_lost")
    fake.wait_for_pushes(1)
    with ctx.engine.begin() as conn:  # the push is lost: as if it never arrived
        conn.execute(sa.text("DELETE FROM events"))
    receipt(base, "oMP_lost", added["encrypt_code"])
    receipt(base, "oMP_ghost", "bm90LWEtcmVhbC1jb2Rl")  # an encrypted code Weixin never issued
    work(ctx)
    assert schedule_recovery(ctx) >= 1
    work(ctx)
    card = card_row(ctx, added["code"])
    assert (card["origin"], card["oa_openid"], card["mp_openid"], card["status"]) == (
        "recovered", "oOA_lost", "oMP_lost", "received"
    )
    with ctx.engine.connect() as conn:
        data = report(conn, ctx.settings)
    assert data["recovered"] == 1
    assert schedule_recovery(ctx) == 0  # nothing waiting any more


def test_gap_recovery_gives_up_on_a_record_after_the_give_up_age(settings: Settings, worker_ctx: WorkerContext) -> None:
    """A waiting record is looked up every WXCOUPON_RECOVERY_DELAY until WXCOUPON_RECOVERY_GIVE_UP after its
    decoding (before, for ever: a lookup that never settles it, quota or a bad reply, cost a call every delay);
    then it stays waiting, counted as given_up, where a push can still match it."""
    ctx = dataclasses.replace(worker_ctx, settings=settings.with_overrides(recovery_delay=600.0,
                                                                           recovery_give_up=86400.0))  # fmt: skip
    now = utcnow()
    ages = {1: 3600, 2: 86400 - 60, 3: 86400 + 60, 4: 30 * 86400}  # record id: seconds since its decoding
    with ctx.engine.begin() as conn:
        for n, age in ages.items():
            conn.execute(sa.insert(mp_records).values(
                id=n, dedupe_key=f"rec-{n}", kind="entry", card_id=CARD, encrypt_code=f"enc{n}", code=f"90000000000{n}",
                is_success=True, match="waiting", status="processed", attempts=1, created_at=now, updated_at=now,
                decoded_at=now - dt.timedelta(seconds=age),
            ))  # fmt: skip
    assert schedule_recovery(ctx, now=now) == 2
    with ctx.engine.connect() as conn:
        checked = conn.execute(sa.select(mp_records.c.id).where(mp_records.c.checked_at.is_not(None))).scalars()
        assert sorted(checked) == [1, 2]
        data = report(conn, ctx.settings)
    assert (data["waiting"], data["given_up"]) == (4, 2)
    assert [item["id"] for item in data["given_up_items"]] == [3, 4]
    env = procs.settings_env(ctx.settings, WXCOUPON_RECOVERY_DELAY="600", WXCOUPON_RECOVERY_GIVE_UP="86400")
    listed = CliRunner().invoke(main, ["reconcile", "report"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "given_up   2" in listed.output
    assert [line.split(":")[0] for line in listed.output.splitlines() if line.startswith("given-up")] == [
        "given-up record 3", "given-up record 4"]


def _refuse_card_updates(ctx: WorkerContext, code: str) -> str:
    """Make the database refuse any change to the card row of `code`; what its error says.

    PostgreSQL raises SQLSTATE 54000, as for an index entry too large (the row error of
    workers.failures.is_row_error); SQLite aborts the statement, as a constraint does.
    """
    assert code.isdigit()  # written into the DDL as it is (DDL takes no bound parameters)
    with ctx.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text(
                "CREATE FUNCTION refuse_card() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'card row refused' USING ERRCODE = '54000'; END $$"))
            conn.execute(sa.text(f"CREATE TRIGGER refuse_card BEFORE UPDATE ON cards FOR EACH ROW "
                                 f"WHEN (NEW.code = '{code}') EXECUTE FUNCTION refuse_card()"))  # fmt: skip
        else:
            conn.execute(sa.text(f"CREATE TRIGGER refuse_card BEFORE UPDATE ON cards WHEN NEW.code = '{code}' "
                                 "BEGIN SELECT RAISE(ABORT, 'card row refused'); END"))  # fmt: skip
    return "card row refused"


def test_gap_recovery_isolates_a_record_that_fails_and_still_fails_on_an_outage(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one recovery job, a record whose card row the database refuses and a record whose lookup raises an
    unexpected error each stay waiting with their error in last_error; the other records are recovered and the
    job finishes. It used to fail the whole job, leaving every record waiting, each time it was claimed again.
    Redis unreachable is not a record's failure: the job still fails and writes nothing."""
    base, _, fake = live
    added = [fake.add_card(CARD, f"oOA_iso{i}") for i in range(4)]
    fake.wait_for_pushes(len(added))
    with ctx.engine.begin() as conn:  # the pushes are lost
        conn.execute(sa.text("DELETE FROM events"))
    card_list = [{"card_id": CARD, "code": a["encrypt_code"], "is_success": True} for a in added]
    assert mp_post(base, "card-receipts", {"mp_openid": "oMP_iso", "card_list": card_list}).status_code == 202
    work(ctx)
    assert matches(ctx) == ["waiting"] * 4
    refused, buggy = added[1]["code"], added[2]["code"]
    refusal = _refuse_card_updates(ctx, refused)
    real_get_code = ctx.weixin.get_code

    def get_code(code: str, card_id: str | None = None, check_consume: bool = False) -> dict[str, Any]:
        if code == buggy:
            raise KeyError("a bug met by this record only")
        return real_get_code(code, card_id=card_id, check_consume=check_consume)

    monkeypatch.setattr(ctx.weixin, "get_code", get_code)
    assert schedule_recovery(ctx) == 4  # one job: WXCOUPON_JOB_BATCH is larger
    work(ctx)

    with ctx.engine.connect() as conn:
        got = conn.execute(sa.select(mp_records.c.id, mp_records.c.code, mp_records.c.match, mp_records.c.last_error)
                           .order_by(mp_records.c.id)).all()  # fmt: skip
    by_code = {code: (match, error) for _, code, match, error in got}
    assert [by_code[a["code"]][0] for a in added] == ["recovered", "waiting", "waiting", "recovered"]
    assert refusal in by_code[refused][1] and by_code[buggy][1].startswith("KeyError")
    assert card_row(ctx, refused)["origin"] is None and card_row(ctx, added[3]["code"])["origin"] == "recovered"
    api = Queue(ctx.queue_name(API_QUEUE), connection=ctx.redis)
    assert api.failed_job_registry.count == 0

    down = redis.Redis(host="127.0.0.1", port=procs.free_port(), retry=Retry(NoBackoff(), 0))
    waiting = [row_id for row_id, code, _, _ in got if code in (refused, buggy)]
    with pytest.raises(redis.ConnectionError):
        recover_records(dataclasses.replace(ctx, redis=down), waiting)  # its own Weixin client, on that Redis
    with ctx.engine.connect() as conn:
        after = conn.execute(sa.select(mp_records.c.id, mp_records.c.code, mp_records.c.match, mp_records.c.last_error)
                             .order_by(mp_records.c.id)).all()  # fmt: skip
    assert after == got
    down.close()


def test_undecodable_code_is_a_permanent_failure_and_reported(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext
) -> None:
    """An encrypt_code Weixin rejects (40056) fails that record only, with the errcode kept."""
    base, _, fake = live
    added = fake.add_card(CARD, "oOA_ok")
    resp = mp_post(base, "card-receipts", {"mp_openid": "oMP_mixed", "card_list": [
        {"card_id": CARD, "code": added["encrypt_code"], "is_success": True},
        {"card_id": CARD, "code": "Zm9yZ2VkLWNvZGU=", "is_success": True},
        {"card_id": CARD, "code": "bm90LWFkZGVk", "is_success": False}]})
    assert resp.status_code == 202
    fake.wait_for_pushes(1)
    work(ctx)
    with ctx.engine.connect() as conn:
        # In the list's order: the answer's ids are (the rows of one receipt are inserted in key order).
        found = {r[0]: r[1:] for r in conn.execute(sa.select(
            mp_records.c.id, mp_records.c.status, mp_records.c.match, mp_records.c.last_error))}
        rows = [found[record_id] for record_id in resp.json()["records"]]
    assert [r[0] for r in rows] == ["processed", "failed", "processed"]
    assert rows[1][2] and "40056" in rows[1][2]
    assert [rows[0][1], rows[1][1], rows[2][1]] == ["matched", None, "ignored"]



def decode_tries() -> float:
    """card/code/decrypt exchanges this process's Weixin clients made so far, whatever their outcome."""
    registry = metrics.metrics().registry
    return registry.get_sample_value("wxcoupon_weixin_api_seconds_count", {"api": "card/code/decrypt"}) or 0.0


def test_a_batch_stops_calling_a_failing_weixin_and_leaves_the_rest_to_rqs_retry(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext
) -> None:
    """Weixin answers -1 to every decode: after a streak of failed calls (each retried by the client)
    the job stops calling; every record goes back to queued for RQ's retry, none is lost or failed."""
    from workers import batch

    base, _, fake = live
    records = 3 * batch.FAILING_STREAK
    card_list = [{"card_id": CARD, "code": fake.add_card(CARD, f"oOA_down{i}")["encrypt_code"], "is_success": True}
                 for i in range(records)]  # fmt: skip
    assert mp_post(base, "card-receipts", {"mp_openid": "oMP_down", "card_list": card_list}).status_code == 202
    fake.wait_for_pushes(records)
    with ctx.engine.begin() as conn:
        conn.execute(sa.text("UPDATE events SET status = 'failed'"))  # only the records run here
    fake.inject_fault("/card/code/decrypt", errcode=-1, count=10_000)
    tried, seen = decode_tries(), fake.calls("/card/code/decrypt")
    work(ctx)
    with ctx.engine.connect() as conn:
        rows = conn.execute(sa.select(mp_records.c.status, mp_records.c.last_error)).all()
    assert len(rows) == records and {status for status, _ in rows} == {"queued"}
    skipped = [error for _, error in rows if "WeixinFailingError" in error]
    # The streak, plus the calls already running on the other fetch threads when it broke
    # (at most one per thread: a thread checks the streak before each call).
    called = records - len(skipped)
    assert batch.FAILING_STREAK <= called < batch.FAILING_STREAK + batch.FETCH_THREADS
    # The tries are counted where they are made. The fake may see fewer: a try sent on a kept-alive
    # connection just as the fake closes it as idle (by the wall clock) is lost, and the client retries it.
    assert decode_tries() - tried == called * ctx.weixin.retry_attempts
    assert 0 < fake.calls("/card/code/decrypt") - seen <= called * ctx.weixin.retry_attempts

@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "mp_openid"),
        ({"mp_openid": "o1"}, "card_list"),
        ({"mp_openid": "o1", "card_list": []}, "card_list"),
        ({"mp_openid": "o1", "card_list": ["x"]}, "card_list[0]"),
        ({"mp_openid": "o1", "card_list": [{"code": "c"}]}, "card_list[0].card_id"),
        ({"mp_openid": "o1", "card_list": [{"card_id": "p"}]}, "card_list[0].code"),
        ({"mp_openid": "o1", "card_list": [{"card_id": "p", "code": "c", "is_success": "yes"}]},
         "card_list[0].is_success"),
        ({"mp_openid": 7, "card_list": [{"card_id": "p", "code": "c"}]}, "mp_openid"),
        ({"mp_openid": "o" * 200, "card_list": [{"card_id": "p", "code": "c"}]}, "mp_openid"),
        # JSON's \ud800 escape decodes to a lone surrogate, which no UTF-8 key or column can hold.
        ({"mp_openid": "o\ud800", "card_list": [{"card_id": "p", "code": "c"}]}, "mp_openid"),
        ({"mp_openid": "o1", "card_list": [{"card_id": "p", "code": "c\udfff"}]}, "card_list[0].code"),
    ],
)
def test_mp_api_bad_input_names_the_field(live: tuple[str, Settings, FakeWeixin], body: dict[str, Any], field: str) -> None:
    """A 400 that names the offending field; nothing stored."""
    base, _, _ = live
    resp = mp_post(base, "card-receipts", body)
    assert resp.status_code == 400 and resp.json()["field"] == field


@pytest.mark.parametrize("body", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"NaN", b"\xff{}"],
                         ids=["deep arrays", "deep objects", "not an object", "not utf-8"])
def test_mp_api_body_that_is_no_json_object_is_400(live: tuple[str, Settings, FakeWeixin], body: bytes) -> None:
    """Nesting deeper than the JSON parser goes is a 400 like any other body that is not a JSON object."""
    base, _, _ = live
    resp = requests.post(f"{base}/api/mp/card-receipts", data=body, timeout=10,
                         headers={"Authorization": f"Bearer {MP_KEY}", "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["field"] == "body"


@pytest.mark.parametrize("segment", ["%00", "o%00x", "o%01", "o%0A", "o" * 129])
def test_a_users_openid_that_no_column_can_hold_is_400(live: tuple[str, Settings, FakeWeixin], segment: str) -> None:
    """A NUL byte or a control character in /users/<mp_openid>/cards is a 400 naming mp_openid on both
    databases (before: PostgreSQL refused the NUL in the query, answered 503 "store unavailable" and logged
    an error; SQLite answered 200 with no cards)."""
    base, _, _ = live
    resp = requests.get(f"{base}/api/mp/users/{segment}/cards", headers={"Authorization": f"Bearer {MP_KEY}"}, timeout=5)
    assert resp.status_code == 400 and resp.json()["field"] == "mp_openid"


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def request_lines() -> Iterator[list[logging.LogRecord]]:
    """The app's request lines (logger wxcoupon.request) logged inside the block."""
    logger, kept = logging.getLogger("wxcoupon.request"), _Kept()
    logger.addHandler(kept)
    try:
        yield kept.records
    finally:
        logger.removeHandler(kept)


def test_the_access_line_of_a_users_cards_call_carries_no_openid(
    live: tuple[str, Settings, FakeWeixin]
) -> None:
    """GET /users/<mp_openid>/cards is logged with a pseudonym in place of the openid, the one every other
    line gives it, so lines about one user still correlate (before: the openid in clear, in `path`)."""
    base, _, _ = live
    openid = "oMP_logged_user_4711"
    with request_lines() as logged:
        for key in (MP_KEY, "wrong-key"):  # answered or refused, the path is logged the same way
            requests.get(f"{base}/api/mp/users/{openid}/cards", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    lines = [record for record in logged if record.getMessage() == "request"]
    assert [record.status for record in lines] == [200, 401]  # type: ignore[attr-defined]
    for record in lines:
        text = TextFormatter().format(record) + JSONFormatter().format(record)
        assert openid not in text
        assert f"/api/mp/users/{pseudonym(openid)}/cards" in text


@pytest.mark.parametrize(("path", "shown"), [
    ("/api/mp/users/o1/cards%0A2026-01-01 00:00:00,000 ERROR forged", "/cards%0A2026-01-01 00:00:00,000 ERROR forged"),
    ("/no-such-page%0D%0Aforged", "/no-such-page%0D%0Aforged"),
    ("/api/mp/card-receipts%00%1b[31m%C2%85%E2%80%A8", "/api/mp/card-receipts%00%1B[31m%C2%85%E2%80%A8"),
])
def test_a_control_character_in_the_path_cannot_forge_a_log_line(
    live: tuple[str, Settings, FakeWeixin], path: str, shown: str
) -> None:
    """A request's path is logged with its control characters percent-encoded: one request, one text line
    (before: a %0A in the path, accepted from anyone without a key, started a line of the client's making)."""
    base, _, _ = live
    with request_lines() as logged:
        requests.get(f"{base}{path}", headers={"Authorization": f"Bearer {MP_KEY}"}, timeout=5)
    [record] = [record for record in logged if record.getMessage() == "request"]
    line = TextFormatter().format(record)
    assert line.isprintable() and f"{shown} status=" in line


def test_mp_api_needs_the_bearer_key(live: tuple[str, Settings, FakeWeixin]) -> None:
    """Without the right bearer key: 401 on every Mini Program endpoint."""
    base, _, _ = live
    assert mp_post(base, "card-receipts", {}, key="wrong-key").status_code == 401
    assert requests.get(f"{base}/api/mp/users/o1/cards", timeout=5).status_code == 401
    assert requests.post(f"{base}/api/mp/card-ext", json={"card_id": CARD}, timeout=5).status_code == 401


def test_card_ext_is_signed_with_the_shared_ticket_and_accepted_by_weixin(
    live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext
) -> None:
    """The cardExt from /api/mp/card-ext passes the (fake) Weixin's signature check on add-card."""
    base, _, fake = live
    resp = mp_post(base, "card-ext", {"card_id": CARD, "outer_str": "mp-banner"})
    assert resp.status_code == 200
    card_ext = resp.json()["card_ext"]
    added = fake.add_card(CARD, "oOA_ext", card_ext=card_ext)
    assert added["code"]
    assert fake.calls("/cgi-bin/ticket/getticket") == 1
    mp_post(base, "card-ext", {"card_id": CARD})
    assert fake.calls("/cgi-bin/ticket/getticket") == 1  # cached and shared


class TestCardExtWithoutItsDependencies:
    """card-ext needs WECHAT_APPID, WECHAT_APPSECRET and Redis (the shared api_ticket): without one it answers
    503 naming what is missing (before: the ConfigError or redis's ConnectionError was unhandled, 500)."""

    @pytest.fixture(params=["no appid", "no appsecret", "redis unreachable"])
    def live_overrides(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"no appid": {"appid": None}, "no appsecret": {"appsecret": None},
                "redis unreachable": {"redis_url": "redis://127.0.0.1:9/0"}}[request.param]  # fmt: skip

    def test_card_ext_is_503_naming_the_cause(self, live: tuple[str, Settings, FakeWeixin]) -> None:
        base, settings, fake = live
        resp = mp_post(base, "card-ext", {"card_id": CARD})
        assert resp.status_code == 503
        missing = "WECHAT_APPID" if not settings.appid else "WECHAT_APPSECRET" if not settings.appsecret else "redis"
        assert missing in resp.json()["error"]
        assert fake.calls("/cgi-bin/ticket/getticket") == 0


def test_coupon_entry_links_the_two_openids(live: tuple[str, Settings, FakeWeixin], ctx: WorkerContext) -> None:
    """Seed flow 4: a user arriving from a coupon gives card_id, encrypt_code and the OA openid."""
    base, _, fake = live
    added = fake.add_card(CARD, "oOA_entry")
    fake.wait_for_pushes(1)
    resp = mp_post(base, "coupon-entries", {"card_id": CARD, "encrypt_code": added["encrypt_code"],
                                            "oa_openid": "oOA_entry", "mp_openid": "oMP_entry"})
    assert resp.status_code == 202
    work(ctx)
    card = card_row(ctx, added["code"])
    assert (card["oa_openid"], card["mp_openid"]) == ("oOA_entry", "oMP_entry")


def test_a_gift_naming_the_received_code_as_its_old_code_leaves_that_card_held(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """A user_get_card with IsGiveByFriend=1 whose OldUserCardCode is its own UserCardCode moved no code: the card
    stays received by its holder. It used to be marked gifted (a final state) pointing at itself, so the card the
    friend holds ended for good."""
    t = int(time.time())
    code = "880000000010"
    pushes = [
        make_push(settings, "user_get_card", CreateTime=t, FromUserName="oOA_giver", CardId=CARD, UserCardCode=code),
        make_push(settings, "user_get_card", CreateTime=t + 5, FromUserName="oOA_friend", CardId=CARD,
                  UserCardCode=code, IsGiveByFriend=1, OldUserCardCode=code, FriendUserName="oOA_giver"),
    ]  # fmt: skip
    for query, body in pushes:
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    process_events([1, 2])
    card = card_row(worker_ctx, code)
    assert (card["status"], card["status_time"], card["old_code"], card["new_code"]) == ("received", t + 5, None, None)
    with worker_ctx.engine.connect() as conn:
        assert conn.execute(sa.select(events.c.status).order_by(events.c.id)).scalars().all() == ["processed"] * 2


@pytest.mark.parametrize("bogus", [99_999_999_999, 999_999_999_999_999_999, -5, 0])
def test_a_create_time_no_clock_gives_does_not_outrank_the_cards_real_events(
    client: Any, settings: Settings, worker_ctx: WorkerContext, bogus: int
) -> None:
    """A user_get_card whose CreateTime is past 32 bits (or not positive) is stored and acknowledged like any
    push; its time places it before the card's events of real times, so a later gifting moves the card. A huge
    CreateTime used to outrank every real time: the card stayed received for ever, whatever happened next."""
    t = int(time.time())
    common = {"FromUserName": "oOA_clock", "CardId": CARD, "UserCardCode": "880000000011"}
    for event, when in (("user_get_card", bogus), ("user_gifting_card", t)):
        query, body = make_push(settings, event, CreateTime=when, **common)
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    for order in ([1], [2]), ([2], [1]):
        with worker_ctx.engine.begin() as conn:
            conn.execute(cards.delete())
            conn.execute(sa.text("DELETE FROM event_attempts"))
            conn.execute(events.update().values(status="pending"))
        for ids in order:
            process_events(ids)
        card = card_row(worker_ctx, "880000000011")
        assert (card["status"], card["status_time"], card["oa_openid"]) == ("gifting", t, "oOA_clock"), order
