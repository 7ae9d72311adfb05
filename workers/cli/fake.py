"""`wxcoupon fake-weixin`: run the project's fake Weixin server in the foreground."""
from __future__ import annotations

import logging
import threading

import click

from webhook.config import ConfigError, load_settings


@click.command("fake-weixin")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (keep it loopback).")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--push-to", default=None, metavar="URL", help="Push card events here (safe mode, Weixin's retries).")
@click.option("--token-ttl", default=7200, show_default=True, type=click.IntRange(1), metavar="SECONDS",
              help="Lifetime of the access_tokens it issues.")
def fake_weixin(host: str, port: int, push_to: str | None, token_ttl: int) -> None:
    """Serve a fake Weixin API (and sandbox paths) for the account in the environment."""
    from workers.fake_weixin import DEFAULT_APPID, DEFAULT_APPSECRET, FakeWeixin

    try:
        settings = load_settings()
        aes_key = settings.aes_key
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if push_to and aes_key is None:
        raise click.ClickException("--push-to needs WECHAT_AES_KEY and WECHAT_APPID: pushes are sent in safe mode")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fake = FakeWeixin(
        appid=settings.appid or DEFAULT_APPID,
        appsecret=settings.appsecret or DEFAULT_APPSECRET,
        host=host,
        port=port,
        token_ttl=token_ttl,
        push_to=push_to,
        token=settings.token,
        aes_key=aes_key,
        quiet=False,
    )
    try:
        fake.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(fake.url)  # alone on its line, for scripts that start it
    if not settings.appid or not settings.appsecret:
        click.echo(f"no WECHAT_APPID/WECHAT_APPSECRET set: serving appid {fake.appid} with the default secret", err=True)
    if push_to:
        click.echo(f"pushing events to {push_to}", err=True)
    try:
        threading.Event().wait()  # until Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
