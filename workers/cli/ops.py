"""`wxcoupon events show`: one event's whole story; `wxcoupon workers`: who is alive."""
from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

import click

from webhook.store import ROW_ID_MAX, get_event, list_attempts, make_engine

from .common import settings_or_exit

SHOW_COLUMNS = (
    "id", "status", "attempts", "event", "msg_type", "to_user", "openid", "unionid", "card_id", "code",
    "old_code", "outer_str", "create_time", "mode", "job_id", "last_error", "received_at", "updated_at",
)  # fmt: skip


def _iso(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # SQLite returns naive values; they are UTC
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.isoformat()
    return value


def event_story(event: dict[str, Any], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """An event as plain JSON data: its columns, parsed fields, raw XML and attempts."""
    data = {k: _iso(event.get(k)) for k in SHOW_COLUMNS}
    data["fields"] = event.get("fields") or {}
    data["raw_xml"] = event.get("raw_xml")
    data["attempt_log"] = [
        {k: _iso(a.get(k)) for k in ("attempt", "started_at", "finished_at", "outcome", "worker", "job_id", "error")}
        for a in attempts
    ]
    return data


@click.command("show")
@click.argument("event_id", type=click.IntRange(min=1, max=ROW_ID_MAX))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def show(event_id: int, as_json: bool) -> None:
    """Show one event: raw XML, parsed fields, and every attempt with its time, worker and error."""
    engine = make_engine(settings_or_exit())
    try:
        with engine.connect() as conn:
            event = get_event(conn, event_id)
            if event is None:
                raise click.ClickException(f"no event {event_id}")
            story = event_story(event, list_attempts(conn, event_id))
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(story, ensure_ascii=False, indent=2))
        return
    click.echo(f"event {story['id']}: {story['event'] or story['msg_type']}  status={story['status']}  "
               f"attempts={story['attempts']}")
    for key in SHOW_COLUMNS[3:]:
        if story[key] not in (None, ""):
            click.echo(f"  {key:<12} {story[key]}")
    click.echo("fields:")
    for key, value in story["fields"].items():
        click.echo(f"  {key:<24} {json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value}")
    click.echo("raw xml:")
    for line in (story["raw_xml"] or "").splitlines():
        click.echo(f"  {line}")
    click.echo(f"attempts ({len(story['attempt_log'])}):")
    for a in story["attempt_log"]:
        click.echo(f"  #{a['attempt']} {a['started_at']} -> {a['finished_at']}  {a['outcome']:<10} "
                   f"worker={a['worker'] or '-'} job={a['job_id'] or '-'}" + (f"  error: {a['error']}" if a["error"] else ""))
    if not story["attempt_log"]:
        click.echo("  (none yet)")


@click.command("workers")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per worker.")
def workers(as_json: bool) -> None:
    """List the workers whose heartbeat is live (host, pid, since)."""
    from ..context import build_context
    from ..reaper import live_workers

    ctx = build_context(settings_or_exit())
    found = live_workers(ctx)
    for name, info in sorted(found.items()):
        if as_json:
            click.echo(json.dumps({"name": name, **info}))
        else:
            click.echo(f"{name:<40} host={info.get('host', '?')} pid={info.get('pid', '?')} since={info.get('since', '?')}")
    if not as_json:
        click.echo(f"{len(found)} live worker(s)", err=True)


@click.command("heartbeat-listener")
@click.option("--group", default="worker", show_default=True, help="The supervisord program of the workers.")
def heartbeat_listener(group: str) -> None:
    """supervisord event listener: SIGKILL a RUNNING worker whose heartbeat stopped (it is hung).

    Runs under [eventlistener:...] with events=TICK_5; supervisord then
    restarts the worker, and the reaper returns the rows it held.
    """
    import logging
    import socket
    import sys

    from supervisor import childutils

    from webhook.logs import configure_logging

    from ..context import build_context
    from ..reaper import live_workers

    settings = settings_or_exit()
    configure_logging(settings.log_format)  # to stderr: stdout is supervisord's protocol channel
    log = logging.getLogger("wxcoupon.heartbeat")
    ctx = build_context(settings)
    host = socket.gethostname()
    grace = 3 * settings.heartbeat_ttl  # a worker just started has not beaten yet
    while True:
        headers, _payload = childutils.listener.wait(sys.stdin, sys.stdout)
        try:
            rpc = childutils.getRPCInterface(os.environ)
            beating = {int(info["pid"]) for info in live_workers(ctx).values()
                       if info.get("host") == host and "pid" in info}
            for proc in rpc.supervisor.getAllProcessInfo():
                if proc["group"] != group or proc["statename"] != "RUNNING":
                    continue
                if proc["now"] - proc["start"] < grace or int(proc["pid"]) in beating:
                    continue
                name = f"{proc['group']}:{proc['name']}"
                log.error("worker heartbeat stopped; killing it for a restart", extra={"program": name, "pid": proc["pid"]})
                rpc.supervisor.signalProcess(name, "KILL")
        except Exception:  # e.g. Redis down: no heartbeat can be read, so nobody is killed
            log.exception("heartbeat check skipped")
        childutils.listener.ok(sys.stdout)
