"""Member card activation over real HTTP: the fake Weixin, the app on a port, workers, both databases.

Redirect-based plug-in, non-redirect push, and the registration fallback end to
end; expired tickets; -1 retries; duplicates; a worker dying after Weixin
applied the activation; and the member's personal data never in a log line
or in clear text in any database column.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet

from webhook.cardstore import cards
from webhook.config import Settings
from webhook.members import activations, members, membership_numbers
from webhook.pii import DataCipher
from webhook.store import events, metadata
from workers.activation import fetch_activation, load_activations
from workers.context import WorkerContext
from workers.fake_weixin import FakeWeixin

from .live_fixtures import MP_KEY, Live, mp_get, mp_post, work

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA_KEY = Fernet.generate_key().decode()
MOBILE = "15912340987"  # values that must never appear in clear outside the encrypted columns
NAME = "Qiu Lanfang-Zed"
FIELDS = {"USER_FORM_INFO_FLAG_MOBILE": MOBILE, "USER_FORM_INFO_FLAG_NAME": NAME}


@pytest.fixture
def live_overrides() -> dict[str, Any]:
    """A data key, sequence membership numbers, initial values, and immediate RQ retries."""
    return {
        "data_keys": (DATA_KEY,), "retry_intervals": (0, 0, 0), "membership_number": "sequence",
        "membership_prefix": "WX", "init_bonus": 100, "init_balance": 0, "init_bonus_record": "welcome",
        "init_custom_field_values": ("Gold",),
    }  # fmt: skip


def example_card(name: str) -> dict[str, Any]:
    card: dict[str, Any] = json.loads((EXAMPLES / name).read_text())["card"]
    return card


def create_card(fake: FakeWeixin, redirect: bool = True) -> str:
    return fake.state.create_card(example_card("member_card.json" if redirect else "member_card_non_redirect.json"))


def activation(base: str, activation_id: int) -> dict[str, Any]:
    resp = mp_get(base, f"activations/{activation_id}")
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    return body


def member_of(ctx: WorkerContext, card_id: str, code: str) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        row = conn.execute(sa.select(members).where(members.c.card_id == card_id, members.c.code == code)).mappings().one()
    return dict(row)


def card_of(ctx: WorkerContext, card_id: str, code: str) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        row = conn.execute(sa.select(cards).where(cards.c.card_id == card_id, cards.c.code == code)).mappings().one()
    return dict(row)


def plugin_activation(base: str, fake: FakeWeixin, card_id: str, oa_openid: str, mp_openid: str,
                      expires_in: int | None = None) -> tuple[dict[str, Any], int]:
    """The user receives the card, fills the plug-in's form; the Mini Program posts the extraData."""
    added = fake.add_card(card_id, oa_openid)
    extra = fake.submit_activation(card_id, added["code"], oa_openid, fields=FIELDS, expires_in=expires_in)
    assert set(extra) == {"activate_ticket", "card_id", "encrypt_code"}  # what the plug-in hands back
    resp = mp_post(base, "activations", {**extra, "mp_openid": mp_openid})
    assert resp.status_code == 202
    return added, int(resp.json()["id"])


@pytest.fixture
def pii_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record at DEBUG, including wxcoupon's and RQ's (which do not propagate)."""
    caplog.set_level(logging.DEBUG)
    attached = [logging.getLogger(name) for name in ("wxcoupon", "rq", "webhook", "workers")]
    levels = [logger.level for logger in attached]
    for logger in attached:
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.DEBUG)
    yield caplog
    for logger, level in zip(attached, levels):
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


def assert_no_pii_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.records, "the flow logged nothing: the check would prove nothing"
    for record in caplog.records:
        text = f"{record.getMessage()} {record.__dict__!r}"
        assert MOBILE not in text and NAME not in text, record.name


def assert_no_pii_stored(ctx: WorkerContext) -> None:
    """Scan every text value of every table: the member's data is only in the encrypted columns."""
    scanned = 0
    with ctx.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)).mappings():
                for column, value in row.items():
                    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
                    if isinstance(text, str):
                        scanned += 1
                        assert MOBILE not in text and NAME not in text, f"{table.name}.{column}"
    assert scanned > 0


