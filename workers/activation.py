"""Activation requests of the Mini Program: the redirect-based plug-in and the registration page.

Fetch phase (network, no batch transaction): decode the code; read the form
(card/membercard/activatetempinfo/get for the plug-in, the stored encrypted
form for a registration); then, under a per-card Redis lock, ask Weixin with
card/code/get whether the card is already active. If it is, nothing is sent
again: that is what makes the activation happen once even when an earlier
attempt crashed after Weixin applied it, or its answer was lost. Otherwise the
membership number is assigned in its own short committed transaction (so every
later attempt reuses it) and card/membercard/activate is called. Apply phase
(inside the batch transaction): the member's data encrypted, the request's
result, and the card state moved to `activated`.

A request that fails for good keeps `result=failed` with Weixin's errcode and
errmsg (72012 for an expired ticket), which the Mini Program reads from
GET /api/mp/activations/<id>.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from webhook.cardstore import CardStatus
from webhook.config import Settings
from webhook.members import ActivationKind, ActivationResult, MemberSource, activations, field_list
from webhook.pii import MissingDataKeyError, UndecryptableError, cipher_for
from webhook.store import EventStatus, utcnow, worker_writing
from webhook.weixin_api import AmbiguousTimeoutError, TicketExpiredError, TransientWeixinError, WeixinAPIError

from .batch import run_batch
from .cardconfig import validate_activate_request
from .context import WorkerContext
from .failures import loggable
from .handlers import Handler
from .member_info import int_or_none, member_data
from .membership import MembershipNumberError, assign_membership_number, store_member
from .reconcile import update_card

log = logging.getLogger("wxcoupon.activation")

Row = dict[str, Any]
CARD_LOCK_TTL = 60  # seconds: longer than card/code/get + activate with the client's retries
CARD_LOCK_WAIT = 10  # seconds to wait for another worker activating the same card


class ActivationError(Exception):
    """A request that cannot be activated as it stands (a permanent failure)."""


@dataclass(frozen=True)
class Activated:
    """What the fetch phase learned: the member's data and the card's membership."""

    code: str
    data: dict[str, Any]
    membership_number: str
    oa_openid: str | None
    bonus: int | None
    balance: int | None
    activated_now: bool  # False: Weixin already showed the card active; nothing was sent


def load_activations(conn: Connection, ids: Sequence[int]) -> list[Row]:
    """Activation requests by id, in id order."""
    if not ids:
        return []
    stmt = select(activations).where(activations.c.id.in_(ids)).order_by(activations.c.id)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def activate_body(settings: Settings, card_id: str, code: str, membership_number: str) -> dict[str, Any]:
    """The card/membercard/activate request with the configured initial values; checked locally."""
    body: dict[str, Any] = {"membership_number": membership_number, "code": code, "card_id": card_id}
    for name, value in (("init_bonus", settings.init_bonus), ("init_balance", settings.init_balance),
                        ("init_bonus_record", settings.init_bonus_record)):
        if value is not None:
            body[name] = value
    for i, value in enumerate(settings.init_custom_field_values, 1):
        if value:
            body[f"init_custom_field_value{i}"] = value
    problems = validate_activate_request(body)
    if problems:
        raise ActivationError("; ".join(str(p) for p in problems))
    return body


@contextlib.contextmanager
def card_lock(ctx: WorkerContext, card_id: str, code: str) -> Iterator[None]:
    """One worker at a time checks and activates a given card."""
    lock = ctx.redis.lock(
        f"{ctx.settings.queue_prefix}:activate:{card_id}:{code}", timeout=CARD_LOCK_TTL, blocking_timeout=CARD_LOCK_WAIT
    )
    if not lock.acquire():
        raise redis.exceptions.LockError("another worker is activating this card")  # transient: retried
    try:
        yield
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


def _form(ctx: WorkerContext, row: Row) -> tuple[dict[str, Any] | None, TicketExpiredError | None]:
    """The submitted form, or the expiry of its ticket."""
    if row["kind"] == ActivationKind.REDIRECT.value:
        if not row["activate_ticket"]:
            return None, None  # used up by an earlier success: card/code/get has the form now
        try:
            reply = ctx.weixin.get_activate_temp_info(str(row["activate_ticket"]))
        except TicketExpiredError as exc:
            return None, exc
        return member_data(reply.get("info")), None
    if not row["fields_enc"]:
        raise ActivationError("the registration has no form data")
    form = cipher_for(ctx.settings).decrypt_json(str(row["fields_enc"]))
    return {
        "common_field_list": field_list(dict(form.get("fields") or {})),
        "custom_field_list": field_list(dict(form.get("custom_fields") or {})),
    }, None


def fetch_activation(ctx: WorkerContext, row: Row) -> Activated:
    """Decode, read the form, and activate on Weixin unless it is active already (network phase)."""
    cipher_for(ctx.settings)  # no data key: fail, naming it, before anything is sent
    card_id = str(row["card_id"])
    code = str(row["code"]) if row["code"] else ctx.weixin.decrypt_code(str(row["encrypt_code"]))
    data, expired = _form(ctx, row)
    with card_lock(ctx, card_id, code):
        current = ctx.weixin.get_code(code, card_id=card_id)
        number = str(current.get("membership_number") or "")
        holder = str(current.get("openid") or "") or None
        if number:
            # Weixin shows the card active: an earlier attempt (or another path) applied it.
            if data is None:
                data = member_data(current.get("user_info"), current)
            return Activated(code, data, number, holder, int_or_none(current.get("bonus")),
                             int_or_none(current.get("balance")), activated_now=False)
        if expired is not None:
            raise expired
        if data is None:
            raise ActivationError("the request has no form data")
        number = assign_membership_number(ctx.engine, ctx.settings, card_id, code)
        body = activate_body(ctx.settings, card_id, code, number)
        try:
            ctx.weixin.activate_member_card(**body)
        except AmbiguousTimeoutError as exc:
            # Safe to try again here: the next attempt asks card/code/get first.
            message = "activate sent without an answer; the retry checks first"
            raise TransientWeixinError(exc.errcode, message, exc.path) from None
    return Activated(code, data, number, holder, ctx.settings.init_bonus or 0, ctx.settings.init_balance or 0, True)


def apply_activation(ctx: WorkerContext, conn: Connection, row: Row, got: Activated) -> None:
    """Store the member (encrypted), the request's result, and the card's new state."""
    now = utcnow()
    source = MemberSource.REDIRECT if row["kind"] == ActivationKind.REDIRECT.value else MemberSource.REGISTRATION
    store_member(
        conn, cipher_for(ctx.settings), str(row["card_id"]), got.code, source=source, data=got.data,
        membership_number=got.membership_number, mp_openid=row["mp_openid"], oa_openid=got.oa_openid,
        bonus=got.bonus, balance=got.balance, activated_at=now,
    )  # fmt: skip
    conn.execute(
        update(activations)
        .where(activations.c.id == row["id"])
        .values(code=got.code, result=ActivationResult.ACTIVATED.value, membership_number=got.membership_number,
                errcode=None, errmsg=None, updated_at=now,
                activate_ticket=None)  # it reads the member's form: not kept once used
    )  # fmt: skip
    update_card(conn, str(row["card_id"]), got.code, status=CardStatus.ACTIVATED, status_time=int(time.time()),
                mp_openid=row["mp_openid"], oa_openid=got.oa_openid)
    log.info("member card activated", extra={"activation_id": row["id"], "already_active": not got.activated_now})


def public_error(exc: BaseException) -> tuple[int | None, str]:
    """The errcode and message the Mini Program may see: Weixin's, or ours (never a payload)."""
    if isinstance(exc, WeixinAPIError):
        return exc.errcode, exc.errmsg
    if isinstance(exc, (ActivationError, MissingDataKeyError, UndecryptableError, MembershipNumberError)):
        return None, str(exc)
    return None, f"internal error ({type(exc).__name__})"


