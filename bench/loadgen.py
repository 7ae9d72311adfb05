"""Load generators for bench/intake.py: wrk with bench/intake.lua, or a Python fallback.

Both replay a file of pre-built requests (one line each, "path?query<TAB>body"),
send every line at most once (unless `wrap`, for the bare app), stop at a
request count or a duration, and then wait for every answer still in flight so
that the number of 200s they report is exact.
"""
from __future__ import annotations

import glob
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH / "intake.lua"
REQUEST_TIMEOUT = 10  # seconds; gunicorn's worker timeout in `wxcoupon serve`


@dataclass
class LoadResult:
    """What one load run measured, whichever generator ran it."""

    loader: str
    sent: int  # real requests written
    answered: int  # real requests answered (any status)
    statuses: dict[int, int]
    window: float  # seconds from the first request sent to the last answer
    latency_ms: dict[str, float]  # p50, p90, p99, p99.9, max, mean
    errors: dict[str, int] = field(default_factory=dict)  # socket-level, not HTTP
    exhausted: bool = False  # the pool of pushes was smaller than the run wanted
    settled: bool = True  # every request sent got an answer
    client_cpu_s: float | None = None  # CPU the load generator itself used

    @property
    def ok(self) -> int:
        """Requests answered 200."""
        return self.statuses.get(200, 0)

    @property
    def non_2xx(self) -> int:
        """Requests answered with a status outside 200-299."""
        return sum(n for code, n in self.statuses.items() if not 200 <= code < 300)

    @property
    def non_200(self) -> int:
        """Requests answered with any status but 200."""
        return sum(n for code, n in self.statuses.items() if code != 200)

    @property
    def rps(self) -> float:
        """Answered requests per second."""
        return self.answered / self.window if self.window > 0 else 0.0

    @property
    def events_per_s(self) -> float:
        """200 answers per second (for wxcoupon: events committed and acknowledged)."""
        return self.ok / self.window if self.window > 0 else 0.0


def write_request_file(path: Path, requests: list[tuple[str, bytes]]) -> None:
    """One request per line for intake.lua: the path with its query, a tab, the body."""
    with path.open("wb") as f:
        for target, body in requests:
            if b"\n" in body or b"\t" in body or "\t" in target:
                raise ValueError("a push body with a newline or tab cannot go in the request file")
            f.write(target.encode("ascii") + b"\t" + body + b"\n")


# ---------------------------------------------------------------- wrk


def find_wrk(install: bool = True) -> tuple[str | None, str]:
    """The wrk binary, installing it with apt-get when missing and allowed; (path, note)."""
    path = shutil.which("wrk")
    if path:
        return path, "wrk found at " + path
    if not install:
        return None, "wrk not found"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "wrk not found and cannot apt-get install it (not root or no apt-get)"
    print("wrk not found: installing it with `apt-get update && apt-get install -y wrk` ...", flush=True)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"], check=True, timeout=300, capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"wrk not found and apt-get install failed ({type(exc).__name__})"
    path = shutil.which("wrk")
    return (path, "wrk installed with apt-get") if path else (None, "apt-get ran but wrk is still missing")


def wrk_version(wrk: str) -> str:
    """wrk's own version line."""
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).splitlines()[0].strip() if (out.stdout + out.stderr) else "?"