# -- redirect-based ----------------------------------------------------------------------


def test_activation_params_are_decoded_for_the_plug_in(live: Live, ctx: WorkerContext) -> None:
    """GET /api/mp/activation-params: appId and the URL-decoded encrypt_card_id, outer_str, biz."""
    base, _, fake = live
    card_id = create_card(fake)
    resp = mp_get(base, "activation-params", card_id=card_id, outer_str="poster 1+2/=")
    assert resp.status_code == 200
    body = resp.json()
    assert body["appId"] == "wxeb490c6f9b154ef9"
    extra = body["extraData"]
    assert fake.state.decrypt(extra["encrypt_card_id"]) == card_id  # decoded: %2B, %3D are gone
    assert extra["outer_str"] == "poster 1+2/=" and extra["biz"] == fake.state.biz
    unknown = mp_get(base, "activation-params", card_id="pNoSuchCard")
    assert unknown.status_code == 502 and unknown.json()["errcode"] == 40073


def test_plugin_params_keep_a_raw_plus_and_decode_percent_escapes() -> None:
    """The URL is decoded with unquote, not as a form: '+' in base64 stays '+'."""
    from webhook.mp_members import plugin_params

    url = ("https://mp.weixin.qq.com/bizmall/activatemembercard?action=preshow&&encrypt_card_id=ab+c%2Fd%3D%3D"
           "&outer_str=123&biz=MjM5Mzc0OTEwMA%3D%3D#wechat_redirect")
    assert plugin_params(url) == {"encrypt_card_id": "ab+c/d==", "outer_str": "123", "biz": "MjM5Mzc0OTEwMA=="}


def test_redirect_activation_end_to_end(live: Live, ctx: WorkerContext, pii_log: pytest.LogCaptureFixture) -> None:
    """Plug-in form -> extraData -> worker: temp info, membership number, activate once; member stored encrypted."""
    base, settings, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_redirect", "oMP_redirect")
    assert activation(base, activation_id)["done"] is False
    fake.wait_for_pushes(1)
    work(ctx)
    got = activation(base, activation_id)
    assert (got["status"], got["result"], got["done"], got["errcode"]) == ("processed", "activated", True, None)
    assert got["membership_number"] == "WX00000001" and got["code"] == added["code"]
    held = fake.state.codes[added["code"]]
    assert held.activations == 1 and fake.calls("/card/membercard/activatetempinfo/get") == 1
    assert held.membership is not None
    assert (held.membership["membership_number"], held.membership["bonus"], held.membership["init_bonus_record"],
            held.membership["init_custom_field_value1"]) == ("WX00000001", 100, "welcome", "Gold")
    # What card/code/get answers after the activation: the number and the submitted form.
    answer = ctx.weixin.get_code(added["code"], card_id=card_id)
    assert answer["membership_number"] == "WX00000001"
    assert {f["name"]: f["value"] for f in answer["user_info"]["common_field_list"]} == FIELDS
    card = card_of(ctx, card_id, added["code"])
    assert (card["status"], card["mp_openid"], card["oa_openid"]) == ("activated", "oMP_redirect", "oOA_redirect")
    member = member_of(ctx, card_id, added["code"])
    assert (member["source"], member["membership_number"], member["bonus"]) == ("redirect", "WX00000001", 100)
    assert (member["mp_openid"], member["oa_openid"]) == ("oMP_redirect", "oOA_redirect")
    data = DataCipher(settings.data_keys).decrypt_json(member["data_enc"])
    assert {f["name"]: f["value"] for f in data["common_field_list"]} == FIELDS
    assert_no_pii_stored(ctx)
    assert_no_pii_logged(pii_log)


