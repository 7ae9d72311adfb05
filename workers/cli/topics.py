"""The list of CLI topic commands; each topic module exposes click commands."""
from __future__ import annotations

import click


def commands() -> list[click.Command]:
    """Every top-level command of `wxcoupon`, in help order."""
    from . import db, dev, events, fake, service, simulate

    return [
        dev.dev,
        service.serve,
        service.worker,
        service.sweep,
        db.db,
        events.events,
        simulate.simulate,
        fake.fake_weixin,
    ]
