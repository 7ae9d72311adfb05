"""Typed views of a parsed push: one frozen record per card event, and the Push envelope."""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Any, ClassVar

from webhook.errors import MalformedError

# Converters return this for a value of the wrong shape: the field stays None
# and the raw value is kept in `extra`, so nothing Weixin sent is lost.
_INVALID: Any = object()
_INT_RE = re.compile(r"-?[0-9]{1,18}")  # ASCII only; int() would take "١", "+1", "1_0"

# Modelled by Push itself, so never copied into a record's `extra`.
_ENVELOPE_FIELDS = frozenset({"ToUserName", "FromUserName", "CreateTime", "MsgType", "Event"})


def _as_str(raw: Any) -> Any:
    if isinstance(raw, str):
        return raw or None
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return _INVALID  # a nested element where text was expected


def _as_int(raw: Any) -> Any:
    if isinstance(raw, str):
        if not raw:
            return None
        return int(raw) if _INT_RE.fullmatch(raw) else _INVALID
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    return _INVALID


def _as_flag(raw: Any) -> Any:
    if isinstance(raw, bool):
        return raw
    value = _as_int(raw)
    if value is None or value is _INVALID:
        return value
    # Weixin's flags are 0/1; any other number is kept raw rather than guessed at.
    return bool(value) if value in (0, 1) else _INVALID


def _wx(name: str, convert: Callable[[Any], Any]) -> Any:
    return field(default=None, metadata={"wx": name, "convert": convert})


def _text(name: str) -> Any:
    return _wx(name, _as_str)


def _number(name: str) -> Any:
    return _wx(name, _as_int)


def _flag(name: str) -> Any:
    return _wx(name, _as_flag)


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of the typed records; `extra` keeps every field the record does not model."""

    EVENT: ClassVar[str | None] = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, kw_only=True)
class CardPassCheck(Record):
    """card_pass_check: the card passed review."""

    EVENT = "card_pass_check"
    card_id: str | None = _text("CardId")
    refuse_reason: str | None = _text("RefuseReason")


@dataclass(frozen=True, kw_only=True)
class CardNotPassCheck(Record):
    """card_not_pass_check: the card failed review."""

    EVENT = "card_not_pass_check"
    card_id: str | None = _text("CardId")
    refuse_reason: str | None = _text("RefuseReason")


@dataclass(frozen=True, kw_only=True)
class UserGetCard(Record):
    """user_get_card: a user received a card (coupon receipt)."""

    EVENT = "user_get_card"
    card_id: str | None = _text("CardId")
    is_give_by_friend: bool | None = _flag("IsGiveByFriend")
    code: str | None = _text("UserCardCode")
    friend_openid: str | None = _text("FriendUserName")
    outer_id: int | None = _number("OuterId")
    old_code: str | None = _text("OldUserCardCode")
    outer_str: str | None = _text("OuterStr")
    is_restore_member_card: bool | None = _flag("IsRestoreMemberCard")
    is_recommend_by_friend: bool | None = _flag("IsRecommendByFriend")
    unionid: str | None = _text("UnionId")
    source_scene: str | None = _text("SourceScene")


@dataclass(frozen=True, kw_only=True)
class UserGiftingCard(Record):
    """user_gifting_card: a user gave a card to a friend."""

    EVENT = "user_gifting_card"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")
    is_return_back: bool | None = _flag("IsReturnBack")
    friend_openid: str | None = _text("FriendUserName")
    is_chat_room: bool | None = _flag("IsChatRoom")


@dataclass(frozen=True, kw_only=True)
class UserDelCard(Record):
    """user_del_card: a user deleted a card."""

    EVENT = "user_del_card"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")


@dataclass(frozen=True, kw_only=True)
class UserConsumeCard(Record):
    """user_consume_card: a card was redeemed."""

    EVENT = "user_consume_card"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")
    consume_source: str | None = _text("ConsumeSource")  # FROM_API / FROM_MP / FROM_MOBILE_HELPER
    location_name: str | None = _text("LocationName")
    staff_openid: str | None = _text("StaffOpenId")
    verify_code: str | None = _text("VerifyCode")
    remark_amount: str | None = _text("RemarkAmount")  # free text typed at the till, not fen
    outer_str: str | None = _text("OuterStr")


@dataclass(frozen=True, kw_only=True)
class UserPayFromPayCell(Record):
    """user_pay_from_pay_cell: a user paid through the card's pay cell (amounts in fen)."""

    EVENT = "user_pay_from_pay_cell"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")
    trans_id: str | None = _text("TransId")
    location_id: str | None = _text("LocationId")  # an id: digits, but never arithmetic
    fee: int | None = _number("Fee")
    original_fee: int | None = _number("OriginalFee")


@dataclass(frozen=True, kw_only=True)
class UserViewCard(Record):
    """user_view_card: a user opened the card's detail page."""

    EVENT = "user_view_card"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")
    outer_str: str | None = _text("OuterStr")


@dataclass(frozen=True, kw_only=True)
class UserEnterSessionFromCard(Record):
    """user_enter_session_from_card: a user entered the account's chat from a card."""

    EVENT = "user_enter_session_from_card"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")


@dataclass(frozen=True, kw_only=True)
class UpdateMemberCard(Record):
    """update_member_card: a member card's bonus or balance changed."""

    EVENT = "update_member_card"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")
    modify_bonus: int | None = _number("ModifyBonus")
    modify_balance: int | None = _number("ModifyBalance")


@dataclass(frozen=True, kw_only=True)
class CardSkuRemind(Record):
    """card_sku_remind: a card's stock is running out."""

    EVENT = "card_sku_remind"
    card_id: str | None = _text("CardId")
    detail: str | None = _text("Detail")


@dataclass(frozen=True, kw_only=True)
class CardPayOrder(Record):
    """card_pay_order: a change in a card-coin order."""

    EVENT = "card_pay_order"
    order_id: str | None = _text("OrderId")
    status: str | None = _text("Status")
    create_order_time: int | None = _number("CreateOrderTime")
    pay_finish_time: int | None = _number("PayFinishTime")
    desc: str | None = _text("Desc")
    free_coin_count: int | None = _number("FreeCoinCount")
    pay_coin_count: int | None = _number("PayCoinCount")
    refund_free_coin_count: int | None = _number("RefundFreeCoinCount")
    refund_pay_coin_count: int | None = _number("RefundPayCoinCount")
    order_type: str | None = _text("OrderType")
    memo: str | None = _text("Memo")
    receipt_info: str | None = _text("ReceiptInfo")


@dataclass(frozen=True, kw_only=True)
class SubmitMembercardUserInfo(Record):
    """submit_membercard_user_info: a user submitted the member-card activation form."""

    EVENT = "submit_membercard_user_info"
    card_id: str | None = _text("CardId")
    code: str | None = _text("UserCardCode")


@dataclass(frozen=True, kw_only=True)
class UnknownEvent(Record):
    """An event this module does not model (yet); everything is in `extra`."""

    event: str | None = _text("Event")


@dataclass(frozen=True, kw_only=True)
class Message(Record):
    """A user message (MsgType other than event); type-specific fields beyond these are in `extra`."""

    msg_id: str | None = _text("MsgId")
    content: str | None = _text("Content")
    media_id: str | None = _text("MediaId")
    pic_url: str | None = _text("PicUrl")


EVENT_TYPES: dict[str, type[Record]] = {
    cls.EVENT: cls
    for cls in (
        CardPassCheck,
        CardNotPassCheck,
        UserGetCard,
        UserGiftingCard,
        UserDelCard,
        UserConsumeCard,
        UserPayFromPayCell,
        UserViewCard,
        UserEnterSessionFromCard,
        UpdateMemberCard,
        CardSkuRemind,
        CardPayOrder,
        SubmitMembercardUserInfo,
    )
    if cls.EVENT is not None
}
CARD_EVENTS: tuple[str, ...] = tuple(EVENT_TYPES)