class _Recorder:
    """Wraps both phases to keep each row's exception for the stored result."""

    def __init__(self) -> None:
        self.errors: dict[int, BaseException] = {}

    def fetch(self, ctx: WorkerContext, row: Row) -> Activated:
        try:
            return fetch_activation(ctx, row)
        except Exception as exc:
            self.errors[int(row["id"])] = exc
            raise

    def apply(self, ctx: WorkerContext, conn: Connection, row: Row, got: Activated) -> None:
        try:
            apply_activation(ctx, conn, row, got)
        except Exception as exc:
            self.errors[int(row["id"])] = exc
            raise


def record_failures(ctx: WorkerContext, errors: dict[int, BaseException]) -> None:
    """Give rows that ended failed or dead their result, errcode and errmsg."""
    with worker_writing(ctx.engine) as conn:
        for row_id, exc in errors.items():
            errcode, errmsg = public_error(exc)
            conn.execute(
                update(activations)
                .where(activations.c.id == row_id,
                       activations.c.status.in_([EventStatus.FAILED.value, EventStatus.DEAD.value]))
                .values(result=ActivationResult.FAILED.value, errcode=errcode, errmsg=errmsg[:1000])
            )  # fmt: skip


def process_activations(ctx: WorkerContext, ids: list[int]) -> dict[str, int]:
    """Run a batch of activation requests; failures keep a result the Mini Program can read."""
    recorder = _Recorder()
    handler = Handler(fetch=recorder.fetch, apply=recorder.apply)
    try:
        return run_batch(ctx, activations, ids, load_activations, lambda _row: handler).summary()
    finally:
        if recorder.errors:
            try:
                record_failures(ctx, recorder.errors)
            except Exception as exc:  # the status and last_error are stored already; the API falls back to them
                log.error("could not record activation results", extra={"error": loggable(exc)})
