"""The deployment as the README describes it: supervisord with deploy/supervisord.conf.

One real supervisord on loopback ports runs the release (migrations), gunicorn
and two RQ workers. Pushes go through end to end; a worker is killed with
SIGKILL in the middle of a job, and the event it held is still processed
exactly once; a hung worker (SIGSTOP) is found by the heartbeat listener and
replaced.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import sqlalchemy as sa

from webhook.config import Settings
from webhook.store import event_attempts, events
from workers.context import WorkerContext
from workers.reaper import live_workers

from . import procs
from .conftest import REQUIRE_SERVICES, make_settings
from .pushes import make_push

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUPERVISORD = BIN / "supervisord"
SLOW_SECONDS = 3.0

# Loaded by every Python process of the deployment through PYTHONPATH: in the
# worker processes it makes events with OuterStr "slow" take SLOW_SECONDS in
# the fetch phase (so a worker can be killed mid-job), and counts each
# committed apply in the event's own row (so "exactly once" is visible).
SITECUSTOMIZE = f'''
import sys
if "worker" in sys.argv[1:2]:
    import time
    import sqlalchemy as sa
    from webhook.store import events
    from workers import handlers

    original = handlers.HANDLERS["user_get_card"]

    def fetch(ctx, row):
        if row.get("outer_str") == "slow":
            time.sleep({SLOW_SECONDS})
        return original.fetch(ctx, row)

    def apply(ctx, conn, row, fetched):
        original.apply(ctx, conn, row, fetched)
        conn.execute(sa.update(events).where(events.c.id == row["id"])
                     .values(old_code=sa.func.coalesce(events.c.old_code, "") + "x"))

    handlers.HANDLERS["user_get_card"] = handlers.Handler(fetch=fetch, apply=apply)
'''


@pytest.fixture
def deploy_settings(tmp_path: Path, redis_url: str, postgres_ok: bool, request: pytest.FixtureRequest) -> Settings:
    """PostgreSQL when the machine has it (as production does), else SQLite; schema left to `release`."""
    url = request.getfixturevalue("postgres_url") if postgres_ok else f"sqlite:///{tmp_path / 'events.sqlite3'}"
    return make_settings(tmp_path, url, redis_url, heartbeat_ttl=2.0)


class Deployment:
    """A running supervisord with the project's configuration."""

    def __init__(self, env: dict[str, str], log: Path, proc: subprocess.Popen[bytes], base: str) -> None:
        self.env, self.log, self.proc, self.base = env, log, proc, base

    def ctl(self, *args: str) -> str:
        """Run supervisorctl against this supervisord."""
        result = subprocess.run([str(BIN / "supervisorctl"), "-c", str(ROOT / "deploy/supervisord.conf"), *args],
                                env=self.env, capture_output=True, text=True, timeout=30)
        return result.stdout

    def worker_pids(self) -> dict[str, int]:
        """supervisord's RUNNING worker processes: name -> pid."""
        found = re.findall(r"^worker:(worker-\d+)\s+RUNNING\s+pid (\d+)", self.ctl("status"), re.M)
        return {name: int(pid) for name, pid in found}


