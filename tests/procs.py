"""Start wxcoupon's own commands as real subprocesses for end-to-end tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from webhook.config import Settings


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process load exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WECHAT_", "WXCOUPON_", "REDIS_URL", "DATABASE_URL"))}
    env.update(
        WECHAT_TOKEN=settings.token,
        WECHAT_TIMESTAMP_TOLERANCE=str(settings.timestamp_tolerance),
        DATABASE_URL=settings.database_url,
        WXCOUPON_INSTANCE_PATH=str(settings.instance_path),
        WXCOUPON_DISPATCH_INTERVAL=str(settings.dispatch_interval),
        PYTHONUNBUFFERED="1",
    )
    if settings.appid:
        env["WECHAT_APPID"] = settings.appid
    if settings.appsecret:
        env["WECHAT_APPSECRET"] = settings.appsecret
    if settings.encoding_aes_key:
        env["WECHAT_AES_KEY"] = settings.encoding_aes_key
    if settings.previous_encoding_aes_key:
        env["WECHAT_PREVIOUS_AES_KEY"] = settings.previous_encoding_aes_key
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    env.update(extra)
    return env


def wxcoupon(args: list[str], env: Mapping[str, str], timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `wxcoupon ARGS` to completion and return its result."""
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )


def start(args: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `wxcoupon ARGS` in the background, its output going to `log`."""
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "workers", *args], env=dict(env), stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    """Wait until `url` answers any HTTP status; fail with the log if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """SIGTERM the process and wait; SIGKILL if it does not stop."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
