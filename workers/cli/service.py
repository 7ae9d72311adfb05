"""`wxcoupon serve`, `worker` and `sweep`: the processes of a deployment."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import redis

from webhook.config import Settings
from webhook.metrics import MULTIPROC_ENV

from ..context import build_context
from ..dispatch import dispatch_all, reap_orphans
from ..reaper import reap_stuck
from ..runner import run_worker
from .common import settings_or_exit

# Two processes per core is gunicorn's advice; WEB_CONCURRENCY overrides it as
# on most platforms.
DEFAULT_WEB_WORKERS = 2
# Threads per process; 1 means gunicorn's sync worker, more its gthread worker.
# With threads, pushes in flight together in one process share a transaction
# and its fsync (webhook.intake.EventWriter), but the handler is CPU-bound and
# threads contend for the GIL: measured on 2 CPUs (bench/intake.py), 4 threads
# cost ~1.5x the CPU per push of sync workers and took in fewer pushes. gevent
# (below) gets the group commit without that cost.
DEFAULT_WEB_THREADS = 1
# gunicorn worker class: sync (with threads: gthread) or gevent. gevent serves
# many pushes at once per process without threads contending for the GIL, and
# they share transactions and fsyncs: on 2 CPUs it took in ~1.8x the pushes of
# sync workers, with a p99 ~1.5-2x as long (bench/README.md), so sync stays the
# default. Optional: pip install 'wxcoupon[gevent]'.
WORKER_CLASSES = ("sync", "gevent")
DEFAULT_WEB_WORKER_CLASS = "sync"
# Connections one gevent worker serves at once (gunicorn's worker_connections).
GEVENT_CONNECTIONS = 256
# Weixin gives up after 5 s; a request still running at 10 s is stuck.
WEB_TIMEOUT = 10


def metrics_dir(settings: Settings) -> Path:
    """This host's shared Prometheus folder: PROMETHEUS_MULTIPROC_DIR, else one in the instance folder.

    Set in the environment before prometheus_client is first imported, so
    every process of the host (gunicorn's and RQ's) writes its values there.
    """
    value = os.environ.get(MULTIPROC_ENV, "").strip()
    path = Path(value) if value else (settings.instance_path / "prometheus").resolve()
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def _child_exit(_server: Any, worker: Any) -> None:
    """gunicorn hook: a web worker exited; drop its live gauges."""
    from webhook.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def web_threads() -> int:
    """Threads per web process: WXCOUPON_WEB_THREADS, else DEFAULT_WEB_THREADS."""
    raw = os.environ.get("WXCOUPON_WEB_THREADS", "").strip()
    if not raw:
        return DEFAULT_WEB_THREADS
    if not raw.isdigit() or int(raw) < 1:
        raise click.ClickException(f"WXCOUPON_WEB_THREADS must be a whole number of at least 1 (got {raw!r})")
    return int(raw)


def web_worker_class() -> str:
    """The web worker class: WXCOUPON_WEB_WORKER_CLASS, else DEFAULT_WEB_WORKER_CLASS."""
    raw = os.environ.get("WXCOUPON_WEB_WORKER_CLASS", "").strip().lower() or DEFAULT_WEB_WORKER_CLASS
    if raw not in WORKER_CLASSES:
        raise click.ClickException(f"WXCOUPON_WEB_WORKER_CLASS must be one of {', '.join(WORKER_CLASSES)} (got {raw!r})")
    return raw


def gunicorn_worker_class(worker_class: str, threads: int) -> str:
    """gunicorn's worker class for `serve`'s choice: sync, gthread (sync with threads) or gevent."""
    if worker_class == "gevent":
        if threads > 1:
            raise click.ClickException("gevent workers take no threads: leave --threads / WXCOUPON_WEB_THREADS at 1")
        try:
            import gevent  # noqa: F401
        except ImportError:
            raise click.ClickException("gevent workers need gevent: pip install 'wxcoupon[gevent]'") from None
        return "gevent"
    return "gthread" if threads > 1 else "sync"


def gunicorn_options(
    host: str, port: int, workers: int, access_log: bool, threads: int = DEFAULT_WEB_THREADS,
    worker_class: str = DEFAULT_WEB_WORKER_CLASS,
) -> dict[str, Any]:
    """The gunicorn settings `serve` applies before an optional config file."""
    options: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": gunicorn_worker_class(worker_class, threads),
        "threads": threads,
        "worker_connections": GEVENT_CONNECTIONS,
        "timeout": WEB_TIMEOUT,
        "graceful_timeout": 20,
        "keepalive": 5,
        "errorlog": "-",
        "loglevel": "info",
        # gunicorn 25+ opens a control socket at a fixed per-user path; two
        # instances on one host would fight over it, and nothing here uses it.
        "control_socket_disable": True,
        "child_exit": _child_exit,
    }
    if access_log:
        options["accesslog"] = "-"
    return options


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", type=int, default=None, help="gunicorn workers [default: WEB_CONCURRENCY or 2]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="threads per worker; more than 1: gthread workers [default: WXCOUPON_WEB_THREADS or 1]")
@click.option("--worker-class", type=click.Choice(WORKER_CLASSES), default=None,
              help="sync (gthread with --threads) or gevent [default: WXCOUPON_WEB_WORKER_CLASS or sync]")
@click.option("--gunicorn-config", type=click.Path(exists=True, dir_okay=False), help="A gunicorn config file.")
@click.option("--access-log/--no-access-log", default=False, show_default=True)
@click.pass_context
def serve(
    click_ctx: click.Context, host: str, port: int, workers: int | None, threads: int | None,
    worker_class: str | None, gunicorn_config: str | None, access_log: bool,
) -> None:
    """Serve the webhook under gunicorn."""
    from gunicorn.app.base import Application

    settings = settings_or_exit()  # fail here, once, with the variable's name
    from webhook.metrics import prepare_multiproc_dir

    prepare_multiproc_dir(metrics_dir(settings))
    if workers is None:
        workers = int(os.environ.get("WEB_CONCURRENCY", DEFAULT_WEB_WORKERS))
    if threads is None:
        threads = web_threads()
    if worker_class is None:
        worker_class = web_worker_class()
    defaults = gunicorn_options(host, port, workers, access_log, threads, worker_class)
    # Precedence: built-in defaults, then the config file, then flags typed on
    # the command line.
    explicit = {
        name
        for name in ("host", "port", "workers", "threads", "worker_class")
        if click_ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }
    overrides: dict[str, Any] = {}
    if explicit & {"host", "port"}:
        overrides["bind"] = defaults["bind"]
    if "workers" in explicit:
        overrides["workers"] = workers
    if "threads" in explicit:
        overrides["threads"] = threads
    if explicit & {"threads", "worker_class"}:
        overrides["worker_class"] = defaults["worker_class"]

    class WebApplication(Application):  # Application: it can read a config file
        def load_config(self) -> None:
            for key, value in defaults.items():
                if key in self.cfg.settings:  # settings differ across gunicorn versions
                    self.cfg.set(key, value)
            if gunicorn_config:
                self.load_config_from_file(gunicorn_config)
            for key, value in overrides.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from webhook import create_app

            return create_app()

    WebApplication().run()


@click.command("worker")
@click.option("--burst", is_flag=True, help="Drain the outbox and the queues, then exit.")
@click.option("--no-dispatcher", is_flag=True, help="Do not run the outbox dispatcher in this worker.")
@click.option("--name", default=None, help="Worker name prefix; the process id is appended [default: RQ's].")
def worker(burst: bool, no_dispatcher: bool, name: str | None) -> None:
    """Run an RQ worker for wxcoupon's queues (and the outbox dispatcher)."""
    from webhook.logs import configure_logging

    settings = settings_or_exit()
    configure_logging(settings.log_format)
    metrics_dir(settings).mkdir(parents=True, exist_ok=True)
    if name:
        # RQ refuses a name still registered to a worker that was killed (for
        # minutes); a restarted process must not inherit the dead one's name.
        name = f"{name}.{os.getpid()}"
    ctx = build_context(settings)
    try:
        ok = run_worker(ctx, burst=burst, dispatcher=not no_dispatcher, name=name)
    except redis.RedisError as exc:
        raise click.ClickException(f"redis unreachable: {type(exc).__name__}: {exc}") from None
    if not ok and burst:
        raise SystemExit(1)


@click.command("sweep")
def sweep() -> None:
    """Enqueue every pending event now, and requeue work of dead workers (workers do both on their own)."""
    settings = settings_or_exit()
    ctx = build_context(settings)
    try:
        released = reap_orphans(ctx)
        stuck = reap_stuck(ctx)
        queued = dispatch_all(ctx)
    except redis.RedisError as exc:
        raise click.ClickException(f"redis unreachable, events stay pending: {type(exc).__name__}") from None
    click.echo(f"queued {queued} pending event(s); released {released} orphaned; "
               f"took back {stuck} from dead workers or jobs")