def run_wrk(
    wrk: str,
    url: str,
    request_file: Path,
    *,
    connections: int,
    threads: int,
    quota: int,
    duration: float,
    wrap: bool,
) -> LoadResult:
    """Drive `url` with wrk and intake.lua; see the header of intake.lua for the protocol."""
    threads = max(1, min(threads, connections))
    markers = Path(tempfile.mkdtemp(prefix="wxbench-wrk-"))
    # wrk sleeps its whole -d; this is only the cap. We interrupt it when done.
    expected = duration if duration else quota / 200.0
    cap = int(math.ceil(expected)) + 60
    argv = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{cap}s", f"--timeout={REQUEST_TIMEOUT}s",
        "-s", str(LUA_SCRIPT), url, "--",
        str(request_file), str(threads), str(quota), repr(float(duration)), "1" if wrap else "0", str(markers),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + cap + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if len(glob.glob(str(markers / "settled.*"))) >= threads:
                break
            time.sleep(0.02)
        client_cpu = proc_cpu_seconds(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # wrk stops its threads and reports
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    finally:
        shutil.rmtree(markers, ignore_errors=True)
    result = _parse_wrk(out, err)
    result.client_cpu_s = client_cpu
    return result


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one live process, from /proc ((0, 0) if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one live process (0 if it is gone)."""
    return sum(proc_cpu_split(pid))


def _parse_wrk(out: str, err: str) -> LoadResult:
    latency: dict[str, float] = {}
    statuses: Counter[int] = Counter()
    errors: dict[str, int] = {}
    sent = answered = 0
    exhausted = False
    settled = True
    first: list[float] = []
    last: list[float] = []
    seen = False
    for line in out.splitlines():
        parts = line.split()
        if not parts or parts[0] != "WXBENCH":
            continue
        seen = True
        kind, values = parts[1], parts[2:]
        if kind == "summary":
            names = ("connect", "read", "write", "status", "timeout")
            errors = {n: int(v) for n, v in zip(names, values[2:]) if n != "status" and int(v)}
        elif kind == "latency":
            latency[values[0].lstrip("p")] = int(float(values[1])) / 1000.0
        elif kind == "thread":
            _tid, t_sent, t_recv, _noop_sent, _noop_recv, t_exh, t_settled = (int(v) for v in values[:7])
            sent += t_sent
            answered += t_recv
            exhausted = exhausted or bool(t_exh)
            settled = settled and bool(t_settled)
            if float(values[7]) > 0:
                first.append(float(values[7]))
            if float(values[8]) > 0:
                last.append(float(values[8]))
        elif kind == "status":
            statuses[int(values[1])] += int(values[2])
    if not seen:
        raise RuntimeError(f"wrk printed no results:\n{out}\n{err}")
    window = (max(last) - min(first)) if first and last else 0.0
    return LoadResult(
        loader="wrk", sent=sent, answered=answered, statuses=dict(statuses), window=window,
        latency_ms=latency, errors=errors, exhausted=exhausted, settled=settled,
    )  # fmt: skip


# ---------------------------------------------------------------- Python fallback


def _http_once(host: str, port: int, data: bytes) -> int:
    """Send one raw request on a new connection; return the status once the answer is complete."""
    with socket.create_connection((host, port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the headers")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while length is None or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                if length is None:
                    break
                raise ConnectionError("closed before the body")
            body += chunk
        return status


def _python_process(
    requests: list[bytes], host: str, port: int, connections: int, quota: int, duration: float, wrap: bool,
    out: Any,
) -> None:  # fmt: skip
    lock = threading.Lock()
    state = {"next": 0, "exhausted": False}
    deadline = time.monotonic() + duration if duration else None
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    window = {"first": 0.0, "last": 0.0}

    def connection() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= quota or (deadline is not None and time.monotonic() >= deadline):
                    return
                if i >= len(requests) and not wrap:
                    state["exhausted"] = True
                    return
                state["next"] = i + 1
            data = requests[i % len(requests)]
            started = time.monotonic()
            with lock:
                if not window["first"]:
                    window["first"] = started
            try:
                status = _http_once(host, port, data)
            except OSError as exc:
                with lock:
                    errors[type(exc).__name__] += 1
                continue
            ended = time.monotonic()
            with lock:
                latencies.append(ended - started)
                statuses[status] += 1
                window["last"] = max(window["last"], ended)

    workers = [threading.Thread(target=connection) for _ in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(
        {"sent": state["next"], "latencies": latencies, "statuses": dict(statuses), "errors": dict(errors),
         "first": window["first"], "last": window["last"], "exhausted": state["exhausted"]}
    )  # fmt: skip


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def run_python(
    url_host: str,
    url_port: int,
    url_path: str,
    requests: list[tuple[str, bytes]],
    *,
    connections: int,
    processes: int,
    quota: int,
    duration: float,
    wrap: bool,
) -> LoadResult:
    """The fallback: `processes` processes, each with its share of the connections as threads."""
    del url_path  # the request targets already carry the path
    raw = [
        (f"POST {target} HTTP/1.1\r\nHost: {url_host}:{url_port}\r\nContent-Type: text/xml\r\n"
         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii") + body
        for target, body in requests
    ]  # fmt: skip
    processes = max(1, min(processes, connections))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = []
    quota = quota if quota > 0 else (len(raw) * (10**6) if wrap else len(raw))
    for p in range(processes):
        share = raw[p::processes] if not wrap else raw
        conns = connections // processes + (1 if p < connections % processes else 0)
        q = quota // processes + (1 if p < quota % processes else 0)
        proc = ctx.Process(target=_python_process, args=(share, url_host, url_port, conns, q, duration, wrap, queue))
        proc.start()
        procs.append(proc)
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    latencies = sorted(x for r in results for x in r["latencies"])
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        statuses.update(r["statuses"])
        errors.update(r["errors"])
    firsts = [r["first"] for r in results if r["first"]]
    lasts = [r["last"] for r in results if r["last"]]
    answered = sum(statuses.values())
    latency_ms = {name: _percentile(latencies, float(name)) * 1000 for name in ("50", "90", "99", "99.9")}
    latency_ms["max"] = latencies[-1] * 1000 if latencies else 0.0
    latency_ms["mean"] = sum(latencies) / len(latencies) * 1000 if latencies else 0.0
    return LoadResult(
        loader="python", sent=sum(r["sent"] for r in results), answered=answered, statuses=dict(statuses),
        window=(max(lasts) - min(firsts)) if firsts and lasts else 0.0, latency_ms=latency_ms,
        errors=dict(errors), exhausted=any(r["exhausted"] for r in results), settled=not errors,
        client_cpu_s=client_cpu,
    )  # fmt: skip
