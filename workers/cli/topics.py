"""The list of CLI topic commands; each topic module exposes click commands."""
from __future__ import annotations

import click


def commands() -> list[click.Command]:
    """Every top-level command of `wxcoupon`, in help order."""
    found: list[click.Command] = []
    return found
