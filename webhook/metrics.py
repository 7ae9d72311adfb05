"""Prometheus metrics, correct across gunicorn's and RQ's processes.

With PROMETHEUS_MULTIPROC_DIR set (`wxcoupon serve` and `wxcoupon worker` set
it), every process writes its values to files in that folder and `/metrics`
adds them up, so a counter does not depend on which gunicorn worker answers the
scrape. The folder is per host: web and workers of one host share it.

prometheus_client picks its storage when it is first imported, so it is
imported here lazily, on the first observation, never at import time. The
`observe_*`/`count_*` hooks never raise: a metrics problem must not fail a push
or a job.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from webhook.weixin_reply import (
    ERRCODE_BAD_RESPONSE,
    ERRCODE_HTTP,
    ERRCODE_LOCK,
    ERRCODE_NETWORK,
    ERRCODE_TIMEOUT,
    KNOWN_ERRCODES,
)

log = logging.getLogger("wxcoupon.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Weixin waits 5 s for the answer; the interesting part is well below that.
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
API_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
# Rows per intake transaction: 1 with sync workers, more when requests overlap (group commit).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Label values come from authenticated pushes and our own code, but are still
# bounded: anything unexpected is counted as "other".
_LABEL_RE = re.compile(r"^[A-Za-z0-9_./:-]{1,64}$")
_PID_FILE_RE = re.compile(r"_(\d+)\.db$")
# The wxcoupon_weixin_api_* labels come from Weixin's replies and the client's code, so they are
# bounded by what the project knows rather than by their shape: every distinct value is a time
# series in every process (and a file's worth in the multiprocess folder). An API path the client
# does not call, or an errcode the project does not know, is counted as "other"; the client's log
# line of the call (`weixin <path> errcode=N`) has the value itself.
WEIXIN_API_PATHS = frozenset({
    "cgi-bin/token",
    "cgi-bin/stable_token",
    "cgi-bin/ticket/getticket",
    "card/code/decrypt",
    "card/code/get",
    "card/membercard/activatetempinfo/get",
    "card/membercard/activate",
    "card/membercard/activate/geturl",
    "card/membercard/activateuserform/set",
    "card/create",
    "card/update",
})
# A call that got no errcode back, by the client's own errcode for it.
_NO_ERRCODE_LABELS = {
    ERRCODE_NETWORK: "network",
    ERRCODE_TIMEOUT: "timeout",
    ERRCODE_HTTP: "http",
    ERRCODE_BAD_RESPONSE: "bad_response",
    ERRCODE_LOCK: "lock",
}
_ERRCODE_LABELS = frozenset({*(str(code) for code in KNOWN_ERRCODES), *_NO_ERRCODE_LABELS.values()})

F = TypeVar("F", bound=Callable[..., None])


def _label(value: object) -> str:
    text = "" if value is None else str(value)
    return text if _LABEL_RE.match(text) else "other"


def _api_label(path: str) -> str:
    """A Weixin API path as the client writes it (no query, no leading slash), or "other"."""
    api = path.split("?", 1)[0].strip("/")
    return api if api in WEIXIN_API_PATHS else "other"


def _errcode_label(errcode: int | str | None) -> str:
    """A known errcode, what a call without one failed on (`network`, `http`, ...), or "other"."""
    if errcode is None:
        return "network"
    if isinstance(errcode, int) and errcode in _NO_ERRCODE_LABELS:
        return _NO_ERRCODE_LABELS[errcode]
    text = str(errcode)
    return text if text in _ERRCODE_LABELS else "other"


class Metrics:
    """The project's metric objects (one set per process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, values

        if os.environ.get(MULTIPROC_ENV) and not getattr(values.ValueClass, "_multiprocess", False):
            # Something imported prometheus_client before the folder was set;
            # choose the multi-process storage now, before any metric exists.
            values.ValueClass = values.get_value_class()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pushes = Counter("wxcoupon_pushes", "Pushes answered success, by event type and outcome "
                              "(stored, duplicate).", ["event", "outcome"], registry=r)
        self.rejections = Counter("wxcoupon_push_rejections", "Pushes refused, by reason.", ["reason"], registry=r)
        self.ack_seconds = Histogram("wxcoupon_push_ack_seconds", "Time from request to `success` (after the "
                                     "commit).", buckets=ACK_BUCKETS, registry=r)
        self.intake_batch = Histogram("wxcoupon_intake_batch_rows", "Push rows committed per intake transaction "
                                      "(group commit).", buckets=BATCH_BUCKETS, registry=r)
        self.job_seconds = Histogram("wxcoupon_job_duration_seconds", "RQ job run time, by job and outcome.",
                                     ["job", "outcome"], buckets=JOB_BUCKETS, registry=r)
        self.weixin_calls = Counter("wxcoupon_weixin_api_calls", "Weixin API calls, by API path and errcode "
                                    "(\"0\" ok, \"http\"/\"network\"/... when no errcode came back, "
                                    "\"other\" for a path or errcode the project does not know).",
                                    ["api", "errcode"], registry=r)
        self.weixin_seconds = Histogram("wxcoupon_weixin_api_seconds", "Weixin API call time, by API path.",
                                        ["api"], buckets=API_BUCKETS, registry=r)
        self.reconcile = Counter("wxcoupon_reconcile_outcomes", "Reconciliation outcomes.", ["outcome"], registry=r)
        self.token_refreshes = Counter("wxcoupon_token_refreshes", "access_token refreshes, by result.",
                                       ["result"], registry=r)
        self.replayed = Counter("wxcoupon_replayed_events", "Events put back through the workers by a replay.",
                                registry=r)
        self.reaped = Counter("wxcoupon_reaped_rows",
                              "Rows taken back from a dead worker or job: to the outbox, or dead after repeated losses.",
                              ["table"], registry=r)


