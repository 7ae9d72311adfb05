"""Poison rows: a stored event whose own values make the database refuse its effects fails alone."""
from __future__ import annotations

import secrets
from typing import Any

import pytest
import sqlalchemy as sa

from webhook.config import Settings
from webhook.store import events
from workers.batch import BatchFailedError
from workers.context import WorkerContext
from workers.jobs import process_events

from .pushes import make_push


def test_a_row_the_database_cannot_index_fails_alone_for_good(
    client: Any, settings: Settings, worker_ctx: WorkerContext
) -> None:
    """A gift whose OldUserCardCode is kilobytes long is stored (the events table does not index it), but its
    card row cannot be: PostgreSQL refuses the index entry with an OperationalError (SQLSTATE 54000). That is
    the row, not the database: the row fails permanently and the other rows of its batch are processed. It used
    to fail the whole batch as a busy database, on every retry, and the rows went back to the outbox for ever."""
    if worker_ctx.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no index entry size limit to hit")
    query, body = make_push(settings, UserCardCode="700000000001", IsGiveByFriend="1",
                            OldUserCardCode=secrets.token_hex(2000))  # fmt: skip
    assert client.post("/wechat", query_string=query, data=body).status_code == 200
    query, body = make_push(settings, UserCardCode="700000000002")
    assert client.post("/wechat", query_string=query, data=body).status_code == 200
    with pytest.raises(BatchFailedError) as raised:
        process_events([1, 2])
    assert list(raised.value.failed) == [1]
    with worker_ctx.engine.connect() as conn:
        got = conn.execute(sa.select(events.c.status, events.c.last_error).order_by(events.c.id)).all()
    assert [status for status, _ in got] == ["failed", "processed"]
    assert "index row size" in got[0][1]
