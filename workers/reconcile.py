"""Reconciliation: join Official Account pushes and Mini Program records per card.

Both sides meet on one `cards` row per (card_id, real code). Every write here
is idempotent and order independent: a field is filled once and never
overwritten with another value, and a status moves only to a later one (by
Weixin's CreateTime, then by rank), so either side may arrive first, any number
of times, on any worker, and the result is the same.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection

from webhook import metrics
from webhook.cardstore import STATUS_RANK, TERMINAL, CardStatus, Match, cards, mp_records
from webhook.store import insert_rows, pairs_among, update_rows, utcnow

log = logging.getLogger("wxcoupon.reconcile")

# Weixin's user_card_status (card/code/get) in our vocabulary.
WEIXIN_STATUS = {
    "NORMAL": CardStatus.RECEIVED,
    "CONSUMED": CardStatus.CONSUMED,
    "EXPIRE": CardStatus.EXPIRED,
    "GIFTING": CardStatus.GIFTING,
    "GIFT_SUCC": CardStatus.GIFTED,
    "GIFT_TIMEOUT": CardStatus.RECEIVED,
    "DELETE": CardStatus.DELETED,
    "UNAVAILABLE": CardStatus.DELETED,
}

# Fields that are filled once: the first non-empty value stays.
FILL_ONCE = ("oa_openid", "mp_openid", "unionid", "outer_str", "old_code", "new_code", "origin", "received_time")


# Weixin's CreateTime is unix seconds in 32 bits. A value outside (0, 2**32) is no
# moment at all: ordered by it, a push stamped in the year 30000 would outrank every
# real event of its card for ever.
_LATEST_TIME = 2**32


def event_time(time: int | None) -> int | None:
    """A status time that places the status among others, or None when it is absent or no clock's."""
    if time is None or not 0 < int(time) < _LATEST_TIME:
        return None
    return int(time)


def status_key(status: str | None, time: int | None) -> tuple[int, int, int, str]:
    """The order of card states: terminal last, then later time, then rank, then name.

    Applying the maximum of this key is what makes the final state independent
    of the order in which events arrive. A status of unknown time (see
    `event_time`) comes before every known time.
    """
    if status is None:
        return (-1, -1, -1, "")
    state = CardStatus(status)
    return (1 if state in TERMINAL else 0, event_time(time) or 0, STATUS_RANK[state], state.value)


@dataclass(frozen=True, slots=True)
class CardChange:
    """One change to the card (card_id, code): a status to move to and fill-once fields.

    With `settle`, the card's waiting Mini Program records are marked matched
    right after the change, when the card's Official Account side is known.
    """

    card_id: str
    code: str
    status: CardStatus | None = None
    status_time: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    settle: bool = False

    def __post_init__(self) -> None:
        for name in self.fields:
            if name not in FILL_ONCE:
                raise ValueError(f"{name} is not a fill-once card field")

    @property
    def key(self) -> tuple[str, str]:
        """The card this change is about."""
        return self.card_id, self.code


@dataclass(frozen=True, slots=True)
class RecordMatch:
    """A Mini Program record's decoded code; its match follows the card as it stands after the row."""

    record_id: int
    code: str | None
    decoded_at: Any
    card: tuple[str, str] | None  # None: nothing to match (wx.addCard failed): IGNORED


@dataclass(frozen=True, slots=True)
class CardPlan:
    """What one row does to the card state, computed before anything is written."""

    changes: tuple[CardChange, ...] = ()
    record: RecordMatch | None = None


NO_CHANGE = CardPlan()


def merge(card: Mapping[str, Any], change: CardChange) -> dict[str, Any]:
    """The columns `change` sets on `card`: empty fill-once fields filled, the status moved forward.

    The one rule of reconciliation, for the row-by-row path and the set-based one alike.
    """
    changes: dict[str, Any] = {}
    for name, value in change.fields.items():
        if value not in (None, "") and card[name] in (None, ""):
            changes[name] = value
    if change.status is not None and status_key(change.status.value, change.status_time) > status_key(
        card["status"], card["status_time"]
    ):
        changes["status"] = change.status.value
        changes["status_time"] = change.status_time
    return changes


def lock_card(conn: Connection, card_id: str, code: str) -> dict[str, Any]:
    """The card row for (card_id, code), created if missing, locked for this transaction."""
    return lock_cards(conn, [(card_id, code)])[(card_id, code)]


