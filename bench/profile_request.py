"""Where one push's time goes: the request path stage by stage, in process.

    .venv/bin/python bench/profile_request.py [--n 3000] [--database sqlite|postgres] [--cprofile 25]

No HTTP server and no load generator: each stage of POST /wechat is timed on
its own over N distinct safe-mode `user_get_card` pushes, then the whole WSGI
app (wxcoupon's and bench/bare_app.py's) is called directly with prepared
environs. The difference between the whole and the sum of the stages is
Flask/Werkzeug. Database stages run on fresh databases so that every insert is
a new row, with SQLite synchronous FULL, NORMAL and OFF (OFF isolates the
fsync), plus the same INSERT through the DBAPI alone (SQLAlchemy's share).
Logging goes to a file, as under `wxcoupon serve` with its output redirected.
Figures are microseconds per push: CPU (process time) and wall.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import secrets
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable
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
from werkzeug.test import EnvironBuilder  # noqa: E402

from webhook import create_app, crypto, envelope, schema  # noqa: E402
from webhook.config import Settings  # noqa: E402
from webhook.events import parse_push  # noqa: E402
from webhook.intake import EventWriter, event_row, record, sqlite_write_lock  # noqa: E402
from webhook.signature import verify_signature  # noqa: E402
from webhook.store import events as events_table  # noqa: E402
from webhook.store import make_engine  # noqa: E402
from webhook.xmlparse import parse_xml  # noqa: E402

from intake import DEFAULT_POSTGRES_URL, Account, PushFactory  # noqa: E402
from pgschema import create_pg_schema, drop_pg_schema, pg_schema_url  # noqa: E402

Row = tuple[str, float, float]  # stage, CPU us, wall us


def timed(name: str, items: Iterable[Any], fn: Callable[[Any], Any]) -> Row:
    """Mean CPU and wall microseconds of fn(item) over items."""
    items = list(items)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for item in items:
        fn(item)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    n = max(1, len(items))
    return name, (cpu1 - cpu0) * 1e6 / n, (wall1 - wall0) * 1e6 / n


def timed_rounds(name: str, items: list[Any], fn: Callable[[Any], Any], rounds: int) -> Row:
    """timed() over `rounds` disjoint slices of items; the fastest round (least disturbed by other load)."""
    size = len(items) // rounds
    results = [timed(name, items[i * size : (i + 1) * size], fn) for i in range(rounds)]
    return name, min(r[1] for r in results), min(r[2] for r in results)


def insert_function(kind: str, engine: sa.Engine, sample: tuple[Any, Any]) -> tuple[Callable[[Any], Any], str]:
    """One way to insert and commit an event row: (function of (push, opened), label)."""
    from webhook.store import _insert_for

    if kind == "record":
        return (lambda po: record(engine, *po)), "record(): SQLAlchemy, statement built once + commit"
    if kind in ("writer", "writer-tx"):
        writer = EventWriter(engine, sqlite_write_lock(engine))
        if kind == "writer-tx":
            # PostgreSQL as before the writer's autocommit: BEGIN, INSERT, COMMIT, three round trips.
            writer._autocommit = False
            return (lambda po: writer.write(event_row(*po))), "EventWriter.write(), BEGIN + INSERT + COMMIT per push"
        return (lambda po: writer.write(event_row(*po))), "EventWriter.write(): the driver, prepared (as now)"
    with engine.connect() as conn:
        stmt = _insert_for(conn).on_conflict_do_nothing(index_elements=["dedupe_key"]).returning(events_table.c.id)
        dialect = conn.dialect
    if kind == "prebuilt":
        # The statement built once; the row goes in as parameters, not as .values().
        def prebuilt(po: Any) -> None:
            with engine.begin() as conn:
                conn.execute(stmt, event_row(*po)).scalar_one_or_none()

        return prebuilt, "statement built once, conn.execute(stmt, row) + commit"
    # The same INSERT ... RETURNING through the driver alone: SQLAlchemy's share is the rest.
    keys = list(event_row(*sample))
    compiled = stmt.compile(dialect=dialect, column_keys=keys)
    sql = str(compiled)
    order = compiled.positiontup
    binds: dict[str, Any] = {}
    for column in events_table.columns:
        process: Any = column.type.bind_processor(dialect) if column.name in keys else None
        if process is None and column.name in keys and isinstance(column.type, sa.JSON) and dialect.name == "postgresql":
            from psycopg.types.json import Json

            process = Json  # what SQLAlchemy's psycopg dialect hands the driver for a JSON value
        if process is not None:
            binds[column.name] = process
    raw_conn = engine.raw_connection()
    driver: Any = raw_conn.driver_connection
    is_sqlite = dialect.name == "sqlite"

    def dbapi(po: Any) -> None:
        row = event_row(*po)
        for key, bind in binds.items():
            row[key] = bind(row[key])
        cur = driver.cursor()
        if is_sqlite:
            cur.execute("BEGIN")
        cur.execute(sql, [row[k] for k in order] if order else row)
        cur.fetchone()
        cur.close()
        driver.commit()

    return dbapi, "the same INSERT via the driver alone + commit"


def settings_for(account: Account, instance: Path, database_url: str, synchronous: str) -> Settings:
    """Settings as `wxcoupon serve` would load them for this account."""
    return Settings(
        token=account.token, appid=account.appid, encoding_aes_key=account.encoding_aes_key,
        timestamp_tolerance=300, database_url=database_url, instance_path=instance,
        sqlite_synchronous=synchronous,
    )  # fmt: skip


def environ(target: str, body: bytes) -> dict[str, Any]:
    """A WSGI environ for POST target with body, as gunicorn would build it."""
    path, _, query = target.partition("?")
    return EnvironBuilder(path=path, method="POST", query_string=query, data=body,
                          content_type="text/xml").get_environ()  # fmt: skip


def call_wsgi(app: Any, env: dict[str, Any]) -> None:
    """Call a WSGI app and drain its answer, as a gunicorn worker does."""
    status: list[str] = []

    def start_response(s: str, headers: Any, exc_info: Any = None) -> None:
        status.append(s)

    body = app(env, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close:
            close()
    if not status or not status[0].startswith("200"):
        raise RuntimeError(f"unexpected answer {status}")


class Database:
    """A fresh database of one kind: SQLite with a synchronous mode, or a PostgreSQL schema."""

    def __init__(self, kind: str, root: Path, synchronous: str, postgres_url: str) -> None:
        self.kind, self.synchronous, self.postgres_url = kind, synchronous, postgres_url
        self.dir = Path(tempfile.mkdtemp(prefix=f"db-{kind}-{synchronous}-", dir=root))
        self.pg_schema = None
        if kind == "sqlite":
            self.url = f"sqlite:///{self.dir / 'wxcoupon.sqlite3'}"
        else:
            self.pg_schema = f"wxprof_{secrets.token_hex(6)}"
            create_pg_schema(postgres_url, self.pg_schema)
            self.url = pg_schema_url(postgres_url, self.pg_schema)

    def close(self) -> None:
        """Drop the PostgreSQL schema, if any."""
        if self.pg_schema:
            drop_pg_schema(self.postgres_url, self.pg_schema)


def main() -> None:
    """Time the stages and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=3000, help="pushes per stage (default 3000)")
    p.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    p.add_argument("--rounds", type=int, default=3, help="rounds per stage; the fastest is shown (default 3)")
    p.add_argument("--cprofile", type=int, default=25, help="lines of cProfile output for the whole app (0: none)")
    args = p.parse_args()
    n = args.n
    root = Path(tempfile.mkdtemp(prefix="wxprof-"))
    # As under `wxcoupon serve`: Prometheus values in per-process files (if the app has metrics).
    (root / "prometheus").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(root / "prometheus")
    log_file = (root / "app.log").open("w")
    os.dup2(log_file.fileno(), 2)  # the app logs to stderr: to a file, as under `wxcoupon serve > log`
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), write_through=True)
    out = sys.stdout
    account = Account.generate()
    factory = PushFactory(account)
    rows: list[Row] = []
    dbs: list[Database] = []
    try:
        base_sync = "FULL"
        main_db = Database(args.database, root, base_sync, args.postgres_url)
        dbs.append(main_db)
        settings = settings_for(account, root / "instance", main_db.url, base_sync)
        engine = make_engine(settings)
        schema.upgrade(engine)
        app = create_app(settings)
        app_engine = app.extensions["wxcoupon.engine"]

        pushes, _ = factory.make(n)
        parsed = [(dict(urllib.parse.parse_qsl(t.partition("?")[2])), b) for t, b in pushes]
        keys = settings.aes_keys
        appid = account.appid

        # -- the pure steps of open_push, one at a time
        r = args.rounds

        def stage(name: str, items: list[Any], fn: Callable[[Any], Any]) -> None:
            rows.append(timed_rounds(name, items * r, fn, r))

        stage("signature + timestamp (_check_query)", parsed,
              lambda qb: envelope._check_query(qb[0], settings.token, 300, None))  # fmt: skip
        stage("parse outer XML (lxml)", parsed, lambda qb: parse_xml(qb[1]))
        outers = [(q, parse_xml(b)["Encrypt"]) for q, b in parsed]
        stage("msg_signature (sha1)", outers, lambda qe: verify_signature(
            qe[0]["msg_signature"], settings.token, qe[0]["timestamp"], qe[0]["nonce"], qe[1]))  # fmt: skip
        stage("base64 + AES-CBC decrypt + unframe", outers, lambda qe: crypto.decrypt(qe[1], keys, appid))
        inner = [crypto.decrypt(e, keys, appid) for _, e in outers]
        stage("parse inner XML (lxml)", inner, parse_xml)
        stage("= open_push, all of the above", parsed, lambda qb: envelope.open_push(qb[0], qb[1], settings))
        opened = [envelope.open_push(q, b, settings) for q, b in parsed]
        stage("parse_push (typed record, dedupe key)", opened, lambda o: parse_push(o.fields))
        pushed = [(parse_push(o.fields), o) for o in opened]
        stage("event_row (column values)", pushed, lambda po: event_row(*po))
        rows.append(("", 0.0, 0.0))

        # -- the insert and commit, on fresh databases, three ways
        def insert_stage(kind: str, sync: str) -> Row:
            db = Database(args.database, root, sync, args.postgres_url)
            dbs.append(db)
            s = settings_for(account, root / "instance", db.url, sync)
            eng = make_engine(s)
            schema.upgrade(eng)
            fresh, _ = factory.make(n * args.rounds)
            items = []
            for t, b in fresh:
                o = envelope.open_push(dict(urllib.parse.parse_qsl(t.partition("?")[2])), b, s)
                items.append((parse_push(o.fields), o))
            label = f"SQLite synchronous={sync}" if args.database == "sqlite" else "PostgreSQL"
            fn, name = insert_function(kind, eng, items[0])
            row = timed_rounds(f"{name}, {label}", items, fn, args.rounds)
            with eng.connect() as conn:
                stored = conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar()
            if stored != len(items):
                raise RuntimeError(f"expected {len(items)} rows, found {stored}")
            eng.dispose()
            return row

        if args.database == "sqlite":
            plan = [("writer", "FULL"), ("writer", "NORMAL"), ("writer", "OFF"),
                    ("record", "FULL"), ("record", "NORMAL"), ("record", "OFF"),
                    ("dbapi", "FULL"), ("dbapi", "NORMAL"), ("dbapi", "OFF")]  # fmt: skip
        else:
            plan = [("writer", "FULL"), ("writer-tx", "FULL"), ("record", "FULL"), ("dbapi", "FULL")]
        for kind, sync in plan:
            rows.append(insert_stage(kind, sync))
        rows.append(("", 0.0, 0.0))

        # -- logging, as the view does it
        log = logging.getLogger("wxcoupon.webhook")
        stage("log.info('push stored') to a file (as the view does)", list(range(n)),
              lambda i: log.info("push stored", extra={"event_id": i, "event": "user_get_card"}))  # fmt: skip
        try:
            from webhook import metrics as metrics_module
        except ImportError:
            metrics_module = None  # type: ignore[assignment]
        if metrics_module is not None and hasattr(metrics_module, "count_push"):
            def observe(_i: int) -> None:
                metrics_module.count_push("user_get_card", "stored")
                metrics_module.observe_ack(0.01)

            stage("metrics: count_push + observe_ack (multi-process files)", list(range(n)), observe)
        rows.append(("", 0.0, 0.0))

        # -- whole apps through WSGI, no HTTP server
        import bare_app

        envs = [environ(t, b) for t, b in pushes * r]
        rows.append(timed_rounds("bare Flask app (bench/bare_app.py), whole WSGI call", envs,
                                 lambda e: call_wsgi(bare_app.app, e), r))  # fmt: skip

        def whole(label: str, application: Any, patches: dict[tuple[Any, str], Any] | None = None) -> None:
            """The whole WSGI call on fresh pushes, with some functions swapped in this process only."""
            missing = [f"{getattr(o, '__name__', o)}.{a}" for (o, a) in (patches or {}) if not hasattr(o, a)]
            if missing:
                rows.append((f"(skipped: {label}: the code has no {', '.join(missing)})", float("nan"), float("nan")))
                return
            saved = {(o, a): getattr(o, a) for (o, a) in (patches or {})}
            fresh, _ = factory.make(n * r)
            envs = [environ(t, b) for t, b in fresh]
            try:
                for (o, a), value in (patches or {}).items():
                    setattr(o, a, value)
                rows.append(timed_rounds(f"wxcoupon, whole WSGI call, {label}", envs,
                                         lambda e: call_wsgi(application, e), r))  # fmt: skip
            finally:
                for (o, a), value in saved.items():
                    setattr(o, a, value)

        import webhook.views as views_module

        db_label = "SQLite FULL" if args.database == "sqlite" else "PostgreSQL"
        apps = [(db_label, app)]
        if args.database == "sqlite":
            normal_db = Database("sqlite", root, "NORMAL", args.postgres_url)
            dbs.append(normal_db)
            normal_settings = settings_for(account, root / "instance", normal_db.url, "NORMAL")
            normal_engine = make_engine(normal_settings)
            schema.upgrade(normal_engine)
            normal_engine.dispose()
            apps.append(("SQLite NORMAL", create_app(normal_settings)))

        counter = iter(range(1, 10**9))
        quiet = logging.getLogger("wxcoupon")

        no_metrics = {(views_module.metrics, name): (lambda *a, **k: None)
                      for name in ("count_push", "observe_ack") if hasattr(views_module, "metrics")}  # fmt: skip
        opened_cache: dict[bytes, Any] = {}
        real_open_push = envelope.open_push

        def open_push_cached(q: Any, body: bytes, st: Any, now: Any = None) -> Any:
            return opened_cache[body]

        for label, application in apps:
            whole(f"{label} (as is)", application)
        rows.append(("  ... what each part costs in context: the same call with one part removed or changed", 0.0, 0.0))
        class NoWrite:
            def write(self, row: dict[str, Any]) -> int:
                return next(counter)

        import webhook.db as db_module

        whole(f"{db_label}, no database write at all (the writer returns an id)", app,
              {(db_module, "get_writer"): lambda: NoWrite()})  # fmt: skip
        quiet_level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            whole(f"{db_label}, logging off", app)
        finally:
            quiet.setLevel(quiet_level)
        if no_metrics:
            whole(f"{db_label}, metrics off", app, no_metrics)
        # Pre-open every push of the next call, then let the view take the result from a dict.
        fresh_pre, _ = factory.make(n * r)
        for t, b in fresh_pre:
            opened_cache[b] = real_open_push(dict(urllib.parse.parse_qsl(t.partition("?")[2])), b, settings)
        envs_pre = [environ(t, b) for t, b in fresh_pre]
        saved_open = views_module.open_push
        setattr(views_module, "open_push", open_push_cached)
        try:
            rows.append(timed_rounds(f"wxcoupon, whole WSGI call, {db_label}, open_push precomputed (no crypto/XML)",
                                     envs_pre, lambda e: call_wsgi(app, e), r))  # fmt: skip
        finally:
            views_module.open_push = saved_open
        quiet.setLevel(logging.WARNING)
        try:
            for label, application in apps:
                whole(f"{label}, logging off + metrics off", application, dict(no_metrics))
        finally:
            quiet.setLevel(quiet_level)

        print_table(rows, out, n)

        if args.cprofile:
            fresh, _ = factory.make(n)
            envs = [environ(t, b) for t, b in fresh]
            prof = cProfile.Profile()
            prof.enable()
            for e in envs:
                call_wsgi(app, e)
            prof.disable()
            for order in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(args.cprofile)
                print(f"\n-- cProfile of {n} whole wxcoupon WSGI calls, by {order} --", file=out)
                print("\n".join(buf.getvalue().splitlines()[4:]), file=out)
        app_engine.dispose()
        engine.dispose()
    finally:
        for db in dbs:
            db.close()
        log_file.close()
        shutil.rmtree(root, ignore_errors=True)


def print_table(rows: list[Row], out: Any, n: int) -> None:
    """Stage | CPU us | wall us."""
    print(f"\nper push: mean over {n} distinct pushes, fastest of the rounds (us = microseconds)", file=out)
    print(f"{'stage':<84} {'CPU us':>8} {'wall us':>8}", file=out)
    print("-" * 102, file=out)
    for name, cpu, wall in rows:
        if not name:
            print("", file=out)
            continue
        if cpu != cpu or (cpu == 0.0 and wall == 0.0):  # NaN (skipped) or a heading
            print(name, file=out)
            continue
        print(f"{name:<84} {cpu:>8.1f} {wall:>8.1f}", file=out)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc(file=sys.stdout)  # stderr is the app's log file by then
        raise SystemExit(1)
