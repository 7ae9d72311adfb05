"""Issue 2's yardstick for bench/intake.py: a straightforward push handler built on wechatpy.

Issue 2 sets wxcoupon's target against a bare app and gives, for scale, "a
straightforward handler built on wechatpy (check, decrypt, parse, SQLite insert
with commit, one RQ enqueue per request)": about 800 req/s where the bare app
did 2,800 on 2 cores, a ratio of 0.3. This is that handler, so that it can be
measured beside the other two in the same run (`bench/intake.py --reference`):

- `wechatpy.utils.check_signature`, then `WeChatCrypto.decrypt_message`
  (msg_signature, base64, AES, the appid) and `wechatpy.parse_message`;
- one INSERT OR IGNORE into a small table (the dedupe columns as its one
  unique key, a status, the decrypted XML) and a commit, on a connection per
  worker process, SQLite in WAL mode with `synchronous=FULL` (as wxcoupon's
  default: an acknowledged push survives a power cut);
- with `--enqueue REDIS_URL`, one RQ enqueue per stored push (nothing runs
  the jobs; the benchmark flushes that database).

No logging, no metrics, no request id, no size limit, no timestamp tolerance:
what a first version would do. Needs wechatpy (`pip install -e '.[bench]'`).

    .venv/bin/python bench/reference_app.py --database FILE [--enqueue REDIS_URL] --port 8002 --workers 2
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# As in bare_app.py: the repository first on sys.path (bench/workers.py would
# shadow the workers package), bench/ last for the sibling module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(BENCH.parent))
sys.path.append(str(BENCH))

from flask import Flask, Response, request  # noqa: E402
from wechatpy import parse_message  # noqa: E402
from wechatpy.crypto import WeChatCrypto  # noqa: E402
from wechatpy.exceptions import InvalidAppIdException, InvalidSignatureException  # noqa: E402
from wechatpy.utils import check_signature  # noqa: E402

from bare_app import serve  # noqa: E402

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    openid TEXT, create_time INTEGER, event TEXT, card_id TEXT, code TEXT,
    status TEXT NOT NULL, xml TEXT NOT NULL,
    UNIQUE (openid, create_time, event, card_id, code)
)
"""
INSERT = ("INSERT OR IGNORE INTO events (openid, create_time, event, card_id, code, status, xml) "
          "VALUES (?, ?, ?, ?, ?, 'pending', ?)")  # fmt: skip

app = Flask(__name__)
_state: dict[str, Any] = {}  # per worker process: the connection and the queue, made on first use


def _connection() -> sqlite3.Connection:
    conn: sqlite3.Connection | None = _state.get("conn")
    if conn is None:
        conn = _state["conn"] = sqlite3.connect(app.config["DATABASE"], timeout=5)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    return conn


def _queue() -> Any:
    queue = _state.get("queue")
    if queue is None:
        import redis
        import rq

        queue = _state["queue"] = rq.Queue("reference", connection=redis.Redis.from_url(app.config["ENQUEUE"]))
    return queue


def process_event(event_id: int) -> int:
    """The job the handler enqueues (never run by the benchmark)."""
    return event_id


@app.post("/wechat")
def receive() -> Response:
    """Check, decrypt, parse, insert and commit, optionally enqueue; then `success`."""
    args = request.args
    crypto: WeChatCrypto = app.config["CRYPTO"]
    try:
        check_signature(app.config["TOKEN"], args["signature"], args["timestamp"], args["nonce"])
        xml = crypto.decrypt_message(request.get_data(), args["msg_signature"], args["timestamp"], args["nonce"])
    except (KeyError, InvalidSignatureException, InvalidAppIdException):
        return Response("invalid", status=403, mimetype="text/plain")
    message = parse_message(xml)
    conn = _connection()
    cursor = conn.execute(INSERT, (
        message.source, int(message.create_time.timestamp()), getattr(message, "event", None),
        getattr(message, "card_id", None), getattr(message, "user_card_code", None), xml,
    ))  # fmt: skip
    conn.commit()
    if app.config["ENQUEUE"] and cursor.rowcount:
        _queue().enqueue("reference_app.process_event", cursor.lastrowid)
    return Response("success", mimetype="text/plain")


def main() -> None:
    """Serve the handler under gunicorn with wxcoupon's serve settings; the account from WECHAT_*."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--database", required=True, help="the SQLite file (created if missing)")
    parser.add_argument("--enqueue", metavar="REDIS_URL", help="one RQ enqueue per stored push, on this Redis")
    own, rest = parser.parse_known_args()
    token, aes_key, appid = os.environ["WECHAT_TOKEN"], os.environ["WECHAT_AES_KEY"], os.environ["WECHAT_APPID"]
    setup = sqlite3.connect(own.database)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute(SCHEMA)
    setup.close()
    app.config.update(DATABASE=own.database, ENQUEUE=own.enqueue, TOKEN=token,
                      CRYPTO=WeChatCrypto(token, aes_key, appid))  # fmt: skip
    serve(app, __doc__.splitlines()[0] if __doc__ else "reference app", rest)


if __name__ == "__main__":
    main()
