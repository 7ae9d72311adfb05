"""The list of CLI topic commands; each topic module exposes click commands."""
from __future__ import annotations

import click


def commands() -> list[click.Command]:
    """Every top-level command of `wxcoupon`, in help order."""
    from . import db, dev, events, fake, reconcile, service, simulate

    return [
        dev.dev,
        service.serve,
        service.worker,
        service.sweep,
        db.db,
        events.events,
        simulate.simulate,
        reconcile.reconcile,
        fake.fake_weixin,
    ]
