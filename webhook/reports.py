"""Read-only reports over the card state: what `wxcoupon reconcile report` and the admin page show."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection

from .cardstore import Match, cards, mp_records
from .config import Settings
from .store import utcnow

# The counts, in the order they are shown.
REPORT_COUNTS = ("matched", "waiting", "given_up", "recovered", "unmatched", "ignored", "undecoded", "oa_only")


def given_up_before(settings: Settings, now: dt.datetime | None = None) -> dt.datetime:
    """Waiting records decoded before this are no longer looked up with Weixin (WXCOUPON_RECOVERY_GIVE_UP)."""
    return (now or utcnow()) - dt.timedelta(seconds=settings.recovery_give_up)


def reconciliation_report(conn: Connection, settings: Settings, unmatched_limit: int = 100) -> dict[str, Any]:
    """Counts of the reconciliation, and the unmatched and given-up items (oldest first, at most `unmatched_limit`
    of each).

    matched/waiting/recovered/unmatched/ignored: Mini Program records by where
    they stand against the pushes; given_up: the waiting ones gap recovery no
    longer looks up (decoded longer than WXCOUPON_RECOVERY_GIVE_UP ago: a push
    may still match them, an operator should look); undecoded: records whose
    code a worker has not decoded yet; oa_only: cards known from pushes that no
    Mini Program record claims.
    """
    counts = {m.value: 0 for m in Match}
    for match, n in conn.execute(select(mp_records.c.match, func.count()).group_by(mp_records.c.match)).all():
        if match is not None:
            counts[str(match)] = int(n)
    undecoded = conn.execute(
        select(func.count()).select_from(mp_records).where(mp_records.c.match.is_(None))
    ).scalar_one()
    given_up = conn.execute(
        select(func.count()).select_from(mp_records).where(
            mp_records.c.match == Match.WAITING.value, mp_records.c.decoded_at < given_up_before(settings))
    ).scalar_one()
    oa_only = conn.execute(
        select(func.count())
        .select_from(cards)
        .where(and_(cards.c.origin.is_not(None), cards.c.mp_openid.is_(None)))
    ).scalar_one()
    columns = (mp_records.c.id, mp_records.c.kind, mp_records.c.card_id, mp_records.c.code, mp_records.c.mp_openid,
               mp_records.c.last_error, mp_records.c.checked_at)  # fmt: skip
    unmatched = conn.execute(
        select(*columns).where(mp_records.c.match == Match.UNMATCHED.value).order_by(mp_records.c.id)
        .limit(unmatched_limit)
    ).mappings()
    abandoned = conn.execute(
        select(*columns, mp_records.c.decoded_at)
        .where(mp_records.c.match == Match.WAITING.value, mp_records.c.decoded_at < given_up_before(settings))
        .order_by(mp_records.c.id)
        .limit(unmatched_limit)
    ).mappings()
    return {
        **counts,
        "given_up": int(given_up),
        "undecoded": int(undecoded),
        "oa_only": int(oa_only),
        "unmatched_items": [dict(i) for i in unmatched],
        "given_up_items": [dict(i) for i in abandoned],
    }
