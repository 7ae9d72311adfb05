"""The `wxcoupon` command: one click group, one module per topic."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """wxcoupon: verified, durable Weixin Cards & Offers events."""


def _register() -> None:
    """Attach each topic's commands to the group (explicit, no import side effects)."""
    # Topic modules are imported here, not at the top, so `wxcoupon --help`
    # stays fast and a broken optional topic names itself.
    from . import topics

    for command in topics.commands():
        main.add_command(command)


_register()