_Spec = tuple[tuple[tuple[str, str, Callable[[Any], Any]], ...], frozenset[str]]


def _spec(cls: type[Record]) -> _Spec:
    """(attribute, Weixin name, converter) per field, and the Weixin names not to copy to extra."""
    columns = tuple(
        (f.name, f.metadata["wx"], f.metadata["convert"]) for f in dataclass_fields(cls) if "wx" in f.metadata
    )
    return columns, _ENVELOPE_FIELDS | {wx for _, wx, _ in columns}


# Computed once: the hot path must not introspect dataclasses per push.
_SPECS: dict[type[Record], _Spec] = {cls: _spec(cls) for cls in (*EVENT_TYPES.values(), UnknownEvent, Message)}


def _record(cls: type[Record], fields: Mapping[str, Any]) -> Record:
    """Build `cls` from fields, keeping unmodelled and ill-typed values in extra."""
    columns, modelled = _SPECS[cls]
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for attribute, name, convert in columns:
        raw = fields.get(name)
        if raw is None:
            continue
        value = convert(raw)
        if value is _INVALID:
            extra[name] = raw
        else:
            values[attribute] = value
    for name, raw in fields.items():
        if name not in modelled:
            extra[name] = raw
    return cls(extra=extra, **values)


def _column(raw: Any) -> str | None:
    """A Push column value: text or None (empty, absent, or a nested element)."""
    value = _as_str(raw)
    return None if value is _INVALID else value


@dataclass(frozen=True)
class Push:
    """One parsed push: the indexed columns, the typed record, and every field as received."""

    msg_type: str
    event: str | None
    openid: str | None  # FromUserName: the user's openid in the Official Account
    to_user: str | None
    create_time: int | None
    card_id: str | None
    code: str | None  # UserCardCode
    old_code: str | None
    outer_str: str | None
    unionid: str | None
    friend_openid: str | None
    msg_id: str | None
    detail: Record
    fields: dict[str, Any] = field(hash=False)
    dedupe_key: str


# Weixin's FromUserName + CreateTime is too coarse for cards: one wx.addCard of
# several cards gives several pushes from one user in one second.
_EVENT_KEY_FIELDS = ("ToUserName", "FromUserName", "CreateTime", "Event", "CardId", "UserCardCode")


