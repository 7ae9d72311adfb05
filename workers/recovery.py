"""Gap recovery: a Mini Program record whose push never came is checked with Weixin.

Weixin gives up on a push after three tries and never sends it again, so a
record still `waiting` after WXCOUPON_RECOVERY_DELAY is looked up with
card/code/get; if Weixin knows the code, the missing receipt is recorded as
recovered, otherwise the record is unmatched.
"""
from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from typing import Any

from rq import Queue
from sqlalchemy import or_, select, update

from webhook import metrics
from webhook.cardstore import Match, mp_records
from webhook.store import utcnow, worker_writing
from webhook.weixin_api import InvalidCodeError, WeixinAPIError

from .context import API_QUEUE, WorkerContext
from .failures import describe, is_transient
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
    """Look each waiting record's code up with Weixin and settle it."""
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
    counts = {"recovered": 0, "unmatched": 0, "retry_later": 0}
    checked = int(time.time())
    with worker_writing(ctx.engine) as conn:
        for record in records:
            answer = answers[record["id"]]
            if isinstance(answer, BaseException):
                if is_transient(answer) or not isinstance(answer, InvalidCodeError):
                    # Not an answer about the code: stay waiting, checked again a delay later.
                    counts["retry_later"] += 1
                    conn.execute(
                        update(mp_records).where(mp_records.c.id == record["id"]).values(last_error=describe(answer))
                    )
                    continue
                counts["unmatched"] += 1
                conn.execute(
                    update(mp_records)
                    .where(mp_records.c.id == record["id"], mp_records.c.match == Match.WAITING.value)
                    .values(match=Match.UNMATCHED.value, last_error=describe(answer), updated_at=utcnow())
                )
                continue
            status = WEIXIN_STATUS.get(str(answer.get("user_card_status") or "NORMAL"))
            card = update_card(
                conn, record["card_id"], record["code"], status=status, status_time=checked,
                oa_openid=answer.get("openid"), origin="recovered",
            )  # fmt: skip
            settled = settle_waiting_records(conn, card)
            counts["recovered"] += 1 if settled else 0
    metrics.count_reconcile(Match.RECOVERED.value, counts["recovered"])
    metrics.count_reconcile(Match.UNMATCHED.value, counts["unmatched"])
    log.info("recovery done", extra=counts)
    return counts
