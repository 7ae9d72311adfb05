"""RQ job functions: the wire contract. Thin, idempotent, primitive arguments."""
from __future__ import annotations

from webhook.store import events, get_events

from . import context
from .batch import run_batch
from .handlers import handler_for


def process_events(event_ids: list[int]) -> dict[str, int]:
    """Handle a batch of stored Official Account events (idempotent)."""
    ctx = context.current()
    return run_batch(ctx, events, event_ids, get_events, handler_for, record_attempts=True).summary()


def process_mp_records(record_ids: list[int]) -> dict[str, int]:
    """Decode and join a batch of Mini Program records (idempotent)."""
    from webhook.cardstore import mp_records

    from .mp_records import handler_for_record, load_records

    ctx = context.current()
    return run_batch(ctx, mp_records, record_ids, load_records, handler_for_record).summary()


def process_activations(activation_ids: list[int]) -> dict[str, int]:
    """Activate member cards for the Mini Program's activation and registration requests (idempotent)."""
    from .activation import process_activations as process

    return process(context.current(), [int(i) for i in activation_ids])


def recover_records(record_ids: list[int]) -> dict[str, int]:
    """Check overdue Mini Program records with card/code/get (gap recovery)."""
    from .recovery import recover_records as recover

    return recover(context.current(), [int(i) for i in record_ids])
