"""Intake benchmark: `wxcoupon serve` against a bare Flask app, same gunicorn, one run.

    .venv/bin/python bench/intake.py [--requests N] [--connections 32] [--duration S]
                                     [--database sqlite|postgres|sqlite,postgres]
                                     [--synchronous FULL|NORMAL|both]

For each configuration it makes a temporary instance folder, runs `wxcoupon db
upgrade`, starts `wxcoupon serve` (gunicorn, the workers production runs),
warms it up, then loads it on loopback with distinct, freshly timestamped,
safe-mode encrypted `user_get_card` pushes, each sent once. The bare app
(bench/bare_app.py) is loaded the same way first, under the same gunicorn
settings (with --web-threads > 1, once more under sync workers, for
reference). It prints events/s,
p50/p99 latency, non-2xx answers and the ratio to the bare app, then checks in the database that every
200 answer is a committed row and nothing else is. Timings are printed, never
asserted; the exit status is 1 only when the durability check fails.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# `python bench/<script>.py` puts bench/ first on sys.path, where a bench script
# named like a package (bench/workers.py) would shadow it: the repository goes
# first, bench/ last (for the sibling modules).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(REPO))
sys.path.append(str(BENCH))

import sqlalchemy as sa  # noqa: E402

from webhook.config import decode_aes_key, load_settings  # noqa: E402
from webhook.envelope import seal_push  # noqa: E402
from webhook.events import sample_fields  # noqa: E402
from workers.cli.service import DEFAULT_WEB_THREADS, DEFAULT_WEB_WORKER_CLASS, WORKER_CLASSES  # noqa: E402

import loadgen  # noqa: E402  (bench/loadgen.py)
from pgschema import create_pg_schema, drop_pg_schema, pg_schema_url  # noqa: E402  (bench/pgschema.py)
from stored import stored_event_row  # noqa: E402  (bench/stored.py)

DEFAULT_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TOLERANCE = 300  # WECHAT_TIMESTAMP_TOLERANCE given to the server (its default)
TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
QUIET_SHARE = 0.15  # the CPUs count as idle below this busy share
_ALNUM = string.ascii_letters + string.digits


# ---------------------------------------------------------------- the account and its pushes


@dataclass(frozen=True)
class Account:
    """A throwaway Official Account: the server and the pushes share it."""

    token: str
    encoding_aes_key: str
    appid: str

    @classmethod
    def generate(cls) -> Account:
        """Random credentials of the right shapes."""
        return cls(
            token="".join(secrets.choice(_ALNUM) for _ in range(32)),
            encoding_aes_key="".join(secrets.choice(_ALNUM) for _ in range(43)),
            appid="wxbench" + secrets.token_hex(5),
        )

    def env(self) -> dict[str, str]:
        """The WECHAT_* variables for this account."""
        return {"WECHAT_TOKEN": self.token, "WECHAT_AES_KEY": self.encoding_aes_key, "WECHAT_APPID": self.appid,
                "WECHAT_TIMESTAMP_TOLERANCE": str(TOLERANCE)}  # fmt: skip


class PushFactory:
    """Distinct `user_get_card` pushes: every one has its own UserCardCode and FromUserName."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.key = decode_aes_key(account.encoding_aes_key)
        self.run_tag = secrets.token_hex(4)  # 8 hex: openids differ between runs too
        self.code_base = 100_000_000_000 + secrets.randbelow(10**11)
        self.made = 0

    def make(self, n: int) -> tuple[list[tuple[str, bytes]], float]:
        """`n` new pushes as (path?query, body), all stamped now; and the seconds it took."""
        started = time.perf_counter()
        now = int(time.time())
        out: list[tuple[str, bytes]] = []
        for _ in range(n):
            i = self.made
            self.made += 1
            fields = sample_fields(
                "user_get_card",
                UserCardCode=str(self.code_base + i),
                FromUserName=f"oWXB{self.run_tag}{i:016d}",  # 28 characters, like a real openid
                CreateTime=now,
            )
            query, body = seal_push(
                fields, token=self.account.token, aes_key=self.key, appid=self.account.appid, mode="safe",
                timestamp=now,
            )  # fmt: skip
            out.append(("/wechat?" + urllib.parse.urlencode(query), body))
        return out, time.perf_counter() - started


