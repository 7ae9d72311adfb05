"""Typed push records: every card event of the protocol table, unknown data kept, dedupe keys."""
from __future__ import annotations

import dataclasses
import time
import typing
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from webhook.errors import MalformedError
from webhook.events import (
    CARD_EVENTS,
    EVENT_TYPES,
    CardPayOrder,
    Message,
    Push,
    SubmitMembercardUserInfo,
    UnknownEvent,
    UpdateMemberCard,
    UserGetCard,
    UserPayFromPayCell,
    dedupe_key,
    parse_push,
    sample_fields,
)
from webhook.xmlparse import build_xml, parse_xml

# Section 2 of the protocol page, transcribed independently of webhook/events.py so
# that a field missing from a record class (or from its sample) fails here.
PROTOCOL_TABLE: dict[str, set[str]] = {
    "card_pass_check": {"CardId", "RefuseReason"},
    "card_not_pass_check": {"CardId", "RefuseReason"},
    "user_get_card": {
        "CardId", "IsGiveByFriend", "UserCardCode", "FriendUserName", "OuterId", "OldUserCardCode", "OuterStr",
        "IsRestoreMemberCard", "IsRecommendByFriend", "UnionId", "SourceScene",
    },
    "user_gifting_card": {"CardId", "UserCardCode", "IsReturnBack", "FriendUserName", "IsChatRoom"},
    "user_del_card": {"CardId", "UserCardCode"},
    "user_consume_card": {
        "CardId", "UserCardCode", "ConsumeSource", "LocationName", "StaffOpenId", "VerifyCode", "RemarkAmount",
        "OuterStr",
    },
    "user_pay_from_pay_cell": {"CardId", "UserCardCode", "TransId", "LocationId", "Fee", "OriginalFee"},
    "user_view_card": {"CardId", "UserCardCode", "OuterStr"},
    "user_enter_session_from_card": {"CardId", "UserCardCode"},
    "update_member_card": {"CardId", "UserCardCode", "ModifyBonus", "ModifyBalance"},
    "card_sku_remind": {"CardId", "Detail"},
    "card_pay_order": {
        "OrderId", "Status", "CreateOrderTime", "PayFinishTime", "Desc", "FreeCoinCount", "PayCoinCount",
        "RefundFreeCoinCount", "RefundPayCoinCount", "OrderType", "Memo", "ReceiptInfo",
    },
    "submit_membercard_user_info": {"CardId", "UserCardCode"},
}
COMMON = {"ToUserName", "FromUserName", "CreateTime", "MsgType", "Event"}
# Fields that must be typed as numbers or flags, not left as text.
NUMERIC = {"OuterId", "Fee", "OriginalFee", "ModifyBonus", "ModifyBalance", "CreateOrderTime", "PayFinishTime",
           "FreeCoinCount", "PayCoinCount", "RefundFreeCoinCount", "RefundPayCoinCount"}
FLAGS = {"IsGiveByFriend", "IsRestoreMemberCard", "IsRecommendByFriend", "IsReturnBack", "IsChatRoom"}


