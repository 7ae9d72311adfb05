"""Probes and metrics: /healthz (alive), /readyz (database and Redis), /metrics.

The push endpoint never touches Redis; these do, through a client the app
creates on first use, with short timeouts so a probe answers within seconds.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from . import db, metrics
from .redisconn import connect_redis

log = logging.getLogger("wxcoupon.health")
bp = Blueprint("ops", __name__)
REDIS_EXTENSION = "wxcoupon.redis"


def get_redis() -> redis.Redis:
    """The app's Redis client (created on first use, never at import or start)."""
    client: redis.Redis | None = current_app.extensions.get(REDIS_EXTENSION)
    if client is None:
        client = connect_redis(db.get_settings())
        current_app.extensions[REDIS_EXTENSION] = client
    return client


def _check(probe: Any) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:  # the probe reports the failure instead of raising it
        return f"error: {type(exc).__name__}"


class SchemaMissingError(Exception):
    """The database answers but `wxcoupon db upgrade` has not run on it yet."""


def _ping_database() -> None:
    # Not only reachable: migrated. Until then every push would get a 503, so
    # the load balancer should not send any (the release runs in one
    # transaction, so a version row means the whole schema is there).
    with db.get_engine().connect() as conn:
        try:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError:
            version = None
            conn.rollback()
            conn.execute(text("SELECT 1"))  # reachable: the table is what is missing
    if not version:
        raise SchemaMissingError()


def _ping_redis() -> None:
    get_redis().ping()


@bp.get("/healthz")
def healthz() -> Response:
    """The process is alive and serving (no dependency is checked)."""
    return Response("ok\n", mimetype="text/plain")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when the database and Redis both answer, 503 naming what does not."""
    checks = {"database": _check(_ping_database), "redis": _check(_ping_redis)}
    ready = all(v == "ok" for v in checks.values())
    if not ready:
        log.warning("not ready", extra=checks)
    return jsonify(status="ready" if ready else "unavailable", checks=checks), 200 if ready else 503


def _backlog() -> Iterator[Any]:
    """Scrape-time gauges: RQ queue lengths and unfinished events by status."""
    from prometheus_client.core import GaugeMetricFamily

    from .admin.queries import backlog

    settings = db.get_settings()
    try:
        from rq import Queue

        depth = GaugeMetricFamily("wxcoupon_queue_depth", "Jobs waiting in each RQ queue.", labels=["queue"])
        for queue in Queue.all(connection=get_redis()):
            if queue.name.startswith(f"{settings.queue_prefix}-"):
                depth.add_metric([queue.name], queue.count)
        yield depth
    except redis.RedisError as exc:
        log.warning("queue depth unavailable", extra={"error": type(exc).__name__})
    try:
        with db.get_engine().connect() as conn:
            counts = backlog(conn)
        gauge = GaugeMetricFamily("wxcoupon_events_unfinished", "Events not yet processed, by status.",
                                  labels=["status"])
        for status, n in sorted(counts.items()):
            gauge.add_metric([status], n)
        yield gauge
    except Exception as exc:  # a scrape still returns the counters
        log.warning("event backlog unavailable", extra={"error": type(exc).__name__})


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """Prometheus exposition of every process of this host, plus queue and backlog gauges."""
    body, content_type = metrics.render(extra=[_backlog])
    return Response(body, content_type=content_type)


def init_app(app: Flask) -> None:
    """Register the probes and the metrics endpoint."""
    app.register_blueprint(bp)