def test_the_used_ticket_is_dropped_and_a_replay_still_ends_activated(live: Live, ctx: WorkerContext) -> None:
    """After a success the activate_ticket (a key to the member's form) is gone; a replay needs only card/code/get."""
    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_replayed", "oMP_replayed")
    work(ctx)
    with ctx.engine.begin() as conn:
        (row,) = load_activations(conn, [activation_id])
        assert row["activate_ticket"] is None and row["result"] == "activated"
        conn.execute(sa.update(activations).where(activations.c.id == activation_id).values(status="pending"))
    work(ctx)
    got = activation(base, activation_id)
    assert (got["status"], got["result"], got["membership_number"]) == ("processed", "activated", "WX00000001")
    assert fake.calls("/card/membercard/activatetempinfo/get") == 1 and fake.calls("/card/membercard/activate") == 1


def test_expired_ticket_is_a_stored_failure_the_mini_program_can_read(live: Live, ctx: WorkerContext) -> None:
    """72012: result failed with Weixin's errcode, no activate call, no membership number used up."""
    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_late", "oMP_late", expires_in=0)
    work(ctx)
    got = activation(base, activation_id)
    assert (got["status"], got["result"], got["done"], got["errcode"]) == ("failed", "failed", True, 72012)
    assert "expired" in got["errmsg"] and got["membership_number"] is None
    assert fake.calls("/card/membercard/activate") == 0
    with ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(membership_numbers)).scalar_one() == 0
        row = conn.execute(sa.select(activations.c.attempts, activations.c.last_error)).one()
    assert row[0] == 1 and "72012" in row[1]  # permanent: not retried


def test_system_busy_is_retried_then_activates_once(live: Live, ctx: WorkerContext) -> None:
    """-1 on every try of the client: the job is retried by RQ, and the card is activated once."""
    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_busy", "oMP_busy")
    fake.inject_fault("/card/membercard/activate", errcode=-1, count=3)  # the client's three tries, one job run
    work(ctx)
    got = activation(base, activation_id)
    assert (got["status"], got["result"], got["membership_number"]) == ("processed", "activated", "WX00000001")
    assert fake.calls("/card/membercard/activate") == 4
    assert fake.state.codes[added["code"]].activations == 1
    with ctx.engine.connect() as conn:
        assert conn.execute(sa.select(activations.c.attempts)).scalar_one() == 2


def test_always_busy_ends_dead_with_its_errcode(live: Live, ctx: WorkerContext) -> None:
    """-1 through every RQ retry: dead, result failed, errcode -1; the number stays reserved for the card."""
    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_dead", "oMP_dead")
    fake.inject_fault("/card/membercard/activatetempinfo/get", errcode=-1, count=100)
    work(ctx)
    got = activation(base, activation_id)
    assert (got["status"], got["result"], got["errcode"]) == ("dead", "failed", -1)
    assert fake.calls("/card/membercard/activate") == 0


def test_duplicate_requests_make_one_activation(live: Live, ctx: WorkerContext) -> None:
    """The same extraData posted three times is one request; a second ticket for the same card activates nothing more."""
    base, _, fake = live
    card_id = create_card(fake)
    added = fake.add_card(card_id, "oOA_dup")
    extra = fake.submit_activation(card_id, added["code"], "oOA_dup", fields=FIELDS)
    ids = {mp_post(base, "activations", {**extra, "mp_openid": "oMP_dup"}).json()["id"] for _ in range(3)}
    assert len(ids) == 1
    again = fake.submit_activation(card_id, added["code"], "oOA_dup", fields=FIELDS)  # the plug-in opened twice
    second = mp_post(base, "activations", {**again, "mp_openid": "oMP_dup"}).json()["id"]
    assert second not in ids
    work(ctx)
    assert [activation(base, i)["membership_number"] for i in (*ids, second)] == ["WX00000001"] * 2
    assert fake.calls("/card/membercard/activate") == 1 and fake.state.codes[added["code"]].activations == 1
    with ctx.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(activations)).scalar_one() == 2
        assert conn.execute(sa.select(sa.func.count()).select_from(members)).scalar_one() == 1


