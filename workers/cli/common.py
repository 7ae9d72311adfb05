"""Helpers shared by the CLI topics: settings that fail with a clear message."""
from __future__ import annotations

import click

from webhook.config import ConfigError, Settings, load_settings


def settings_or_exit() -> Settings:
    """Load settings, or stop with the message that names the bad variable."""
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
