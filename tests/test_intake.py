"""The push endpoint: what is accepted is stored once; what is not is refused, storing nothing."""
from __future__ import annotations

import base64
import time
from typing import Any

import pytest
import sqlalchemy as sa

from webhook import create_app
from webhook.config import Settings
from webhook.crypto import encrypt
from webhook.envelope import seal_push
from webhook.events import CARD_EVENTS, sample_fields
from webhook.signature import sign
from webhook.store import events, list_events, make_engine

from .pushes import make_push


def rows(settings: Settings) -> list[dict[str, Any]]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        found = [dict(r) for r in conn.execute(sa.select(events).order_by(events.c.id)).mappings()]
    engine.dispose()
    return found


def post(client: Any, query: dict[str, str], body: bytes) -> Any:
    return client.post("/wechat", query_string=query, data=body, content_type="text/xml")


@pytest.mark.parametrize("mode", ["safe", "compat", "plain"])
def test_user_get_card_is_stored_with_its_columns(client: Any, settings: Settings, mode: str) -> None:
    """A coupon receipt in every mode is acknowledged and stored with openid, card, code and outer_str."""
    query, body = make_push(
        settings, "user_get_card", mode, FromUserName="oUser1", CardId="pCard1", UserCardCode="111122223333",
        OuterStr="spring", UnionId="uUnion1",
    )
    resp = post(client, query, body)
    assert resp.status_code == 200 and resp.data == b"success"
    [row] = rows(settings)
    assert (row["openid"], row["card_id"], row["code"], row["outer_str"], row["unionid"]) == (
        "oUser1", "pCard1", "111122223333", "spring", "uUnion1"
    )
    assert row["event"] == "user_get_card" and row["msg_type"] == "event"
    assert row["status"] == "pending" and row["mode"] == mode
    assert "<UserCardCode>" in row["raw_xml"] and row["fields"]["OuterStr"] == "spring"
    assert row["create_time"] > 1_700_000_000


@pytest.mark.parametrize("event", CARD_EVENTS)
def test_every_card_event_type_is_stored_with_all_fields(client: Any, settings: Settings, event: str) -> None:
    """Each event of the protocol table is accepted and keeps every field it carried."""
    query, body = make_push(settings, event)
    assert post(client, query, body).status_code == 200
    [row] = rows(settings)
    assert row["event"] == event
    sent = sample_fields(event)
    assert set(sent) <= set(row["fields"])


def test_retried_push_is_acknowledged_and_stored_once(client: Any, settings: Settings) -> None:
    """Weixin's retries of one push (same body) make one event, every copy answered success."""
    query, body = make_push(settings)
    answers = [post(client, query, body) for _ in range(3)]
    assert [(a.status_code, a.data) for a in answers] == [(200, b"success")] * 3
    assert len(rows(settings)) == 1


def test_retry_with_new_query_is_still_one_event(client: Any, settings: Settings) -> None:
    """A retry re-signed with another timestamp/nonce is still the same event."""
    fields = sample_fields("user_get_card", CreateTime=int(time.time()))
    for nonce in ("n1", "n2"):
        query, body = seal_push(fields, token=settings.token, aes_key=settings.aes_key, appid=settings.appid, nonce=nonce)
        assert post(client, query, body).status_code == 200
    assert len(rows(settings)) == 1


def test_two_cards_from_one_add_card_in_one_second_are_two_events(client: Any, settings: Settings) -> None:
    """wx.addCard of several cards: same user and second, different cards, each kept."""
    now = int(time.time())
    for card, code in (("pCardA", "100000000001"), ("pCardB", "100000000002")):
        query, body = make_push(settings, CreateTime=now, FromUserName="oSame", CardId=card, UserCardCode=code)
        assert post(client, query, body).status_code == 200
    assert [(r["card_id"], r["code"]) for r in rows(settings)] == [("pCardA", "100000000001"), ("pCardB", "100000000002")]


def test_unknown_event_and_unknown_fields_are_kept(client: Any, settings: Settings) -> None:
    """New event types and new fields are stored and acknowledged, never rejected."""
    query, body = make_push(settings, "user_get_card", NewFieldFromWeixin="x1")
    assert post(client, query, body).status_code == 200
    fields = sample_fields("user_get_card", CreateTime=int(time.time()))
    fields["Event"] = "card_brand_new_event"
    query, body = seal_push(fields, token=settings.token, aes_key=settings.aes_key, appid=settings.appid)
    assert post(client, query, body).status_code == 200
    stored = rows(settings)
    assert stored[0]["fields"]["NewFieldFromWeixin"] == "x1"
    assert stored[1]["event"] == "card_brand_new_event"


