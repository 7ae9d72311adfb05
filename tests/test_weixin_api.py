"""WeixinClient over real HTTP against the fake Weixin, with tokens shared through real Redis."""
from __future__ import annotations

import gzip
import io
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest
import redis
import requests
import trustme

from tests.weixin_fixtures import make_weixin_client
from webhook import weixin_api
from webhook.config import ConfigError, Settings
from workers.fake_weixin import FakeWeixin
from webhook.weixin_api import (
    ERRCODE_BAD_RESPONSE,
    ERRCODE_HTTP,
    AmbiguousTimeoutError,
    CardUnavailableError,
    CodeConsumedError,
    InvalidCodeError,
    QuotaError,
    TicketExpiredError,
    TokenError,
    TransientWeixinError,
    WeixinAPIError,
    WeixinClient,
)

MEMBER_CARD = {
    "card_type": "MEMBER_CARD",
    "member_card": {
        "base_info": {"title": "会员卡", "custom_app_brand_user_name": "gh_86a091e50ad4@app",
                      "custom_app_brand_pass": "API/cardPage"},
        "wx_activate": True,
        "wx_activate_after_submit": True,
    },
}


class SleepRecorder:
    """Stands in for time.sleep: records the backoff delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# -- each API wrapper -------------------------------------------------------------


def test_decrypt_code_returns_the_real_code(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """card/code/decrypt turns the encrypted code wx.addCard hands out into the real one."""
    added = fake_weixin.add_card("pCardDecrypt", "oUser1")
    assert added["encrypt_code"] != added["code"]
    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]


def test_decrypt_unknown_code_is_invalid_code(weixin_client: WeixinClient) -> None:
    """An encrypt_code Weixin never issued maps to InvalidCodeError (40056)."""
    with pytest.raises(InvalidCodeError) as caught:
        weixin_client.decrypt_code("bm90IGEgcmVhbCBjb2RlIGF0IGFsbCEhISEhISEhISE=")
    assert caught.value.errcode == 40056


def test_get_code_reports_holder_and_status(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """card/code/get: holder and status; check_consume turns bad statuses into typed errors."""
    kept = fake_weixin.add_card("pCardGet", "oHolder", outer_str="shop7")
    used = fake_weixin.add_card("pCardGet", "oHolder")
    gone = fake_weixin.add_card("pCardGet", "oHolder")
    fake_weixin.consume_card("pCardGet", used["code"])
    fake_weixin.delete_card("pCardGet", gone["code"])

    reply = weixin_client.get_code(kept["code"], card_id="pCardGet")
    assert reply["openid"] == "oHolder"
    assert reply["card"]["card_id"] == "pCardGet"
    assert reply["user_card_status"] == "NORMAL" and reply["can_consume"] is True
    assert reply["outer_str"] == "shop7"
    assert weixin_client.get_code(used["code"])["user_card_status"] == "CONSUMED"
    with pytest.raises(CodeConsumedError):
        weixin_client.get_code(used["code"], check_consume=True)
    with pytest.raises(CardUnavailableError):
        weixin_client.get_code(gone["code"], check_consume=True)
    with pytest.raises(InvalidCodeError):
        weixin_client.get_code("000000000000")
    with pytest.raises(InvalidCodeError):
        weixin_client.get_code(kept["code"], card_id="pAnotherCard")


def test_member_card_activation_flow(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """create, form, geturl, temp info, activate and update, each through its wrapper."""
    card_id = weixin_client.create_card(MEMBER_CARD)
    assert card_id.startswith("p") and len(card_id) == 28
    form = {"card_id": card_id, "required_form": {"can_modify": False,
                                                   "common_field_id_list": ["USER_FORM_INFO_FLAG_MOBILE"]}}
    assert weixin_client.set_activate_user_form(form)["errcode"] == 0
    assert fake_weixin.state.cards[card_id].user_form == {"required_form": form["required_form"]}

    url = weixin_client.get_activate_url(card_id, outer_str="poster 1")
    query = parse_qs(urlsplit(url).query)  # parse_qs URL-decodes, as the plug-in needs
    assert fake_weixin.state.decrypt(query["encrypt_card_id"][0]) == card_id
    assert query["outer_str"] == ["poster 1"] and query["biz"][0].endswith("==")
    assert "%3D" in url  # the URL carries its parameters URL-encoded

    added = fake_weixin.add_card(card_id, "oMember")
    fields = [{"name": "USER_FORM_INFO_FLAG_MOBILE", "value": "15500000000"}]
    extra = fake_weixin.submit_activation_form(card_id, added["code"], common_field_list=fields)
    assert weixin_client.decrypt_code(extra["encrypt_code"]) == added["code"]
    info = weixin_client.get_activate_temp_info(extra["activate_ticket"])["info"]
    assert info["common_field_list"] == fields

    weixin_client.activate_member_card(membership_number="M0001", code=added["code"], card_id=card_id,
                                       init_bonus=100)
    held = weixin_client.get_code(added["code"], card_id=card_id)
    assert held["membership_number"] == "M0001" and held["bonus"] == 100
    assert held["user_info"]["common_field_list"] == fields

    reply = weixin_client.update_card(card_id, {"member_card": {"base_info": {"custom_app_brand_pass": "pages/new"}}})
    assert reply["send_check"] is False
    base_info = fake_weixin.state.cards[card_id].definition["member_card"]["base_info"]
    assert base_info["custom_app_brand_pass"] == "pages/new" and base_info["title"] == "会员卡"


def test_activate_requires_its_fields(weixin_client: WeixinClient) -> None:
    """activate_member_card refuses to send a request missing membership_number or code."""
    with pytest.raises(ValueError, match="membership_number"):
        weixin_client.activate_member_card(code="123")


def test_expired_activate_ticket_is_ticket_expired(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """An activate_ticket past its lifetime maps to TicketExpiredError (72012)."""
    added = fake_weixin.add_card("pCardTicket", "oMember")
    extra = fake_weixin.submit_activation_form("pCardTicket", added["code"], expires_in=0)
    with pytest.raises(TicketExpiredError) as caught:
        weixin_client.get_activate_temp_info(extra["activate_ticket"])
    assert caught.value.errcode == 72012


# -- tokens and tickets: cached, shared, refreshed once -------------------------------


def test_token_and_ticket_are_cached_in_redis(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, redis_client: redis.Redis,
) -> None:
    """One token and one ticket fetch serve many calls; both expire from Redis before Weixin's."""
    added = fake_weixin.add_card("pCardCache", "oUser")
    for _ in range(3):
        weixin_client.decrypt_code(added["encrypt_code"])
        weixin_client.get_card_api_ticket()
    assert fake_weixin.calls("/cgi-bin/stable_token") == 1
    assert fake_weixin.calls("/cgi-bin/ticket/getticket") == 1
    for key in (weixin_client.access_token_key, weixin_client.card_ticket_key):
        assert 7200 - 300 - 5 <= redis_client.ttl(key) <= 7200 - 300
    assert fake_weixin.appid in weixin_client.access_token_key


