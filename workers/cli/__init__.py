"""The `wxcoupon` command: one click group, one module per topic."""
from __future__ import annotations

import sys
from typing import Any

import click


class _Main(click.Group):
    """The group: a database or Redis that cannot be reached stops any command with one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn an unreachable service into a ClickException (exit 1) naming its variable."""
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = _unreachable(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


def _unreachable(exc: Exception) -> str | None:
    """The line for a database or Redis that does not answer, or None for any other error."""
    # Looked up, not imported: `wxcoupon --help` stays fast, and a command that never
    # loaded SQLAlchemy or redis-py cannot have raised their errors.
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.OperationalError):
        lines = str(exc.orig or exc).strip().splitlines()  # the driver's words: host and port, never the password
        return f"cannot use the database of DATABASE_URL: {lines[0] if lines else type(exc).__name__}"
    redis_exc = sys.modules.get("redis.exceptions")
    if redis_exc is not None and isinstance(exc, (redis_exc.ConnectionError, redis_exc.TimeoutError)):
        return f"redis unreachable (REDIS_URL): {type(exc).__name__}: {exc}"
    return None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
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
