"""Probes, Prometheus metrics across processes, and structured, redacted logs."""
from __future__ import annotations

import ast
import io
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from rq import Queue, SimpleWorker

from webhook import create_app, logs, metrics
from webhook.config import Settings
from workers import handlers
from workers.context import EVENTS_QUEUE, WorkerContext
from workers.dispatch import dispatch_all

from . import procs
from .pushes import make_push


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base, _, raw_labels = metric.partition("{")
        got = ",".join(sorted(raw_labels.rstrip("}").split(","))) if raw_labels else ""
        if base == name and got == want:
            return float(value)
    return 0.0


def test_healthz_and_readyz_when_everything_answers(client: Any) -> None:
    """/healthz says ok; /readyz checks the database and Redis and says ready."""
    assert client.get("/healthz").status_code == 200
    resp = client.get("/readyz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}


def test_readyz_is_503_naming_redis_when_it_is_down(settings: Settings) -> None:
    """With Redis unreachable /readyz answers 503 and names it; /healthz still says ok."""
    down = settings.with_overrides(redis_url=f"redis://127.0.0.1:{procs.free_port()}/0")
    app = create_app(down, {"TESTING": True})
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503
    checks = resp.get_json()["checks"]
    assert checks["database"] == "ok" and checks["redis"].startswith("error: ConnectionError")
    assert app.test_client().get("/healthz").status_code == 200


def test_readyz_is_503_naming_the_database_when_it_is_down(settings: Settings, tmp_path: Path) -> None:
    """A database that cannot be opened makes /readyz 503 with the database named."""
    broken = settings.with_overrides(database_url=f"sqlite:///{tmp_path}/missing/dir/db.sqlite3")
    resp = create_app(broken, {"TESTING": True}).test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["database"].startswith("error: OperationalError")


def test_readyz_is_503_until_the_schema_is_migrated(settings: Settings, tmp_path: Path) -> None:
    """A reachable database without `wxcoupon db upgrade` is not ready: pushes would all get 503."""
    fresh = settings.with_overrides(database_url=f"sqlite:///{tmp_path}/fresh.sqlite3")
    resp = create_app(fresh, {"TESTING": True}).test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["database"] == "error: SchemaMissingError"


def test_metrics_count_pushes_rejections_and_ack_latency(client: Any, settings: Settings) -> None:
    """Stored and duplicate pushes by event, rejections by reason, and the ack histogram move by what happened."""
    before = client.get("/metrics").get_data(as_text=True)
    query, body = make_push(settings, "user_del_card", UserCardCode="410000000001")
    for _ in range(2):  # the second is Weixin's retry: a duplicate
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    bad = dict(query, msg_signature="0" * 40)
    assert client.post("/wechat", query_string=bad, data=body).status_code == 403
    after = client.get("/metrics").get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("wxcoupon_pushes_total", event="user_del_card", outcome="stored") == 1
    assert delta("wxcoupon_pushes_total", event="user_del_card", outcome="duplicate") == 1
    assert delta("wxcoupon_push_rejections_total", reason="invalid_signature") == 1
    assert delta("wxcoupon_push_ack_seconds_count") == 2
    assert delta("wxcoupon_push_ack_seconds_bucket", le="5.0") == 2
    assert sample(after, "wxcoupon_events_unfinished", status="pending") == 1
    assert "wxcoupon_queue_depth" in after


def test_weixin_reconcile_and_token_hooks_never_raise(client: Any) -> None:
    """The hooks other modules call record labelled samples, and bad input is counted as `other`."""
    before = client.get("/metrics").get_data(as_text=True)
    metrics.observe_weixin_call("/card/code/get?access_token=SECRET", 40056, 0.12)
    metrics.observe_weixin_call("/cgi-bin/token", None)
    metrics.count_reconcile("matched", 3)
    metrics.count_token_refresh()
    metrics.count_push("evil\nlabel{}", "stored")
    metrics.observe_ack("not a number")  # type: ignore[arg-type]
    after = client.get("/metrics").get_data(as_text=True)
    assert "SECRET" not in after
    assert sample(after, "wxcoupon_weixin_api_calls_total", api="card/code/get", errcode="40056") - sample(
        before, "wxcoupon_weixin_api_calls_total", api="card/code/get", errcode="40056") == 1
    assert sample(after, "wxcoupon_weixin_api_calls_total", api="cgi-bin/token", errcode="network") >= 1
    assert sample(after, "wxcoupon_reconcile_outcomes_total", outcome="matched") - sample(
        before, "wxcoupon_reconcile_outcomes_total", outcome="matched") == 3
    assert sample(after, "wxcoupon_token_refreshes_total", result="ok") >= 1
    assert sample(after, "wxcoupon_pushes_total", event="other", outcome="stored") >= 1


def _weixin_call_series() -> dict[tuple[str, str], float]:
    """This process's wxcoupon_weixin_api_calls_total samples: (api, errcode) -> count."""
    return {
        (s.labels["api"], s.labels["errcode"]): s.value
        for family in metrics.metrics().registry.collect()
        if family.name == "wxcoupon_weixin_api_calls"
        for s in family.samples
        if s.name.endswith("_total")
    }


def test_unknown_weixin_errcodes_and_paths_share_one_other_series() -> None:
    """An upstream answering a different errcode each time, or a path the client never calls, adds one series
    ("other"), not one per value; a known errcode and the client's own no-errcode labels keep theirs. It used
    to be one series per distinct int32 (and per path), for ever, in every process."""
    from webhook.weixin_reply import KNOWN_ERRCODES

    rng = random.Random(20240611)
    unknown = {rng.randint(-(2**31), 2**31 - 1) for _ in range(300)} - KNOWN_ERRCODES
    before = _weixin_call_series()
    for errcode in unknown:
        metrics.observe_weixin_call("card/code/get", errcode, 0.01)
    for i in range(50):
        metrics.observe_weixin_call(f"card/code/get/{i}", 0)  # not a path of the client's
    for label in ("40056", "timeout", "bad_response"):  # as the client passes them
        metrics.observe_weixin_call("card/code/get", label)
    metrics.observe_weixin_call("card/code/get", 40056)
    after = _weixin_call_series()

    def delta(api: str, errcode: str) -> float:
        return after.get((api, errcode), 0.0) - before.get((api, errcode), 0.0)

    added = set(after) - set(before)
    assert added <= {("card/code/get", "other"), ("other", "0"), ("card/code/get", "40056"),
                     ("card/code/get", "timeout"), ("card/code/get", "bad_response")}  # fmt: skip
    assert delta("card/code/get", "other") == len(unknown)
    assert delta("other", "0") == 50
    assert delta("card/code/get", "40056") == 2
    assert delta("card/code/get", "timeout") == delta("card/code/get", "bad_response") == 1
    for errcode in sorted(KNOWN_ERRCODES):
        metrics.observe_weixin_call("card/update", errcode)
    assert {("card/update", str(code)) for code in KNOWN_ERRCODES} <= set(_weixin_call_series())


def test_every_path_and_no_errcode_label_of_the_client_is_a_label_of_its_own() -> None:
    """The bound must not hide the client's own calls: each API path written in webhook/weixin_api.py, each
    errcode the fake Weixin answers, and each label the client gives a call that got no errcode back, is
    counted under its own name."""
    from webhook import weixin_api, weixin_reply

    source = Path(weixin_api.__file__).read_text(encoding="utf-8")
    paths = {node.value for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and re.fullmatch(r"(cgi-bin|card)/[a-z_/]+", node.value)}  # fmt: skip
    assert len(paths) >= 10  # the check found the client's paths, or it proves nothing
    assert paths <= metrics.WEIXIN_API_PATHS
    from workers.fake_weixin.state import ERRMSGS

    assert set(ERRMSGS) <= weixin_reply.KNOWN_ERRCODES  # every errcode the fake Weixin answers
    own = {weixin_reply.ERRCODE_NETWORK: "network", weixin_reply.ERRCODE_TIMEOUT: "timeout",
           weixin_reply.ERRCODE_HTTP: "http", weixin_reply.ERRCODE_BAD_RESPONSE: "bad_response",
           weixin_reply.ERRCODE_LOCK: "lock"}  # fmt: skip
    for errcode, label in own.items():
        before = _weixin_call_series().get(("card/code/decrypt", label), 0.0)
        metrics.observe_weixin_call("card/code/decrypt", errcode)  # what the client passes
        metrics.observe_weixin_call("card/code/decrypt", label)
        assert _weixin_call_series()[("card/code/decrypt", label)] == before + 2


def test_prepare_multiproc_dir_empties_a_dead_run_and_keeps_live_processes(tmp_path: Path) -> None:
    """Between runs the folder is emptied; with a live process in it, only dead processes' live gauges go."""
    folder = tmp_path / "prom"
    folder.mkdir()
    dead_pid = 2**22 + 12345  # above any pid_max default: never a live process
    for name in (f"counter_{dead_pid}.db", f"gauge_livesum_{dead_pid}.db"):
        (folder / name).write_bytes(b"")
    metrics.prepare_multiproc_dir(folder)
    assert list(folder.iterdir()) == []
    for name in (f"counter_{dead_pid}.db", f"gauge_livesum_{dead_pid}.db", f"counter_{os.getpid()}.db"):
        (folder / name).write_bytes(b"")
    metrics.prepare_multiproc_dir(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"counter_{dead_pid}.db", f"counter_{os.getpid()}.db"])