def lock_cards(conn: Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The card rows of `keys`, created if missing, locked for this transaction.

    Keys are inserted and locked in sorted order, so two workers whose batches
    share cards wait for each other instead of deadlocking.
    """
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    now = utcnow()
    insert_rows(conn, cards, [{"card_id": card_id, "code": code, "created_at": now, "updated_at": now}
                              for card_id, code in wanted], ["card_id", "code"])  # fmt: skip
    return _select_locked(conn, wanted)


def update_card(
    conn: Connection,
    card_id: str,
    code: str,
    *,
    status: CardStatus | None = None,
    status_time: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Fill empty fields and move the status forward; return the card as it is now."""
    change = CardChange(card_id, code, status, status_time, fields)
    card = lock_card(conn, card_id, code)
    changes = merge(card, change)
    if changes:
        changes["updated_at"] = utcnow()
        conn.execute(update(cards).where(cards.c.id == card["id"]).values(**changes))
        card.update(changes)
    return card


def settle_waiting_records(conn: Connection, card: dict[str, Any]) -> int:
    """Mark Mini Program records of this card matched once its Official Account side is known."""
    if card.get("origin") is None:
        return 0
    match = Match.RECOVERED if card["origin"] == "recovered" else Match.MATCHED
    result = conn.execute(
        update(mp_records)
        .where(
            mp_records.c.card_id == card["card_id"],
            mp_records.c.code == card["code"],
            mp_records.c.match == Match.WAITING.value,
        )
        .values(match=match.value, updated_at=utcnow())
    )
    return int(result.rowcount or 0)


def match_for(card: Mapping[str, Any]) -> Match:
    """Where a decoded record of this card stands right now."""
    if card.get("origin") == "recovered":
        return Match.RECOVERED
    return Match.MATCHED if card.get("origin") == "push" else Match.WAITING


# Columns a merge may change: the set-based UPDATE writes them all for every changed card.
_MERGED = ("status", "status_time", *FILL_ONCE)


def apply_plans(conn: Connection, plans: Sequence[CardPlan]) -> Counter[str]:
    """Apply the rows' plans in order, set-based; return the reconciliation outcomes.

    The batch's existing cards are locked at once (in key order), the changes
    merged in memory in row order by the same rule as `update_card`, the
    missing cards inserted with their final values, and each other changed
    card written once. The end state is the one row-by-row application would
    leave, whatever the order of the rows.
    """
    keys = sorted({change.key for plan in plans for change in plan.changes})
    existing = _select_locked(conn, keys)
    missing = [key for key in keys if key not in existing]
    merged = _Merged.of(plans, existing, missing)
    inserted: set[tuple[str, str]] = set()
    now = utcnow()
    if missing:
        rows = [{"card_id": key[0], "code": key[1], "created_at": now, "updated_at": now,
                 **{name: merged.cards[key][name] for name in _MERGED}} for key in missing]  # fmt: skip
        found = insert_rows(conn, cards, rows, ["card_id", "code"], [cards.c.card_id, cards.c.code])
        inserted = {(str(r.card_id), str(r.code)) for r in found}
        lost = [key for key in missing if key not in inserted]
        if lost:  # another worker created some of them meanwhile: merge again from what it wrote
            existing.update(_select_locked(conn, lost))
            merged = _Merged.of(plans, existing, sorted(inserted))
    changed = [key for key in sorted(merged.changed) if key not in inserted]
    if changed:
        update_rows(conn, cards, [
            {"id": existing[key]["id"], "updated_at": now, **{name: merged.cards[key][name] for name in _MERGED}}
            for key in changed
        ])  # fmt: skip
    update_rows(conn, mp_records, [{**r, "updated_at": now} for r in merged.records])
    outcomes = merged.outcomes
    for match in (Match.MATCHED, Match.RECOVERED):
        # A waiting record is only ever written with its card: a card created just now has none
        # but those of this very batch.
        waiting = sorted(
            key for key, m in merged.settle.items() if m is match and (key not in inserted or key in merged.record_cards)
        )
        if waiting:
            settled = conn.execute(
                update(mp_records)
                .where(mp_records.c.match == Match.WAITING.value, _keys_in(conn, mp_records, waiting))
                .values(match=match.value, updated_at=now)
            )
            outcomes[match.value] += int(settled.rowcount or 0)
    return outcomes


def _keys_in(conn: Connection, table: Any, keys: Sequence[tuple[str, str]]) -> Any:
    if len(keys) == 1:
        return and_(table.c.card_id == keys[0][0], table.c.code == keys[0][1])
    return pairs_among(conn, table.c.card_id, table.c.code, keys)


def _select_locked(conn: Connection, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The existing cards of `keys`, locked for this transaction in key order."""
    if not keys:
        return {}
    stmt = select(cards).where(_keys_in(conn, cards, keys)).order_by(cards.c.card_id, cards.c.code)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()  # SQLite already holds its write lock (BEGIN IMMEDIATE)
    return {(row["card_id"], row["code"]): dict(row) for row in conn.execute(stmt).mappings()}


@dataclass
class _Merged:
    """The plans of a batch merged in memory: the cards as they end, and what to write."""

    cards: dict[tuple[str, str], dict[str, Any]]
    changed: set[tuple[str, str]] = field(default_factory=set)
    settle: dict[tuple[str, str], Match] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    record_cards: set[tuple[str, str]] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(
        cls, plans: Sequence[CardPlan], existing: Mapping[tuple[str, str], Mapping[str, Any]], blank: Sequence[tuple[str, str]]
    ) -> _Merged:
        """Merge `plans` in row order onto the `existing` cards and `blank` new ones."""
        merged = cls({key: dict(card) for key, card in existing.items()})
        for key in blank:
            merged.cards[key] = {"card_id": key[0], "code": key[1], **dict.fromkeys(_MERGED)}
        for plan in plans:
            for change in plan.changes:
                card = merged.cards[change.key]
                diff = merge(card, change)
                if diff:
                    card.update(diff)
                    merged.changed.add(change.key)
                if change.settle and card["origin"] is not None:
                    merged.settle.setdefault(change.key, match_for(card))
            if plan.record is not None:
                got = plan.record
                match = Match.IGNORED if got.card is None else match_for(merged.cards[got.card])
                if got.card is not None:
                    merged.record_cards.add(got.card)
                merged.outcomes[match.value] += 1
                merged.records.append({"id": got.record_id, "code": got.code,
                                       "decoded_at": got.decoded_at, "match": match.value})  # fmt: skip
        return merged


def count_outcomes(outcomes: Mapping[str, int]) -> None:
    """Report a batch's reconciliation outcomes to the metrics (once per outcome, not per row)."""
    for outcome, n in outcomes.items():
        metrics.count_reconcile(outcome, n)
