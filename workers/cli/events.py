"""`wxcoupon events`: read the durable event store."""
from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import click

from webhook.store import ROW_ID_MAX, EventStatus, list_events, make_engine

from .common import settings_or_exit

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

LIST_COLUMNS = (
    "id", "event", "msg_type", "openid", "card_id", "code", "outer_str", "unionid",
    "status", "attempts", "received_at", "create_time", "last_error",
)  # fmt: skip


def parse_since(value: str, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO 8601 time (UTC if no zone) or a relative age such as 15m, 2h, 7d."""
    now = now or dt.datetime.now(dt.timezone.utc)
    match = _RELATIVE.match(value.strip())
    if match:
        try:
            return now - dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:  # before year 1, or more days than a timedelta holds
            raise click.BadParameter(f"{value!r} reaches back before the year 1") from None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use an ISO time (2026-11-25T10:00) or an age (15m, 2h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def since_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.datetime | None:
    """Click callback for a time option: parsed by `parse_since`, a bad value named by its option."""
    return parse_since(value) if value else None


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in LIST_COLUMNS}
    received = out["received_at"]
    if isinstance(received, dt.datetime):
        if received.tzinfo is None:  # SQLite returns naive values; they are UTC
            received = received.replace(tzinfo=dt.timezone.utc)
        out["received_at"] = received.isoformat()
    return out


@click.group("events")
def events() -> None:
    """Inspect stored events."""


@events.command("list")
@click.option("--event", "event_type", help="Only this Event (e.g. user_get_card), or MsgType of a message (e.g. text).")
@click.option("--status", type=click.Choice([s.value for s in EventStatus]), help="Only this status.")
@click.option("--since", callback=since_option, help="Received at or after: ISO time or age (15m, 2h, 7d).")
@click.option("--limit", type=click.IntRange(min=1, max=ROW_ID_MAX), default=None, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(
    event_type: str | None, status: str | None, since: dt.datetime | None, limit: int | None, as_json: bool
) -> None:
    """List events, oldest first."""
    settings = settings_or_exit()
    engine = make_engine(settings)
    with engine.connect() as conn:
        rows = list_events(conn, event=event_type, status=status, since=since, limit=limit)
    engine.dispose()
    for row in rows:
        data = _jsonable(row)
        if as_json:
            click.echo(json.dumps(data, ensure_ascii=False))
        else:
            click.echo(
                f"{data['id']:>7} {data['received_at'][:19]} {data['status']:<10} "
                f"{(data['event'] or data['msg_type'] or ''):<28} card={data['card_id'] or '-'} "
                f"code={data['code'] or '-'} openid={data['openid'] or '-'} outer_str={data['outer_str'] or '-'}"
            )
    if not as_json:
        click.echo(f"{len(rows)} event(s)", err=True)