# ---------------------------------------------------------------- processes


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without wxcoupon's settings, plus `extra`."""
    prefixes = ("WECHAT_", "WXCOUPON_", "DATABASE_URL", "REDIS_URL", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _cpu_times() -> tuple[float, float, float]:
    """(busy, interrupts + steal, total) CPU seconds of all CPUs together, from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    )
    tick = os.sysconf("SC_CLK_TCK")
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return (total - idle - iowait) / tick, (irq + softirq + steal) / tick, total / tick


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs together."""
    busy, _, total = _cpu_times()
    return busy, total


def wait_for_quiet(max_wait: float, threshold: float = QUIET_SHARE) -> float:
    """Wait (at most `max_wait` s) until the CPUs are less than `threshold` busy over 1 s; the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, total0 = _machine_busy()
        time.sleep(1.0)
        busy1, total1 = _machine_busy()
        share = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        if share < threshold or time.monotonic() >= deadline:
            return share


class Server:
    """A gunicorn-served app in its own session: start, wait, measure CPU, stop."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path, port: int) -> None:
        self.name, self.argv, self.env, self.cwd, self.log, self.port = name, argv, env, cwd, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The push endpoint."""
        return f"http://127.0.0.1:{self.port}/wechat"

    def spawn(self) -> None:
        """Start the process in a session of its own, its output to the log file."""
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until /wechat answers (any status)."""
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # 400/405: up and answering
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{self.name} did not answer in {timeout}s:\n{self.log_tail()}")
        # Every gunicorn worker must be up before the clock starts.
        while len(self.worker_pids()) < int(self.argv[self.argv.index("--workers") + 1]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: workers did not all start:\n{self.log_tail()}")
            time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        """The gunicorn workers (children of the arbiter we started)."""
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(c) for c in children]

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU seconds used so far by the workers."""
        splits = [loadgen.proc_cpu_split(pid) for pid in self.worker_pids()]
        return sum(u for u, _ in splits), sum(s for _, s in splits)

    def stop(self) -> None:
        """SIGTERM the arbiter (it stops its workers); SIGKILL our session if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session we started, nothing else
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its output."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ---------------------------------------------------------------- configurations and results


@dataclass
class Config:
    """One wxcoupon configuration to measure."""

    database: str  # sqlite | postgres
    synchronous: str | None = None  # SQLite only

    @property
    def label(self) -> str:
        """A short name for tables."""
        return f"wxcoupon sqlite {self.synchronous}" if self.database == "sqlite" else "wxcoupon postgres"


@dataclass
class RunReport:
    """Everything measured for one server."""

    label: str
    result: loadgen.LoadResult
    warmup: loadgen.LoadResult | None
    cpu_ms_per_request: float | None
    machine_busy: float | None  # fraction of all CPUs busy during the measured run
    sys_ms_per_request: float | None = None  # the kernel part of cpu_ms_per_request
    client_cpu_ms_per_request: float | None = None  # the load generator's CPU per answered request
    foreign_cpu_share: float | None = None  # share of all CPUs used by other processes meanwhile
    db_cpu_ms_per_request: float | None = None  # PostgreSQL backends serving the server, per request
    ratio: float | None = None
    rows: int | None = None
    rows_by_status: dict[str, int] = field(default_factory=dict)
    durable_ok: bool | None = None
    notes: list[str] = field(default_factory=list)
    reference: bool = False  # issue 2's yardstick handler (--reference), not wxcoupon

    other_runs: list[RunReport] = field(default_factory=list)  # the repeats that were not the best
    window: tuple[float, float] | None = None  # time.monotonic() at the start and end of the measured load

    def _all(self) -> list[loadgen.LoadResult]:
        return [self.result, *(r.result for r in self.other_runs), *([self.warmup] if self.warmup else [])]

    def acked(self) -> int:
        """200 answers in the warm-up and every measured run."""
        return sum(r.ok for r in self._all())

    def non_200(self) -> int:
        """Answers other than 200 in the warm-up and every measured run."""
        return sum(r.non_200 for r in self._all())

    def compare_with(self, bare: RunReport | None) -> None:
        """Set the ratio of this server's events/s to the bare app's req/s (when there is one)."""
        if bare is not None and bare.result.events_per_s:
            self.ratio = self.result.events_per_s / bare.result.events_per_s


class Bench:
    """Runs the bare app and each configuration with the chosen load generator."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.account = Account.generate()
        self.pushes = PushFactory(self.account)
        self.tmp_root = Path(tempfile.mkdtemp(prefix="wxbench-", dir=args.tmpdir))
        self.wrk: str | None = None
        self.db_pids: Any = None  # () -> PostgreSQL backend pids serving the server under test

    # -- load

    def pool_size(self, seconds: float, quota: int) -> int:
        """How many distinct pushes a run may need at most."""
        if quota:
            return quota
        return int(math.ceil(seconds * self.args.max_rate)) + self.args.connections

    def make_pool(self, seconds: float, quota: int, wrap: bool, tag: str) -> list[tuple[str, bytes]] | Path:
        """Fresh distinct pushes for one load: a request file for wrk, or the list for the Python loader."""
        size = self.pool_size(seconds, quota)
        if wrap:
            size = min(size, 20_000)  # the bare app may cycle: it does not look at the pushes
        pool, took = self.pushes.make(size)
        print(f"  {tag}: {len(pool)} distinct pushes sealed in {took:.1f}s", flush=True)
        if not self.wrk:
            return pool
        request_file = self.tmp_root / "requests.txt"
        loadgen.write_request_file(request_file, pool)
        return request_file

    def load(self, server: Server, pool: list[tuple[str, bytes]] | Path, seconds: float, quota: int,
             wrap: bool) -> loadgen.LoadResult:  # fmt: skip
        """Run one load against `server` with a pool from make_pool."""
        duration = seconds if not quota or self.args.duration_given else 0
        if isinstance(pool, Path):
            assert self.wrk is not None
            result = loadgen.run_wrk(
                self.wrk, server.url, pool, connections=self.args.connections, threads=self.args.threads,
                quota=quota, duration=duration, wrap=wrap,
            )  # fmt: skip
            pool.unlink()
            return result
        return loadgen.run_python(
            "127.0.0.1", server.port, "/wechat", pool, connections=self.args.connections,
            processes=self.args.py_procs, quota=quota, duration=duration, wrap=wrap,
        )  # fmt: skip

    def measure(
        self, server: Server, label: str, wrap: bool, before_first_run: Callable[[], None] | None = None
    ) -> RunReport:
        """Warm-up, then --repeat measured runs with CPU accounting; the best one stands for the server.

        `before_first_run` is called just before the first measured load starts
        (its pushes sealed, the CPUs found quiet).
        """
        warmup = None
        if self.args.warmup > 0:
            pool = self.make_pool(self.args.warmup, 0, wrap, "warm-up")
            warmup = self.load(server, pool, self.args.warmup, 0, wrap)
        runs = [
            self.measure_once(server, label, wrap, i, before_first_run if i == 0 else None)
            for i in range(self.args.repeat)
        ]
        best = max(runs, key=lambda r: r.result.events_per_s)
        best.warmup = warmup
        best.other_runs = [r for r in runs if r is not best]
        if len(runs) > 1:
            print(f"  best of {len(runs)}: run {runs.index(best) + 1}", flush=True)
        return best

    def measure_once(
        self, server: Server, label: str, wrap: bool, index: int, before_load: Callable[[], None] | None = None
    ) -> RunReport:
        """One measured run."""
        quota = self.args.requests or 0
        if self.args.quiet_wait > 0:
            busy = wait_for_quiet(self.args.quiet_wait)
            if busy >= QUIET_SHARE:
                print(f"  NOTE: the CPUs are {100 * busy:.0f}% busy with other work before the measured run "
                      f"(waited {self.args.quiet_wait:g}s); figures will be low", flush=True)  # fmt: skip
        tag = "measured" if self.args.repeat == 1 else f"measured {index + 1}/{self.args.repeat}"
        pool = self.make_pool(self.args.duration, quota, wrap, tag)
        db_before = {pid: loadgen.proc_cpu_seconds(pid) for pid in (self.db_pids() if self.db_pids else [])}
        if before_load is not None:
            before_load()
        user0, sys0 = server.cpu_seconds()
        busy0, kernel0, total0 = _cpu_times()
        started = time.monotonic()
        result = self.load(server, pool, self.args.duration, quota, wrap)
        window = (started, time.monotonic())
        user1, sys1 = server.cpu_seconds()
        busy1, kernel1, total1 = _cpu_times()
        db_after = {pid: loadgen.proc_cpu_seconds(pid) for pid in (self.db_pids() if self.db_pids else [])}
        db_cpu = sum(after - db_before.get(pid, 0.0) for pid, after in db_after.items()) if self.db_pids else None
        cpu0, cpu1 = user0 + sys0, user1 + sys1
        # CPU in the window used neither by the server, nor by the load generator,
        # nor by interrupts (loopback TCP runs in softirq) or the hypervisor (steal).
        foreign = ((busy1 - busy0) - (kernel1 - kernel0) - (cpu1 - cpu0) - (result.client_cpu_s or 0.0)
                   - (db_cpu or 0.0))  # fmt: skip
        report = RunReport(
            label=label, result=result, warmup=None,
            cpu_ms_per_request=(cpu1 - cpu0) * 1000 / result.answered if result.answered else None,
            sys_ms_per_request=(sys1 - sys0) * 1000 / result.answered if result.answered else None,
            machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else None,
            client_cpu_ms_per_request=(result.client_cpu_s * 1000 / result.answered
                                       if result.answered and result.client_cpu_s is not None else None),
            foreign_cpu_share=max(0.0, foreign / (total1 - total0)) if total1 > total0 else None,
            db_cpu_ms_per_request=db_cpu * 1000 / result.answered if db_cpu is not None and result.answered else None,
            window=window,
        )  # fmt: skip
        print_run(report)
        return report

    # -- servers

    def start_backlog(self, env: dict[str, str], workdir: Path, database_url: str, pg_schema: str | None) -> list[Server]:
        """`--backlog-workers` workers draining the `--backlog` stored events (and the new pushes) from now on."""
        import redis

        batch = self.args.backlog_job_batch or "wxcoupon's"
        print(f"  backlog: {self.args.backlog_workers} workers (job batch {batch}) on {self.args.redis_url} "
              "(flushed) start now, with the measured run", flush=True)  # fmt: skip
        redis.Redis.from_url(self.args.redis_url).flushdb()
        worker_env = {**env, "REDIS_URL": self.args.redis_url}
        if self.args.backlog_job_batch:
            worker_env["WXCOUPON_JOB_BATCH"] = str(self.args.backlog_job_batch)
        if pg_schema:  # their own application_name: their backends are not counted as the server's
            worker_env["DATABASE_URL"] = pg_schema_url(self.args.postgres_url, pg_schema) + "&application_name=wxbench-workers"
        workers = []
        for i in range(self.args.backlog_workers):
            argv = [sys.executable, "-m", "workers", "worker", "--name", f"intake-bench-{i}"]
            worker = Server(f"worker {i}", argv, worker_env, workdir, workdir / f"worker-{i}.log", 0)
            worker.spawn()  # no HTTP to wait for: it starts on the backlog at once
            workers.append(worker)
        return workers

    def run_bare(self, threads: int, worker_class: str) -> RunReport:
        """The baseline: bench/bare_app.py under wxcoupon's gunicorn settings, with `threads` per worker."""
        port = free_port()
        same = (threads, worker_class) == (self.args.web_threads, self.args.worker_class)
        label = "bare Flask app" if same else f"bare Flask app, {describe_workers(threads, worker_class)}"
        workdir = self.tmp_root / f"bare-{worker_class}-{threads}"
        workdir.mkdir()
        argv = [sys.executable, str(BENCH / "bare_app.py"), "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(self.args.workers), "--threads", str(threads), "--worker-class", worker_class]  # fmt: skip
        server = Server("bare app", argv, clean_env(), workdir, workdir / "server.log", port)
        print(f"\n== bare Flask app (bench/bare_app.py), {self.args.workers} gunicorn "
              f"{describe_workers(threads, worker_class)}", flush=True)  # fmt: skip
        server.start()
        try:
            return self.measure(server, label, wrap=True)
        finally:
            server.stop()

    def run_reference(self, bare: RunReport | None, enqueue: bool) -> RunReport:
        """Issue 2's yardstick (bench/reference_app.py) under the same settings; with `enqueue`, one RQ enqueue per push."""
        port = free_port()
        label = "wechatpy reference" + (" + RQ" if enqueue else "")
        workdir = self.tmp_root / label.replace(" ", "-").replace("+", "")
        workdir.mkdir()
        database = workdir / "reference.sqlite3"
        argv = [sys.executable, str(BENCH / "reference_app.py"), "--database", str(database),
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(self.args.workers)]  # fmt: skip
        flush: Callable[[], Any] = lambda: None  # noqa: E731
        if enqueue:
            import redis

            flush = redis.Redis.from_url(self.args.redis_url).flushdb
            flush()
            argv += ["--enqueue", self.args.redis_url]
        server = Server(label, argv, clean_env(**self.account.env()), workdir, workdir / "server.log", port)
        print(f"\n== {label} (bench/reference_app.py: check, decrypt, parse, SQLite FULL insert + commit"
              f"{', one RQ enqueue on ' + self.args.redis_url if enqueue else ''})", flush=True)  # fmt: skip
        server.start()
        try:
            report = self.measure(server, label, wrap=False)
        finally:
            server.stop()
            flush()
        report.reference = True
        report.compare_with(bare)
        check_durability(report, f"sqlite:///{database}")
        return report

    def run_wxcoupon(self, config: Config, bare: RunReport | None) -> RunReport:
        """One wxcoupon configuration on a fresh database."""
        workdir = self.tmp_root / config.label.replace(" ", "-")
        instance = workdir / "instance"
        instance.mkdir(parents=True)
        extra = {**self.account.env(), "WXCOUPON_INSTANCE_PATH": str(instance)}
        if os.environ.get("REDIS_URL"):
            extra["REDIS_URL"] = os.environ["REDIS_URL"]
        pg_schema = None
        if config.database == "sqlite":
            extra["WXCOUPON_SQLITE_SYNCHRONOUS"] = config.synchronous or "FULL"
        else:
            pg_schema = f"wxbench_{secrets.token_hex(6)}"
            create_pg_schema(self.args.postgres_url, pg_schema)
            # application_name marks this run's backends, to count their CPU apart from other clients'.
            app_name = f"wxbench-{pg_schema}"
            extra["DATABASE_URL"] = pg_schema_url(self.args.postgres_url, pg_schema) + f"&application_name={app_name}"
            self.db_pids = lambda: pg_backend_pids(self.args.postgres_url, app_name)
        env = clean_env(**extra)
        database_url = load_settings(env, dotenv=False).database_url
        print(f"\n== {config.label}: {redact(database_url)}", flush=True)
        try:
            upgrade = subprocess.run(
                [sys.executable, "-m", "workers", "db", "upgrade"], env=env, cwd=workdir,
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if upgrade.returncode != 0:
                raise RuntimeError(f"wxcoupon db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
            print(f"  wxcoupon db upgrade: {upgrade.stdout.strip()}", flush=True)
            port = free_port()
            argv = [sys.executable, "-m", "workers", "serve", "--host", "127.0.0.1", "--port", str(port),
                    "--workers", str(self.args.workers), "--threads", str(self.args.web_threads),
                    "--worker-class", self.args.worker_class]  # fmt: skip
            server = Server(config.label, argv, env, workdir, workdir / "server.log", port)
            server.start()
            workers: list[Server] = []
            watch: BacklogWatch | None = None

            last_backlog_id = 0

            def start_workers() -> None:
                nonlocal watch
                workers.extend(self.start_backlog(env, workdir, database_url, pg_schema))
                watch = BacklogWatch(database_url, last_backlog_id)
                watch.start()

            try:
                if self.args.backlog:
                    took, last_backlog_id = fill_backlog(database_url, self.account, self.args.backlog)
                    print(f"  backlog: {self.args.backlog} pending events stored in {took:.1f}s", flush=True)
                report = self.measure(server, config.label, wrap=False,
                                      before_first_run=start_workers if self.args.backlog else None)  # fmt: skip
            finally:
                if watch is not None:
                    watch.stop()
                server.stop()
                for worker in workers:
                    worker.stop()
            if workers:
                done, total = backlog_done(database_url, last_backlog_id)
                note = (f"backlog: {done} of {total} stored events processed by {len(workers)} `wxcoupon worker` "
                        f"processes meanwhile (their CPU counts as other processes')")  # fmt: skip
                if watch is not None and report.window is not None:
                    note += "; " + watch.describe(*report.window)
                print(f"  {note}", flush=True)
                report.notes.append(note)
            report.compare_with(bare)
            check_durability(report, database_url, self.args.backlog)
            if report.non_200():
                report.notes.append("server log tail:\n" + server.log_tail(15))
            return report
        finally:
            self.db_pids = None
            if pg_schema:
                drop_pg_schema(self.args.postgres_url, pg_schema)


# ---------------------------------------------------------------- databases


def pg_backend_pids(base: str, application_name: str) -> list[int]:
    """Pids of the PostgreSQL backends whose clients set this application_name."""
    engine = sa.create_engine(base, connect_args={"connect_timeout": 5}, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                                {"name": application_name}).scalars()  # fmt: skip
            return [int(pid) for pid in rows]
    finally:
        engine.dispose()


def postgres_facts(base: str) -> dict[str, str] | None:
    """The server settings that decide what a commit costs, or None if unreachable."""
    try:
        engine = sa.create_engine(base, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            facts = {"version": str(conn.execute(sa.text("SHOW server_version")).scalar())}
            for name in ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes", "commit_delay"):
                facts[name] = str(conn.execute(sa.text(f"SHOW {name}")).scalar())
        engine.dispose()
        return facts
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        print(f"PostgreSQL at {redact(base)} unreachable: {type(exc).__name__}: {exc}".splitlines()[0])
        return None


def fill_backlog(database_url: str, account: Account, n: int) -> tuple[float, int]:
    """Store `n` pending user_get_card events, as intake stores them, before any push: (seconds taken, last id).

    The backlog is then every row up to that id, and every row after it a push.
    """
    from webhook.store import events

    started = time.perf_counter()
    tag, now = secrets.token_hex(4), int(time.time()) - 60
    rows = [
        stored_event_row(
            "user_get_card", FromUserName=f"oBACKLOG{tag}{i:012d}", CreateTime=now,
            CardId=f"pBACKLOG{tag}{i % 4:02d}" + "x" * 12, UserCardCode=str(300_000_000_000 + i),
        )  # fmt: skip
        for i in range(n)
    ]
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            for start in range(0, n, 2000):
                conn.execute(sa.insert(events), rows[start : start + 2000])
            last = int(conn.execute(sa.select(sa.func.max(events.c.id))).scalar_one() or 0)
    finally:
        engine.dispose()
    return time.perf_counter() - started, last


def backlog_done(database_url: str, last_id: int) -> tuple[int, int]:
    """(processed, all) events of the backlog (the rows up to `last_id`)."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(sa.text(
                "SELECT count(*) FILTER (WHERE status = 'processed'), count(*) FROM events WHERE id <= :last"
            ), {"last": last_id}).one()  # fmt: skip
    finally:
        engine.dispose()
    return int(found[0]), int(found[1])


class BacklogWatch(threading.Thread):
    """Samples, twice a second, how much of the backlog is left and how many pushes intake has committed.

    So that a `--backlog` run can tell whether the backlog lasted through the
    measured run, and what intake took in while it did: the workers drain it at
    their own pace, and intake alone afterwards is a different measurement.
    The backlog's rows are those up to `last_id`; every later row is a push.
    """

    INTERVAL = 0.5

    def __init__(self, database_url: str, last_id: int) -> None:
        super().__init__(name="backlog-watch", daemon=True)
        self.last_id = last_id
        self.engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, backlog rows not processed, pushes stored)
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stopped (cheap: an index range and max(id))."""
        left = sa.text("SELECT count(*) FROM events WHERE status IN ('pending', 'queued', 'processing') AND id <= :n")
        with self.engine.connect() as conn:
            while not self._stop_event.is_set():
                remaining = int(conn.execute(left, {"n": self.last_id}).scalar_one())
                top = conn.execute(sa.text("SELECT max(id) FROM events")).scalar_one()
                conn.rollback()  # a new snapshot next time
                self.samples.append((time.monotonic(), remaining, max(0, int(top or 0) - self.last_id)))
                self._stop_event.wait(self.INTERVAL)

    def stop(self) -> None:
        """End the sampling."""
        self._stop_event.set()
        self.join(10)
        self.engine.dispose()

    def _pushes_at(self, moment: float) -> float:
        """Pushes stored at `moment`, interpolated between the samples around it."""
        before = [s for s in self.samples if s[0] <= moment]
        after = [s for s in self.samples if s[0] >= moment]
        if not before:
            return float(after[0][2]) if after else 0.0
        if not after:
            return float(before[-1][2])
        (t0, _, p0), (t1, _, p1) = before[-1], after[0]
        return p0 + (p1 - p0) * ((moment - t0) / (t1 - t0) if t1 > t0 else 0.0)

    def describe(self, start: float, end: float) -> str:
        """When the backlog ran out relative to the measured run [start, end], and intake's rate before and after."""
        if not self.samples:
            return "no backlog samples"
        drained = next((t for t, remaining, _ in self.samples if remaining == 0), None)
        if drained is None or drained >= end:
            left = next((r for t, r, _ in reversed(self.samples) if t <= end), self.samples[-1][1])
            rate = (self._pushes_at(end) - self._pushes_at(start)) / (end - start)
            return f"it lasted the whole measured run ({left} left at its end): intake {rate:.0f} events/s meanwhile"
        if drained <= start:
            return f"it ran out {start - drained:.1f}s before the measured run: intake alone in that run"
        during = (self._pushes_at(drained) - self._pushes_at(start)) / (drained - start)
        after = (self._pushes_at(end) - self._pushes_at(drained)) / (end - drained) if end > drained else 0.0
        return (f"it ran out {drained - start:.1f}s into the {end - start:.1f}s measured run (±{self.INTERVAL}s): "
                f"intake {during:.0f} events/s while it lasted, {after:.0f} after")  # fmt: skip


def check_durability(report: RunReport, database_url: str, backlog: int = 0) -> None:
    """Every 200 answer is a committed row, and there is no row without a 200 (the `--backlog` rows aside)."""
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM events GROUP BY status")).all()
    engine.dispose()
    report.rows_by_status = {str(s): int(n) for s, n in rows}
    report.rows = sum(report.rows_by_status.values()) - backlog
    report.durable_ok = report.rows == report.acked() and report.non_200() == 0


def redact(url: str) -> str:
    """A database URL without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


# ---------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_run(report: RunReport) -> None:
    """The figures of one measured run, as soon as it is done."""
    r = report.result
    lat = r.latency_ms
    print(f"  {r.loader}: {r.answered} answered in {r.window:.2f}s -> {r.rps:.0f} req/s, "
          f"{r.events_per_s:.0f} events/s (200s)", flush=True)  # fmt: skip
    print(f"  latency ms: p50 {_ms(lat.get('50'))}  p90 {_ms(lat.get('90'))}  p99 {_ms(lat.get('99'))}  "
          f"p99.9 {_ms(lat.get('99.9'))}  max {_ms(lat.get('max'))}", flush=True)  # fmt: skip
    print(f"  statuses: {dict(sorted(r.statuses.items()))}  non-2xx: {r.non_2xx}  socket errors: {r.errors or 0}")
    if report.cpu_ms_per_request is not None:
        client = report.client_cpu_ms_per_request
        print(f"  CPU per request: server {report.cpu_ms_per_request:.3f} ms (gunicorn workers; "
              f"{_cpu(report.sys_ms_per_request)} ms of it in the kernel), "
              f"load generator {_cpu(client)} ms; all {os.cpu_count()} CPUs {100 * (report.machine_busy or 0):.0f}% "
              f"busy, {100 * (report.foreign_cpu_share or 0):.0f}% by other processes", flush=True)  # fmt: skip
    if report.db_cpu_ms_per_request is not None:
        print(f"  PostgreSQL backends serving it: {report.db_cpu_ms_per_request:.3f} ms CPU per request", flush=True)
    if (report.foreign_cpu_share or 0) > 0.1:
        print("  NOTE: other processes used more than 10% of the CPUs during this run: figures are low", flush=True)
    if r.exhausted:
        print("  NOTE: the pool of distinct pushes ran out before the duration: raise --max-rate", flush=True)
    if not r.settled:
        print("  NOTE: some requests got no answer (socket errors or timeouts)", flush=True)


def _cost(rep: RunReport) -> float | None:
    """Server + its PostgreSQL backends + load generator CPU ms per request."""
    if rep.cpu_ms_per_request is None:
        return None
    return rep.cpu_ms_per_request + (rep.client_cpu_ms_per_request or 0.0) + (rep.db_cpu_ms_per_request or 0.0)


def describe_workers(threads: int, worker_class: str = "sync") -> str:
    """gunicorn's worker kind for `threads` per worker and the worker class, as `wxcoupon serve` picks it."""
    if worker_class == "gevent":
        return "gevent workers"
    return f"gthread workers x {threads} threads" if threads > 1 else "sync workers"


def print_summary(bare: RunReport | None, reports: list[RunReport], args: argparse.Namespace,
                  bare_sync: RunReport | None = None) -> None:  # fmt: skip
    """The table at the end, and the durability verdicts."""
    print("\n" + "=" * 120)
    mode = f"{args.requests} requests" if args.requests else f"{args.duration:g}s"
    print(f"SUMMARY: {args.connections} connections, {args.workers} gunicorn {describe_workers(args.web_threads, args.worker_class)} "
          f"(both apps), {mode} per server after {args.warmup:g}s warm-up, loopback, {os.cpu_count()} CPUs")  # fmt: skip
    header = (f"{'server':<24} {'req/s':>8} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>8} "
              f"{'ratio':>6} {'CPU ms/req':>10} {'CPU ratio':>9} {'other%':>6} {'rows=200s':>10} "
              f"{'target':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for rep in ([bare] if bare else []) + ([bare_sync] if bare_sync else []) + reports:
        r = rep.result
        p99 = r.latency_ms.get("99")
        cpu_ratio = "-"
        if bare is not None and _cost(bare) and _cost(rep):
            cpu_ratio = f"{_cost(bare) / _cost(rep):.2f}"  # type: ignore[operator]
        if rep is bare:
            ratio, durable, target = "1.00", "n/a", ""
        elif rep is bare_sync:
            ratio = f"{r.events_per_s / bare.result.events_per_s:.2f}" if bare and bare.result.events_per_s else "-"
            durable, target = "n/a", "(ref.)"
        else:
            ratio = f"{rep.ratio:.2f}" if rep.ratio is not None else "-"
            durable = "yes" if rep.durable_ok else "NO"
            met = rep.ratio is not None and rep.ratio >= TARGET_RATIO and p99 is not None and p99 < TARGET_P99_MS
            target = "(ref.)" if rep.reference else "met" if met else "missed"
        print(f"{rep.label:<24} {r.rps:>8.0f} {r.events_per_s:>9.0f} {_ms(r.latency_ms.get('50')):>7} "
              f"{_ms(p99):>7} {r.non_2xx:>8} {ratio:>6} {_cpu(rep.cpu_ms_per_request):>10} {cpu_ratio:>9} "
              f"{100 * (rep.foreign_cpu_share or 0):>6.0f} {durable:>10} {target:>8}")  # fmt: skip
    print("-" * len(header))
    print("CPU ms/req: the server's gunicorn workers (user+sys) per answered request. CPU ratio: the bare app's "
          "(server + load generator [+ PostgreSQL backends]) CPU per request over this server's, the ratio to expect on an otherwise idle, "
          "CPU-bound machine (it leaves out waits such as fsync). other%: CPU share used during the run by "
          "processes other than the server, its PostgreSQL backends and the load generator.")
    print(f"target (issue 2): events/s >= {TARGET_RATIO} x bare req/s with durability on, and p99 < "
          f"{TARGET_P99_MS:g} ms at {args.connections} connections")  # fmt: skip
    if bare_sync is not None and bare_sync.result.events_per_s:
        against = ", ".join(f"{rep.label} {rep.result.events_per_s / bare_sync.result.events_per_s:.2f}"
                            for rep in reports)  # fmt: skip
        print(f"for transparency, the bare app under {args.workers} {describe_workers(1)} too (same run): "
              f"{bare_sync.result.events_per_s:.0f} req/s; wxcoupon events/s over that: {against or '-'}")  # fmt: skip
    for rep in reports:
        acked = rep.acked()
        verdict = "OK" if rep.durable_ok else "FAILED"
        print(f"durability {rep.label}: {verdict}: {acked} answered 200 (warm-up + measured), {rep.rows} rows "
              f"stored {rep.rows_by_status}, {rep.non_200()} non-200 answers")  # fmt: skip
        for note in rep.notes:
            print("  " + note.replace("\n", "\n    "))


def environment_facts(args: argparse.Namespace, loader_note: str, pg: dict[str, str] | None) -> dict[str, Any]:
    """What the figures depend on."""
    from importlib.metadata import version

    fs = subprocess.run(["stat", "-f", "-c", "%T", str(args.tmpdir or tempfile.gettempdir())],
                        capture_output=True, text=True).stdout.strip()  # fmt: skip
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    facts: dict[str, Any] = {
        "code": f"{git or '?'} (git describe --always --dirty)",
        "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "flask": version("flask"),
        "gunicorn": version("gunicorn"), "sqlalchemy": version("sqlalchemy"), "loader": loader_note,
        "temp filesystem": fs or "?", "REDIS_URL": "set" if os.environ.get("REDIS_URL") else "unset (web does not need it)",
    }  # fmt: skip
    if pg:
        facts["postgres"] = ", ".join(f"{k}={v}" for k, v in pg.items())
    return facts


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=0, help="measured requests per server (default: by duration)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per server (default 15)")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds before each measured run (default 3)")
    p.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn workers for both apps (default 2)")
    p.add_argument("--web-threads", type=int, default=DEFAULT_WEB_THREADS,
                   help=f"threads per gunicorn worker for both apps, 1 for sync workers (default {DEFAULT_WEB_THREADS}, "
                        "as `wxcoupon serve`)")  # fmt: skip
    p.add_argument("--worker-class", choices=WORKER_CLASSES, default=DEFAULT_WEB_WORKER_CLASS,
                   help="gunicorn worker class for both apps: sync (gthread with --web-threads) or gevent "
                        f"(default {DEFAULT_WEB_WORKER_CLASS}, as `wxcoupon serve`)")  # fmt: skip
    p.add_argument("--database", default="sqlite", help="sqlite, postgres, or both comma-separated (default sqlite)")
    p.add_argument("--synchronous", default="FULL", type=str.upper, choices=["FULL", "NORMAL", "BOTH"],
                   help="SQLite PRAGMA synchronous: FULL (default), NORMAL, or both")  # fmt: skip
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, help="PostgreSQL server (a fresh schema per run)")
    p.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto",
                   help="load generator: wrk (installed with apt-get if missing), python, or auto (default)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leaves the CPUs to the servers)")
    p.add_argument("--py-procs", type=int, default=2, help="processes of the Python load generator (default 2)")
    p.add_argument("--max-rate", type=float, default=6000.0,
                   help="req/s the push pool is sized for in a timed run (default 6000)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1,
                   help="measured runs per server, each with new pushes; the best is reported (default 1)")  # fmt: skip
    p.add_argument("--no-bare", action="store_true", help="skip the bare app (no ratio)")
    p.add_argument("--reference", action="store_true",
                   help="also measure issue 2's yardstick, a straightforward wechatpy handler (bench/reference_app.py), "
                        "without and with one RQ enqueue per push (on --redis-url, flushed); needs wechatpy")  # fmt: skip
    p.add_argument("--backlog", type=int, default=0,
                   help="store N pending events before each wxcoupon run and drain them with workers meanwhile")
    p.add_argument("--backlog-workers", type=int, default=2, help="`wxcoupon worker` processes for --backlog (default 2)")
    p.add_argument("--backlog-job-batch", type=int, default=0, help="WXCOUPON_JOB_BATCH of those workers (default wxcoupon's)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/10",
                   help="Redis for the --backlog workers and --reference's enqueue (loopback only; this database is flushed)")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each measured run, wait up to this many seconds for the CPUs to be idle (default 60)")  # fmt: skip
    p.add_argument("--tmpdir", default=None, help="where the instance folders go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (databases, server logs)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.reference:
        if args.worker_class != "sync" or args.web_threads > 1:
            p.error("--reference runs under sync workers only (the handler keeps one SQLite connection per process)")
        try:
            import wechatpy  # noqa: F401
        except ImportError:
            p.error("--reference needs wechatpy: .venv/bin/pip install -e '.[bench]'")
    args.duration_given = args.duration is not None
    if args.duration is None:
        args.duration = 15.0
    if args.requests < 0 or args.duration <= 0 or args.connections < 1 or args.workers < 1 or args.repeat < 1:
        p.error("--requests, --duration, --connections, --workers and --repeat must be positive")
    budget = args.warmup + (args.duration if (not args.requests or args.duration_given) else args.requests / 500)
    if budget > TOLERANCE - 60:
        p.error(f"a run must end within the {TOLERANCE}s timestamp tolerance: keep warm-up + duration under "
                f"{TOLERANCE - 60}s")  # fmt: skip
    return args


def configurations(args: argparse.Namespace) -> list[Config]:
    """The wxcoupon configurations the options ask for."""
    configs: list[Config] = []
    for db in [d.strip().lower() for d in args.database.split(",") if d.strip()]:
        if db == "sqlite":
            syncs = ["FULL", "NORMAL"] if args.synchronous == "BOTH" else [args.synchronous]
            configs.extend(Config("sqlite", s) for s in syncs)
        elif db in ("postgres", "postgresql"):
            configs.append(Config("postgres"))
        else:
            raise SystemExit(f"unknown --database {db!r}: use sqlite, postgres or both")
    return configs


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 if a durability check failed, else 0."""
    args = parse_args(argv)
    configs = configurations(args)
    bench = Bench(args)
    if args.loader == "python":
        loader_note = "Python load generator (--loader python)"
    else:
        wrk, note = loadgen.find_wrk(install=True)
        if wrk:
            bench.wrk = wrk
            loader_note = f"{loadgen.wrk_version(wrk)} with bench/intake.lua ({note})"
        elif args.loader == "wrk":
            raise SystemExit(f"--loader wrk: {note}")
        else:
            loader_note = f"Python load generator ({note}; its own CPU use lowers the figures)"
    pg = None
    if any(c.database == "postgres" for c in configs):
        pg = postgres_facts(args.postgres_url)
        if pg is None:
            print("skipping the PostgreSQL configuration")
            configs = [c for c in configs if c.database != "postgres"]
    print("environment:")
    for key, value in environment_facts(args, loader_note, pg).items():
        print(f"  {key}: {value}")
    bare: RunReport | None = None
    bare_sync: RunReport | None = None
    reports: list[RunReport] = []
    try:
        if not args.no_bare:
            bare = bench.run_bare(args.web_threads, args.worker_class)
            if args.web_threads > 1 or args.worker_class != "sync":
                bare_sync = bench.run_bare(1, "sync")  # the default workers' baseline, for comparison
        if args.reference:
            reports.extend(bench.run_reference(bare, enqueue) for enqueue in (False, True))
        for config in configs:
            reports.append(bench.run_wxcoupon(config, bare))
    finally:
        if args.keep:
            print(f"\nkept {bench.tmp_root}")
        else:
            import shutil

            shutil.rmtree(bench.tmp_root, ignore_errors=True)
    print_summary(bare, reports, args, bare_sync)
    if args.json:
        data = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "runs": [dict(asdict(r), events_per_s=r.result.events_per_s, rps=r.result.rps)
                         for r in ([bare] if bare else []) + ([bare_sync] if bare_sync else []) + reports]}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0 if all(r.durable_ok for r in reports if not r.reference) else 1


if __name__ == "__main__":
    sys.exit(main())
