"""`wxcoupon dev` on a fresh folder: no settings, no services, everything works, Ctrl-C stops it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from . import procs

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("WECHAT_", "WXCOUPON_", "REDIS_URL", "DATABASE_URL", "TEST_"))}


def test_dev_runs_web_worker_and_embedded_redis_then_stops_cleanly(tmp_path: Path) -> None:
    """From an empty folder: a push sent with `simulate` is processed; SIGINT leaves no process behind."""
    env = {**clean_env(), "PYTHONUNBUFFERED": "1", "WXCOUPON_DISPATCH_INTERVAL": "0.1"}
    port = procs.free_port()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "dev", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/wechat", proc, log, timeout=60)
        assert (tmp_path / "instance" / "dev.env").exists()
        sent = procs.wxcoupon(["simulate", "user_get_card", "--url", f"http://127.0.0.1:{port}/wechat"], env,
                              cwd=tmp_path)
        assert sent.returncode == 0 and "200 success" in sent.stdout, sent.stdout + sent.stderr
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            listed = procs.wxcoupon(["events", "list", "--json"], env, cwd=tmp_path)
            rows = [json.loads(line) for line in listed.stdout.splitlines()]
            status = rows[0]["status"] if rows else None
            if status == "processed":
                break
            time.sleep(0.3)
        assert status == "processed", log.read_text()
        # The fake Weixin started by dev pushes a sandbox card to the service.
        dev_env = dict(line.split("=", 1) for line in (tmp_path / "instance" / "dev.env").read_text().splitlines()
                       if "=" in line and not line.startswith("#"))
        fake_url = next(line.split("weixin:   fake, ")[1].split(" ")[0] for line in log.read_text().splitlines()
                        if "weixin:   fake, " in line)
        added = requests.post(f"{fake_url}/sandbox/add-card", json={"card_id": "pDevCard", "openid": "oDevUser"},
                              timeout=5).json()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = procs.wxcoupon(["events", "list", "--json", "--event", "user_get_card"], env, cwd=tmp_path)
            codes = {json.loads(line)["code"]: json.loads(line)["status"] for line in listed.stdout.splitlines()}
            if codes.get(added["code"]) == "processed":
                break
            time.sleep(0.3)
        assert codes.get(added["code"]) == "processed", log.read_text()
        assert dev_env["MP_API_KEY"]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4  # web master + workers, RQ worker, fake Weixin, embedded redis
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], log.read_text()
        text = log.read_text()
        assert "web    |" in text and "worker |" in text and "weixin |" in text
    finally:
        if proc.poll() is None:
            proc.kill()
