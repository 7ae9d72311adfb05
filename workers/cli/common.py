"""Helpers shared by the CLI topics: settings that fail with a clear message."""
from __future__ import annotations

import math
from typing import Any

import click

from webhook.config import ConfigError, Settings, load_settings


def settings_or_exit() -> Settings:
    """Load settings, or stop with the message that names the bad variable."""
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(f"configuration: {exc}") from None


class Seconds(click.FloatRange):
    """A duration option: a FloatRange that also refuses `nan`, which every range comparison lets through."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds
