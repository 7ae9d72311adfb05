"""The fake Weixin server over real HTTP: Weixin's API behaviour, faults, sandbox and pushes."""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from typing import Any

import pytest
import requests
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from webhook.config import Settings
from webhook.envelope import open_push
from workers.fake_weixin import FakeWeixin, FakeWeixinError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

TOKEN = "fakepushtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wxfa4e5eed00000002"
SECRET = "fa4e5ecre70000000000000000000002"
PUSH_SETTINGS = Settings(token=TOKEN, appid=APPID, encoding_aes_key=AES_KEY)


def token_for(fake: FakeWeixin, *, stable: bool = True, force: bool = False) -> str:
    """Fetch an access_token straight from the fake, as any HTTP client would."""
    account = {"grant_type": "client_credential", "appid": fake.appid, "secret": fake.appsecret}
    if stable:
        reply = requests.post(f"{fake.url}/cgi-bin/stable_token", json={**account, "force_refresh": force}, timeout=5)
    else:
        reply = requests.get(f"{fake.url}/cgi-bin/token", params=account, timeout=5)
    token: str = reply.json()["access_token"]
    return token


def call(fake: FakeWeixin, path: str, token: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """POST a Weixin API path with an access_token; the JSON reply."""
    params = {"access_token": token} if token is not None else {}
    reply = requests.post(f"{fake.url}/{path}", params=params, json=body, timeout=5)
    assert reply.status_code == 200  # Weixin reports errors in the body, with HTTP 200
    result: dict[str, Any] = reply.json()
    return result


def sandbox(fake: FakeWeixin, action: str, body: dict[str, Any]) -> requests.Response:
    """POST a sandbox path."""
    return requests.post(f"{fake.url}/sandbox/{action}", json=body, timeout=5)


# -- tokens ------------------------------------------------------------------------------


def test_cgi_bin_token_invalidates_the_previous_one(fake_weixin: FakeWeixin) -> None:
    """A new cgi-bin/token makes the previous one answer 40001 "not latest"."""
    added = fake_weixin.add_card("pCard", "oUser")
    first = token_for(fake_weixin, stable=False)
    second = token_for(fake_weixin, stable=False)
    assert first != second
    assert call(fake_weixin, "card/code/decrypt", first, {"encrypt_code": added["encrypt_code"]})["errcode"] == 40001
    assert call(fake_weixin, "card/code/decrypt", second, {"encrypt_code": added["encrypt_code"]})["code"] == added["code"]


def test_stable_token_is_stable_until_force_refresh(fake_weixin: FakeWeixin) -> None:
    """stable_token repeats the token while valid; force_refresh replaces it; cgi-bin/token is separate."""
    first = token_for(fake_weixin)
    assert token_for(fake_weixin) == first
    token_for(fake_weixin, stable=False)  # tokens of the other endpoint do not interfere
    assert call(fake_weixin, "card/code/get", first, {"code": "1"})["errcode"] == 40056
    forced = token_for(fake_weixin, force=True)
    assert forced != first
    assert call(fake_weixin, "card/code/get", first, {"code": "1"})["errcode"] == 40001
    assert fake_weixin.calls("/cgi-bin/stable_token") == 3


def test_tokens_expire(fake_weixin: FakeWeixin) -> None:
    """Past its lifetime a token answers 42001, and stable_token hands out a new one."""
    token = token_for(fake_weixin)
    real_clock = fake_weixin.state.clock
    fake_weixin.state.clock = lambda: real_clock() + 7201
    assert call(fake_weixin, "card/code/get", token, {"code": "1"})["errcode"] == 42001
    assert token_for(fake_weixin) != token


def test_token_ttl_is_configurable() -> None:
    """token_ttl sets expires_in (the CLI's --token-ttl)."""
    with FakeWeixin(token_ttl=60) as fake:
        account = {"grant_type": "client_credential", "appid": fake.appid, "secret": fake.appsecret}
        assert requests.get(f"{fake.url}/cgi-bin/token", params=account, timeout=5).json()["expires_in"] == 60


def test_credentials_are_checked(fake_weixin: FakeWeixin) -> None:
    """Wrong appid 40013, wrong secret 40125, missing token 41001, garbage token 40014."""
    url = f"{fake_weixin.url}/cgi-bin/token"
    base = {"grant_type": "client_credential", "appid": fake_weixin.appid, "secret": fake_weixin.appsecret}
    assert requests.get(url, params={**base, "appid": "wxother"}, timeout=5).json()["errcode"] == 40013
    assert requests.get(url, params={**base, "secret": "nope"}, timeout=5).json()["errcode"] == 40125
    assert requests.get(url, params={**base, "grant_type": "x"}, timeout=5).json()["errcode"] == 40002
    assert call(fake_weixin, "card/code/get", None, {"code": "1"})["errcode"] == 41001
    assert call(fake_weixin, "card/code/get", "garbage", {"code": "1"})["errcode"] == 40014
    assert call(fake_weixin, "card/code/get", "FAKESTABLE_never-issued", {"code": "1"})["errcode"] == 40001
    assert "rid: " in call(fake_weixin, "card/code/get", None, {"code": "1"})["errmsg"]


def test_malformed_json_body_is_47001(fake_weixin: FakeWeixin) -> None:
    """A body that is not a JSON object answers 47001 data format error."""
    token = token_for(fake_weixin)
    reply = requests.post(f"{fake_weixin.url}/card/code/get", params={"access_token": token}, data=b"{not json",
                          timeout=5)
    assert reply.json()["errcode"] == 47001


# -- codes ---------------------------------------------------------------------------------


def test_encrypt_code_is_deterministic_and_tamper_proof(fake_weixin: FakeWeixin) -> None:
    """The same code always encrypts the same way; a changed byte or a stranger's string is 40056."""
    added = fake_weixin.add_card("pCard", "oUser", code="123456789012")
    assert fake_weixin.state.encrypt("123456789012") == added["encrypt_code"]
    token = token_for(fake_weixin)
    tampered = ("A" if added["encrypt_code"][0] != "A" else "B") + added["encrypt_code"][1:]
    for bad in (tampered, "not base64 at all", ""):
        assert call(fake_weixin, "card/code/decrypt", token, {"encrypt_code": bad})["errcode"] in (40056, 41011)
    other = FakeWeixin()  # another server secret: its encrypt_codes mean nothing here
    assert other.state.encrypt("123456789012") != added["encrypt_code"]


def test_add_card_generates_twelve_digit_codes(fake_weixin: FakeWeixin) -> None:
    """Without a code, add-card makes a fresh 12-digit one; a reused code is refused."""
    codes = {fake_weixin.add_card("pCard", f"oUser{i}")["code"] for i in range(20)}
    assert len(codes) == 20 and all(len(c) == 12 and c.isdigit() for c in codes)
    with pytest.raises(FakeWeixinError) as caught:
        fake_weixin.add_card("pCard", "oUser", code=next(iter(codes)))
    assert caught.value.errcode == 40116


def test_sandbox_paths_change_what_weixin_reports(fake_weixin: FakeWeixin) -> None:
    """add, consume, delete and gift over HTTP, each visible through card/code/get."""
    token = token_for(fake_weixin)
    added = sandbox(fake_weixin, "add-card", {"card_id": "pCard", "openid": "oA", "outer_str": "s1"}).json()
    assert added["errcode"] == 0 and len(added["code"]) == 12
    gift = sandbox(fake_weixin, "add-card", {"card_id": "pCard", "openid": "oA", "code": "555000111222"}).json()
    assert gift["code"] == "555000111222"
    drop = sandbox(fake_weixin, "add-card", {"card_id": "pCard", "openid": "oA"}).json()

    assert sandbox(fake_weixin, "consume-card", {"card_id": "pCard", "code": added["code"]}).json()["status"] == "CONSUMED"
    assert sandbox(fake_weixin, "delete-card", {"card_id": "pCard", "code": drop["code"]}).json()["status"] == "DELETE"
    given = sandbox(fake_weixin, "gift-card", {"card_id": "pCard", "code": gift["code"], "to_openid": "oB"}).json()
    assert given["old_code"] == gift["code"] and given["code"] != gift["code"]

    def status(code: str) -> Any:
        reply = call(fake_weixin, "card/code/get", token, {"code": code, "check_consume": False})
        return reply.get("user_card_status", reply["errcode"])

    assert status(added["code"]) == "CONSUMED"
    assert status(drop["code"]) == "DELETE"
    assert status(gift["code"]) == 40056  # gifted away: Weixin no longer knows the old code
    assert status(given["code"]) == "NORMAL"
    assert call(fake_weixin, "card/code/get", token, {"code": given["code"]})["openid"] == "oB"
    assert call(fake_weixin, "card/code/get", token, {"code": added["code"]})["errcode"] == 40099

    refused = sandbox(fake_weixin, "consume-card", {"card_id": "pCard", "code": added["code"]})
    assert refused.status_code == 400 and refused.json()["errcode"] == 40099
    missing = sandbox(fake_weixin, "add-card", {"card_id": "pCard"})
    assert missing.status_code == 400 and "openid" in missing.json()["errmsg"]


def test_add_card_checks_the_card_ext_signature(fake_weixin: FakeWeixin) -> None:
    """With a cardExt, add-card checks its signature over the wx_card api_ticket (40080 if wrong)."""
    token = token_for(fake_weixin)
    ticket = requests.get(f"{fake_weixin.url}/cgi-bin/ticket/getticket",
                          params={"access_token": token, "type": "wx_card"}, timeout=5).json()["ticket"]
    ext = {"code": "", "openid": "", "timestamp": str(int(time.time())), "nonce_str": "n0nce", "outer_str": "poster"}
    parts = [ticket, ext["timestamp"], "pCardExt", ext["nonce_str"]]
    signed = {**ext, "signature": hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()}
    added = fake_weixin.add_card("pCardExt", "oUser", card_ext=json.dumps(signed))
    assert fake_weixin.state.codes[added["code"]].outer_str == "poster"
    with pytest.raises(FakeWeixinError) as caught:
        fake_weixin.add_card("pCardExt", "oUser", card_ext=json.dumps({**signed, "signature": "0" * 40}))
    assert caught.value.errcode == 40080


# -- faults, stats, reset ------------------------------------------------------------------


def test_fault_injection_over_http(fake_weixin: FakeWeixin) -> None:
    """POST /sandbox/faults: the errcode for the next N calls only; GET /sandbox/stats counts them all."""
    token = token_for(fake_weixin)
    reply = sandbox(fake_weixin, "faults", {"path": "/card/code/get", "errcode": 45009, "count": 2})
    assert reply.json()["errcode"] == 0
    codes = [call(fake_weixin, "card/code/get", token, {"code": "1"})["errcode"] for _ in range(3)]
    assert codes == [45009, 45009, 40056]
    stats = requests.get(f"{fake_weixin.url}/sandbox/stats", timeout=5).json()["calls"]
    assert stats == {"/cgi-bin/stable_token": 1, "/card/code/get": 3}
    assert sandbox(fake_weixin, "faults", {"path": "/card/code/get", "count": 0}).status_code == 400


def test_latency_and_dropped_connections(fake_weixin: FakeWeixin) -> None:
    """latency_ms delays the reply; drop closes the connection with no reply at all."""
    fake_weixin.inject_fault("cgi-bin/stable_token", latency_ms=300)
    started = time.monotonic()
    token_for(fake_weixin)
    assert time.monotonic() - started >= 0.3
    fake_weixin.inject_fault("/card/code/get", drop=True)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{fake_weixin.url}/card/code/get", json={"code": "1"}, timeout=5)
    fake_weixin.inject_fault("/card/code/get", http_status=503)
    assert requests.post(f"{fake_weixin.url}/card/code/get", json={"code": "1"}, timeout=5).status_code == 503


def test_raw_reply_fault_over_http(fake_weixin: FakeWeixin) -> None:
    """raw / raw_base64: the next N calls get exactly that body, with http_status or 200; then Weixin again."""
    body = '{"errcode": 1e999, "errmsg": "不是"}'
    reply = sandbox(fake_weixin, "faults", {"path": "/card/code/get", "raw": body, "count": 2})
    assert reply.json()["errcode"] == 0
    for _ in range(2):
        answer = requests.post(f"{fake_weixin.url}/card/code/get", json={"code": "1"}, timeout=5)
        assert (answer.status_code, answer.content) == (200, body.encode("utf-8"))
        assert answer.headers["Content-Length"] == str(len(body.encode("utf-8")))
    assert requests.post(f"{fake_weixin.url}/card/code/get", json={"code": "1"}, timeout=5).json()["errcode"] == 41001
    not_utf8 = b'{"code": "\xff\xed\xa0\x80"}'
    sandbox(fake_weixin, "faults", {"path": "/card/code/decrypt", "raw_base64": base64.b64encode(not_utf8).decode(),
                                    "http_status": 502, "content_encoding": "gzip"})  # fmt: skip
    answer = requests.post(f"{fake_weixin.url}/card/code/decrypt", json={}, timeout=5, stream=True)
    assert answer.status_code == 502 and answer.headers["Content-Encoding"] == "gzip"
    assert answer.raw.read(decode_content=False) == not_utf8  # as sent: labelled gzip, not encoded
    assert fake_weixin.calls("/card/code/get") == 3 and fake_weixin.calls("/card/code/decrypt") == 1


def test_raw_reply_can_be_chunked(fake_weixin: FakeWeixin) -> None:
    """chunked: the raw body streams with no Content-Length, as an upstream that never says how long it is."""
    raw = b"x" * 300_000
    fake_weixin.inject_fault("/card/code/get", raw=raw, chunked=True)
    connection = http.client.HTTPConnection("127.0.0.1", fake_weixin.port, timeout=5)
    try:
        connection.request("POST", "/card/code/get", body=b"{}")
        answer = connection.getresponse()
        assert answer.getheader("Transfer-Encoding") == "chunked" and answer.getheader("Content-Length") is None
        assert answer.read() == raw
    finally:
        connection.close()


@pytest.mark.parametrize("fault", [
    {"raw": 5},
    {"raw": "x", "raw_base64": "eA=="},
    {"raw_base64": "not base64!"},
    {"raw_base64": 5},
    {"raw": "\ud800"},  # no UTF-8 for it: raw_base64 sends any bytes
    {"chunked": True},
    {"content_encoding": "gzip"},
    {"raw": "x", "content_encoding": "gzip\r\nX-Injected: 1"},
])
def test_raw_reply_fault_arguments_are_checked(fake_weixin: FakeWeixin, fault: dict[str, Any]) -> None:
    """A raw fault that cannot be sent as asked is refused (400, 40097), and nothing is queued."""
    reply = sandbox(fake_weixin, "faults", {"path": "/card/code/get", **fault})
    assert (reply.status_code, reply.json()["errcode"]) == (400, 40097)
    assert fake_weixin.state.faults == {}


def test_raw_reply_fault_in_process(fake_weixin: FakeWeixin) -> None:
    """inject_fault(raw=bytes) sends any bytes; its arguments are checked as over HTTP."""
    fake_weixin.inject_fault("/card/code/get", raw=b"\x00\xff", http_status=404)
    answer = requests.post(f"{fake_weixin.url}/card/code/get", json={}, timeout=5)
    assert (answer.status_code, answer.content) == (404, b"\x00\xff")
    with pytest.raises(FakeWeixinError) as caught:
        fake_weixin.inject_fault("/card/code/get", chunked=True)
    assert caught.value.errcode == 40097


def test_an_applied_fault_makes_the_change_then_answers_with_the_fault(fake_weixin: FakeWeixin) -> None:
    """applied: the card is created, then the answer is the fault's (here a 502); alone it is refused."""
    token = token_for(fake_weixin)
    sandbox(fake_weixin, "faults", {"path": "/card/create", "applied": True, "http_status": 502})
    answer = requests.post(f"{fake_weixin.url}/card/create", params={"access_token": token},
                           json={"card": {"card_type": "GROUPON", "groupon": {"base_info": {}}}}, timeout=5)
    assert answer.status_code == 502 and len(fake_weixin.state.cards) == 1
    refused = sandbox(fake_weixin, "faults", {"path": "/card/create", "applied": True})
    assert (refused.status_code, refused.json()["errcode"]) == (400, 40097)


def test_connections_are_kept_alive(fake_weixin: FakeWeixin) -> None:
    """HTTP/1.1 keep-alive: two calls are answered on one connection, which stays open."""
    connection = http.client.HTTPConnection("127.0.0.1", fake_weixin.port, timeout=5)
    try:
        answers = []
        for _ in range(2):
            connection.request("POST", "/card/code/get", body=b'{"code": "1"}')
            answer = connection.getresponse()
            answers.append((answer.status, json.loads(answer.read())["errcode"], answer.will_close))
            if len(answers) == 1:
                first_socket = connection.sock
        assert first_socket is not None and connection.sock is first_socket  # not reconnected
    finally:
        connection.close()
    assert answers == [(200, 41001, False), (200, 41001, False)]  # access_token missing, connection kept
    assert fake_weixin.calls("/card/code/get") == 2


def test_dropped_connection_on_a_kept_alive_connection(fake_weixin: FakeWeixin) -> None:
    """A drop fault cuts the pooled connection itself: no reply, a connection error; the next call reconnects."""
    with requests.Session() as session:
        assert session.post(f"{fake_weixin.url}/card/code/get", json={"code": "1"}, timeout=5).status_code == 200
        fake_weixin.inject_fault("/card/code/get", drop=True)
        with pytest.raises(requests.ConnectionError) as caught:
            session.post(f"{fake_weixin.url}/card/code/get", json={"code": "1"}, timeout=5)
        assert "RemoteDisconnected" in repr(caught.value) or "reset" in repr(caught.value).lower()
        assert session.post(f"{fake_weixin.url}/card/code/get", json={"code": "1"}, timeout=5).status_code == 200
    assert fake_weixin.calls("/card/code/get") == 3  # the dropped call reached the fake once


def test_stop_releases_the_port_and_closes_kept_alive_connections() -> None:
    """stop(): an idle kept-alive connection is closed and the port refuses new ones."""
    fake = FakeWeixin().start()
    port = fake.port
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        idle.request("GET", "/sandbox/stats")
        assert idle.getresponse().read()
        assert idle.sock is not None
        fake.stop()
        assert idle.sock.recv(1) == b""  # the server closed it
    finally:
        idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_taken_port_fails_at_start(fake_weixin: FakeWeixin) -> None:
    """Starting a second fake on a port in use raises OSError (the command reports it), leaving no threads."""
    threads = threading.active_count()
    with pytest.raises(OSError):
        FakeWeixin(port=fake_weixin.port).start()
    assert threading.active_count() == threads


def test_foreground_fake_logs_each_request_without_the_query(caplog: pytest.LogCaptureFixture) -> None:
    """quiet=False (the fake-weixin command) logs method, path and status, never the access_token."""
    caplog.set_level(logging.INFO, logger="workers.fake_weixin")
    with FakeWeixin(quiet=False) as fake:
        token = token_for(fake)
        call(fake, "card/code/get", token, {"code": "1"})
    assert "POST /card/code/get 200" in caplog.text
    assert token not in caplog.text


def test_reset_forgets_everything(fake_weixin: FakeWeixin) -> None:
    """POST /sandbox/reset drops tokens, codes, faults and counts."""
    token = token_for(fake_weixin)
    fake_weixin.add_card("pCard", "oUser")
    fake_weixin.inject_fault("/card/code/get", errcode=-1, count=5)
    assert sandbox(fake_weixin, "reset", {}).json()["errcode"] == 0
    assert fake_weixin.stats() == {} and fake_weixin.state.codes == {}
    assert call(fake_weixin, "card/code/get", token, {"code": "1"})["errcode"] == 40001


# -- pushes --------------------------------------------------------------------------------


class Receiver:
    """A tiny real merchant endpoint: verifies each push with open_push, can fail on purpose."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.tries = 0
        self.fail_first = 0  # answer HTTP 500 to this many tries
        self.delay = 0.0  # seconds before answering
        self.lock = threading.Lock()
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, self.app, threaded=True,
                                                  request_handler=_Quiet)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/wx"

    def app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point."""
        return self.handle(Request(environ))(environ, start_response)

    def handle(self, request: Request) -> Response:
        with self.lock:
            self.tries += 1
            failing = self.tries <= self.fail_first
        time.sleep(self.delay)
        opened = open_push(dict(request.args), request.get_data(), PUSH_SETTINGS)  # raises if not genuine
        assert opened.mode == "safe"
        if failing:
            return Response("busy", status=500)
        with self.lock:
            self.received.append(opened.fields)
        return Response("success")


class _Quiet(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A push receiver on a loopback port."""
    rec = Receiver()
    rec.thread.start()
    try:
        yield rec
    finally:
        rec.server.shutdown()
        rec.server.server_close()


def pushing_fake(receiver: Receiver, **options: Any) -> FakeWeixin:
    """A fake Weixin pushing to `receiver` with short timeouts suited to tests."""
    options.setdefault("push_timeout", 0.5)
    return FakeWeixin(appid=APPID, appsecret=SECRET, push_to=receiver.url, token=TOKEN,
                      aes_key=PUSH_SETTINGS.aes_key, original_id="gh_fa4e0000aaaa", **options).start()


def test_sandbox_actions_push_matching_events(receiver: Receiver) -> None:
    """Each user action pushes its event, signed and encrypted in safe mode, with the real fields."""
    fake = pushing_fake(receiver)
    try:
        added = fake.add_card("pCardPush", "oGiver", outer_str="poster9", unionid="uUnion1")
        other = fake.add_card("pCardPush", "oGiver")
        given = fake.gift_card("pCardPush", added["code"], "oFriend")
        fake.consume_card("pCardPush", given["code"])
        fake.delete_card("pCardPush", other["code"])
        deliveries = fake.wait_for_pushes(6, timeout=10)
    finally:
        fake.stop()
    assert [d["state"] for d in deliveries] == ["delivered"] * 6
    assert all(len(d["attempts"]) == 1 for d in deliveries)
    got, got2, gifting, regot, consumed, deleted = receiver.received
    assert [f["Event"] for f in receiver.received] == [
        "user_get_card", "user_get_card", "user_gifting_card", "user_get_card", "user_consume_card", "user_del_card",
    ]
    assert got["ToUserName"] == "gh_fa4e0000aaaa" and got["FromUserName"] == "oGiver"
    assert (got["CardId"], got["UserCardCode"], got["OuterStr"]) == ("pCardPush", added["code"], "poster9")
    assert str(got["IsGiveByFriend"]) == "0" and got["UnionId"] == "uUnion1"
    assert (gifting["UserCardCode"], gifting["FriendUserName"]) == (added["code"], "oFriend")
    assert regot["FromUserName"] == "oFriend" and str(regot["IsGiveByFriend"]) == "1"
    assert (regot["UserCardCode"], regot["OldUserCardCode"], regot["FriendUserName"]) == (
        given["code"], added["code"], "oGiver")
    assert (consumed["UserCardCode"], consumed["FromUserName"]) == (given["code"], "oFriend")
    assert deleted["UserCardCode"] == other["code"]


def test_activation_form_pushes_submit_membercard_user_info(receiver: Receiver) -> None:
    """Submitting the activation form pushes submit_membercard_user_info for the code."""
    fake = pushing_fake(receiver)
    try:
        added = fake.add_card("pCardForm", "oMember")
        fake.submit_activation_form("pCardForm", added["code"])
        fake.wait_for_pushes(2, timeout=10)
    finally:
        fake.stop()
    assert receiver.received[1]["Event"] == "submit_membercard_user_info"
    assert receiver.received[1]["UserCardCode"] == added["code"]


def test_failed_push_is_retried_up_to_three_tries(receiver: Receiver) -> None:
    """A receiver failing twice gets the event on the third try; GET /sandbox/pushes shows the tries."""
    receiver.fail_first = 2
    fake = pushing_fake(receiver)
    try:
        fake.add_card("pCardRetry", "oUser")
        fake.wait_for_pushes(1, timeout=10)
        report = requests.get(f"{fake.url}/sandbox/pushes", timeout=5).json()
    finally:
        fake.stop()
    (delivery,) = report["pushes"]
    assert delivery["state"] == "delivered" and delivery["event"] == "user_get_card"
    assert [a["status"] for a in delivery["attempts"]] == [500, 500, 200]
    assert receiver.tries == 3 and len(receiver.received) == 1


def test_push_given_up_after_three_tries(receiver: Receiver) -> None:
    """A receiver that always fails sees exactly three tries; the delivery is reported failed."""
    receiver.fail_first = 100
    fake = pushing_fake(receiver)
    try:
        fake.add_card("pCardLost", "oUser")
        (delivery,) = fake.wait_for_pushes(1, timeout=10)
    finally:
        fake.stop()
    assert delivery["state"] == "failed" and len(delivery["attempts"]) == 3
    assert receiver.tries == 3 and receiver.received == []


def test_slow_receiver_counts_as_a_failed_try(receiver: Receiver) -> None:
    """No answer within the push timeout is a failed try, as Weixin's 5 s rule (shortened here)."""
    receiver.delay = 0.4
    fake = pushing_fake(receiver, push_timeout=0.2)
    try:
        fake.add_card("pCardSlow", "oUser")
        (delivery,) = fake.wait_for_pushes(1, timeout=10)
    finally:
        fake.stop()
    assert delivery["state"] == "failed"
    assert [a["error"] for a in delivery["attempts"]] == ["ReadTimeout"] * 3


def test_pushes_are_asynchronous(receiver: Receiver) -> None:
    """A sandbox action returns before its push is delivered (Weixin pushes in the background)."""
    receiver.delay = 0.5
    fake = pushing_fake(receiver, push_timeout=2.0)
    try:
        started = time.monotonic()
        reply = sandbox(fake, "add-card", {"card_id": "pCardAsync", "openid": "oUser"}).json()
        assert time.monotonic() - started < 0.4 and reply["push_ids"] == [1]
        fake.wait_for_pushes(1, timeout=10)
    finally:
        fake.stop()
    assert len(receiver.received) == 1


def test_push_to_requires_the_account_keys() -> None:
    """push_to without token or AES key is refused at construction."""
    with pytest.raises(ValueError, match="aes_key"):
        FakeWeixin(push_to="http://127.0.0.1:9/wx", token=TOKEN)


# -- the command -----------------------------------------------------------------------------


def test_fake_weixin_command_serves_until_interrupted() -> None:
    """`fake-weixin --port 0` prints its URL, serves the account from the environment, stops on Ctrl-C."""
    env = {**os.environ, "WECHAT_TOKEN": TOKEN, "WECHAT_APPID": APPID, "WECHAT_APPSECRET": SECRET,
           "WECHAT_AES_KEY": AES_KEY}
    code = "from workers.cli.fake import fake_weixin; fake_weixin()"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--token-ttl", "90"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        account = {"grant_type": "client_credential", "appid": APPID, "secret": SECRET}
        assert requests.get(f"{url}/cgi-bin/token", params=account, timeout=5).json()["expires_in"] == 90
        assert requests.get(f"{url}/sandbox/stats", timeout=5).json()["calls"] == {"/cgi-bin/token": 1}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