def test_two_workers_activating_one_card_at_once_call_activate_once(live: Live, ctx: WorkerContext) -> None:
    """Two requests for the same card on two workers at the same moment: the per-card lock serialises them."""
    import threading

    from workers.jobs import process_activations

    base, _, fake = live
    card_id = create_card(fake)
    added = fake.add_card(card_id, "oOA_race")
    ids = []
    for _ in range(2):  # the plug-in run twice: two tickets, two requests
        extra = fake.submit_activation(card_id, added["code"], "oOA_race", fields=FIELDS)
        ids.append(int(mp_post(base, "activations", {**extra, "mp_openid": "oMP_race"}).json()["id"]))
    fake.inject_fault("/card/code/get", latency_ms=300, count=2)  # widen the gap between check and activate
    errors: list[BaseException] = []

    def run(activation_id: int) -> None:
        try:
            process_activations([activation_id])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert fake.calls("/card/membercard/activate") == 1 and fake.state.codes[added["code"]].activations == 1
    assert {activation(base, i)["membership_number"] for i in ids} == {"WX00000001"}


def test_a_worker_dying_after_weixin_applied_the_activation_does_not_activate_twice(
    live: Live, ctx: WorkerContext
) -> None:
    """Fetch ran (Weixin activated the card), the worker died before its commit: the rerun only records."""
    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_crash", "oMP_crash")
    with ctx.engine.connect() as conn:
        (row,) = load_activations(conn, [activation_id])
    fetch_activation(ctx, row)  # the dead worker's network phase; nothing of it was committed but the number
    assert fake.state.codes[added["code"]].activations == 1
    work(ctx)  # the row is still pending: another worker takes it
    got = activation(base, activation_id)
    assert (got["result"], got["membership_number"]) == ("activated", "WX00000001")
    assert fake.calls("/card/membercard/activate") == 1 and fake.state.codes[added["code"]].activations == 1
    assert member_of(ctx, card_id, added["code"])["membership_number"] == "WX00000001"


def test_a_transient_failure_after_activate_is_retried_without_activating_again(
    live: Live, ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The apply phase fails transiently after Weixin applied it: RQ's retry finds the card active."""
    import redis

    from workers import activation as module

    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_apply", "oMP_apply")
    real = module.store_member
    failures = [redis.exceptions.ConnectionError("lost the connection")]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "store_member", flaky)
    work(ctx)
    got = activation(base, activation_id)
    assert (got["status"], got["result"], got["membership_number"]) == ("processed", "activated", "WX00000001")
    assert fake.calls("/card/membercard/activate") == 1


def test_an_activate_call_without_an_answer_is_checked_then_sent_again(live: Live, ctx: WorkerContext) -> None:
    """The connection drops after activate was sent: the retry asks card/code/get first, then activates once."""
    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_drop", "oMP_drop")
    fake.inject_fault("/card/membercard/activate", drop=True, count=1)
    work(ctx)
    assert activation(base, activation_id)["result"] == "activated"
    assert fake.calls("/card/membercard/activate") == 2  # the dropped one was never applied
    assert fake.state.codes[added["code"]].activations == 1


@pytest.mark.parametrize("answer", [
    {"drop": True},
    {"http_status": 502},
    {"http_status": 503},
    {"raw": "<html>gateway error</html>"},
    {"raw": '{"errcode": 0, "errmsg": "o'},  # cut off: not Weixin's verdict
], ids=["dropped", "http-502", "http-503", "html", "cut-off"])
def test_an_activation_weixin_applied_whose_answer_was_lost_ends_activated_once(
    live: Live, ctx: WorkerContext, answer: dict[str, Any]
) -> None:
    """Weixin activated the card, then its answer was lost or unusable: the retry finds it active, sends nothing.

    An unusable answer to a write is not a refusal: failing the request for good
    would leave a member Weixin shows active that the merchant never recorded.
    """
    base, _, fake = live
    card_id = create_card(fake)
    added, activation_id = plugin_activation(base, fake, card_id, "oOA_lost", "oMP_lost")
    fake.inject_fault("/card/membercard/activate", applied=True, count=1, **answer)
    work(ctx)
    got = activation(base, activation_id)
    assert (got["status"], got["result"], got["membership_number"]) == ("processed", "activated", "WX00000001")
    assert fake.calls("/card/membercard/activate") == 1  # the retry checked first and sent nothing
    assert fake.state.codes[added["code"]].activations == 1