@pytest.fixture
def served(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    """`wxcoupon serve` with 4 gunicorn workers and its own multiprocess metrics folder."""
    prom = tmp_path / "prom"
    env = procs.settings_env(settings, PROMETHEUS_MULTIPROC_DIR=str(prom), WXCOUPON_LOG_FORMAT="json")
    port = procs.free_port()
    log = tmp_path / "serve.log"
    proc = procs.start(["serve", "--port", str(port), "--workers", "4"], env, log)
    base = f"http://127.0.0.1:{port}"
    procs.wait_http(f"{base}/healthz", proc, log)
    yield base, env, log
    procs.stop(proc)


@pytest.mark.slow
def test_counters_are_exact_across_gunicorn_workers_and_rq_workers(
    served: tuple[str, dict[str, str], Path], settings: Settings
) -> None:
    """Pushes spread over 4 gunicorn processes and a job run by a separate worker process add up exactly in
    every scrape, whichever process answers it."""
    base, env, log = served
    for i in range(24):  # a new connection each: gunicorn spreads them over its workers
        query, body = make_push(settings, "user_get_card", UserCardCode=f"{420000000000 + i}")
        resp = requests.post(f"{base}/wechat", params=query, data=body, timeout=5,
                             headers={"Connection": "close", "X-Request-Id": f"req-test-{i:04d}"})
        assert resp.text == "success" and resp.headers["X-Request-Id"] == f"req-test-{i:04d}"
    for _ in range(5):
        resp = requests.post(f"{base}/wechat", params={"timestamp": "1", "nonce": "n", "msg_signature": "x"},
                             data=b"<xml/>", timeout=5, headers={"Connection": "close"})
        assert resp.status_code == 403
    worker = procs.wxcoupon(["worker", "--burst"], env)
    assert worker.returncode == 0, worker.stderr
    scrapes = [requests.get(f"{base}/metrics", timeout=5, headers={"Connection": "close"}).text for _ in range(8)]
    for text in scrapes:
        assert sample(text, "wxcoupon_pushes_total", event="user_get_card", outcome="stored") == 24
        assert sample(text, "wxcoupon_push_rejections_total", reason="missing_signature") == 5
        assert sample(text, "wxcoupon_push_ack_seconds_count") == 24
        assert sample(text, "wxcoupon_job_duration_seconds_count", job="process_events", outcome="finished") == 1
        assert sample(text, "wxcoupon_events_unfinished", status="pending") == 0
    # JSON logs: one object per line, and exactly one line per push (its outcome is its access line): request
    # id, method, path (no query string), status and time on each.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    requests_logged = [entry for entry in lines if entry.get("path") == "/wechat"]
    assert len(requests_logged) == 29
    assert all({"request_id", "method", "status", "ms"} <= set(e) for e in requests_logged)
    stored = [entry for entry in requests_logged if entry.get("msg") == "push stored"]
    assert len(stored) == 24 and {e["request_id"] for e in stored} == {f"req-test-{i:04d}" for i in range(24)}
    assert all(e["status"] == 200 and e["event"] == "user_get_card" for e in stored)
    rejected = [entry for entry in requests_logged if entry.get("msg") == "push rejected"]
    assert len(rejected) == 5 and all(e["status"] == 403 for e in rejected)
    assert "msg_signature" not in log.read_text()


def test_json_log_lines_carry_context_and_hide_secrets() -> None:
    """Bound ids are stamped on each line; codes are cut to four digits, openids pseudonymized, tokens redacted."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("wxcoupon.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logs.bind(request_id="r-123", event_id=7):
            logger.warning(
                "calling https://api.weixin.qq.com/card/code/get?access_token=TOKENVALUE&x=1",
                extra={"code": "226009850808", "openid": "oZI8Fj040-be6rlDohc6gkoPOQTQ", "appsecret": "s3cr3t",
                       "raw_xml": "<xml>...</xml>"},
            )
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["request_id"] == "r-123" and first["event_id"] == 7 and first["level"] == "warning"
    assert first["code"] == "…0808" and first["openid"].startswith("~") and first["appsecret"] == "[redacted]"
    assert first["raw_xml"] == "[redacted]"
    assert "TOKENVALUE" not in stream.getvalue() and "226009850808" not in stream.getvalue()
    assert "oZI8Fj040" not in stream.getvalue() and "s3cr3t" not in stream.getvalue()
    assert "request_id" not in second


def test_an_unhandled_exception_is_logged_through_wxcoupons_handler(settings: Settings) -> None:
    """Flask's "Exception on /path" line and traceback go through wxcoupon's handler, not Flask's own
    stderr one: with the request id, and with secrets in the exception's text redacted."""
    from flask.logging import default_handler

    app = create_app(settings)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("calling https://api.weixin.qq.com/x?access_token=TOKENVALUE")

    assert default_handler not in app.logger.handlers
    # wxcoupon's own handler (the logger may also hold pytest's capture handlers)
    [handler] = [h for h in logging.getLogger("wxcoupon").handlers
                 if any(isinstance(f, logs.ContextFilter) for f in h.filters)]
    stream = io.StringIO()
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        resp = app.test_client().get("/boom", headers={"X-Request-Id": "req-boom-0001"})
    finally:
        handler.setStream(previous)  # type: ignore[attr-defined]
    assert resp.status_code == 500
    text = stream.getvalue()
    first = text.splitlines()[0]  # the fields on the line with the message, before the traceback
    assert "webhook: Exception on /boom [GET]" in first and "request_id=req-boom-0001" in first
    assert "RuntimeError" in text and "access_token=[redacted]" in text and "TOKENVALUE" not in text


def test_an_unhandled_exceptions_line_names_the_path_as_the_access_line_does(settings: Settings) -> None:
    """Flask's "Exception on <path>" named request.path as is: a Mini Program user's openid in clear, and a
    client's %0A starting a log line of its own. Both are now as in the access line; and no text line of any
    record holds a line break before its traceback."""
    app = create_app(settings)

    @app.get("/api/mp/users/<openid>/boom")
    @app.get("/boom/<tail>")
    def boom(openid: str = "", tail: str = "") -> str:
        raise RuntimeError("no")

    [handler] = [h for h in logging.getLogger("wxcoupon").handlers
                 if any(isinstance(f, logs.ContextFilter) for f in h.filters)]
    stream = io.StringIO()
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        user = app.test_client().get("/api/mp/users/oMPsecretUser01/boom")
        forged = app.test_client().get("/boom/x%0A2026 ERROR forged")
        logging.getLogger("wxcoupon.test").warning("a message\nERROR forged too\u2028")
    finally:
        handler.setStream(previous)  # type: ignore[attr-defined]
    assert user.status_code == forged.status_code == 500
    text = stream.getvalue()
    assert "oMPsecretUser01" not in text and "Exception on /api/mp/users/~" in text
    assert "Exception on /boom/x%0A2026 ERROR forged [GET]" in text
    assert not any(line.startswith("2026 ERROR forged") or line.startswith("ERROR forged") for line in text.splitlines())
    assert "a message\\nERROR forged too\\u2028" in text


def test_worker_log_lines_carry_the_rq_job_id(
    client: Any, settings: Settings, worker_ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line logged inside a job (here the batch's warning about a failed event) carries that job's id."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("wxcoupon")
    logger.addHandler(handler)

    def refuse(ctx: WorkerContext, row: dict[str, Any]) -> None:
        raise ValueError("no")

    monkeypatch.setitem(handlers.HANDLERS, "user_get_card", handlers.Handler(fetch=refuse))
    query, body = make_push(settings, "user_get_card", UserCardCode="430000000001")
    assert client.post("/wechat", query_string=query, data=body).status_code == 200
    try:
        dispatch_all(worker_ctx)
        [job] = Queue(worker_ctx.queue_name(EVENTS_QUEUE), connection=worker_ctx.redis).get_jobs()
        SimpleWorker([Queue(worker_ctx.queue_name(EVENTS_QUEUE), connection=worker_ctx.redis)],
                     connection=worker_ctx.redis).work(burst=True)
    finally:
        logger.removeHandler(handler)
    failed_lines = [line for line in stream.getvalue().splitlines() if "failed" in line and "job_id=" in line]
    assert failed_lines and all(f"job_id={job.id}" in line for line in failed_lines)
