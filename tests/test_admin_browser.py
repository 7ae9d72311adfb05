"""The admin page in a real headless Chromium (Debian's package), driven over the DevTools protocol.

Chromium is started with --remote-debugging-pipe: the protocol runs over two
pipes (our fd 3 to its input, its fd 4 to us), so there is no port to race
for and no driver or client library to install.
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import re

import pytest
import requests
import sqlalchemy as sa
from werkzeug.serving import make_server

from webhook import create_app
from webhook.config import Settings
from webhook.cardstore import mp_records
from webhook.store import add_attempts, events, utcnow

from .conftest import REQUIRE_SERVICES
from .pushes import make_push

pytestmark = pytest.mark.slow

ADMIN_KEY = "browser-test-admin-key-0123456789"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900", "--remote-debugging-pipe",
]  # fmt: skip


class Browser:
    """A headless Chromium and one page, spoken to in DevTools protocol messages over pipes."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes() -> None:  # in the child: its fd 3 reads our commands, fd 4 writes answers
            # Move both out of the way first: either may itself be 3 or 4.
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 100)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 100)
            os.dup2(high_r, 3)  # dup2 leaves 3 and 4 inheritable across exec
            os.dup2(high_w, 4)

        # close_fds=False: our other descriptors are non-inheritable anyway (PEP 446),
        # and closing "all but 3 and 4" would run before the move above.
        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes, close_fds=False,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._answers: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        waiter = self._answers.get(message["id"])
                    if waiter is not None:
                        waiter.put(message)

    def call(self, method: str, session: bool = False, timeout: float = 15, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer; raise on a protocol error."""
        with self._lock:
            self._next_id += 1
            message_id = self._next_id
            self._answers[message_id] = queue.Queue()
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        answer = self._answers[message_id].get(timeout=timeout)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def js(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its value."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _wait_new_document(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.js("window.__old === undefined && document.readyState === 'complete'"):
                    return
            except RuntimeError:
                pass  # the page is between documents
            time.sleep(0.05)
        raise AssertionError("the page did not load a new document")

    def goto(self, url: str) -> None:
        """Open a URL and wait for it to load."""
        self.js("window.__old = true")
        self.call("Page.navigate", session=True, url=url)
        self._wait_new_document()

    def click(self, selector: str) -> None:
        """Click an element that submits a form or follows a link, and wait for the next page."""
        self.js("window.__old = true")
        self.js(f"document.querySelector({json.dumps(selector)}).click()")
        self._wait_new_document()

    def text(self, selector: str = "body") -> str:
        """The text of the first element matching `selector`."""
        return str(self.js(f"document.querySelector({json.dumps(selector)})?.innerText ?? ''"))

    def screenshot(self, path: Path) -> None:
        """Save what the page looks like as a PNG."""
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"]))

    def close(self) -> None:
        """Stop Chromium."""
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A fresh headless Chromium with an empty profile."""
    if CHROMIUM is None:
        if REQUIRE_SERVICES:
            pytest.fail("Chromium is required (apt-get install -y chromium)")
        pytest.skip("chromium not installed")
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def _serve(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


@pytest.fixture
def admin_site(settings: Settings) -> Iterator[tuple[str, Any]]:
    """The app with an admin key, served over real HTTP on loopback; yields its URL and engine."""
    app = create_app(settings.with_overrides(admin_key=ADMIN_KEY), {"TESTING": True})
    client = app.test_client()
    for i, outer in enumerate(["spring", "summer", "autumn", "winter"]):
        query, body = make_push(settings, "user_get_card", UserCardCode=f"{510000000000 + i}", OuterStr=outer)
        assert client.post("/wechat", query_string=query, data=body).status_code == 200
    engine = app.extensions["wxcoupon.engine"]
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.update(events).where(events.c.id == 2).values(status="failed", attempts=1,
                                                                        last_error="ValueError: card not found"))
        conn.execute(sa.update(events).where(events.c.id == 3).values(status="dead", attempts=4,
                                                                        last_error="TransientWeixinError: -1"))
        conn.execute(sa.update(events).where(events.c.id == 4).values(status="processed", attempts=1))
        add_attempts(conn, [{"event_id": 2, "attempt": 1, "job_id": "evt-abc", "worker": "host-01.4242",
                             "started_at": now, "finished_at": now, "outcome": "failed",
                             "error": "ValueError: card not found"}])
        for i, match in enumerate(["matched", "matched", "unmatched"]):
            conn.execute(sa.insert(mp_records).values(
                dedupe_key=f"bench-{i}", kind="receipt", card_id="pCardAdmin", encrypt_code=f"enc{i}",
                code=f"52000000000{i}", mp_openid=f"oMP_{i}", is_success=True, match=match, status="processed",
                attempts=1, created_at=now, updated_at=now, checked_at=now if match == "unmatched" else None,
                last_error="card/code/get: 40056 invalid code" if match == "unmatched" else None,
            ))  # fmt: skip
    yield from ((url, engine) for url in _serve(app))
    engine.dispose()


def _status(engine: Any, event_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.select(events.c.status).where(events.c.id == event_id)).scalar_one())


def test_operator_logs_in_browses_filters_and_replays_in_chromium(
    browser: Browser, admin_site: tuple[str, Any], tmp_path: Path
) -> None:
    """Login with the key, the event log and its search, one event's history, and the replay button."""
    base, engine = admin_site
    browser.goto(f"{base}/admin/failed")
    assert browser.js("location.pathname") == "/admin/login"
    browser.js("document.querySelector('#key').value = 'not-the-key-at-all'")
    browser.click("#login")
    assert "not the admin key" in browser.text()
    browser.js(f"document.querySelector('#key').value = {json.dumps(ADMIN_KEY)}")
    browser.click("#login")
    assert browser.js("location.pathname") == "/admin/failed"  # back where the operator was going
    assert browser.js("[...document.querySelectorAll('#events tbody tr')].map(r => r.id)") == ["event-3", "event-2"]
    assert "card not found" in browser.text("#event-2")

    browser.click("#nav-events")
    assert len(browser.js("[...document.querySelectorAll('#events tbody tr')]")) == 4
    assert "…0001" in browser.text("#event-2") and "510000000001" not in browser.text("#events")
    browser.js("document.querySelector('#q').value = 'autumn'")
    browser.click("#apply")
    assert browser.js("[...document.querySelectorAll('#events tbody tr')].map(r => r.id)") == ["event-3"]
    browser.goto(f"{base}/admin/?status=processed")
    assert browser.js("[...document.querySelectorAll('#events tbody tr')].map(r => r.id)") == ["event-4"]
    assert browser.js("document.querySelector('#replay-4')") is None  # processed: no replay button

    browser.goto(f"{base}/admin/events/2")
    assert browser.text("#status") == "failed"
    assert "host-01.4242" in browser.text("#attempts") and "card not found" in browser.text("#attempts")
    assert "<OuterStr><![CDATA[summer]]></OuterStr>" in browser.text("#raw-xml")  # shown as text, not parsed
    browser.click("#replay")
    assert "1 event(s) will be replayed" in browser.text()
    assert _status(engine, 2) == "pending" and browser.text("#status") == "pending"

    browser.goto(f"{base}/admin/failed")
    browser.click("#replay-3")
    assert _status(engine, 3) == "pending"
    assert "No events match." in browser.text()
    browser.click("#nav-reconciliation")
    assert browser.text("#count-matched").split() == ["matched", "2"]
    assert browser.text("#count-unmatched").split() == ["unmatched", "1"]
    assert browser.text("#count-given_up").split() == ["given_up", "0"] and browser.text("#no-given-up") == "None."
    unmatched = browser.text("#unmatched")
    assert "…0002" in unmatched and "520000000002" not in unmatched and "40056" in unmatched
    assert "oMP_2" not in browser.text()  # Mini Program openids are not shown
    browser.screenshot(tmp_path / "admin.png")
    assert (tmp_path / "admin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_cannot_be_forged_across_sites_or_without_the_token(
    browser: Browser, admin_site: tuple[str, Any], settings: Settings
) -> None:
    """A logged-in operator visiting another site that auto-submits a replay form does not replay anything,
    and a same-site POST without the CSRF token is refused."""
    base, engine = admin_site
    browser.goto(f"{base}/admin/login")
    browser.js(f"document.querySelector('#key').value = {json.dumps(ADMIN_KEY)}")
    browser.click("#login")
    evil = create_app(settings, {"TESTING": True})

    @evil.get("/evil")
    def evil_page() -> str:
        return (f'<form id="f" method="post" action="{base}/admin/events/2/replay">'
                '<input name="csrf" value="guess"></form><script>document.getElementById("f").submit()</script>')

    for evil_base in _serve(evil):
        evil_url = evil_base.replace("127.0.0.1", "localhost")  # another site, not only another port
        browser.goto(f"{evil_url}/evil")
        deadline = time.monotonic() + 10
        while browser.js("location.href") != f"{base}/admin/events/2/replay" and time.monotonic() < deadline:
            time.sleep(0.05)  # the page submits its form on load
        assert browser.js("location.href") == f"{base}/admin/events/2/replay"  # the forged POST did arrive...
        time.sleep(0.2)
        assert "Forbidden" in browser.text() and _status(engine, 2) == "failed"  # ...without the session: refused
    browser.goto(f"{base}/admin/")
    status = browser.js("fetch('/admin/events/2/replay', {method: 'POST'}).then(r => r.status)")
    assert status == 403 and _status(engine, 2) == "failed"


def test_ids_beyond_any_row_are_not_found_not_errors(admin_site: tuple[str, Any]) -> None:
    """An id past the largest a row can have (2**63 - 1) names no row: 404 for the event page, the first
    page for a `before` link, 400 for a replay form. Before, SQLite's OverflowError made them 500s."""
    url, _ = admin_site
    session = requests.Session()

    def csrf(page: str) -> dict[str, str]:
        found = re.search(r'name="csrf" value="([^"]+)"', session.get(f"{url}{page}").text)
        return {"csrf": found.group(1)} if found else {}

    assert session.post(f"{url}/admin/login", data={"key": ADMIN_KEY, **csrf("/admin/login")}).status_code == 200
    beyond = 2**63
    assert session.get(f"{url}/admin/events/{beyond}").status_code == 404
    assert session.get(f"{url}/admin/events/{beyond - 1}").status_code == 404  # in range, no such row
    assert session.get(f"{url}/admin/?before={beyond}").status_code == 200
    token = csrf("/admin/failed")
    assert token
    assert session.post(f"{url}/admin/replay", data={**token, "id": [str(beyond)]}).status_code == 400
    assert session.post(f"{url}/admin/events/{beyond}/replay", data=token).status_code == 404