# -- non-redirect and registration ----------------------------------------------------------------


def test_non_redirect_push_stores_the_member_linked_to_the_card(
    live: Live, ctx: WorkerContext, pii_log: pytest.LogCaptureFixture
) -> None:
    """submit_membercard_user_info -> card/code/get -> member data encrypted, card activated; no activate call."""
    _, settings, fake = live
    card_id = create_card(fake, redirect=False)
    added = fake.add_card(card_id, "oOA_direct")
    result = fake.submit_activation(card_id, added["code"], "oOA_direct", fields=FIELDS,
                                    custom_fields={"Favourite drink": "Oat latte"})
    assert result["activated"] is True and "activate_ticket" not in result
    pushes = fake.wait_for_pushes(2)
    assert [p["event"] for p in pushes] == ["user_get_card", "submit_membercard_user_info"]
    work(ctx)
    with ctx.engine.connect() as conn:
        assert list(conn.execute(sa.select(events.c.status)).scalars()) == ["processed", "processed"]
    member = member_of(ctx, card_id, added["code"])
    assert (member["source"], member["membership_number"], member["oa_openid"]) == (
        "non_redirect", added["code"], "oOA_direct")
    data = DataCipher(settings.data_keys).decrypt_json(member["data_enc"])
    assert {f["name"]: f["value"] for f in data["common_field_list"]} == FIELDS
    assert data["custom_field_list"] == [{"name": "Favourite drink", "value": "Oat latte"}]
    assert card_of(ctx, card_id, added["code"])["status"] == "activated"
    assert fake.calls("/card/code/get") == 1 and fake.calls("/card/membercard/activate") == 0
    assert_no_pii_stored(ctx)
    assert_no_pii_logged(pii_log)


def test_registration_fallback_activates_without_the_plug_in(
    live: Live, ctx: WorkerContext, pii_log: pytest.LogCaptureFixture
) -> None:
    """An old Weixin client: the Mini Program's own form, then /registrations; no temp info call."""
    base, settings, fake = live
    card_id = create_card(fake)
    added = fake.add_card(card_id, "oOA_old")
    body = {"card_id": card_id, "encrypt_code": added["encrypt_code"], "mp_openid": "oMP_old",
            "fields": {**FIELDS, "USER_FORM_INFO_FLAG_EDUCATION_BACKGROUND": "postgraduate"},
            "custom_fields": {"Milk": ["Oat"]}}
    ids = {mp_post(base, "registrations", body).json()["id"] for _ in range(2)}
    assert len(ids) == 1  # a retried call is the same request
    work(ctx)
    got = activation(base, ids.pop())
    assert (got["kind"], got["result"], got["membership_number"]) == ("registration", "activated", "WX00000001")
    assert fake.calls("/card/membercard/activatetempinfo/get") == 0 and fake.state.codes[added["code"]].activations == 1
    member = member_of(ctx, card_id, added["code"])
    data = DataCipher(settings.data_keys).decrypt_json(member["data_enc"])
    assert {f["name"]: f["value"] for f in data["common_field_list"]} == {
        **FIELDS, "USER_FORM_INFO_FLAG_EDUCATION_BACKGRO": "postgraduate"}
    assert data["custom_field_list"] == [{"name": "Milk", "value_list": ["Oat"]}]
    assert member["source"] == "registration" and card_of(ctx, card_id, added["code"])["status"] == "activated"
    assert_no_pii_stored(ctx)
    assert_no_pii_logged(pii_log)