def wire(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields as they arrive: through XML, so every value is text."""
    return parse_xml(build_xml(fields))


def modelled(cls: type) -> dict[str, tuple[str, type]]:
    """Weixin name -> (attribute, declared non-None type) for a record class."""
    hints = typing.get_type_hints(cls)
    result = {}
    for f in dataclasses.fields(cls):
        if "wx" in f.metadata:
            (kind,) = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
            result[f.metadata["wx"]] = (f.name, kind)
    return result


def test_card_events_cover_the_protocol_table() -> None:
    """CARD_EVENTS and EVENT_TYPES list exactly the events of the table."""
    assert set(CARD_EVENTS) == set(EVENT_TYPES) == set(PROTOCOL_TABLE)


@pytest.mark.parametrize("event", sorted(PROTOCOL_TABLE))
def test_every_card_event_parses_with_all_fields_typed(event: str) -> None:
    """Each event's sample, after a trip through XML, fills every field of the table with the right type."""
    sample = sample_fields(event)
    assert set(sample) == COMMON | PROTOCOL_TABLE[event], "sample_fields must be complete"
    push = parse_push(wire(sample))
    cls = EVENT_TYPES[event]
    assert type(push.detail) is cls and push.event == event and push.msg_type == "event"
    assert push.detail.extra == {}
    columns = modelled(cls)
    assert set(columns) == PROTOCOL_TABLE[event], "the record must model every field of the table"
    for name, (attribute, kind) in columns.items():
        value = getattr(push.detail, attribute)
        if sample[name] == "":
            assert value is None, f"{name}: empty means None"
            continue
        assert type(value) is kind, f"{name} is {type(value).__name__}, want {kind.__name__}"
        if name in FLAGS:
            assert kind is bool
        elif name in NUMERIC:
            assert kind is int and value == sample[name]
        else:
            assert kind is str and value == str(sample[name])


def test_protocol_sample_user_get_card() -> None:
    """The protocol page's user_get_card XML gives the expected Push columns and record."""
    body = (
        b"<xml><ToUserName><![CDATA[gh_fc0a06a20993]]></ToUserName>"
        b"<FromUserName><![CDATA[oZI8Fj040-be6rlDohc6gkoPOQTQ]]>"
        b"</FromUserName><CreateTime>1472551036</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA["
        b"user_get_card]]></Event><CardId><![CDATA[pZI8Fjwsy5fVPRBeD78J4RmqVvBc]]></CardId><IsGiveByFriend>0"
        b"</IsGiveByFriend><UserCardCode><![CDATA[226009850808]]></UserCardCode><FriendUserName><![CDATA[]]>"
        b"</FriendUserName><OuterId>0</OuterId><OldUserCardCode><![CDATA[]]></OldUserCardCode><OuterStr><![CDATA[12b]]>"
        b"</OuterStr><IsRestoreMemberCard>0</IsRestoreMemberCard><IsRecommendByFriend>0</IsRecommendByFriend></xml>"
    )
    push = parse_push(parse_xml(body))
    assert push.to_user == "gh_fc0a06a20993" and push.openid == "oZI8Fj040-be6rlDohc6gkoPOQTQ"
    assert push.create_time == 1472551036
    assert (push.card_id, push.code, push.outer_str) == ("pZI8Fjwsy5fVPRBeD78J4RmqVvBc", "226009850808", "12b")
    assert push.friend_openid is None and push.old_code is None and push.unionid is None and push.msg_id is None
    assert push.detail == UserGetCard(
        card_id="pZI8Fjwsy5fVPRBeD78J4RmqVvBc", is_give_by_friend=False, code="226009850808", outer_id=0,
        outer_str="12b", is_restore_member_card=False, is_recommend_by_friend=False,
    )
    assert push.fields["FriendUserName"] == ""  # fields keep everything exactly as parsed


def test_protocol_sample_submit_membercard_user_info() -> None:
    """The activation-form sample maps to SubmitMembercardUserInfo with its card and code."""
    body = (
        b"<xml><ToUserName><![CDATA[gh_3fcea188bf78]]></ToUserName>"
        b"<FromUserName><![CDATA[obLatjlaNQKb8FqOvt1M1x1lIBFE]]>"
        b"</FromUserName><CreateTime>1432668700</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA["
        b"submit_membercard_user_info]]></Event><CardId><![CDATA[pbLatjtZ7v1BG_ZnTjbW85GYc_E8]]></CardId>"
        b"<UserCardCode><![CDATA[018255396048]]></UserCardCode></xml>"
    )
    push = parse_push(parse_xml(body))
    assert push.detail == SubmitMembercardUserInfo(card_id="pbLatjtZ7v1BG_ZnTjbW85GYc_E8", code="018255396048")
    assert push.code == "018255396048"  # leading zero kept: codes are text


def test_gift_sets_flag_friend_and_old_code() -> None:
    """A gifted card: IsGiveByFriend=1 is True, the friend and the old code appear in record and columns."""
    push = parse_push(wire(sample_fields(
        "user_get_card", IsGiveByFriend=1, FriendUserName="oFriend", OldUserCardCode="111", UserCardCode="222")))
    assert isinstance(push.detail, UserGetCard)
    assert push.detail.is_give_by_friend is True
    assert (push.friend_openid, push.old_code, push.code) == ("oFriend", "111", "222")


def test_unknown_fields_are_kept_in_extra() -> None:
    """A field Weixin adds later lands in detail.extra and in fields, and the known fields still parse."""
    push = parse_push(wire(sample_fields("user_del_card", BrandNewField="x", Nested={"A": "1"})))
    assert push.detail.extra == {"BrandNewField": "x", "Nested": {"A": "1"}}
    assert push.fields["BrandNewField"] == "x"
    assert push.code == "226009850808"


@pytest.mark.parametrize("event", ["user_brand_new_event", "subscribe", "CLICK"])
def test_unknown_events_are_kept(event: str) -> None:
    """An event outside the table yields UnknownEvent with its name and every non-envelope field in extra."""
    push = parse_push(wire(sample_fields("user_del_card", Event=event, Whatever="w")))
    assert push.event == event
    assert push.detail == UnknownEvent(
        event=event, extra={"CardId": "pZI8Fjwsy5fVPRBeD78J4RmqVvBc", "UserCardCode": "226009850808", "Whatever": "w"})
    assert push.card_id == "pZI8Fjwsy5fVPRBeD78J4RmqVvBc"  # columns are filled whatever the event


def test_event_without_event_name_is_unknown() -> None:
    """MsgType=event without Event is accepted as UnknownEvent, with event None."""
    push = parse_push({"MsgType": "event", "Event": ""})
    assert push.event is None and push.detail == UnknownEvent()


def test_messages_yield_message() -> None:
    """A text message (MsgType text) yields Message with msg_id and content; type-specific extras kept."""
    fields = {"ToUserName": "gh_x", "FromUserName": "o1", "CreateTime": "1348831860", "MsgType": "text",
              "Content": "this is a test", "MsgId": "1234567890123456", "MsgDataId": "9"}
    push = parse_push(wire(fields))
    assert push.msg_type == "text" and push.event is None and push.msg_id == "1234567890123456"
    assert push.detail == Message(msg_id="1234567890123456", content="this is a test", extra={"MsgDataId": "9"})


def test_missing_and_empty_fields_default_to_none() -> None:
    """Only MsgType is required; absent or empty fields are None in the columns and the record."""
    push = parse_push({"MsgType": "event", "Event": "user_get_card", "CardId": "", "UserCardCode": ""})
    assert push.detail == UserGetCard()
    assert (push.openid, push.to_user, push.create_time, push.card_id, push.code) == (None, None, None, None, None)


def test_garbage_in_typed_fields_is_kept_raw() -> None:
    """Non-numeric or non-0/1 values never crash: the typed field is None and the raw value goes to extra."""
    push = parse_push(wire(sample_fields(
        "user_pay_from_pay_cell", Fee="12.50", OriginalFee="１００", CardId="c", TransId="t")))
    assert isinstance(push.detail, UserPayFromPayCell)
    assert push.detail.fee is None and push.detail.original_fee is None
    assert push.detail.extra == {"Fee": "12.50", "OriginalFee": "１００"}
    flags = parse_push(wire(sample_fields("user_get_card", IsGiveByFriend="yes", IsRestoreMemberCard=2, OuterId="-")))
    assert isinstance(flags.detail, UserGetCard)
    detail = flags.detail
    assert detail.is_give_by_friend is None and detail.is_restore_member_card is None and detail.outer_id is None
    assert flags.detail.extra == {"IsGiveByFriend": "yes", "IsRestoreMemberCard": "2", "OuterId": "-"}


def test_nested_element_where_text_is_expected() -> None:
    """An element where text belongs is kept in extra; the column and the record field are None."""
    fields = wire(sample_fields("card_pay_order"))
    fields["OrderId"] = {"Evil": "1"}
    push = parse_push(fields)
    assert isinstance(push.detail, CardPayOrder)
    assert push.detail.order_id is None and push.detail.extra == {"OrderId": {"Evil": "1"}}


def test_negative_amounts_parse() -> None:
    """Bonus and balance changes can be negative (a deduction)."""
    push = parse_push(wire(sample_fields("update_member_card", ModifyBonus=-30, ModifyBalance="-100")))
    assert isinstance(push.detail, UpdateMemberCard)
    assert (push.detail.modify_bonus, push.detail.modify_balance) == (-30, -100)


@pytest.mark.parametrize("fields", [{}, {"MsgType": ""}, {"MsgType": {"A": "event"}}, {"Event": "user_get_card"}])
def test_msg_type_is_required(fields: dict[str, Any]) -> None:
    """Without a text MsgType the push is malformed."""
    with pytest.raises(MalformedError, match="MsgType"):
        parse_push(fields)


@pytest.mark.parametrize("create_time", ["abc", "1.5", "1e9", {"A": "1"}])
def test_create_time_must_be_an_integer(create_time: Any) -> None:
    """A present, non-integer CreateTime is malformed (empty is just absent)."""
    with pytest.raises(MalformedError, match="CreateTime"):
        parse_push({"MsgType": "event", "CreateTime": create_time})
    assert parse_push({"MsgType": "event", "CreateTime": ""}).create_time is None


def test_push_is_frozen() -> None:
    """Push and records are immutable once parsed."""
    push = parse_push(sample_fields("user_del_card"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        push.code = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        push.detail.extra = {}  # type: ignore[misc]


def test_dedupe_key_separates_cards_received_in_one_call() -> None:
    """One wx.addCard of two cards: same user and second, different card/code, so different keys."""
    first = sample_fields("user_get_card", CreateTime=1472551036)
    second = sample_fields("user_get_card", CreateTime=1472551036, CardId="pOther", UserCardCode="999")
    same_card_other_code = sample_fields("user_get_card", CreateTime=1472551036, UserCardCode="999")
    keys = {dedupe_key(first), dedupe_key(second), dedupe_key(same_card_other_code)}
    assert len(keys) == 3


def test_dedupe_key_is_stable_for_a_retried_push() -> None:
    """A retry (the same push re-sent, re-parsed) has the same key, whether values are text or ints."""
    fields = sample_fields("user_get_card", CreateTime=1472551036)
    key = dedupe_key(fields)
    assert len(key) == 64 and int(key, 16) >= 0
    assert dedupe_key(wire(fields)) == key
    assert parse_push(wire(fields)).dedupe_key == parse_push(fields).dedupe_key == key


def test_dedupe_key_is_unambiguous() -> None:
    """Moving a separator-like character between fields changes the key (no naive joining)."""
    a = {"MsgType": "event", "Event": "user_get_card", "CardId": "a|b", "UserCardCode": "c"}
    b = {"MsgType": "event", "Event": "user_get_card", "CardId": "a", "UserCardCode": "b|c"}
    c = {"MsgType": "event", "Event": "user_get_card", "CardId": 'a","b', "UserCardCode": "c"}
    assert len({dedupe_key(a), dedupe_key(b), dedupe_key(c)}) == 3


def test_dedupe_key_other_events_use_their_fields() -> None:
    """Two different events by the same user in the same second differ; a different account differs."""
    base = sample_fields("user_del_card", CreateTime=1)
    assert dedupe_key(base) != dedupe_key({**base, "Event": "user_view_card"})
    assert dedupe_key(base) != dedupe_key({**base, "ToUserName": "gh_other"})
    assert dedupe_key(base) != dedupe_key({**base, "FromUserName": "oOther"})
    assert dedupe_key(base) != dedupe_key({**base, "CreateTime": 2})


def test_dedupe_key_for_messages() -> None:
    """Messages dedupe on MsgId (per account); without MsgId on sender, time and type."""
    msg = {"ToUserName": "gh_x", "FromUserName": "o1", "CreateTime": "1", "MsgType": "text", "MsgId": "42"}
    assert dedupe_key(msg) == dedupe_key({**msg, "CreateTime": "2", "Content": "edited"})
    assert dedupe_key(msg) != dedupe_key({**msg, "MsgId": "43"})
    assert dedupe_key(msg) != dedupe_key({**msg, "ToUserName": "gh_y"})
    no_id = {k: v for k, v in msg.items() if k != "MsgId"}
    assert dedupe_key(no_id) != dedupe_key({**no_id, "CreateTime": "2"})
    assert dedupe_key(no_id) != dedupe_key({**no_id, "MsgType": "image"})
    assert dedupe_key(no_id) == dedupe_key({**no_id, "Content": "other"})


def test_sample_fields_overrides_and_time() -> None:
    """Overrides use Weixin names and win; CreateTime defaults to now; other events get the envelope only."""
    before = int(time.time())
    fields = sample_fields("user_get_card", CardId="pX", OuterStr="chan", FromUserName="oMe")
    assert before <= fields["CreateTime"] <= int(time.time())
    assert (fields["CardId"], fields["OuterStr"], fields["FromUserName"]) == ("pX", "chan", "oMe")
    assert fields["ToUserName"].startswith("gh_") and fields["MsgType"] == "event"
    assert set(sample_fields("subscribe")) == COMMON
    assert parse_push(sample_fields("subscribe")).detail == UnknownEvent(event="subscribe")


TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "0", "1", "-5", "12.5", "99999999999999999999"]))
RAW_VALUE = st.one_of(TEXT, st.dictionaries(st.text(max_size=5), TEXT, max_size=2), st.lists(TEXT, max_size=2))
KNOWN_NAMES = sorted(set().union(*PROTOCOL_TABLE.values()) | COMMON | {"MsgId"})
ANY_NAME = st.one_of(st.sampled_from(KNOWN_NAMES), st.text(max_size=8))


@settings(max_examples=300, deadline=None)
@given(
    event=st.one_of(st.sampled_from(CARD_EVENTS), st.text(max_size=10)),
    msg_type=st.sampled_from(["event", "text", "image"]),
    fields=st.dictionaries(ANY_NAME, RAW_VALUE, max_size=10),
)
def test_parse_push_never_crashes_and_never_loses_data(event: str, msg_type: str, fields: dict[str, Any]) -> None:
    """Any field values give a Push or MalformedError; every field is in `fields`, and each is modelled or in extra."""
    fields = {**fields, "MsgType": msg_type, "Event": event}
    try:
        push = parse_push(fields)
    except MalformedError:
        assert not isinstance(fields.get("CreateTime"), str) or fields["CreateTime"] != ""
        return
    assert isinstance(push, Push) and push.fields == fields
    names = modelled(type(push.detail))
    for name, raw in fields.items():
        if name in COMMON:
            continue
        if name in push.detail.extra:
            assert push.detail.extra[name] == raw
        else:
            assert name in names, f"{name} dropped"
