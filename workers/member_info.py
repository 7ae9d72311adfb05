"""The member's form data: reading Weixin's answers, and the non-redirect activation push.

With the non-redirect activation component (wx_activate_after_submit false)
Weixin activates the card itself when the user submits the form and pushes
`submit_membercard_user_info`; the worker then reads the form with
card/code/get and stores it, encrypted, linked to the card state.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from webhook.cardstore import CardStatus
from webhook.members import MemberSource
from webhook.pii import cipher_for
from webhook.store import utcnow

from .context import WorkerContext
from .membership import store_member
from .reconcile import update_card

Row = dict[str, Any]


def member_data(info: Any, answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The member data we keep (encrypted): Weixin's two field lists, plus nickname and sex when given."""
    info = info if isinstance(info, dict) else {}
    data: dict[str, Any] = {
        "common_field_list": [f for f in info.get("common_field_list") or [] if isinstance(f, dict)],
        "custom_field_list": [f for f in info.get("custom_field_list") or [] if isinstance(f, dict)],
    }
    for name in ("nickname", "sex"):
        if answer and answer.get(name):
            data[name] = answer[name]
    return data


def int_or_none(value: Any) -> int | None:
    """An integer from Weixin's answer, or None when absent or malformed."""
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        return None
    return number if -(2**63) <= number < 2**63 else None  # what a BIGINT column holds


def fetch_member_info(ctx: WorkerContext, event: Row) -> dict[str, Any] | None:
    """card/code/get for the code whose activation form was submitted."""
    if not event.get("card_id") or not event.get("code"):
        return None  # nothing to look up; the event is kept as stored
    cipher_for(ctx.settings)  # no data key: fail (permanently, naming it) before asking Weixin
    return ctx.weixin.get_code(str(event["code"]), card_id=str(event["card_id"]))


def apply_member_info(ctx: WorkerContext, conn: Connection, event: Row, answer: dict[str, Any] | None) -> None:
    """Store the submitted form encrypted; the card is activated once Weixin shows a membership number."""
    if answer is None:
        return
    card_id, code = str(event["card_id"]), str(event["code"])
    number = str(answer.get("membership_number") or "") or None
    oa_openid = event.get("openid") or answer.get("openid")
    store_member(
        conn, cipher_for(ctx.settings), card_id, code,
        source=MemberSource.NON_REDIRECT, data=member_data(answer.get("user_info"), answer),
        membership_number=number, oa_openid=oa_openid,
        bonus=int_or_none(answer.get("bonus")), balance=int_or_none(answer.get("balance")),
        activated_at=utcnow() if number else None, keep_source=True,
    )  # fmt: skip
    if number:
        update_card(conn, card_id, code, status=CardStatus.ACTIVATED, status_time=event.get("create_time"),
                    oa_openid=oa_openid)