# -- the API's answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("activations", {}, "activate_ticket"),
        ("activations", {"activate_ticket": "t"}, "card_id"),
        ("activations", {"activate_ticket": "t", "card_id": "p" * 33, "encrypt_code": "e", "mp_openid": "o"}, "card_id"),
        ("activations", {"activate_ticket": "t", "card_id": "p"}, "encrypt_code"),
        ("activations", {"activate_ticket": "t", "card_id": "p", "encrypt_code": "e"}, "mp_openid"),
        ("activations", {"activate_ticket": 5, "card_id": "p", "encrypt_code": "e", "mp_openid": "o"}, "activate_ticket"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o"}, "fields"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": {}}, "fields"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": ["x"]}, "fields"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o",
                           "fields": {"USER_FORM_INFO_FLAG_PHONE": "1"}}, "fields.USER_FORM_INFO_FLAG_PHONE"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o",
                           "fields": {"USER_FORM_INFO_FLAG_MOBILE": 15912340987}}, "fields.USER_FORM_INFO_FLAG_MOBILE"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o",
                           "fields": {"USER_FORM_INFO_FLAG_NAME": "x" * 300}}, "fields.USER_FORM_INFO_FLAG_NAME"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": FIELDS,
                           "custom_fields": "x"}, "custom_fields"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": FIELDS,
                           "custom_fields": {"Milk": [1]}}, "custom_fields.Milk[0]"),
        ("registrations", {"encrypt_code": "e", "mp_openid": "o", "fields": FIELDS}, "card_id"),
        # One field under both its names: one value would be dropped without a word.
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": {
            "USER_FORM_INFO_FLAG_EDUCATION_BACKGRO": "a", "USER_FORM_INFO_FLAG_EDUCATION_BACKGROUND": "b"}},
         "fields.USER_FORM_INFO_FLAG_EDUCATION_BACKGROUND"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": {
            "USER_FORM_INFO_FLAG_EDUCATION_BACKGROUND": "a", "USER_FORM_INFO_FLAG_EDUCATION_BACKGRO": "a"}},
         "fields.USER_FORM_INFO_FLAG_EDUCATION_BACKGRO"),
        # Lone surrogates (JSON \ud800 escapes): no UTF-8 key, digest or column can hold them.
        ("activations", {"activate_ticket": "t\ud800", "card_id": "p", "encrypt_code": "e", "mp_openid": "o"},
         "activate_ticket"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o",
                           "fields": {"USER_FORM_INFO_FLAG_MOBILE": "1591234\udc00"}}, "fields.USER_FORM_INFO_FLAG_MOBILE"),
        ("registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": FIELDS,
                           "custom_fields": {"Milk\ud800": "yes"}}, "custom_fields.Milk\ud800"),
    ],
)
def test_bad_requests_name_the_field(live: Live, path: str, body: dict[str, Any], field: str) -> None:
    """A 400 whose field names the problem; nothing stored."""
    base, _, _ = live
    resp = mp_post(base, path, body)
    assert resp.status_code == 400 and resp.json()["field"] == field
    assert MOBILE not in resp.text


def test_activation_params_need_a_card_id_and_everything_needs_the_key(live: Live) -> None:
    """400 naming card_id; 401 without the bearer key on each new endpoint; 404 for an unknown id."""
    base, _, _ = live
    assert mp_get(base, "activation-params").json()["field"] == "card_id"
    for resp in (mp_get(base, "activation-params", key="wrong", card_id="p"), mp_post(base, "activations", {}, key="x"),
                 mp_post(base, "registrations", {}, key="x"), mp_get(base, "activations/1", key="x")):
        assert resp.status_code == 401
    assert mp_get(base, "activations/999").status_code == 404


class TestActivationParamsWithoutRedis:
    """activation-params reads the shared access_token from Redis: without Redis it answers 503 naming it
    (before: redis's ConnectionError was unhandled, 500)."""

    @pytest.fixture
    def live_overrides(self) -> dict[str, Any]:
        return {"redis_url": "redis://127.0.0.1:9/0"}

    def test_activation_params_are_503_naming_redis(self, live: Live) -> None:
        base, _, fake = live
        resp = mp_get(base, "activation-params", card_id="pCard")
        assert resp.status_code == 503 and "redis" in resp.json()["error"]
        assert fake.calls("/card/membercard/activate/geturl") == 0


