"""What each Official Account card event does to the card state (the apply phase)."""
from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from webhook.cardstore import CardStatus

from .context import WorkerContext
from .reconcile import settle_waiting_records, update_card

Row = dict[str, Any]


def _flag(row: Row, name: str) -> bool:
    return str(row["fields"].get(name) or "0").strip() == "1"


def _card_code(row: Row) -> tuple[str, str] | None:
    if not row.get("card_id") or not row.get("code"):
        return None  # nothing to join on; the event is kept as stored
    return str(row["card_id"]), str(row["code"])


def on_user_get_card(ctx: WorkerContext, conn: Connection, row: Row, _fetched: Any) -> None:
    """A user received a card: the holder in the Official Account, its channel, and gifts."""
    key = _card_code(row)
    if key is None:
        return
    card_id, code = key
    gifted_from = row.get("old_code") if _flag(row, "IsGiveByFriend") else None
    card = update_card(
        conn, card_id, code,
        status=CardStatus.RECEIVED, status_time=row["create_time"],
        oa_openid=row["openid"], unionid=row["unionid"], outer_str=row["outer_str"],
        old_code=gifted_from, origin="push", received_time=row["create_time"],
    )  # fmt: skip
    if gifted_from:
        # The gift moved the card: the old code is done, and points at the new one.
        update_card(conn, card_id, gifted_from, status=CardStatus.GIFTED, status_time=row["create_time"], new_code=code)
    settle_waiting_records(conn, card)


def on_user_gifting_card(ctx: WorkerContext, conn: Connection, row: Row, _fetched: Any) -> None:
    """The holder is gifting the card (or, with IsReturnBack=1, the gift came back)."""
    key = _card_code(row)
    if key is not None:
        status = CardStatus.RECEIVED if _flag(row, "IsReturnBack") else CardStatus.GIFTING
        update_card(conn, *key, status=status, status_time=row["create_time"])


def _terminal(status: CardStatus) -> Any:
    def apply(ctx: WorkerContext, conn: Connection, row: Row, _fetched: Any) -> None:
        key = _card_code(row)
        if key is not None:
            update_card(conn, *key, status=status, status_time=row["create_time"])

    apply.__doc__ = f"The card is {status.value}."
    return apply


on_user_del_card = _terminal(CardStatus.DELETED)
on_user_consume_card = _terminal(CardStatus.CONSUMED)
