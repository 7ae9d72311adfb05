"""The worker-side commands as an operator meets them: exit codes and bad input."""
from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from webhook.config import Settings
from webhook.store import events
from workers.cli import main
from workers.context import WorkerContext

from . import procs
from .pushes import make_push


@pytest.fixture
def cli_env(settings: Settings) -> dict[str, str]:
    """The environment under which the `wxcoupon` CLI loads the test settings."""
    return procs.settings_env(settings, REDIS_URL=settings.redis_url or "")


def _statuses(ctx: WorkerContext) -> list[str]:
    with ctx.engine.connect() as conn:
        return list(conn.execute(sa.select(events.c.status).order_by(events.c.id)).scalars())


def test_burst_worker_exits_0_with_nothing_to_do_and_when_it_drained_the_queues(
    client: Any, settings: Settings, worker_ctx: WorkerContext, cli_env: dict[str, str]
) -> None:
    """`wxcoupon worker --burst` drains the outbox and the queues, then exits 0, also when there was
    nothing to do (it used to exit 1 then, silently: RQ's "did any job run")."""
    idle = procs.wxcoupon(["worker", "--burst"], cli_env)
    assert idle.returncode == 0, idle.stdout + idle.stderr
    query, body = make_push(settings, UserCardCode="610000000001")
    assert client.post("/wechat", query_string=query, data=body).status_code == 200
    busy = procs.wxcoupon(["worker", "--burst"], cli_env)
    assert busy.returncode == 0, busy.stdout + busy.stderr
    assert _statuses(worker_ctx) == ["processed"]


def test_burst_worker_without_dispatcher_leaves_the_outbox_alone(
    client: Any, settings: Settings, worker_ctx: WorkerContext, cli_env: dict[str, str]
) -> None:
    """`--no-dispatcher` ("do not run the outbox dispatcher in this worker") holds with `--burst` too: the
    worker only runs what is queued, and a pending event stays pending (it used to be dispatched)."""
    query, body = make_push(settings, UserCardCode="610000000002")
    assert client.post("/wechat", query_string=query, data=body).status_code == 200
    result = procs.wxcoupon(["worker", "--burst", "--no-dispatcher"], cli_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _statuses(worker_ctx) == ["pending"]


@pytest.mark.parametrize(("option", "args"), [
    ("--since", ["events", "list", "--since", "99999999999d"]),
    ("--since", ["events", "list", "--since", "800000d"]),
    ("--since", ["replay", "--status", "failed", "--since", "99999999999999h"]),
    ("--until", ["replay", "--status", "dead", "--until", "1000000d", "--dry-run"]),
])  # fmt: skip
def test_an_age_reaching_before_the_year_1_is_a_usage_error_naming_the_option(
    settings: Settings, cli_env: dict[str, str], option: str, args: list[str]
) -> None:
    """An age too large for a date was an OverflowError traceback (exit 1); now a usage error naming the option."""
    result = CliRunner().invoke(main, args, env=cli_env)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and "before the year 1" in result.output


def test_replay_of_an_id_that_names_no_event_exits_1_after_replaying_the_others(
    client: Any, settings: Settings, worker_ctx: WorkerContext, cli_env: dict[str, str]
) -> None:
    """A mistyped id is a failure a script must see (it exited 0); a processed event left unchanged is not."""
    for code in ("610000000003", "610000000004"):
        query, body = make_push(settings, UserCardCode=code)
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    with worker_ctx.engine.begin() as conn:
        conn.execute(sa.update(events).where(events.c.id == 1).values(status="failed"))
        conn.execute(sa.update(events).where(events.c.id == 2).values(status="processed"))
    result = CliRunner().invoke(main, ["replay", "1", "2", "424242"], env=cli_env)
    assert result.exit_code == 1, result.output
    assert "replayed 1 event(s)" in result.output and "1 ID(s) name no event: 424242" in result.output
    assert _statuses(worker_ctx) == ["queued", "processed"]
    for dry in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["replay", "2", *dry], env=cli_env)
        assert result.exit_code == 0, result.output  # processed: left unchanged, as documented


@pytest.mark.parametrize("args", [
    ["events", "list"], ["events", "show", "1"], ["replay", "1"], ["replay", "--status", "failed"], ["sweep"],
    ["reconcile", "report"], ["members", "show", "--card-id", "pCard", "--code", "123456789012"],
])  # fmt: skip
def test_a_database_that_does_not_answer_is_one_line_naming_database_url(
    settings: Settings, cli_env: dict[str, str], args: list[str]
) -> None:
    """The runbook's commands on a database that is down: exit 1 with the driver's reason, not a traceback."""
    env = {**cli_env, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{procs.free_port()}/test"}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "cannot use the database of DATABASE_URL" in result.output and "Connection refused" in result.output


def test_redis_that_does_not_answer_is_one_line_naming_redis_url(settings: Settings, cli_env: dict[str, str]) -> None:
    """`wxcoupon workers` with Redis down: exit 1 and one line, not redis-py's traceback."""
    env = {**cli_env, "REDIS_URL": f"redis://127.0.0.1:{procs.free_port()}/0"}
    result = CliRunner().invoke(main, ["workers"], env=env)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "redis unreachable (REDIS_URL)" in result.output


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe{\x00}\x00", "not UTF-8"),  # UTF-16, as some editors save
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])  # fmt: skip
def test_cards_validate_a_file_that_is_no_utf8_json_document_is_one_line(
    tmp_path: Any, content: bytes, message: str
) -> None:
    """It was a UnicodeDecodeError or RecursionError traceback; now the file's problem, exit 1."""
    path = tmp_path / "card.json"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["cards", "validate", "--kind", "card", "--file", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in result.output


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_simulate_timeout_must_be_a_positive_number(settings: Settings, cli_env: dict[str, str], timeout: str) -> None:
    """A timeout requests cannot use was a ValueError traceback after building the push; now a usage error."""
    result = CliRunner().invoke(main, ["simulate", "user_get_card", "--url", "http://127.0.0.1:9/wechat",
                                       "--timeout", timeout], env=cli_env)  # fmt: skip
    assert result.exit_code == 2 and "Invalid value for '--timeout'" in result.output, result.output
