"""The worker's heartbeat while Redis cannot be written: a few lines per outage, not one per beat."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from webhook.store import make_engine
from workers.context import WorkerContext
from workers.reaper import HEARTBEAT_REMIND_SECONDS, Heartbeat, heartbeat_key

from . import procs
from .conftest import make_settings


@contextlib.contextmanager
def reaper_log(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """The records of the reaper's logger at every level (wxcoupon's loggers may not propagate)."""
    logger = logging.getLogger("wxcoupon.reaper")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)  # this test phase's handler: enter it in the test itself
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # each record once, whether or not configure_logging ran in this session
    try:
        yield caplog.records
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


def test_heartbeat_warns_once_per_outage_reminds_each_minute_and_says_when_it_is_back(
    tmp_path: Path, sqlite_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis unreachable (a client on a closed port, refused for real) the first failed beat is a warning
    naming the error type, the following ones are debug lines but for a reminder a minute, and the first beat
    written again is one info line. It used to be a warning on every beat: an hour's outage, 720 lines."""
    settings = make_settings(tmp_path, sqlite_url, redis_url)
    # No retries inside the client: each beat meets the refusal at once (a worker's client retries with backoff).
    down = redis.Redis(host="127.0.0.1", port=procs.free_port(), retry=Retry(NoBackoff(), 0))
    live = redis.Redis.from_url(redis_url)
    now = [1000.0]
    beat = Heartbeat(WorkerContext(settings, make_engine(settings), down), "w-outage", clock=lambda: now[0])
    with reaper_log(caplog) as records:
        interval = beat.ttl_ms / 3000  # the thread beats this often
        beats = 90  # 7.5 minutes of outage at the default lifetime
        for _ in range(beats):
            assert not beat.try_beat()
            now[0] += interval

        warnings = [r for r in records if r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in warnings[:1]] == ["heartbeat not written"]
        assert all(getattr(r, "error") == "ConnectionError" for r in warnings)
        reminders = int((beats - 1) * interval // HEARTBEAT_REMIND_SECONDS)
        assert reminders >= 2 and [r.getMessage() for r in warnings[1:]] == ["heartbeat still not written"] * reminders
        assert len([r for r in records if r.levelno == logging.DEBUG]) == beats - 1 - reminders

        records.clear()
        beat.ctx = dataclasses.replace(beat.ctx, redis=live)  # Redis answers again
        assert beat.try_beat() and beat.try_beat()
        assert live.exists(heartbeat_key(settings.queue_prefix, "w-outage"))
        assert [(r.levelno, r.getMessage()) for r in records] == [(logging.INFO, "heartbeat written again")]
        assert getattr(records[0], "failures") == beats

        records.clear()
        beat.ctx = dataclasses.replace(beat.ctx, redis=down)  # a new outage is told at once
        now[0] += interval
        assert not beat.try_beat()
        assert [(r.levelno, r.getMessage()) for r in records] == [(logging.WARNING, "heartbeat not written")]
    live.close()
    down.close()
