"""`wxcoupon members`: look at a member (personal data masked unless --reveal), rotate the data key."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click
from sqlalchemy import Column, Engine, Table, select, update

from webhook.members import activations, members
from webhook.pii import DataCipher, MissingDataKeyError, UndecryptableError, cipher_for
from webhook.store import make_engine

from ..membership import get_member
from .common import settings_or_exit

ROTATE_BATCH = 500


def mask(value: Any) -> str:
    """A personal value with most of it hidden: 13812345678 -> 13*******78, Lin -> L**."""
    text = str(value)
    if len(text) <= 2:
        return "*" * len(text)
    if len(text) <= 6:
        return text[0] + "*" * (len(text) - 1)
    return text[:2] + "*" * (len(text) - 4) + text[-2:]


def _fields(items: Any, reveal: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if not isinstance(item, dict) or "name" not in item:
            continue
        value = item.get("value_list") if "value_list" in item else item.get("value")
        if isinstance(value, list):
            out[str(item["name"])] = value if reveal else [mask(v) for v in value]
        else:
            out[str(item["name"])] = value if reveal or value in (None, "") else mask(value)
    return out


def _when(value: Any) -> str | None:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).isoformat()
    return None


def describe_member(member: dict[str, Any], cipher: DataCipher | None, reveal: bool) -> dict[str, Any]:
    """The member as shown by `members show`: personal values masked unless `reveal`."""
    data: dict[str, Any] = {}
    if member["data_enc"]:
        if cipher is None:
            raise MissingDataKeyError()
        data = cipher.decrypt_json(str(member["data_enc"]))

    def person(value: Any) -> Any:
        return value if reveal or not value else mask(value)

    return {
        "card_id": member["card_id"],
        "code": member["code"],
        "membership_number": member["membership_number"],
        "source": member["source"],
        "mp_openid": person(member["mp_openid"]),
        "oa_openid": person(member["oa_openid"]),
        "bonus": member["bonus"],
        "balance": member["balance"],
        "activated_at": _when(member["activated_at"]),
        "nickname": person(data.get("nickname")),
        "sex": data.get("sex"),
        "fields": _fields(data.get("common_field_list"), reveal),
        "custom_fields": _fields(data.get("custom_field_list"), reveal),
    }


@click.group("members")
def members_group() -> None:
    """Member cards: members' data (encrypted at rest) and its key."""


@members_group.command("show")
@click.option("--card-id", required=True)
@click.option("--code", required=True, help="The real card code.")
@click.option("--reveal", is_flag=True, help="Show personal data in clear (mobile, name, ...).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def show(card_id: str, code: str, reveal: bool, as_json: bool) -> None:
    """One member: membership number, state, form data (masked unless --reveal) and activation requests."""
    settings = settings_or_exit()
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            member = get_member(conn, card_id, code)
            requests = [
                dict(r) for r in conn.execute(
                    select(activations.c.id, activations.c.kind, activations.c.status, activations.c.result,
                           activations.c.errcode, activations.c.errmsg)
                    .where(activations.c.card_id == card_id, activations.c.code == code)
                    .order_by(activations.c.id)
                ).mappings()
            ]  # fmt: skip
    finally:
        engine.dispose()
    if member is None:
        raise click.ClickException(f"no member for card {card_id} code {code}")
    try:
        shown = describe_member(member, cipher_for(settings) if settings.data_keys else None, reveal)
    except (MissingDataKeyError, UndecryptableError) as exc:
        raise click.ClickException(str(exc)) from None
    shown["activations"] = requests
    if as_json:
        click.echo(json.dumps(shown, ensure_ascii=False, default=str))
        return
    for name in ("card_id", "code", "membership_number", "source", "mp_openid", "oa_openid", "bonus", "balance",
                 "activated_at", "nickname", "sex"):
        click.echo(f"{name:<18} {shown[name] if shown[name] not in (None, '') else '-'}")
    for group in ("fields", "custom_fields"):
        for name, value in shown[group].items():
            click.echo(f"  {name:<40} {value}")
    for item in requests:
        click.echo(f"activation {item['id']}: {item['kind']} {item['status']} result={item['result'] or '-'}"
                   f" errcode={item['errcode'] if item['errcode'] is not None else '-'}")
    if not reveal:
        click.echo("(personal data masked; --reveal shows it)", err=True)


def rotate_column(engine: Engine, cipher: DataCipher, table: Table, column: Column[Any], batch: int) -> dict[str, int]:
    """Re-encrypt every value of one column with the first key, batch by batch."""
    counts = {"rotated": 0, "changed_meanwhile": 0, "undecryptable": 0}
    last = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(table.c.id, column).where(table.c.id > last, column.is_not(None)).order_by(table.c.id).limit(batch)
            ).all()
        if not rows:
            return counts
        with engine.begin() as conn:
            for row_id, token in rows:
                try:
                    fresh = cipher.rotate(str(token))
                except UndecryptableError:
                    counts["undecryptable"] += 1
                    continue
                # Compare-and-set: a worker that rewrote the value meanwhile used the first key already.
                done = conn.execute(update(table).where(table.c.id == row_id, column == token).values({column.name: fresh}))
                counts["rotated" if done.rowcount else "changed_meanwhile"] += 1
        last = int(rows[-1][0])


@members_group.command("rotate-key")
@click.option("--batch", type=click.IntRange(1), default=ROTATE_BATCH, show_default=True, help="Rows per transaction.")
def rotate_key(batch: int) -> None:
    """Re-encrypt all member data with the first key of WXCOUPON_DATA_KEY (then older keys can go)."""
    settings = settings_or_exit()
    try:
        cipher = cipher_for(settings)
    except MissingDataKeyError as exc:
        raise click.ClickException(str(exc)) from None
    engine = make_engine(settings)
    try:
        totals = {
            f"{table.name}.{column.name}": rotate_column(engine, cipher, table, column, batch)
            for table, column in ((members, members.c.data_enc), (activations, activations.c.fields_enc))
        }
    finally:
        engine.dispose()
    bad = 0
    for name, counts in totals.items():
        click.echo(f"{name:<24} rotated {counts['rotated']}, rewritten meanwhile {counts['changed_meanwhile']}, "
                   f"undecryptable {counts['undecryptable']}")
        bad += counts["undecryptable"]
    if bad:
        raise click.ClickException(f"{bad} value(s) no key of WXCOUPON_DATA_KEY opens: keep the old keys until resolved")
    if len(settings.data_keys) > 1:
        click.echo("every value is now under the first key; the other keys of WXCOUPON_DATA_KEY can be removed", err=True)
