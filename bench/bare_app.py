"""The baseline for bench/intake.py: a Flask app that only answers `success`.

It reads the request body (every webhook must, and an unread body makes the
kernel reset the connection on close) and does nothing else: no signature, no
decryption, no parsing, no database, no logging. It is served under exactly
the gunicorn settings `wxcoupon serve` applies (the same `gunicorn_options`),
so the difference between the two is wxcoupon's request path alone.

    .venv/bin/python bench/bare_app.py --host 127.0.0.1 --port 8001 --workers 2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

BENCH = Path(__file__).resolve().parent
# Run as a script, bench/ is first on sys.path, where bench/workers.py would
# shadow the workers package: the repository goes first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))

app = Flask(__name__)


@app.post("/wechat")
def receive() -> Response:
    """Drain the body and acknowledge, nothing more."""
    request.get_data(cache=False)
    return Response("success", mimetype="text/plain")


def serve(wsgi: Any, description: str, argv: list[str] | None = None) -> None:
    """Serve `wsgi` under gunicorn with wxcoupon's own serve settings, from the command line."""
    from gunicorn.app.base import BaseApplication

    from workers.cli.service import DEFAULT_WEB_THREADS, DEFAULT_WEB_WORKER_CLASS, WORKER_CLASSES, gunicorn_options

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=DEFAULT_WEB_THREADS, help="per worker; 1: sync workers")
    parser.add_argument("--worker-class", choices=WORKER_CLASSES, default=DEFAULT_WEB_WORKER_CLASS)
    args = parser.parse_args(argv)
    options = gunicorn_options(args.host, args.port, args.workers, access_log=False, threads=args.threads,
                               worker_class=args.worker_class)

    class BenchApplication(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return wsgi

    BenchApplication().run()


def main() -> None:
    """Serve `app` under gunicorn with wxcoupon's own serve settings."""
    serve(app, __doc__.splitlines()[0] if __doc__ else "bare app")


if __name__ == "__main__":
    main()
