"""`wxcoupon replay`: send failed, dead or pending events through the workers again."""
from __future__ import annotations

import datetime as dt

import click
import redis

from webhook.eventfilter import REPLAYABLE, EventFilter
from webhook.store import ROW_ID_MAX

from ..context import build_context
from .common import settings_or_exit
from .events import since_option


@click.command("replay")
@click.argument("ids", nargs=-1, type=click.IntRange(min=1, max=ROW_ID_MAX))
@click.option("--status", "statuses", multiple=True, type=click.Choice([s.value for s in REPLAYABLE]),
              help="Replay every event in this status (repeatable).")
@click.option("--event", "event_type", help="Only this Event (e.g. user_get_card).")
@click.option("--card-id", help="Only this CardId.")
@click.option("--since", callback=since_option, help="Received at or after: ISO time or age (15m, 2h, 7d).")
@click.option("--until", callback=since_option, help="Received before: ISO time or age.")
@click.option("--dry-run", is_flag=True, help="List what would be replayed and the count; change nothing.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: when on a terminal].")
def replay(
    ids: tuple[int, ...],
    statuses: tuple[str, ...],
    event_type: str | None,
    card_id: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    dry_run: bool,
    progress: bool | None,
) -> None:
    """Replay events by ID, or every event matching --status and the filters.

    Processed events are never touched; events in flight are left to their
    job. Safe to interrupt and to run again. Exits 1 if an ID names no event
    (after replaying the others).
    """
    from tqdm import tqdm

    from ..replay import NO_SUCH_EVENT, count_replayable, replay as run_replay, replay_ids

    filters = statuses or event_type or card_id or since or until
    if ids and filters:
        raise click.UsageError("give event IDs or --status with filters, not both")
    if not ids and not statuses:
        raise click.UsageError("give event IDs, or --status failed|dead|pending (with optional filters)")
    ctx = build_context(settings_or_exit())
    try:
        if ids:
            result = replay_ids(ctx, ids, dry_run=dry_run)
            for event_id, why in sorted(result.unchanged.items()):
                click.echo(f"{event_id:>9} unchanged: {why}", err=True)
        else:
            flt = EventFilter(
                statuses=statuses, event=event_type, card_id=card_id,
                since=since, until=until,
            )  # fmt: skip
            total = count_replayable(ctx, flt)
            with tqdm(total=total, unit="event", disable=(not progress) if progress is not None else None,
                      dynamic_ncols=True, leave=False) as bar:

                def on_page(rows: list[dict[str, object]]) -> None:
                    if dry_run:
                        for row in rows:
                            bar.write(f"{row['id']:>9} {row['status']:<8} {row['event'] or row['msg_type']:<28} "
                                      f"card={row['card_id'] or '-'} received={str(row['received_at'])[:19]}")
                    bar.update(len(rows))

                result = run_replay(ctx, flt, dry_run=dry_run, on_page=on_page)
    except redis.RedisError as exc:
        raise click.ClickException(
            f"redis unreachable ({type(exc).__name__}): nothing was lost; what was not queued is pending "
            "and the workers will dispatch it, or run the replay again"
        ) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted: pages already queued stay queued; run the same replay again") from None
    finally:
        ctx.engine.dispose()
    if dry_run:
        click.echo(f"would replay {result.matched} event(s) (dry run: nothing changed)")
    else:
        click.echo(f"replayed {result.queued} event(s) in {result.jobs} job(s)"
                   + (f"; {len(result.unchanged)} unchanged" if result.unchanged else ""))
    missing = sorted(i for i, why in result.unchanged.items() if why == NO_SUCH_EVENT)
    if missing:
        raise click.ClickException(f"{len(missing)} ID(s) name no event: {' '.join(map(str, missing[:20]))}")