def test_text_message_is_stored_and_deduped_by_msgid(client: Any, settings: Settings) -> None:
    """Plain messages are acknowledged too; MsgId makes retries one row."""
    fields = {
        "ToUserName": "gh_fc0a06a20993", "FromUserName": "oUser1", "CreateTime": int(time.time()),
        "MsgType": "text", "Content": "hello", "MsgId": "1234567890123456",
    }
    query, body = seal_push(fields, token=settings.token, aes_key=settings.aes_key, appid=settings.appid)
    assert post(client, query, body).status_code == 200
    assert post(client, query, body).status_code == 200
    [row] = rows(settings)
    assert row["msg_type"] == "text" and row["event"] is None
    # `events list --event text` finds it, as `replay --event text` does (the listing shows the MsgType
    # where there is no Event)
    assert post(client, *make_push(settings, "user_get_card")).status_code == 200
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            assert [r["msg_type"] for r in list_events(conn, event="text")] == ["text"]
            assert [r["event"] for r in list_events(conn, event="user_get_card")] == ["user_get_card"]
    finally:
        engine.dispose()


def test_url_verification_echoes_echostr(tmp_path: Any, sqlite_url: str) -> None:
    """GET with the protocol page's vector (token AAAAA) echoes echostr as text/plain."""
    s = Settings(token="AAAAA", database_url=sqlite_url, instance_path=tmp_path, timestamp_tolerance=0)
    client = create_app(s).test_client()
    args = {"signature": "f464b24fc39322e44b38aa78f5edd27bd1441696", "timestamp": "1714036504",
            "nonce": "1514711492", "echostr": "7083749412967390812"}
    resp = client.get("/wechat", query_string=args)
    assert resp.status_code == 200 and resp.data == b"7083749412967390812"
    assert resp.mimetype == "text/plain"
    args["signature"] = "0" * 40
    assert client.get("/wechat", query_string=args).status_code == 403


def _bad_padding_body(settings: Settings) -> tuple[dict[str, str], bytes]:
    from Crypto.Cipher import AES

    key = settings.aes_key
    assert key is not None
    plain = b"x" * 16 + b"\x00\x00\x00\x05<xml>" + settings.appid.encode()  # type: ignore[union-attr]
    padded = plain + bytes([0]) * (32 - len(plain) % 32)  # pad byte 0 is never valid
    cipher = base64.b64encode(AES.new(key, AES.MODE_CBC, key[:16]).encrypt(padded)).decode()
    return _safe_envelope(settings, cipher)


def _safe_envelope(settings: Settings, encrypted: str) -> tuple[dict[str, str], bytes]:
    ts, nonce = str(int(time.time())), "nonce1"
    query = {
        "signature": sign(settings.token, ts, nonce), "timestamp": ts, "nonce": nonce, "encrypt_type": "aes",
        "msg_signature": sign(settings.token, ts, nonce, encrypted), "openid": "oUser1",
    }
    body = f"<xml><ToUserName><![CDATA[gh_x]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    return query, body.encode()


def _bad_inputs(settings: Settings) -> dict[str, tuple[dict[str, str], bytes, int]]:
    good_q, good_b = make_push(settings)
    cases: dict[str, tuple[dict[str, str], bytes, int]] = {}
    cases["wrong signature"] = ({**good_q, "signature": "0" * 40}, good_b, 403)
    cases["missing signature"] = ({k: v for k, v in good_q.items() if k != "signature"}, good_b, 403)
    cases["wrong msg_signature"] = ({**good_q, "msg_signature": "0" * 40}, good_b, 403)
    stale_q, stale_b = seal_push(
        sample_fields("user_get_card"), token=settings.token, aes_key=settings.aes_key, appid=settings.appid,
        timestamp=int(time.time()) - 3600,
    )
    cases["stale timestamp"] = (stale_q, stale_b, 403)
    other = encrypt(b"<xml><MsgType>event</MsgType></xml>", settings.aes_key or b"", "wxotherappid0000")
    cases["wrong appid"] = (*_safe_envelope(settings, other), 403)
    cases["bad padding"] = (*_bad_padding_body(settings), 400)
    cases["undecodable base64"] = (*_safe_envelope(settings, "!!!not-base64!!!"), 400)
    ts = str(int(time.time()))
    plain_q = {"signature": sign(settings.token, ts, "n"), "timestamp": ts, "nonce": "n"}
    cases["not xml"] = (plain_q, b"this is not xml", 400)
    doctype = b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY a "aaaa">]><xml><MsgType>&a;</MsgType></xml>'
    cases["dtd and entities"] = (plain_q, doctype, 400)
    xxe = b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY e SYSTEM "file:///etc/passwd">]><xml><MsgType>&e;</MsgType></xml>'
    cases["external entity"] = (plain_q, xxe, 400)
    cases["oversize"] = (plain_q, b"<xml>" + b"a" * (settings.max_body + 1) + b"</xml>", 413)
    return cases


