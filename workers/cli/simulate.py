"""`wxcoupon simulate`: post a card event signed and encrypted exactly as Weixin does."""
from __future__ import annotations

import time

import click
import requests

from webhook.envelope import seal_push
from webhook.events import CARD_EVENTS, sample_fields

from .common import Seconds, settings_or_exit


def _parse_field(values: tuple[str, ...]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: use Name=value with Weixin's field name, e.g. OuterStr=spring")
        fields[key] = value
    return fields


@click.command("simulate")
@click.argument("event")
@click.option("--url", required=True, help="The webhook URL, e.g. http://127.0.0.1:8000/wechat")
@click.option("--mode", type=click.Choice(["safe", "compat", "plain"]), default="safe", show_default=True)
@click.option("--field", "fields", multiple=True, metavar="K=V", help="Set a field (Weixin's name). Repeatable.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Post the same push N times (as retries).")
@click.option("--timeout", type=Seconds(min=0, min_open=True, max=3600), default=5.0, show_default=True,
              help="Seconds, as Weixin waits.")
def simulate(event: str, url: str, mode: str, fields: tuple[str, ...], repeat: int, timeout: float) -> None:
    """Build EVENT (e.g. user_get_card), sign/encrypt it with the configured account, post it."""
    settings = settings_or_exit()
    if mode != "plain" and not settings.aes_key:
        raise click.ClickException("safe and compat modes need WECHAT_AES_KEY and WECHAT_APPID (or use --mode plain)")
    if event not in CARD_EVENTS:
        click.echo(f"note: {event!r} is not a card event of the protocol table; sending it anyway", err=True)
    overrides = _parse_field(fields)
    overrides.setdefault("CreateTime", str(int(time.time())))
    if settings.appid is None and mode != "plain":
        raise click.ClickException("WECHAT_APPID is required to encrypt")
    push_fields = sample_fields(event, **overrides)
    query, body = seal_push(
        push_fields, token=settings.token, aes_key=settings.aes_key, appid=settings.appid, mode=mode
    )
    failures = 0
    with requests.Session() as session:
        for attempt in range(1, max(repeat, 1) + 1):
            try:
                resp = session.post(url, params=query, data=body, timeout=timeout,
                                    headers={"Content-Type": "text/xml"})
            except requests.RequestException as exc:
                failures += 1
                click.echo(f"[{attempt}] error: {type(exc).__name__}: {exc}")
                continue
            if resp.status_code != 200:
                failures += 1
            click.echo(f"[{attempt}] {resp.status_code} {resp.text.strip()[:200]}")
    if failures:
        raise SystemExit(1)
