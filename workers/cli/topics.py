"""The list of CLI topic commands; each topic module exposes click commands."""
from __future__ import annotations

import click


def commands() -> list[click.Command]:
    """Every top-level command of `wxcoupon`, in help order."""
    from . import cards, db, dev, events, fake, members, ops, reconcile, replay, service, simulate

    if "show" not in events.events.commands:
        events.events.add_command(ops.show)  # `wxcoupon events show ID`
    return [
        dev.dev,
        service.serve,
        service.worker,
        service.sweep,
        db.db,
        events.events,
        replay.replay,
        ops.workers,
        ops.heartbeat_listener,
        simulate.simulate,
        reconcile.reconcile,
        members.members_group,
        cards.cards,
        fake.fake_weixin,
    ]