def wait_for(what: str, check: Callable[[], Any], log: Path, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; supervisord output:\n{log.read_text()[-6000:]}")


@pytest.fixture
def deployment(deploy_settings: Settings, tmp_path: Path) -> Iterator[Deployment]:
    """supervisord -c deploy/supervisord.conf, started from another folder, on loopback ports."""
    if not SUPERVISORD.exists():
        if REQUIRE_SERVICES:
            pytest.fail("supervisor is required (pip install -e '.[test]')")
        pytest.skip("supervisor not installed")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    port = procs.free_port()
    env = procs.settings_env(
        deploy_settings,
        WXCOUPON_RUN_DIR=str(run_dir), WXCOUPON_WORKERS="2", WXCOUPON_BIND=f"127.0.0.1:{port}",
        WXCOUPON_HEARTBEAT_TTL="2", WXCOUPON_REAP_INTERVAL="1", WXCOUPON_DISPATCH_INTERVAL="0.1",
        WXCOUPON_PROXIES="1", WEB_CONCURRENCY="2",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(hooks),
    )  # fmt: skip
    log = tmp_path / "supervisord.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(SUPERVISORD), "-c", str(ROOT / "deploy/supervisord.conf")], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deployment = Deployment(env, log, proc, base)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"supervisord exited:\n{log.read_text()}")
        try:
            return requests.get(f"{base}/readyz", timeout=2).status_code == 200 and len(deployment.worker_pids()) == 2
        except requests.ConnectionError:
            return False

    try:
        wait_for("web ready and two workers running", ready, log, timeout=60)
        yield deployment
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Nothing of this deployment may outlive it: not even the RQ scheduler
        # forked by the worker that was killed with SIGKILL.
        deadline = time.monotonic() + 10
        while (left := processes_of(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running after supervisord stopped: {left}"


def processes_of(run_dir: Path) -> list[int]:
    """Pids of live processes started with this WXCOUPON_RUN_DIR in their environment."""
    marker = f"WXCOUPON_RUN_DIR={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and (entry / "stat").read_text().split()[2] != "Z":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_supervisord_deployment_survives_a_worker_killed_mid_job(
    deployment: Deployment, deploy_settings: Settings
) -> None:
    """Events pushed over HTTP are all processed; the one whose worker got SIGKILL mid-job is requeued by the
    reaper and processed exactly once; supervisord restarts the killed worker; a SIGSTOPped worker is killed
    by the heartbeat listener and replaced."""
    from webhook.store import make_engine

    engine = make_engine(deploy_settings)
    ctx = WorkerContext(settings=deploy_settings, engine=engine, redis=redis.Redis.from_url(deploy_settings.redis_url or ""))
    log = deployment.log

    def status_of(outer: str) -> dict[str, Any] | None:
        with engine.connect() as conn:
            row = conn.execute(sa.select(events).where(events.c.outer_str == outer)).mappings().first()
        return dict(row) if row else None

    codes = {"slow": "620000000000", **{f"fast{i}": f"62000000000{i + 1}" for i in range(5)}}
    for outer, code in codes.items():
        query, body = make_push(deploy_settings, "user_get_card", UserCardCode=code, OuterStr=outer)
        resp = requests.post(f"{deployment.base}/wechat", params=query, data=body, timeout=5)
        assert (resp.status_code, resp.text) == (200, "success")

    held = wait_for("the slow event to be processing", lambda: (r := status_of("slow")) and r["status"] == "processing"
                    and r, log)
    from rq.job import Job

    worker_name = Job.fetch(held["job_id"], connection=ctx.redis).worker_name
    victim = live_workers(ctx)[worker_name]["pid"]
    assert victim in deployment.worker_pids().values()
    os.kill(victim, signal.SIGKILL)

    def all_processed() -> bool:
        with engine.connect() as conn:
            return set(conn.execute(sa.select(events.c.status)).scalars()) == {"processed"}

    wait_for("every event processed", all_processed, log, timeout=40)
    slow = status_of("slow")
    assert slow is not None
    with engine.connect() as conn:
        tries = conn.execute(
            sa.select(event_attempts.c.outcome, event_attempts.c.error)
            .where(event_attempts.c.event_id == slow["id"]).order_by(event_attempts.c.id)
        ).all()
        marks = dict(conn.execute(sa.select(events.c.outer_str, events.c.old_code)).all())
    assert [t.outcome for t in tries] == ["retrying", "processed"]
    assert worker_name in (tries[0].error or "")
    assert slow["attempts"] == 2
    assert marks == {outer: "x" for outer in codes}  # every effect committed exactly once
    # supervisord replaced the killed worker with a new process under the same program name.
    pids = wait_for("two running workers again", lambda: len(p := deployment.worker_pids()) == 2 and p, log)
    assert victim not in pids.values()

    # A hung worker: alive to supervisord, but its heartbeat stops. The listener kills it; it is restarted.
    hung = wait_for("a worker beating for a while", lambda: next(
        (pid for pid in deployment.worker_pids().values() if pid in {w["pid"] for w in live_workers(ctx).values()}),
        None), log)
    time.sleep(3 * deploy_settings.heartbeat_ttl)  # past the listener's grace for a fresh worker
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_for("the hung worker replaced", lambda: len(p := deployment.worker_pids()) == 2 and hung not in p.values(),
                 log, timeout=30)
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "worker heartbeat stopped" in log.read_text()

    # /metrics adds up every process of the host, workers included.
    text = requests.get(f"{deployment.base}/metrics", timeout=5).text
    stored = re.search(r'^wxcoupon_pushes_total\{event="user_get_card",outcome="stored"\} (\S+)$', text, re.M)
    assert stored and float(stored.group(1)) == len(codes)
    assert re.search(r'^wxcoupon_job_duration_seconds_count\{job="process_events",outcome="finished"\} ', text, re.M)
    reaped = re.search(r'^wxcoupon_reaped_rows_total\{table="events"\} (\S+)$', text, re.M)
    assert reaped and float(reaped.group(1)) >= 1  # the killed job may have held more than the slow event
    # Logs are JSON lines, and carry no secret.
    output = log.read_text()
    assert '"msg": "push stored"' in output and deploy_settings.encoding_aes_key not in output
    engine.dispose()
    ctx.redis.close()


def test_procfile_runs_the_same_commands_as_supervisord() -> None:
    """Procfile's release, web and worker are the commands supervisord runs."""
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    conf = (ROOT / "deploy/supervisord.conf").read_text()
    assert set(procfile) == {"release", "web", "worker"}
    assert "command=wxcoupon db upgrade" in conf and procfile["release"] == "wxcoupon db upgrade"
    assert procfile["web"].endswith("wxcoupon serve --gunicorn-config deploy/gunicorn.conf.py")
    assert "command=wxcoupon serve --gunicorn-config %(here)s/gunicorn.conf.py" in conf
    assert procfile["worker"] == "wxcoupon worker" and "command=wxcoupon worker " in conf
