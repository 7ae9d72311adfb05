"""What each Official Account card event does to the card state.

Each handler only plans its card changes (`reconcile.CardPlan`); the batch
applies the plans of all its rows at once (`reconcile.apply_plans`).
"""
from __future__ import annotations

from typing import Any

from webhook.cardstore import CardStatus

from .context import WorkerContext
from .reconcile import NO_CHANGE, CardChange, CardPlan

Row = dict[str, Any]


def _flag(row: Row, name: str) -> bool:
    return str((row.get("fields") or {}).get(name) or "0").strip() == "1"


def _card_code(row: Row) -> tuple[str, str] | None:
    if not row.get("card_id") or not row.get("code"):
        return None  # nothing to join on; the event is kept as stored
    return str(row["card_id"]), str(row["code"])


def plan_user_get_card(ctx: WorkerContext, row: Row, _fetched: Any) -> CardPlan:
    """A user received a card: the holder in the Official Account, its channel, and gifts."""
    key = _card_code(row)
    if key is None:
        return NO_CHANGE
    card_id, code = key
    gifted_from = row.get("old_code") if _flag(row, "IsGiveByFriend") else None
    if gifted_from == code:
        # A gift gets a new code; one naming the received code as the old one moved
        # nothing, and marking it gifted would end the card its holder has now.
        gifted_from = None
    received = CardChange(
        card_id, code, CardStatus.RECEIVED, row["create_time"],
        {"oa_openid": row["openid"], "unionid": row["unionid"], "outer_str": row["outer_str"],
         "old_code": gifted_from, "origin": "push", "received_time": row["create_time"]},
        settle=True,
    )  # fmt: skip
    if not gifted_from:
        return CardPlan((received,))
    # The gift moved the card: the old code is done, and points at the new one.
    gifted = CardChange(card_id, str(gifted_from), CardStatus.GIFTED, row["create_time"], {"new_code": code})
    return CardPlan((received, gifted))


def plan_user_gifting_card(ctx: WorkerContext, row: Row, _fetched: Any) -> CardPlan:
    """The holder is gifting the card (or, with IsReturnBack=1, the gift came back)."""
    key = _card_code(row)
    if key is None:
        return NO_CHANGE
    status = CardStatus.RECEIVED if _flag(row, "IsReturnBack") else CardStatus.GIFTING
    return CardPlan((CardChange(*key, status, row["create_time"]),))


def _terminal(status: CardStatus) -> Any:
    def plan(ctx: WorkerContext, row: Row, _fetched: Any) -> CardPlan:
        key = _card_code(row)
        if key is None:
            return NO_CHANGE
        return CardPlan((CardChange(*key, status, row["create_time"]),))

    plan.__doc__ = f"The card is {status.value}."
    return plan


plan_user_del_card = _terminal(CardStatus.DELETED)
plan_user_consume_card = _terminal(CardStatus.CONSUMED)