@pytest.mark.parametrize(
    "case",
    ["wrong signature", "missing signature", "wrong msg_signature", "stale timestamp", "wrong appid",
     "bad padding", "undecodable base64", "not xml", "dtd and entities", "external entity", "oversize"],
)
def test_bad_input_is_refused_with_reason_and_nothing_stored(
    client: Any, settings: Settings, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every class of bad input: a clear 4xx with a short reason, no row, no secret in the log."""
    query, body, status = _bad_inputs(settings)[case]
    with caplog.at_level("INFO", logger="wxcoupon"):
        resp = post(client, query, body)
    assert resp.status_code == status, resp.data
    assert 0 < len(resp.data) < 80 and resp.mimetype == "text/plain"
    assert rows(settings) == []
    logged = caplog.text
    assert settings.token not in logged and (settings.encoding_aes_key or "") not in logged
    assert "passwd" not in logged and "Encrypt" not in logged
    # The service keeps serving after the bad input.
    good_q, good_b = make_push(settings)
    assert post(client, good_q, good_b).status_code == 200


def test_encrypted_push_without_aes_key_is_refused(tmp_path: Any, sqlite_url: str) -> None:
    """An account configured for plaintext refuses an encrypted push instead of storing garbage."""
    from webhook import schema

    s = Settings(token="plaintoken", database_url=sqlite_url, instance_path=tmp_path)
    schema.upgrade(make_engine(s))
    aes = Settings(token="plaintoken", appid="wxb11529c136998cb6",
                   encoding_aes_key="abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")
    query, body = make_push(aes)
    resp = post(create_app(s).test_client(), query, body)
    assert resp.status_code == 400


def test_previous_aes_key_is_accepted_during_rotation(tmp_path: Any, sqlite_url: str, redis_url: str) -> None:
    """During key rotation a push encrypted with the previous EncodingAESKey is still accepted."""
    from webhook import schema

    from .conftest import AES_KEY, PREVIOUS_AES_KEY, make_settings

    rotated = make_settings(tmp_path, sqlite_url, redis_url, encoding_aes_key=PREVIOUS_AES_KEY,
                            previous_encoding_aes_key=AES_KEY)
    schema.upgrade(make_engine(rotated))
    old = make_settings(tmp_path, sqlite_url, redis_url)  # still sending with the old key
    query, body = make_push(old)
    assert post(create_app(rotated).test_client(), query, body).status_code == 200
    assert len(rows(rotated)) == 1


def test_database_locked_answers_503_so_weixin_retries(client: Any, settings: Settings) -> None:
    """When the event cannot be committed the answer is 5xx, never `success`."""
    if not settings.database_url.startswith("sqlite"):
        pytest.skip("the lock is SQLite's; PostgreSQL down is tested separately")
    import sqlite3

    path = settings.database_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        query, body = make_push(settings)
        resp = post(client, query, body)
        assert resp.status_code == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Weixin's retry, once the database is back, is stored.
    assert post(client, query, body).status_code == 200
    assert len(rows(settings)) == 1


def test_postgres_unreachable_answers_503(tmp_path: Any, redis_url: str) -> None:
    """A PostgreSQL that does not answer gives 503 quickly, not a hang and not `success`."""
    from .conftest import make_settings
    from .procs import free_port

    s = make_settings(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2", redis_url)
    query, body = make_push(s)
    resp = post(create_app(s).test_client(), query, body)
    assert resp.status_code == 503 and resp.data == b"store unavailable"
