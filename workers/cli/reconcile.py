"""`wxcoupon reconcile`: how the two sides of each card line up."""
from __future__ import annotations

import json

import click

from webhook.reports import REPORT_COUNTS, reconciliation_report
from webhook.store import ROW_ID_MAX, make_engine

from .common import settings_or_exit


@click.group("reconcile")
def reconcile() -> None:
    """Official Account pushes against Mini Program records."""


@reconcile.command("report")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--limit", type=click.IntRange(min=0, max=ROW_ID_MAX), default=100, show_default=True,
              help="Unmatched items to list, and as many given-up ones.")
def report(as_json: bool, limit: int) -> None:
    """Matched, waiting, recovered and unmatched counts, and the unmatched and given-up items."""
    settings = settings_or_exit()
    engine = make_engine(settings)
    with engine.connect() as conn:
        data = reconciliation_report(conn, settings, unmatched_limit=limit)
    engine.dispose()
    if as_json:
        click.echo(json.dumps(data, default=str, ensure_ascii=False))
        return
    for name in REPORT_COUNTS:
        click.echo(f"{name:<10} {data[name]}")
    for item in data["unmatched_items"]:
        click.echo(
            f"unmatched record {item['id']}: {item['kind']} card={item['card_id']} code={item['code']} "
            f"mp_openid={item['mp_openid']} error={item['last_error'] or '-'}"
        )
    for item in data["given_up_items"]:
        click.echo(
            f"given-up record {item['id']}: {item['kind']} card={item['card_id']} code={item['code']} "
            f"mp_openid={item['mp_openid']} decoded={item['decoded_at']} error={item['last_error'] or '-'}"
        )
