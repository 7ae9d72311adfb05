"""Gap recovery: a Mini Program record whose push never came is checked with Weixin.

Weixin gives up on a push after three tries and never sends it again, so a
record still `waiting` after WXCOUPON_RECOVERY_DELAY is looked up with
card/code/get; if Weixin knows the code, the missing receipt is recorded as
recovered, otherwise the record is unmatched. A lookup that settles nothing
(quota, a bad reply, an error of the record's own) is tried again a delay
later, until WXCOUPON_RECOVERY_GIVE_UP after the record's decoding; then the
record stays waiting, counted as given_up in the reconciliation report.
"""
from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from typing import Any

from rq import Queue
from sqlalchemy import or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from webhook import metrics
from webhook.cardstore import Match, mp_records
from webhook.reports import given_up_before
from webhook.store import utcnow, worker_writing
from webhook.weixin_api import InvalidCodeError, WeixinAPIError

from .context import API_QUEUE, WorkerContext
from .failures import describe, is_row_error, is_transient, loggable
from .reconcile import WEIXIN_STATUS, settle_waiting_records, update_card

log = logging.getLogger("wxcoupon.recovery")

RECOVER_RECORDS = "workers.jobs.recover_records"


def schedule_recovery(ctx: WorkerContext, now: dt.datetime | None = None, limit: int = 500) -> int:
    """Claim overdue waiting records and enqueue recovery jobs; return how many."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=ctx.settings.recovery_delay)
    with worker_writing(ctx.engine) as conn:
        ids = [
            int(i)
            for i in conn.execute(
                select(mp_records.c.id)
                .where(
                    mp_records.c.match == Match.WAITING.value,
                    mp_records.c.decoded_at < cutoff,
                    # Past it, a record whose lookups never settle it stops costing a call every delay.
                    mp_records.c.decoded_at >= given_up_before(ctx.settings, now),
                    or_(mp_records.c.checked_at.is_(None), mp_records.c.checked_at < cutoff),
                )
                .order_by(mp_records.c.id)
                .limit(limit)
            ).scalars()
        ]
        if ids:
            # Claimed by the check time: the next claim comes a delay later.
            conn.execute(update(mp_records).where(mp_records.c.id.in_(ids)).values(checked_at=now))
    if not ids:
        return 0
    queue = Queue(ctx.queue_name(API_QUEUE), connection=ctx.redis)
    size = ctx.settings.job_batch
    datas = [
        Queue.prepare_data(RECOVER_RECORDS, args=(ids[i : i + size],), job_id=f"rec-{secrets.token_hex(8)}")
        for i in range(0, len(ids), size)
    ]
    with ctx.redis.pipeline() as pipe:
        queue.enqueue_many(datas, pipeline=pipe)
        pipe.execute()
    log.info("recovery scheduled", extra={"records": len(ids)})
    return len(ids)


def recover_records(ctx: WorkerContext, record_ids: list[int]) -> dict[str, int]:
    """Look each waiting record's code up with Weixin and settle it; one record's failure is its own.

    A record whose lookup or settling fails for a reason of its own (an
    unexpected error, a row the database refuses) keeps `waiting` with the error
    in last_error, like an answer that says nothing about the code, and is
    checked again a delay later; the other records of the job are settled. A
    failure that is not the record's (Redis or the database unreachable, busy
    or locked) fails the job: its records are claimed again a delay later.
    """
    with ctx.engine.connect() as conn:
        records = [
            dict(r)
            for r in conn.execute(
                select(mp_records).where(mp_records.c.id.in_(record_ids), mp_records.c.match == Match.WAITING.value)
            ).mappings()
        ]
    answers: dict[int, dict[str, Any] | BaseException] = {}
    for record in records:
        try:
            answers[record["id"]] = ctx.weixin.get_code(record["code"], card_id=record["card_id"])
        except WeixinAPIError as exc:
            answers[record["id"]] = exc
        except Exception as exc:
            if is_transient(exc):
                raise  # Redis or the database, not this record: every record would meet it
            _record_failed(record, "lookup", exc)
            answers[record["id"]] = exc
    counts = {"recovered": 0, "unmatched": 0, "retry_later": 0}
    checked = int(time.time())
    with worker_writing(ctx.engine) as conn:
        for record in records:
            savepoint = conn.begin_nested()
            try:
                outcome = _settle(conn, record, answers[record["id"]], checked)
                savepoint.commit()
            except Exception as exc:
                if isinstance(exc, OperationalError) and not is_row_error(exc):
                    raise  # the database, not this record: the job fails
                savepoint.rollback()
                _record_failed(record, "settling", exc)
                _keep_waiting(conn, record, exc)
                outcome = "retry_later"
            if outcome is not None:
                counts[outcome] += 1
    metrics.count_reconcile(Match.RECOVERED.value, counts["recovered"])
    metrics.count_reconcile(Match.UNMATCHED.value, counts["unmatched"])
    log.info("recovery done", extra=counts)
    return counts


def _settle(
    conn: Connection, record: dict[str, Any], answer: dict[str, Any] | BaseException, checked: int
) -> str | None:
    """Write what Weixin's answer says about one record; the count it falls under (None: none)."""
    if isinstance(answer, BaseException):
        if is_transient(answer) or not isinstance(answer, InvalidCodeError):
            # Not an answer about the code: stay waiting, checked again a delay later.
            _keep_waiting(conn, record, answer)
            return "retry_later"
        conn.execute(
            update(mp_records)
            .where(mp_records.c.id == record["id"], mp_records.c.match == Match.WAITING.value)
            .values(match=Match.UNMATCHED.value, last_error=describe(answer), updated_at=utcnow())
        )
        return "unmatched"
    status = WEIXIN_STATUS.get(str(answer.get("user_card_status") or "NORMAL"))
    card = update_card(
        conn, record["card_id"], record["code"], status=status, status_time=checked,
        oa_openid=answer.get("openid"), origin="recovered",
    )  # fmt: skip
    return "recovered" if settle_waiting_records(conn, card) else None


def _keep_waiting(conn: Connection, record: dict[str, Any], error: BaseException) -> None:
    conn.execute(update(mp_records).where(mp_records.c.id == record["id"]).values(last_error=describe(error)))


def _record_failed(record: dict[str, Any], step: str, exc: BaseException) -> None:
    log.warning("recovery of a record failed; it stays waiting",
                extra={"record_id": record["id"], "step": step, "error": loggable(exc)})  # fmt: skip
