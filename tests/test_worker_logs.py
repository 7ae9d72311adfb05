"""Worker log lines keep personal data out, as the README promises: codes masked, openids pseudonymous."""
from __future__ import annotations

import logging
from typing import Any

import pytest

from webhook.config import Settings
from webhook.logs import JSONFormatter, TextFormatter
from workers import card_events, handlers
from workers.batch import BatchFailedError
from workers.context import WorkerContext
from workers.jobs import process_events
from workers.reconcile import CardPlan

from .pushes import make_push

CARD = "pCardLogs00000000000000001"
CODES = ["500000000001", "500000000002"]


def test_a_failed_set_based_apply_logs_no_code_or_openid(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the database refuses the batch's set-based apply, the warning used to carry the driver's
    exception with its SQL parameters (PostgreSQL): every card code and openid of the batch, in clear.
    It names the error's types; the row's last_error keeps the whole text."""

    def broken(ctx: WorkerContext, row: dict[str, Any], fetched: Any) -> CardPlan:
        plan = card_events.plan_user_del_card(ctx, row, fetched)  # a time no BIGINT holds
        return CardPlan(tuple(type(c)(c.card_id, c.code, c.status, 2**70) for c in plan.changes))

    monkeypatch.setitem(handlers.HANDLERS, "user_del_card", handlers.Handler(plan=broken))
    for i, code in enumerate(CODES):
        query, body = make_push(settings, FromUserName=f"oSecretUser{i}", CardId=CARD, UserCardCode=code)
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    query, body = make_push(settings, "user_del_card", CardId=CARD, UserCardCode=CODES[0])
    assert client.post("/wechat", query_string=query, data=body).status_code == 200
    with caplog.at_level(logging.INFO, logger="wxcoupon"), pytest.raises(BatchFailedError):
        process_events([1, 2, 3])
    worker_lines = [r for r in caplog.records if r.name.startswith("wxcoupon.jobs")]
    [fallback] = [r for r in worker_lines if "set-based apply failed" in r.getMessage()]
    assert fallback.error.split()[0] in ("DataError", "OverflowError")  # type: ignore[attr-defined]
    for formatter in (JSONFormatter(), TextFormatter()):
        text = "\n".join(formatter.format(r) for r in worker_lines)
        assert not any(secret in text for secret in [*CODES, "oSecretUser0", "oSecretUser1"]), text