class TestWithoutDataKey:
    """No WXCOUPON_DATA_KEY: nothing personal is accepted or stored, and the error names the variable."""

    @pytest.fixture
    def live_overrides(self) -> dict[str, Any]:
        return {"data_keys": (), "retry_intervals": (0, 0, 0)}

    def test_requests_are_refused_naming_the_variable(self, live: Live) -> None:
        base, _, _ = live
        body = {"activate_ticket": "t", "card_id": "p", "encrypt_code": "e", "mp_openid": "o"}
        resp = mp_post(base, "activations", body)
        assert resp.status_code == 503 and "WXCOUPON_DATA_KEY" in resp.json()["error"]
        resp = mp_post(base, "registrations", {"card_id": "p", "encrypt_code": "e", "mp_openid": "o", "fields": FIELDS})
        assert resp.status_code == 503

    def test_a_non_redirect_push_fails_permanently_naming_the_variable(self, live: Live, ctx: WorkerContext) -> None:
        _, _, fake = live
        card_id = create_card(fake, redirect=False)
        added = fake.add_card(card_id, "oOA_nokey")
        fake.submit_activation(card_id, added["code"], "oOA_nokey", fields=FIELDS)
        fake.wait_for_pushes(2)
        work(ctx)
        with ctx.engine.connect() as conn:
            status, error = conn.execute(
                sa.select(events.c.status, events.c.last_error).where(events.c.event == "submit_membercard_user_info")
            ).one()
        assert status == "failed" and "WXCOUPON_DATA_KEY" in error
        assert fake.calls("/card/code/get") == 0  # refused before asking Weixin for the data

    def test_an_activation_job_without_the_key_stores_a_failure_naming_it(
        self, live: Live, ctx: WorkerContext
    ) -> None:
        from webhook.members import ActivationKind, activation_key, insert_activation
        from webhook.store import utcnow
        from workers.jobs import process_activations

        with ctx.engine.begin() as conn:
            now = utcnow()
            row_id = insert_activation(conn, {
                "dedupe_key": activation_key(ActivationKind.REDIRECT, "x"), "kind": "redirect", "card_id": "p",
                "encrypt_code": "e", "mp_openid": "o", "activate_ticket": "t", "status": "pending", "attempts": 0,
                "created_at": now, "updated_at": now,
            })  # fmt: skip
        with pytest.raises(Exception):
            process_activations([row_id])
        with ctx.engine.connect() as conn:
            result, errmsg, status = conn.execute(
                sa.select(activations.c.result, activations.c.errmsg, activations.c.status)).one()
        assert (result, status) == ("failed", "failed") and "WXCOUPON_DATA_KEY" in errmsg
        assert ctx.settings.data_keys == ()


def test_settings_without_overrides_have_no_data_key(settings: Settings) -> None:
    """The default test settings carry no data key (so the refusal tests above test something)."""
    assert settings.data_keys == ()


def test_activation_ids_beyond_any_row_are_not_found(live: Live) -> None:
    """An id past the largest a row can have is a 404 like a missing one, not a 500 (SQLite's
    OverflowError) or a 503 (PostgreSQL's out-of-range error taken for the store being down)."""
    base, _, _ = live
    beyond = mp_get(base, f"activations/{2**63}")
    assert beyond.status_code == 404 and beyond.json() == {"error": "not found"}
    missing = mp_get(base, f"activations/{2**63 - 1}")
    assert missing.status_code == 404 and missing.json()["error"] == "no such activation"


def test_mp_api_http_errors_are_json(live: Live) -> None:
    """The Mini Program's backend parses JSON errors: an unknown path and a wrong method answer in JSON
    under /api/mp (before: Flask's HTML pages); elsewhere Flask's own pages stay."""
    base, _, _ = live
    unknown = mp_get(base, "no-such-endpoint")
    assert unknown.status_code == 404 and unknown.json() == {"error": "not found"}
    wrong = requests.put(f"{base}/api/mp/card-receipts", json={}, timeout=5, headers={"Authorization": f"Bearer {MP_KEY}"})
    assert wrong.status_code == 405 and wrong.json() == {"error": "method not allowed"}
    elsewhere = requests.get(f"{base}/no-such-page", timeout=5)
    assert elsewhere.status_code == 404 and elsewhere.headers["Content-Type"].startswith("text/html")
