"""Event rows exactly as intake stores them, for benchmarks that start from a filled database."""
from __future__ import annotations

from typing import Any

from webhook.envelope import OpenedPush
from webhook.events import parse_push, sample_fields
from webhook.intake import event_row
from webhook.xmlparse import build_xml, parse_xml


def stored_event_row(event: str, **fields: Any) -> dict[str, Any]:
    """The `events` row intake would commit for a safe-mode push of `event` with these fields (status pending)."""
    xml = build_xml(sample_fields(event, **fields))
    parsed = parse_xml(xml)  # as intake sees it: every value a string
    return event_row(parse_push(parsed), OpenedPush(xml=xml, fields=parsed, mode="safe"))