@functools.lru_cache(maxsize=1)
def metrics() -> Metrics:
    """This process's metrics, created on first use."""
    return Metrics()


def _never_raise(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # telemetry must not fail the work it measures
            log.warning("metric not recorded", extra={"metric": fn.__name__, "error": type(exc).__name__})

    return wrapper  # type: ignore[return-value]


@_never_raise
def count_push(event: str | None, outcome: str) -> None:
    """A push answered success: outcome `stored` or `duplicate`."""
    metrics().pushes.labels(event=_label(event), outcome=_label(outcome)).inc()


@_never_raise
def count_rejection(reason: str) -> None:
    """A push refused (the error's short reason)."""
    metrics().rejections.labels(reason=_label(reason.replace(" ", "_"))).inc()


@_never_raise
def observe_ack(seconds: float) -> None:
    """How long a push took from request to `success`."""
    metrics().ack_seconds.observe(seconds)


@_never_raise
def observe_intake_batch(rows: int) -> None:
    """How many push rows one intake transaction committed."""
    metrics().intake_batch.observe(rows)


@_never_raise
def observe_job(job: str, outcome: str, seconds: float) -> None:
    """One RQ job run: its function name, `finished` or `failed`, and its duration."""
    metrics().job_seconds.labels(job=_label(job), outcome=_label(outcome)).observe(seconds)


@_never_raise
def observe_weixin_call(path: str, errcode: int | str | None, seconds: float | None = None) -> None:
    """One Weixin API call: its path, the errcode it returned (None: no answer), and its time.

    Both labels are bounded: an unknown path or errcode is counted as "other".
    """
    api = _api_label(path)
    metrics().weixin_calls.labels(api=api, errcode=_errcode_label(errcode)).inc()
    if seconds is not None:
        metrics().weixin_seconds.labels(api=api).observe(seconds)


@_never_raise
def count_reconcile(outcome: str, n: int = 1) -> None:
    """Reconciliation outcomes (matched, recovered, unmatched, ...)."""
    if n:
        metrics().reconcile.labels(outcome=_label(outcome)).inc(n)


@_never_raise
def count_token_refresh(result: str = "ok") -> None:
    """An access_token refresh (`ok` or `error`)."""
    metrics().token_refreshes.labels(result=_label(result)).inc()


@_never_raise
def count_replayed(n: int) -> None:
    """Events a replay queued."""
    if n:
        metrics().replayed.inc(n)


@_never_raise
def count_reaped(table: str, n: int) -> None:
    """Rows the reaper returned to the outbox."""
    if n:
        metrics().reaped.labels(table=_label(table)).inc(n)


def multiproc_dir() -> Path | None:
    """The shared metrics folder of this host, when multi-process mode is on."""
    value = os.environ.get(MULTIPROC_ENV, "").strip()
    return Path(value) if value else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_multiproc_dir(path: Path) -> None:
    """Make the folder ready before any process writes to it.

    If no process that wrote there is alive (a fresh start of the host's
    services), it is emptied, as prometheus_client requires between runs.
    Otherwise the files of live processes are kept, and dead processes' live
    gauges are dropped (their counters stay: a total must not go backwards).
    """
    path.mkdir(parents=True, exist_ok=True)
    pids = {int(m.group(1)) for f in path.glob("*.db") if (m := _PID_FILE_RE.search(f.name))}
    alive = {pid for pid in pids if _pid_alive(pid)}
    if not alive:
        for item in path.iterdir():
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
        return
    for pid in pids - alive:
        mark_process_dead(pid, path)


def mark_process_dead(pid: int, path: Path | None = None) -> None:
    """Drop a finished process's live gauges (gunicorn's child_exit, worker exit)."""
    folder = path or multiproc_dir()
    if folder is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(folder))


def render(extra: Iterable[Callable[[], Iterable[Any]]] = ()) -> tuple[bytes, str]:
    """The exposition text of every process's metrics plus `extra` collect functions."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry(auto_describe=False)
    folder = multiproc_dir()
    if folder is not None:
        metrics()  # this process's files exist even before its first observation
        multiprocess.MultiProcessCollector(registry, path=str(folder))
    else:
        registry.register(_Collect(metrics().registry.collect))
    for collect in extra:
        registry.register(_Collect(collect))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collect:
    """Adapt a collect function to the registry's collector protocol."""

    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Any]:
        """Yield the metric families."""
        return self._collect()
