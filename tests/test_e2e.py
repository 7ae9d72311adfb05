"""End to end over real processes: serve, simulate, worker, events list."""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from webhook.config import Settings
from webhook.events import CARD_EVENTS
from webhook.signature import sign
from webhook.store import events, make_engine

from . import procs
from .pushes import make_push

pytestmark = pytest.mark.slow


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`wxcoupon serve` on a free loopback port; yields its URL and environment."""
    env = procs.settings_env(settings)
    port = procs.free_port()
    log = tmp_path / "serve.log"
    proc = procs.start(["serve", "--port", str(port), "--workers", "2"], env, log)
    url = f"http://127.0.0.1:{port}/wechat"
    procs.wait_http(url, proc, log)
    yield url, env
    procs.stop(proc)


def test_simulate_each_card_event_then_worker_then_events_list(server: tuple[str, dict[str, str]]) -> None:
    """Every card event type posted by `wxcoupon simulate` is stored once, processed by a worker, listed."""
    url, env = server

    def simulate(i: int, event: str) -> Any:
        return procs.wxcoupon(
            ["simulate", event, "--url", url, "--field", f"UserCardCode={500000000000 + i}",
             "--field", "OuterStr=e2e", "--repeat", "2"],
            env,
        )

    # A few at a time: each is a process of its own, and most of its time is Python starting up.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(simulate, range(len(CARD_EVENTS)), CARD_EVENTS))
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("200 success") == 2
    worker = procs.wxcoupon(["worker", "--burst"], env)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    listed = procs.wxcoupon(["events", "list", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["event"] for r in lines) == sorted(CARD_EVENTS)
    # submit_membercard_user_info stores the member's form, encrypted: without WXCOUPON_DATA_KEY it
    # fails for good, naming it (before asking Weixin); every other event needs nothing more.
    [form] = [r for r in lines if r["event"] == "submit_membercard_user_info"]
    assert form["status"] == "failed" and "WXCOUPON_DATA_KEY" in form["last_error"]
    assert {r["status"] for r in lines if r is not form} == {"processed"}
    for row in lines:
        assert {"id", "event", "openid", "card_id", "code", "outer_str", "unionid", "status",
                "received_at", "create_time"} <= set(row)
    filtered = procs.wxcoupon(["events", "list", "--json", "--event", "user_get_card", "--since", "1h"], env)
    [got] = [json.loads(line) for line in filtered.stdout.splitlines()]
    assert got["event"] == "user_get_card" and got["outer_str"] == "e2e" and got["openid"]


def test_concurrent_copies_on_different_processes_make_one_event(
    server: tuple[str, dict[str, str]], settings: Settings
) -> None:
    """The same pushes sent 8 times at once to a 2-process server: one row each, all answered success."""
    url, env = server
    pushes = [make_push(settings, UserCardCode=f"{700000000000 + i}") for i in range(10)]
    answers: list[Any] = []
    lock = threading.Lock()

    def fire(query: dict[str, str], body: bytes) -> None:
        with requests.Session() as session:
            resp = session.post(url, params=query, data=body, timeout=10)
        with lock:
            answers.append((resp.status_code, resp.text))

    threads = [threading.Thread(target=fire, args=p) for p in pushes for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [(200, "success")] * 80
    listed = procs.wxcoupon(["events", "list", "--json"], env)
    codes = sorted(json.loads(line)["code"] for line in listed.stdout.splitlines())
    assert codes == sorted(f"{700000000000 + i}" for i in range(10))


def test_missing_token_stops_at_start_naming_the_variable(settings: Settings) -> None:
    """A service without WECHAT_TOKEN refuses to start and says which variable is missing."""
    env = procs.settings_env(settings)
    env.pop("WECHAT_TOKEN")
    result = procs.wxcoupon(["serve", "--port", str(procs.free_port())], env, cwd=settings.instance_path.parent)
    assert result.returncode != 0
    assert "WECHAT_TOKEN" in result.stderr


def test_malformed_aes_key_stops_at_start(settings: Settings) -> None:
    """A 42-character EncodingAESKey is named as malformed at start."""
    env = procs.settings_env(settings, WECHAT_AES_KEY="a" * 42)
    result = procs.wxcoupon(["worker", "--burst"], env, cwd=settings.instance_path.parent)
    assert result.returncode != 0 and "WECHAT_AES_KEY" in result.stderr


def _post_chunked(port: int, query: dict[str, str], body: bytes, chunk: int = 1000, path: str = "/wechat",
                  headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST with Transfer-Encoding: chunked (no Content-Length); the status and the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        pieces = (body[i:i + chunk] for i in range(0, len(body), chunk))
        conn.request("POST", f"{path}?{urllib.parse.urlencode(query)}", body=pieces,
                     headers=headers or {"Content-Type": "text/xml"}, encode_chunked=True)  # fmt: skip
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_chunked_bodies_are_held_to_the_size_cap(settings: Settings, tmp_path: Path) -> None:
    """A chunked body declares no length, so the cap cannot be checked before reading. Under gunicorn:
    one byte over WXCOUPON_MAX_BODY gets 413 and stores nothing (werkzeug alone cuts it at the cap and
    hands on what it read); one of exactly the cap is read whole and stored; a push sent chunked is stored.
    The Mini Program API's JSON bodies and the admin's forms are held to the same cap; the API answers
    its 413 in its JSON error format."""
    cap = 4096
    admin_key = "chunked-admin-key-0123456789"
    env = procs.settings_env(settings, WXCOUPON_MAX_BODY=str(cap), MP_API_KEY="chunked-test-key-0123456789",
                             WXCOUPON_ADMIN_KEY=admin_key)  # fmt: skip
    port = procs.free_port()
    log = tmp_path / "serve.log"
    proc = procs.start(["serve", "--port", str(port), "--workers", "1"], env, log)
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/wechat", proc, log)
        stamp = str(int(time.time()))
        query = {"signature": sign(settings.token, stamp, "42"), "timestamp": stamp, "nonce": "42"}

        def text_message(msg_id: int, size: int) -> bytes:
            head = (f"<xml><ToUserName>gh_chunk</ToUserName><FromUserName>oChunked</FromUserName>"
                    f"<CreateTime>{stamp}</CreateTime><MsgType>text</MsgType><MsgId>{msg_id}</MsgId><Content>").encode()
            tail = b"</Content></xml>"
            return head + b"a" * (size - len(head) - len(tail)) + tail

        # Well-formed up to the cap, then more: werkzeug's cut alone would store a message.
        over = text_message(1, cap) + b"<!-- one byte more than the cap -->"
        assert _post_chunked(port, query, over) == (413, "payload too large")
        assert _post_chunked(port, query, text_message(2, cap)) == (200, "success")
        push_query, push_body = make_push(settings, UserCardCode="700000000001")
        assert _post_chunked(port, push_query, push_body, chunk=100) == (200, "success")
        # Valid JSON up to the cap, then whitespace, which a JSON parser would skip.
        receipt = json.dumps({"mp_openid": "oMpChunked", "card_list": [{"card_id": "p" * 27, "code": "x"}]}).encode()
        mp_headers = {"Content-Type": "application/json", "Authorization": "Bearer chunked-test-key-0123456789"}
        status, text = _post_chunked(port, {}, receipt + b" " * cap, path="/api/mp/card-receipts", headers=mp_headers)
        assert (status, json.loads(text)) == (413, {"error": "request entity too large"})
        declared = requests.post(f"http://127.0.0.1:{port}/api/mp/card-receipts", data=receipt + b" " * cap,
                                 headers=mp_headers, timeout=10)  # fmt: skip
        assert (declared.status_code, declared.json()) == (413, {"error": "request entity too large"})
        # The admin's login form, key first, padding past the cap: werkzeug's form parser alone would
        # read the form up to the cap and log in.
        admin = requests.Session()
        page = admin.get(f"http://127.0.0.1:{port}/admin/login", timeout=10).text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        form = urllib.parse.urlencode({"csrf": csrf.group(1) if csrf else "", "key": admin_key}).encode()
        padded = form + b"&pad=" + b"a" * cap
        login = admin.post(f"http://127.0.0.1:{port}/admin/login", data=iter([padded[:1000], padded[1000:]]),
                           headers={"Content-Type": "application/x-www-form-urlencoded"},
                           allow_redirects=False, timeout=10)  # fmt: skip
        assert login.status_code == 413
        assert admin.get(f"http://127.0.0.1:{port}/admin/", allow_redirects=False, timeout=10).status_code == 302
    finally:
        procs.stop(proc)
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(events.c.msg_type, events.c.code, events.c.raw_xml)).all()
    finally:
        engine.dispose()
    assert sorted((m, c) for m, c, _ in stored) == [("event", "700000000001"), ("text", None)]
    assert [len(x.encode()) for m, _, x in stored if m == "text"] == [cap]


def test_a_push_not_from_weixin_is_refused_before_its_body_is_read(server: tuple[str, dict[str, str]]) -> None:
    """The query's signature is checked before the body is read: a request that declares a body and
    never sends it gets its 403 at once instead of holding a sync worker until the body or a timeout."""
    url, _ = server
    parts = urllib.parse.urlsplit(url)
    stamp = str(int(time.time()))
    query = urllib.parse.urlencode({"signature": "0" * 40, "timestamp": stamp, "nonce": "42"})
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(f"POST /wechat?{query} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: text/xml\r\n"
                     f"Content-Length: 1000\r\n\r\n".encode())  # fmt: skip
        answer = sock.recv(4096)  # socket.timeout here: the server is waiting for the body
    assert answer.startswith(b"HTTP/1.1 403")