def _key_part(raw: Any) -> Any:
    """Normalise a value for the dedupe key: "", absent -> None; ints as text."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    return raw


def dedupe_key(fields: Mapping[str, Any]) -> str:
    """The sha256 hex that is equal for a retried push and differs between distinct pushes."""
    get = fields.get
    if get("MsgType") == "event":
        parts = ["event", *(get(name) for name in _EVENT_KEY_FIELDS)]
    elif _key_part(get("MsgId")) is not None:
        parts = ["msg", get("ToUserName"), get("MsgId")]
    else:
        parts = ["msg", get("ToUserName"), get("FromUserName"), get("CreateTime"), get("MsgType")]
    # A JSON list is unambiguous where joining with a separator is not.
    payload = json.dumps([_key_part(p) for p in parts], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def parse_push(fields: Mapping[str, Any]) -> Push:
    """Turn parsed fields into a Push; MalformedError without MsgType or with a non-integer CreateTime."""
    msg_type = _column(fields.get("MsgType"))
    if msg_type is None:
        raise MalformedError("missing MsgType")
    create_time = _as_int(fields.get("CreateTime", ""))
    if create_time is _INVALID:
        raise MalformedError("bad CreateTime")
    if msg_type == "event":
        event = _column(fields.get("Event"))
        cls = EVENT_TYPES.get(event, UnknownEvent) if event else UnknownEvent
    else:
        event, cls = None, Message
    get = fields.get
    return Push(
        msg_type=msg_type,
        event=event,
        openid=_column(get("FromUserName")),
        to_user=_column(get("ToUserName")),
        create_time=create_time,
        card_id=_column(get("CardId")),
        code=_column(get("UserCardCode")),
        old_code=_column(get("OldUserCardCode")),
        outer_str=_column(get("OuterStr")),
        unionid=_column(get("UnionId")),
        friend_openid=_column(get("FriendUserName")),
        msg_id=_column(get("MsgId")),
        detail=_record(cls, fields),
        fields=dict(fields),
        dedupe_key=dedupe_key(fields),
    )


# Realistic values, modelled on the samples in Weixin's documentation.
_SAMPLE_ACCOUNT = "gh_fc0a06a20993"
_SAMPLE_OPENID = "oZI8Fj040-be6rlDohc6gkoPOQTQ"
_SAMPLE_FRIEND = "oZI8Fj1Mq1-gKNE-SWHsDJwqMYeg"
_SAMPLE_CARD = "pZI8Fjwsy5fVPRBeD78J4RmqVvBc"
_SAMPLE_CODE = "226009850808"
_SAMPLES: dict[str, dict[str, str | int]] = {
    "card_pass_check": {"CardId": _SAMPLE_CARD, "RefuseReason": ""},
    "card_not_pass_check": {"CardId": _SAMPLE_CARD, "RefuseReason": "卡券图片不清晰"},
    "user_get_card": {
        "CardId": _SAMPLE_CARD, "IsGiveByFriend": 0, "UserCardCode": _SAMPLE_CODE, "FriendUserName": "",
        "OuterId": 0, "OldUserCardCode": "", "OuterStr": "12b", "IsRestoreMemberCard": 0,
        "IsRecommendByFriend": 0, "UnionId": "o6_bmasdasdsad6_2sgVt7hMZOPfL", "SourceScene": "SOURCE_SCENE_QRCODE",
    },
    "user_gifting_card": {
        "CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE, "IsReturnBack": 0,
        "FriendUserName": _SAMPLE_FRIEND, "IsChatRoom": 0,
    },
    "user_del_card": {"CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE},
    "user_consume_card": {
        "CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE, "ConsumeSource": "FROM_API",
        "LocationName": "测试门店", "StaffOpenId": "oZI8Fj7T3hBZLb-3GMDnX6KUjJbQ", "VerifyCode": "",
        "RemarkAmount": "", "OuterStr": "12b",
    },
    "user_pay_from_pay_cell": {
        "CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE, "TransId": "10022403432015929927",
        "LocationId": 291710847, "Fee": 10000, "OriginalFee": 10000,
    },
    "user_view_card": {"CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE, "OuterStr": "12b"},
    "user_enter_session_from_card": {"CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE},
    "update_member_card": {"CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE, "ModifyBonus": 3, "ModifyBalance": 0},
    "card_sku_remind": {"CardId": _SAMPLE_CARD, "Detail": "the card's quantity is equal to 0"},
    "card_pay_order": {
        "OrderId": "404091456", "Status": "ORDER_STATUS_FINANCE_SUCC", "CreateOrderTime": 1472551036,
        "PayFinishTime": 1472551036, "Desc": "", "FreeCoinCount": 200, "PayCoinCount": 0,
        "RefundFreeCoinCount": 0, "RefundPayCoinCount": 0, "OrderType": "ORDER_TYPE_SYS_ADD",
        "Memo": "开通账户奖励", "ReceiptInfo": "",
    },
    "submit_membercard_user_info": {"CardId": _SAMPLE_CARD, "UserCardCode": _SAMPLE_CODE},
}


def sample_fields(event: str, **overrides: str | int) -> dict[str, Any]:
    """A complete, realistic field dict for an event (CreateTime now); overrides use Weixin names."""
    # An event outside the table gets the envelope fields only: the simulator and
    # the tests send such events on purpose, to prove they are kept.
    specific = _SAMPLES.get(event, {})
    fields: dict[str, Any] = {
        "ToUserName": _SAMPLE_ACCOUNT,
        "FromUserName": _SAMPLE_OPENID,
        "CreateTime": int(time.time()),
        "MsgType": "event",
        "Event": event,
        **specific,
    }
    fields.update(overrides)
    return fields