def test_token_is_shared_by_clients(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """A second client (as in another worker) reuses the first one's token from Redis."""
    first = make_weixin_client(fake_weixin, redis_client)
    second = make_weixin_client(fake_weixin, redis.Redis(connection_pool=redis_client.connection_pool))
    assert first.get_access_token() == second.get_access_token()
    assert fake_weixin.calls("/cgi-bin/stable_token") == 1


CHILD = r"""
import sys
import redis
from webhook.weixin_api import WeixinClient

api_base, appid, secret, redis_url = sys.argv[1:5]
client = WeixinClient(api_base, appid, secret, redis.Redis.from_url(redis_url), timeout=5.0)
print("ready", flush=True)
sys.stdin.readline()
print(client.get_access_token(), flush=True)
"""


def test_two_processes_cause_exactly_one_refresh(fake_weixin: FakeWeixin, redis_url: str) -> None:
    """Two OS processes asking for a token at once: one fetches it, the other waits and reuses it."""
    # A slow token endpoint makes the two requests overlap if both were sent.
    fake_weixin.inject_fault("/cgi-bin/stable_token", latency_ms=500, count=2)
    args = [sys.executable, "-c", CHILD, fake_weixin.url, fake_weixin.appid, fake_weixin.appsecret, redis_url]
    children = [subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:  # release both as close together as possible
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        tokens = [child.communicate(timeout=15)[0].strip() for child in children]
    finally:
        for child in children:
            child.kill() if child.poll() is None else None
    assert [child.returncode for child in children] == [0, 0]
    assert tokens[0] and tokens[0] == tokens[1]
    assert fake_weixin.calls("/cgi-bin/stable_token") == 1


def test_token_not_latest_is_refreshed_once_and_retried(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """40001 after a force_refresh elsewhere: the client refreshes once, retries once, succeeds."""
    added = fake_weixin.add_card("pCard40001", "oUser")
    old = weixin_client.get_access_token()
    reply = requests.post(f"{fake_weixin.url}/cgi-bin/stable_token", json={
        "grant_type": "client_credential", "appid": fake_weixin.appid, "secret": fake_weixin.appsecret,
        "force_refresh": True,
    }, timeout=5).json()
    assert reply["access_token"] != old  # the cached token is now "not latest"

    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]
    assert fake_weixin.calls("/card/code/decrypt") == 2  # the refusal, then the retry
    assert fake_weixin.calls("/cgi-bin/stable_token") == 3  # first fetch, force_refresh, one refresh
    assert weixin_client.get_access_token() == reply["access_token"]


def test_cgi_bin_token_mode_recovers_when_another_fetch_replaced_it(
    fake_weixin: FakeWeixin, redis_client: redis.Redis,
) -> None:
    """With the cgi-bin/token endpoint, a fetch by anyone else invalidates ours: one refresh fixes it."""
    client = make_weixin_client(fake_weixin, redis_client, token_endpoint="token")
    added = fake_weixin.add_card("pCardToken", "oUser")
    client.get_access_token()
    requests.get(f"{fake_weixin.url}/cgi-bin/token", params={
        "grant_type": "client_credential", "appid": fake_weixin.appid, "secret": fake_weixin.appsecret,
    }, timeout=5)
    assert client.get_code(added["code"])["openid"] == "oUser"
    assert fake_weixin.calls("/cgi-bin/token") == 3
    assert fake_weixin.calls("/card/code/get") == 2


def test_persistent_token_error_is_raised_without_looping(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """A token refused again after the refresh is raised: one refresh, two calls, no loop."""
    added = fake_weixin.add_card("pCardLoop", "oUser")
    fake_weixin.inject_fault("/card/code/get", errcode=40001, count=10)
    with pytest.raises(TokenError) as caught:
        weixin_client.get_code(added["code"])
    assert caught.value.errcode == 40001
    assert fake_weixin.calls("/card/code/get") == 2
    assert fake_weixin.calls("/cgi-bin/stable_token") == 2


def test_refresh_is_skipped_when_another_process_already_refreshed(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, redis_client: redis.Redis,
) -> None:
    """Invalidating a token that is no longer the cached one reuses the cached one, fetching nothing."""
    weixin_client.get_access_token()
    redis_client.set(weixin_client.access_token_key, "FAKESTABLE_refreshed-by-another-process", ex=600)
    assert weixin_client.invalidate_access_token("FAKESTABLE_the-one-that-failed") == (
        "FAKESTABLE_refreshed-by-another-process"
    )
    assert fake_weixin.calls("/cgi-bin/stable_token") == 1


def test_expired_token_in_cache_is_refreshed(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """42001 (expired at Weixin, still cached here) is recovered like 40001."""
    added = fake_weixin.add_card("pCard42001", "oUser")
    weixin_client.get_access_token()
    real_clock = fake_weixin.state.clock
    fake_weixin.state.clock = lambda: real_clock() + 7201  # Weixin's clock moves past the expiry
    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]
    assert fake_weixin.calls("/cgi-bin/stable_token") == 2


def test_token_is_kept_in_process_for_a_few_seconds(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls reuse the token read from Redis without reading it again, until LOCAL_CACHE_SECONDS pass."""
    monkeypatch.setattr(weixin_api, "LOCAL_CACHE_SECONDS", 0.3)
    added = fake_weixin.add_card("pCardLocal", "oUser")
    weixin_client.decrypt_code(added["encrypt_code"])
    redis_client.delete(weixin_client.access_token_key)
    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]  # the process's copy
    assert fake_weixin.calls("/cgi-bin/stable_token") == 1
    time.sleep(0.4)
    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]  # copy due: Redis is empty
    assert fake_weixin.calls("/cgi-bin/stable_token") == 2


def test_token_copy_never_outlives_the_redis_key(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """A token read from Redis just before its key expires is not used past that expiry."""
    first = make_weixin_client(fake_weixin, redis_client)
    token = first.get_access_token()
    redis_client.set(first.access_token_key, token, px=200)  # as if it were about to expire
    second = make_weixin_client(fake_weixin, redis.Redis(connection_pool=redis_client.connection_pool))
    assert second.get_access_token() == token
    time.sleep(0.3)
    assert second.get_access_token() == token  # stable_token repeats it, but it had to be fetched again
    assert fake_weixin.calls("/cgi-bin/stable_token") == 2


def test_token_replaced_by_another_process_is_picked_up_after_one_refusal(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, redis_client: redis.Redis,
) -> None:
    """Another process refreshed the token meanwhile: this client's copy is refused once, then Redis has the new one."""
    added = fake_weixin.add_card("pCardReplaced", "oUser")
    old = weixin_client.get_access_token()
    new = requests.post(f"{fake_weixin.url}/cgi-bin/stable_token", json={
        "grant_type": "client_credential", "appid": fake_weixin.appid, "secret": fake_weixin.appsecret,
        "force_refresh": True,
    }, timeout=5).json()["access_token"]
    redis_client.set(weixin_client.access_token_key, new, ex=600)  # what the other process stored
    assert new != old
    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]
    assert fake_weixin.calls("/card/code/decrypt") == 2  # the stale copy's 40001, then the retry
    assert fake_weixin.calls("/cgi-bin/stable_token") == 2  # no fetch of our own: Redis had it
    assert weixin_client.get_access_token() == new


def test_calls_reuse_one_connection(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """Sequential calls go over one kept-alive connection to the fake, not one connection each."""
    added = fake_weixin.add_card("pCardKeepAlive", "oUser")
    for _ in range(5):
        assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]
    connected = [conn for conn in psutil.Process().net_connections(kind="tcp")
                 if conn.raddr and conn.raddr.port == fake_weixin.port and conn.status == psutil.CONN_ESTABLISHED]
    assert len(connected) == 1


# -- transient failures, quota, timeouts ------------------------------------------------


def test_system_busy_is_retried_with_exponential_backoff(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """-1 twice then success: three calls, two growing jittered sleeps within their bounds."""
    sleeps = SleepRecorder()
    client = make_weixin_client(fake_weixin, redis_client, backoff_base=0.1, backoff_max=1.0, sleep=sleeps)
    added = fake_weixin.add_card("pCardBusy", "oUser")
    fake_weixin.inject_fault("/card/code/decrypt", errcode=-1, count=2)
    assert client.decrypt_code(added["encrypt_code"]) == added["code"]
    assert fake_weixin.calls("/card/code/decrypt") == 3
    first, second = sleeps.delays
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2


def test_system_busy_exhausts_the_bounded_retries(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """-1 on every try: TransientWeixinError after exactly retry_attempts calls."""
    sleeps = SleepRecorder()
    client = make_weixin_client(fake_weixin, redis_client, retry_attempts=3, sleep=sleeps)
    added = fake_weixin.add_card("pCardBusy", "oUser")
    fake_weixin.inject_fault("/card/code/get", errcode=-1, count=50)
    with pytest.raises(TransientWeixinError) as caught:
        client.get_code(added["code"])
    assert caught.value.errcode == -1
    assert fake_weixin.calls("/card/code/get") == 3
    assert len(sleeps.delays) == 2


@pytest.mark.parametrize("status", [502, 503, 408, 429])
def test_http_5xx_408_and_429_are_transient_and_retried(fake_weixin: FakeWeixin, weixin_client: WeixinClient,
                                                       status: int) -> None:  # fmt: skip
    """A 5xx from the gateway is retried like -1; so are 408 and 429 (Weixin's gateway or a proxy on the way
    turned the request away unread)."""
    added = fake_weixin.add_card(f"pCard{status}", "oUser")
    fake_weixin.inject_fault("/card/code/get", http_status=status, count=1)
    assert weixin_client.get_code(added["code"])["user_card_status"] == "NORMAL"
    assert fake_weixin.calls("/card/code/get") == 2


def test_other_http_4xx_is_permanent(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """A 403 (a proxy refusing us, say) is not cured by asking again: one call, WeixinAPIError."""
    added = fake_weixin.add_card("pCard403", "oUser")
    fake_weixin.inject_fault("/card/code/get", http_status=403, count=5)
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.get_code(added["code"])
    assert not isinstance(caught.value, TransientWeixinError)
    assert caught.value.errcode == ERRCODE_HTTP
    assert fake_weixin.calls("/card/code/get") == 1


def test_quota_is_not_retried(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """45009: QuotaError at once, one call, no backoff."""
    sleeps = SleepRecorder()
    client = make_weixin_client(fake_weixin, redis_client, sleep=sleeps)
    fake_weixin.inject_fault("/card/code/decrypt", errcode=45009, count=5)
    with pytest.raises(QuotaError) as caught:
        client.decrypt_code("anything")
    assert caught.value.errcode == 45009
    assert fake_weixin.calls("/card/code/decrypt") == 1
    assert sleeps.delays == []


def test_read_timeout_on_a_read_is_retried(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """A slow reply to an idempotent call times out and is simply asked again."""
    client = make_weixin_client(fake_weixin, redis_client, timeout=0.3)
    added = fake_weixin.add_card("pCardSlow", "oUser")
    client.get_access_token()
    fake_weixin.inject_fault("/card/code/get", latency_ms=800, count=1)
    started = time.monotonic()
    assert client.get_code(added["code"])["openid"] == "oUser"
    assert fake_weixin.calls("/card/code/get") == 2
    assert time.monotonic() - started < 2.0


def test_read_timeout_on_activate_is_not_retried(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """activate_member_card sent, reply too slow: AmbiguousTimeoutError, one call, applied once."""
    client = make_weixin_client(fake_weixin, redis_client, timeout=0.3)
    added = fake_weixin.add_card("pCardAmbiguous", "oUser")
    client.get_access_token()
    fake_weixin.inject_fault("/card/membercard/activate", latency_ms=800, count=1)
    with pytest.raises(AmbiguousTimeoutError) as caught:
        client.activate_member_card(membership_number="M1", code=added["code"], init_bonus=10)
    assert caught.value.errcode < 0
    time.sleep(0.7)  # let the slow reply finish on the server side
    assert fake_weixin.calls("/card/membercard/activate") == 1
    assert fake_weixin.state.codes[added["code"]].activations == 1


def test_dropped_connection_on_a_read_is_retried(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """A connection closed without a reply on decrypt: retried, then the code comes back."""
    added = fake_weixin.add_card("pCardDrop", "oUser")
    fake_weixin.inject_fault("/card/code/decrypt", drop=True, count=1)
    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]
    assert fake_weixin.calls("/card/code/decrypt") == 2


def test_dropped_connection_on_create_is_ambiguous(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """A connection closed after card/create was sent: AmbiguousTimeoutError, never resent."""
    fake_weixin.inject_fault("/card/create", drop=True, count=1)
    with pytest.raises(AmbiguousTimeoutError):
        weixin_client.create_card(MEMBER_CARD)
    assert fake_weixin.calls("/card/create") == 1


@pytest.mark.parametrize("answer", [
    {"http_status": 500}, {"http_status": 502}, {"http_status": 503}, {"http_status": 504},
    {"raw": "<html>bad gateway</html>"}, {"raw": '{"errcode": 0, "card_id": "p'},
], ids=["500", "502", "503", "504", "html", "cut-off"])
def test_a_write_answered_without_weixins_verdict_is_ambiguous(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, answer: dict[str, Any]
) -> None:
    """card/create made the card, then a 5xx or an unreadable reply came back: AmbiguousTimeoutError, never resent.

    Retrying it (as a 5xx of a read is) would create a second card.
    """
    fake_weixin.inject_fault("/card/create", applied=True, **answer)
    with pytest.raises(AmbiguousTimeoutError) as caught:
        weixin_client.create_card(MEMBER_CARD)
    assert "outcome unknown" in caught.value.errmsg
    assert fake_weixin.calls("/card/create") == 1 and len(fake_weixin.state.cards) == 1


@pytest.mark.parametrize("status", [408, 429])
def test_a_write_turned_away_unread_is_retried(fake_weixin: FakeWeixin, weixin_client: WeixinClient,
                                               status: int) -> None:  # fmt: skip
    """408 and 429 say the request was not acted on: even card/create is sent again, and made once."""
    fake_weixin.inject_fault("/card/create", http_status=status)
    card_id = weixin_client.create_card(MEMBER_CARD)
    assert fake_weixin.calls("/card/create") == 2 and list(fake_weixin.state.cards) == [card_id]


@contextmanager
def _peer(serve: Callable[[socket.socket], None]) -> Iterator[tuple[int, list[int]]]:
    """A loopback listener handing each connection to `serve`; yields its port and a connection count."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                serve(conn)
            except OSError:  # the client gave up (on the handshake, on a slow reply), as it should
                pass

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted.append(1)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _tls_client(port: int, redis_client: redis.Redis, sleeps: SleepRecorder) -> WeixinClient:
    client = WeixinClient(f"https://127.0.0.1:{port}", "wxtls", "secret", redis_client, timeout=2.0, sleep=sleeps)
    redis_client.set(client.access_token_key, "FAKESTABLE_cached", ex=60)
    return client


def test_a_refused_certificate_is_transient_even_for_writes(redis_client: redis.Redis) -> None:
    """A certificate the client does not trust fails the handshake, before the request: retried, boundedly."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_ctx)  # a CA no bundle holds

    def handshake(conn: socket.socket) -> None:
        server_ctx.wrap_socket(conn, server_side=True).close()

    sleeps = SleepRecorder()
    with _peer(handshake) as (port, accepted):
        client = _tls_client(port, redis_client, sleeps)
        with pytest.raises(TransientWeixinError) as caught:
            client.update_card("pCard", {"member_card": {}})
    assert "certificate refused (request not sent)" in caught.value.errmsg
    assert len(accepted) == client.retry_attempts and len(sleeps.delays) == client.retry_attempts - 1


def test_another_tls_error_is_ambiguous_for_a_write_and_retried_for_a_read(redis_client: redis.Redis) -> None:
    """Any other TLS error may come after the request went (on a kept-alive connection): a write is not resent."""

    def plain_http(conn: socket.socket) -> None:  # answers TLS with plain HTTP: not a certificate problem
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    sleeps = SleepRecorder()
    with _peer(plain_http) as (port, accepted):
        client = _tls_client(port, redis_client, sleeps)
        with pytest.raises(AmbiguousTimeoutError) as write:
            client.update_card("pCard", {"member_card": {}})
        assert len(accepted) == 1 and "TLS error after sending; outcome unknown" in write.value.errmsg
        with pytest.raises(TransientWeixinError) as read:
            client.get_code("123456789012")
    assert not isinstance(read.value, AmbiguousTimeoutError)
    assert len(accepted) == 1 + client.retry_attempts


def _trickle(conn: socket.socket) -> None:
    """Answers 200 at once, then its body a byte every 50 ms: each read is quick, the whole never ends in time."""
    conn.recv(65536)
    body = b'{"errcode": 0, "errmsg": "ok", "card": {}' + b" " * 200 + b"}"
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    for byte in body:
        conn.sendall(bytes([byte]))
        time.sleep(0.05)


def test_a_reply_trickled_past_its_deadline_is_given_up(redis_client: redis.Redis) -> None:
    """Each byte within the read timeout, the whole far past it: the read gives up at twice the timeout
    (connect and headers, then the body), a read is retried, a write is outcome unknown."""
    sleeps = SleepRecorder()
    with _peer(_trickle) as (port, accepted):
        client = WeixinClient(f"http://127.0.0.1:{port}", "wxslow", "secret", redis_client, timeout=0.3,
                              sleep=sleeps, retry_attempts=2)  # fmt: skip
        redis_client.set(client.access_token_key, "FAKESTABLE_cached", ex=60)
        with pytest.raises(TransientWeixinError) as read:
            client.get_code("123456789012")
        assert "reply too slow" in read.value.errmsg and len(accepted) == 2
        with pytest.raises(AmbiguousTimeoutError) as write:
            client.update_card("pCard", {"member_card": {}})
        assert "reply too slow after sending; outcome unknown" in write.value.errmsg and len(accepted) == 3


def test_refused_connection_is_transient_even_for_writes(redis_client: redis.Redis) -> None:
    """Nothing listening: the request never left, so even update_card is retried, boundedly."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # a port nobody listens on once the probe is closed
    sleeps = SleepRecorder()
    client = WeixinClient(f"http://127.0.0.1:{port}", "wxnobody", "secret", redis_client, timeout=1.0, sleep=sleeps)
    redis_client.set(client.access_token_key, "FAKESTABLE_cached", ex=60)
    with pytest.raises(TransientWeixinError) as caught:
        client.update_card("pCard", {"member_card": {}})
    assert "not sent" in caught.value.errmsg
    assert len(sleeps.delays) == 2



class _RecordingProxy:
    """A forwarding HTTP proxy on loopback: records each request line, relays it to the origin."""

    def __init__(self) -> None:
        import http.client
        import http.server
        import threading

        seen = self.request_lines = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                seen.append(self.requestline)
                target = urlsplit(self.path)  # a proxy gets the absolute URL
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
                upstream.request("POST", f"{target.path}?{target.query}", body=body,
                                 headers={"Content-Type": self.headers.get("Content-Type", "")})  # fmt: skip
                reply = upstream.getresponse()
                data = reply.read()
                upstream.close()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _clear_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_calls_go_through_the_environment_proxy_unless_no_proxy_covers_the_host(
    fake_weixin: FakeWeixin, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """http_proxy is honoured as requests honoured it (read once, when the client is made); no_proxy wins."""
    added = fake_weixin.add_card("pCardProxy", "oUser")
    proxy = _RecordingProxy()
    try:
        _clear_proxy_env(monkeypatch)
        monkeypatch.setenv("http_proxy", proxy.url)
        proxied = make_weixin_client(fake_weixin, redis_client)
        assert proxied.decrypt_code(added["encrypt_code"]) == added["code"]
        decrypts = [line for line in proxy.request_lines if "/card/code/decrypt" in line]
        assert len(decrypts) == 1 and decrypts[0].startswith(f"POST {fake_weixin.url}/card/code/decrypt?")

        monkeypatch.setenv("no_proxy", "127.0.0.1")
        before = len(proxy.request_lines)
        direct = make_weixin_client(fake_weixin, redis_client)
        assert direct.decrypt_code(added["encrypt_code"]) == added["code"]
        assert len(proxy.request_lines) == before
    finally:
        proxy.close()


def test_an_unreachable_proxy_is_transient_and_nothing_was_sent(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused by the proxy: the request never left, so even a write is retried (boundedly)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _clear_proxy_env(monkeypatch)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    sleeps = SleepRecorder()
    client = WeixinClient("http://api.weixin.invalid", "wxproxy", "secret", redis_client, timeout=1.0, sleep=sleeps)
    redis_client.set(client.access_token_key, "FAKESTABLE_cached", ex=60)
    with pytest.raises(TransientWeixinError) as caught:
        client.update_card("pCard", {"member_card": {}})
    assert "not sent" in caught.value.errmsg
    assert len(sleeps.delays) == 2

# -- what the client lets out ------------------------------------------------------------


def test_secrets_stay_out_of_errors_and_logs(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, caplog: pytest.LogCaptureFixture,
) -> None:
    """Errors and log lines carry path and errcode, never the token, the secret or a full code."""
    caplog.set_level(logging.DEBUG, logger="wxcoupon.weixin")
    added = fake_weixin.add_card("pCardSecret", "oUser")
    token = weixin_client.get_access_token()
    fake_weixin.inject_fault("/card/code/get", errcode=40097, count=1,
                             errmsg=f"echo {fake_weixin.appsecret} {token}")
    with pytest.raises(WeixinAPIError) as echoed:
        weixin_client.get_code(added["code"])
    fake_weixin.inject_fault("/card/code/decrypt", drop=True, count=3)
    with pytest.raises(TransientWeixinError) as dropped:
        weixin_client.decrypt_code(added["encrypt_code"])
    for exc in (echoed.value, dropped.value):
        rendered = "".join(traceback.format_exception(exc)) + repr(exc)
        for secret in (token, fake_weixin.appsecret, added["code"], added["encrypt_code"]):
            assert secret not in rendered
    assert caplog.records, "the failures were logged"
    for secret in (token, fake_weixin.appsecret, added["code"], added["encrypt_code"]):
        assert secret not in caplog.text


def test_wrong_secret_fails_clearly_without_retry(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """A wrong appsecret is a plain WeixinAPIError (40125) from the token fetch, sent once."""
    client = WeixinClient(fake_weixin.url, fake_weixin.appid, "wrong-secret", redis_client)
    with pytest.raises(WeixinAPIError) as caught:
        client.decrypt_code("x")
    assert caught.value.errcode == 40125 and "wrong-secret" not in str(caught.value)
    assert fake_weixin.calls("/cgi-bin/stable_token") == 1
    assert fake_weixin.calls("/card/code/decrypt") == 0


def test_from_settings(fake_weixin: FakeWeixin, redis_client: redis.Redis) -> None:
    """from_settings uses WECHAT_API_BASE and the account; a missing secret names the variable."""
    settings = Settings(token="tok123", appid=fake_weixin.appid, appsecret=fake_weixin.appsecret,
                        api_base=fake_weixin.url)
    client = WeixinClient.from_settings(settings, redis_client)
    assert client.api_base == fake_weixin.url and client.get_access_token()
    assert client.access_token_key.startswith(f"{settings.queue_prefix}:weixin:{fake_weixin.appid}:")
    with pytest.raises(ConfigError, match="WECHAT_APPSECRET"):
        WeixinClient.from_settings(settings.with_overrides(appsecret=None), redis_client)


# -- metrics ------------------------------------------------------------------------


def _calls(api: str, errcode: str) -> float:
    from webhook import metrics

    found = metrics.metrics().registry.get_sample_value("wxcoupon_weixin_api_calls_total", {"api": api, "errcode": errcode})
    return found or 0.0


def test_calls_and_token_refreshes_are_counted(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """Every exchange is counted by API path and errcode; a token refresh by its result."""
    from webhook import metrics

    registry = metrics.metrics().registry
    refreshes = registry.get_sample_value("wxcoupon_token_refreshes_total", {"result": "ok"}) or 0.0
    ok_before, bad_before = _calls("card/code/decrypt", "0"), _calls("card/code/decrypt", "40056")
    timed_before = registry.get_sample_value("wxcoupon_weixin_api_seconds_count", {"api": "card/code/decrypt"}) or 0.0

    added = fake_weixin.add_card("pCardMetrics", "oUser1")
    weixin_client.decrypt_code(added["encrypt_code"])
    with pytest.raises(InvalidCodeError):
        weixin_client.decrypt_code("bm90IGEgcmVhbCBjb2RlIGF0IGFsbCEhISEhISEhISE=")

    assert _calls("card/code/decrypt", "0") == ok_before + 1
    assert _calls("card/code/decrypt", "40056") == bad_before + 1
    assert registry.get_sample_value("wxcoupon_weixin_api_seconds_count", {"api": "card/code/decrypt"}) == timed_before + 2
    assert registry.get_sample_value("wxcoupon_token_refreshes_total", {"result": "ok"}) == refreshes + 1


def test_a_refused_connection_is_counted_as_network(redis_client: redis.Redis) -> None:
    """No errcode came back: the label says why instead of a made-up number."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    client = WeixinClient(f"http://127.0.0.1:{port}", "wxMetricsApp", "secret", redis_client, timeout=1.0,
                          retry_attempts=1)  # fmt: skip
    before = _calls("cgi-bin/stable_token", "network")
    refresh_errors = _refreshes("error")
    with pytest.raises(TransientWeixinError):
        client.get_access_token()
    assert _calls("cgi-bin/stable_token", "network") == before + 1
    assert _refreshes("error") == refresh_errors + 1


def _refreshes(result: str) -> float:
    from webhook import metrics

    return metrics.metrics().registry.get_sample_value("wxcoupon_token_refreshes_total", {"result": result}) or 0.0


# -- hostile replies: whatever comes back, the client's own error ---------------------------------------------

_BAD_REPLIES = [
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-past-the-parser"),  # was RecursionError
    pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="objects-nested-past-the-parser"),
    pytest.param(b'{"errcode": 0, "code": "1", "x": ' + b"[" * 40 + b"]" * 40 + b"}", id="nested-past-max-depth"),
    pytest.param(b'{"errcode": 1e999}', id="errcode-1e999"),  # was OverflowError
    pytest.param(b'{"errcode": -1e999}', id="errcode-minus-1e999"),
    pytest.param(b'{"errcode": Infinity}', id="errcode-Infinity"),
    pytest.param(b'{"errcode": NaN}', id="errcode-NaN"),
    pytest.param(b'{"errcode": 0, "code": "1", "x": NaN}', id="NaN-elsewhere"),
    pytest.param(b'{"errcode": 0, "code": "1", "x": 1e400}', id="float-out-of-range-elsewhere"),
    pytest.param(b'{"errcode": 0, "code": "1", "code": "2"}', id="duplicate-key"),
    pytest.param(b'{"errcode": 40001, "errcode": 0, "code": "1"}', id="duplicate-errcode"),
    pytest.param(b'{"errcode": null, "code": "1"}', id="errcode-null"),  # was read as 0: success
    pytest.param(b'{"errcode": false, "code": "1"}', id="errcode-false"),
    pytest.param(b'{"errcode": true, "code": "1"}', id="errcode-true"),
    pytest.param(b'{"errcode": "", "code": "1"}', id="errcode-empty-string"),
    pytest.param(b'{"errcode": "0", "code": "1"}', id="errcode-string-0"),
    pytest.param(b'{"errcode": "40001", "code": "1"}', id="errcode-string-40001"),
    pytest.param(b'{"errcode": [], "code": "1"}', id="errcode-list"),
    pytest.param(b'{"errcode": {}, "code": "1"}', id="errcode-object"),
    pytest.param(b'{"errcode": 0.5, "code": "1"}', id="errcode-float"),
    pytest.param(b'{"errcode": 40001.0}', id="errcode-integral-float"),
    pytest.param(b'{"errcode": 1099511627776}', id="errcode-past-32-bits"),
    pytest.param(b'{"errcode": -1002, "errmsg": "timeout?"}', id="errcode-of-this-client"),
    pytest.param(b"", id="empty"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'"ok"', id="string"),
    pytest.param(b"0", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"<html>bad gateway</html>", id="html"),
    pytest.param(b'{"errcode": 0, "code": "\xff1"}', id="invalid-utf8"),
    pytest.param(b'{"errcode": 0, "code": "\xed\xa0\x801"}', id="utf8-encoded-surrogate"),
    pytest.param('{"errcode": 0, "code": "1"}'.encode("utf-16"), id="utf16"),
    pytest.param(b'{"errcode": 0, "code": "1\\ud800"}', id="escaped-lone-surrogate"),
    pytest.param(b'{"errcode": 0, "code": "1", "x": ["\\udfff"]}', id="escaped-lone-surrogate-elsewhere"),
    pytest.param(b'{"errcode": 0, "code": 226009850808}', id="code-number"),
    pytest.param(b'{"errcode": 0, "code": ""}', id="code-empty"),
    pytest.param(b'{"errcode": 0, "code": "2260\\u00009850"}', id="code-with-NUL"),
    pytest.param(b'{"errcode": 0, "code": "2260\\n9850"}', id="code-with-newline"),
    pytest.param(b'{"errcode": 0, "code": "' + b"1" * 129 + b'"}', id="code-too-long"),
]


@pytest.mark.parametrize("raw", _BAD_REPLIES)
def test_unusable_reply_is_bad_response(fake_weixin: FakeWeixin, weixin_client: WeixinClient, raw: bytes) -> None:
    """Any reply the client cannot use whole is WeixinAPIError(ERRCODE_BAD_RESPONSE), like a reply that is no
    JSON: not retried, never a parser's exception or a value that breaks the caller later."""
    weixin_client.get_access_token()
    fake_weixin.inject_fault("/card/code/decrypt", raw=raw, count=5)
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.decrypt_code("anything")
    assert type(caught.value) is WeixinAPIError and caught.value.errcode == ERRCODE_BAD_RESPONSE
    assert fake_weixin.calls("/card/code/decrypt") == 1


def test_a_bad_reply_is_counted_and_logged_without_its_content(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, caplog: pytest.LogCaptureFixture,
) -> None:
    """Metrics label it bad_response; the log line names path and reason, never the reply or the token;
    a call that changes state is not sent again, and its outcome is unknown."""
    caplog.set_level(logging.DEBUG, logger="wxcoupon.weixin")
    token = weixin_client.get_access_token()
    before = _calls("card/membercard/activate", "bad_response")
    marker = "oPersonalOpenid0000SECRET"
    fake_weixin.inject_fault("/card/membercard/activate", count=5,
                             raw=f'{{"errcode": 1e999, "openid": "{marker}", "echo": "{token}"}}')  # fmt: skip
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.activate_member_card(membership_number="M1", code="226009850808")
    assert isinstance(caught.value, AmbiguousTimeoutError) and caught.value.errcode == ERRCODE_BAD_RESPONSE
    assert fake_weixin.calls("/card/membercard/activate") == 1
    assert _calls("card/membercard/activate", "bad_response") == before + 1
    assert "card/membercard/activate errcode=-1004: reply has a number out of range" in caplog.text
    rendered = "".join(traceback.format_exception(caught.value)) + caplog.text
    assert marker not in rendered and token not in rendered and "1e999" not in rendered


def test_errmsg_is_kept_only_as_plain_text(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """errmsg reaches stored results and the Mini Program: an object is dropped, control characters go."""
    weixin_client.get_access_token()
    fake_weixin.inject_fault("/card/code/get", raw=b'{"errcode": 40097, "errmsg": {"openid": "oLeaked"}}')
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.get_code("226009850808")
    assert caught.value.errcode == 40097 and caught.value.errmsg == ""
    fake_weixin.inject_fault("/card/code/get", raw=b'{"errcode": 40097, "errmsg": "bad\\u0000arg\\nrid: 1"}')
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.get_code("226009850808")
    assert caught.value.errcode == 40097 and caught.value.errmsg == "bad arg rid: 1"


# -- how much of a reply is read -----------------------------------------------------------------------------


def _padded_reply(size: int) -> bytes:
    """A valid decrypt reply of exactly `size` bytes."""
    head, tail = b'{"errcode": 0, "code": "226009850808", "pad": "', b'"}'
    return head + b" " * (size - len(head) - len(tail)) + tail


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_reply_longer_than_the_cap_is_refused(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, chunked: bool,
) -> None:
    """Past MAX_REPLY_BYTES a reply is not read on (with or without a Content-Length): bad response, and the
    next call, on a new connection, works."""
    added = fake_weixin.add_card("pCardHuge", "oUser")
    weixin_client.get_access_token()
    fake_weixin.inject_fault("/card/code/decrypt", raw=_padded_reply(weixin_api.MAX_REPLY_BYTES + 1), chunked=chunked)
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.decrypt_code(added["encrypt_code"])
    assert caught.value.errcode == ERRCODE_BAD_RESPONSE and "longer than" in caught.value.errmsg
    assert weixin_client.decrypt_code(added["encrypt_code"]) == added["code"]
    assert fake_weixin.calls("/card/code/decrypt") == 2


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_reply_of_exactly_the_cap_is_read(fake_weixin: FakeWeixin, weixin_client: WeixinClient, chunked: bool) -> None:
    """The cap is inclusive: MAX_REPLY_BYTES of valid JSON is an answer."""
    weixin_client.get_access_token()
    fake_weixin.inject_fault("/card/code/decrypt", raw=_padded_reply(weixin_api.MAX_REPLY_BYTES), chunked=chunked)
    assert weixin_client.decrypt_code("anything") == "226009850808"


def test_a_compressed_reply_is_not_expanded(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """The client asks for no compression; a gzip reply anyway (a few KiB that inflate past the cap) is
    refused as unreadable instead of inflated in memory."""
    weixin_client.get_access_token()
    bomb = gzip.compress(_padded_reply(weixin_api.MAX_REPLY_BYTES * 4))
    fake_weixin.inject_fault("/card/code/decrypt", raw=bomb, content_encoding="gzip")
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.decrypt_code("anything")
    assert caught.value.errcode == ERRCODE_BAD_RESPONSE


# -- credentials ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expires_in", [
    b"-5", b"0", b"86401", b"100000000000000000000", b"7200.5", b"7200.0", b'"7200"', b"true", b"null", b"[7200]",
])
def test_a_malformed_expires_in_is_bad_response(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, redis_client: redis.Redis, expires_in: bytes,
) -> None:
    """expires_in must be whole seconds in 1..MAX_EXPIRES_IN: nothing else is cached (a token kept for a
    second or forever, or a TTL Redis refuses); the refresh counts as an error."""
    errors = _refreshes("error")
    fake_weixin.inject_fault("/cgi-bin/stable_token", raw=b'{"access_token": "FAKESTABLE_x", "expires_in": '
                             + expires_in + b"}")  # fmt: skip
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.get_access_token()
    assert type(caught.value) is WeixinAPIError and caught.value.errcode == ERRCODE_BAD_RESPONSE
    assert redis_client.get(weixin_client.access_token_key) is None
    assert _refreshes("error") == errors + 1


def test_a_missing_expires_in_is_weixins_default(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, redis_client: redis.Redis,
) -> None:
    """A reply without expires_in gets Weixin's 7200 s (less the margin), as before."""
    fake_weixin.inject_fault("/cgi-bin/stable_token", raw=b'{"access_token": "FAKESTABLE_noexpiry"}')
    assert weixin_client.get_access_token() == "FAKESTABLE_noexpiry"
    assert 7200 - 300 - 5 <= redis_client.ttl(weixin_client.access_token_key) <= 7200 - 300


@pytest.mark.parametrize(("path", "raw"), [
    pytest.param("/cgi-bin/stable_token", b'{"access_token": "FAKE\\u0000STABLE", "expires_in": 7200}', id="token-NUL"),
    pytest.param("/cgi-bin/stable_token", b'{"access_token": "FAKE STABLE\\r\\nX: 1", "expires_in": 7200}',
                 id="token-CRLF"),
    pytest.param("/cgi-bin/stable_token", b'{"access_token": "' + b"T" * 2049 + b'", "expires_in": 7200}',
                 id="token-too-long"),
    pytest.param("/cgi-bin/stable_token", b'{"access_token": "FAKE\\udc00", "expires_in": 7200}',
                 id="token-lone-surrogate"),  # was UnicodeEncodeError from Redis
    pytest.param("/cgi-bin/stable_token", b'{"access_token": 12345, "expires_in": 7200}', id="token-number"),
    pytest.param("/cgi-bin/ticket/getticket", b'{"errcode": 0, "ticket": ["K1"], "expires_in": 7200}', id="ticket-list"),
    pytest.param("/cgi-bin/ticket/getticket", b'{"errcode": 0, "ticket": "K\\u00071", "expires_in": 7200}',
                 id="ticket-BEL"),
    pytest.param("/cgi-bin/ticket/getticket", b'{"errcode": 0, "ticket": "K1", "expires_in": -1}',
                 id="ticket-expires-in-negative"),
])
def test_a_malformed_credential_is_bad_response(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, redis_client: redis.Redis, path: str, raw: bytes,
) -> None:
    """A token or ticket that is not plain bounded text (it goes into URLs and Redis) is refused, not cached."""
    fake_weixin.inject_fault(path, raw=raw)
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.get_card_api_ticket()
    assert caught.value.errcode == ERRCODE_BAD_RESPONSE
    assert redis_client.get(weixin_client.access_token_key) is None or path.endswith("getticket")
    assert redis_client.get(weixin_client.card_ticket_key) is None


# -- the fields callers use ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    b'"openid": 5', b'"openid": "o\\u0000x"', b'"openid": {"id": "o"}', b'"user_card_status": ["NORMAL"]',
    b'"membership_number": 316510891298', b'"membership_number": {}', b'"nickname": 5', b'"sex": ["MALE"]',
    b'"bonus": 1e300', b'"bonus": 9223372036854775808', b'"bonus": "460"', b'"bonus": true', b'"balance": 1.5',
    b'"user_info": []', b'"user_info": {"common_field_list": 5}', b'"user_info": {"common_field_list": true}',
    b'"user_info": {"custom_field_list": [1]}', b'"user_info": {"common_field_list": [{"value": "x"}]}',
])
def test_card_code_get_fields_have_weixins_types(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, fields: bytes,
) -> None:
    """The fields the workers read and store (openid, status, membership, bonus, balance, user_info) are
    checked: a wrong type is a bad response, not a crash or a wrong row in the worker."""
    weixin_client.get_access_token()
    fake_weixin.inject_fault("/card/code/get", raw=b'{"errcode": 0, ' + fields + b"}")
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.get_code("226009850808")
    assert caught.value.errcode == ERRCODE_BAD_RESPONSE


def test_card_code_get_takes_weixins_own_reply(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """The documented member-card reply, nulls and unknown fields included, passes the checks unchanged."""
    weixin_client.get_access_token()
    raw = ('{"errcode": 0, "errmsg": "ok", "openid": "obLatjjwDxxxxdoGIdwNqRXw", "nickname": "Fourier",'
           ' "membership_number": "316510891298", "bonus": 460, "balance": null, "sex": "MALE",'
           ' "user_info": {"common_field_list": [{"name": "USER_FORM_INFO_FLAG_MOBILE", "value": "1552xxxx8888"}],'
           ' "custom_field_list": [{"name": "爱好", "value_list": ["a", "b"]}]},'
           ' "user_card_status": "NORMAL", "has_active": true, "new_field": {"x": [1.5, "😀", "\\ud83d\\ude00"]}}')
    fake_weixin.inject_fault("/card/code/get", raw=raw)
    assert weixin_client.get_code("316510891298") == json.loads(raw)


@pytest.mark.parametrize("info", [
    b"", b'"info": null,', b'"info": "x",', b'"info": [],', b'"info": {"common_field_list": {}},',
    b'"info": {"custom_field_list": [{"value_list": ["x"]}]},', b'"info": {"common_field_list": ["x"]},',
])
def test_activate_temp_info_needs_a_form(fake_weixin: FakeWeixin, weixin_client: WeixinClient, info: bytes) -> None:
    """activatetempinfo/get without a well-formed info is a bad response: the worker would have activated the
    card with an empty form."""
    weixin_client.get_access_token()
    fake_weixin.inject_fault("/card/membercard/activatetempinfo/get", raw=b'{' + info + b'"errcode": 0}')
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.get_activate_temp_info("ticket")
    assert caught.value.errcode == ERRCODE_BAD_RESPONSE


def test_client_lines_go_through_wxcoupons_handler(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, settings: Settings,
) -> None:
    """The client's log lines reach the service's handler (its format, redaction and context), not
    Python's last-resort stderr handler, which the client's logger under `webhook.` fell back to."""
    from webhook import logs

    logs.configure_logging(settings.log_format)
    [handler] = [h for h in logging.getLogger("wxcoupon").handlers
                 if any(isinstance(f, logs.ContextFilter) for f in h.filters)]  # fmt: skip
    stream = io.StringIO()
    previous = handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        fake_weixin.inject_fault("/card/code/get", errcode=40097, count=1)
        with pytest.raises(WeixinAPIError):
            weixin_client.get_code(fake_weixin.add_card("pCardLogged", "oUser")["code"])
    finally:
        handler.setStream(previous)  # type: ignore[attr-defined]
    assert "WARNING wxcoupon.weixin: weixin card/code/get errcode=40097" in stream.getvalue()
