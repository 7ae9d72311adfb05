"""`wxcoupon cards`: card configuration files, validated locally, then sent to Weixin."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from webhook.config import ConfigError
from webhook.members import MAX_CARD_ID

from ..cardconfig import Problem, validate_activation_form, validate_card, validate_card_patch
from .common import settings_or_exit

KINDS: dict[str, Callable[[Any], list[Problem]]] = {
    "card": validate_card,
    "patch": validate_card_patch,
    "form": validate_activation_form,
}


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{path}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{path}: not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    except RecursionError:
        raise click.ClickException(f"{path}: nested too deeply to be a card document") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror or exc}") from None


def _checked(path: Path, problems: list[Problem]) -> None:
    """Print every problem and stop before anything is sent."""
    if not problems:
        return
    for problem in problems:
        click.echo(f"{path}: {problem}", err=True)
    raise click.ClickException(f"{len(problems)} problem(s) in {path}; nothing was sent to Weixin")


def _card_id(value: str) -> str:
    if not value or len(value.encode("utf-8")) > MAX_CARD_ID:
        raise click.BadParameter(f"must be 1 to {MAX_CARD_ID} bytes", param_hint="--card-id")
    return value


def _weixin() -> Any:
    from webhook.redisconn import connect_redis
    from webhook.weixin_api import WeixinClient

    settings = settings_or_exit()
    try:
        return WeixinClient.from_settings(settings, connect_redis(settings))
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


def _send(call: Callable[[], Any]) -> Any:
    from webhook.weixin_api import AmbiguousTimeoutError, WeixinAPIError

    try:
        return call()
    except AmbiguousTimeoutError as exc:
        # Sending it again blindly could create a second card: say so.
        raise click.ClickException(
            f"sent, but no usable answer came back (errcode {exc.errcode}: {exc.errmsg}); Weixin may have "
            "applied it: check the card in the Official Account's admin before sending it again"
        ) from None
    except WeixinAPIError as exc:
        raise click.ClickException(f"weixin refused it: errcode {exc.errcode}: {exc.errmsg}") from None


FILE = click.option("--file", "path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
                    help="The JSON document.")
CARD_ID = click.option("--card-id", required=True, help="The card to change.")


@click.group("cards")
def cards() -> None:
    """Card configuration: each file is validated locally before anything is sent."""


@cards.command("validate")
@click.option("--kind", type=click.Choice(sorted(KINDS)), required=True,
              help="card: card/create body; patch: card/update body; form: activation form.")
@FILE
def validate(kind: str, path: Path) -> None:
    """Check a file without sending it; every problem is printed with its JSON path."""
    _checked(path, KINDS[kind](_load(path)))
    click.echo(f"{path}: ok")


@cards.command("create")
@FILE
def create(path: Path) -> None:
    """Create a card from a card/create body ({"card": {...}}); prints the card_id."""
    doc = _load(path)
    _checked(path, validate_card(doc))
    client = _weixin()
    card_id = _send(lambda: client.create_card(doc["card"]))
    click.echo(card_id)


@cards.command("update")
@CARD_ID
@FILE
def update(card_id: str, path: Path) -> None:
    """Change a card with a card/update body ({"member_card": {...}})."""
    card_id = _card_id(card_id)
    doc = _load(path)
    _checked(path, validate_card_patch(doc, card_id))
    client = _weixin()
    patch = {k: v for k, v in doc.items() if k != "card_id"}
    reply = _send(lambda: client.update_card(card_id, patch))
    click.echo(f"updated {card_id} (send_check={str(bool(reply.get('send_check'))).lower()})")


@cards.command("set-activation-form")
@CARD_ID
@FILE
def set_activation_form(card_id: str, path: Path) -> None:
    """Set the fields of a member card's activation form (card/membercard/activateuserform/set)."""
    card_id = _card_id(card_id)
    doc = _load(path)
    _checked(path, validate_activation_form(doc, card_id))
    client = _weixin()
    _send(lambda: client.set_activate_user_form({**doc, "card_id": card_id}))
    click.echo(f"activation form set for {card_id}")
