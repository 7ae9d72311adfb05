"""In-memory state of the fake Weixin: one Official Account, its tokens, cards and codes.

Every method is thread-safe (the HTTP server is threaded) and either returns a
value or raises `WeixinFailure` carrying the errcode Weixin would answer.
Sandbox actions (what a user does in the Weixin app) also return the events
Weixin would push for them, as `PushEvent`s.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import secrets
import string
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from Crypto.Cipher import AES
from Crypto.Util.Padding import pad, unpad

CODE_STATUSES = ("NORMAL", "CONSUMED", "DELETE", "GIFTING", "GIFT_SUCC", "EXPIRE")
CARD_TYPES = ("MEMBER_CARD", "GENERAL_COUPON", "GROUPON", "CASH", "DISCOUNT", "GIFT", "SCENIC_TICKET", "MOVIE_TICKET")
DEFAULT_TOKEN_TTL = 7200  # seconds, as Weixin grants
DEFAULT_TICKET_TTL = 7200
DEFAULT_ACTIVATE_TICKET_TTL = 1800  # activate_ticket lifetime (72012 after it)

# errmsg Weixin sends with each errcode (the fake appends a request id, as Weixin does).
ERRMSGS: dict[int, str] = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40013: "invalid appid",
    40014: "invalid access_token",
    40056: "invalid serial code",
    40071: "invalid card type",
    40073: "invalid card id",
    40080: "invalid card ext",
    40097: "invalid args",
    40099: "invalid code, this code has consumed.",
    40116: "invalid code",
    40125: "invalid appsecret",
    40127: "invalid user-card status! the card has been deleted by the user or is being gifted",
    41001: "access_token missing",
    41011: "missing required field",
    42001: "access_token expired",
    45009: "reach max api daily quota limit",
    47001: "data format error",
    72012: "activate ticket expired",
}


class WeixinFailure(Exception):
    """An errcode the fake answers instead of a result."""

    def __init__(self, errcode: int, errmsg: str | None = None) -> None:
        self.errcode = errcode
        self.errmsg = errmsg or ERRMSGS.get(errcode, "error")
        super().__init__(errcode, self.errmsg)


@dataclass
class PushEvent:
    """One event Weixin would push: its type, the user it is about, its XML fields."""

    event: str
    openid: str
    fields: dict[str, str]


@dataclass
class Fault:
    """A misbehaviour injected for the next `remaining` calls of one path."""

    remaining: int
    errcode: int | None = None
    errmsg: str | None = None
    latency_ms: int = 0
    drop: bool = False
    http_status: int | None = None
    raw: bytes | None = None  # the reply body as is, instead of Weixin's JSON (status: http_status or 200)
    chunked: bool = False  # send `raw` in chunks with no Content-Length, as a streaming upstream does
    content_encoding: str | None = None  # a Content-Encoding header on the raw reply (the body is not encoded here)
    applied: bool = False  # the call happens first (its change is made); then the reply is this fault's


@dataclass
class Card:
    """A card definition (card/create, or created on the fly by the sandbox)."""

    card_id: str
    card_type: str
    definition: dict[str, Any]
    user_form: dict[str, Any] | None = None


@dataclass
class UserCard:
    """One code held by one user."""

    card_id: str
    code: str
    openid: str
    status: str = "NORMAL"
    outer_str: str = ""
    unionid: str = ""
    old_code: str = ""  # the giver's code when this one came as a gift
    begin_time: int = 0
    end_time: int = 0
    membership: dict[str, Any] | None = None  # set by card/membercard/activate
    activations: int = 0  # how many times card/membercard/activate applied
    user_info: dict[str, Any] = field(default_factory=lambda: {"common_field_list": [], "custom_field_list": []})


@dataclass
class _Issued:
    kind: str  # "token", "stable" or "ticket"
    expires_at: float
    superseded: bool = False


@dataclass
class _ActivateTicket:
    card_id: str
    code: str
    info: dict[str, Any]
    expires_at: float


def _text(body: Mapping[str, Any], name: str, required: bool = True) -> str:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise WeixinFailure(41011, f"missing required field {name}")
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise WeixinFailure(40097, f"invalid args: {name}")
    return str(value)


class FakeState:
    """Tokens, cards, codes, faults and call counts of one fake Official Account."""

    def __init__(
        self,
        appid: str,
        appsecret: str,
        *,
        token_ttl: int = DEFAULT_TOKEN_TTL,
        ticket_ttl: int = DEFAULT_TICKET_TTL,
        activate_ticket_ttl: int = DEFAULT_ACTIVATE_TICKET_TTL,
        secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.appid = appid
        self.appsecret = appsecret
        self.token_ttl = token_ttl
        self.ticket_ttl = ticket_ttl
        self.activate_ticket_ttl = activate_ticket_ttl
        self.clock = clock
        master = secret or secrets.token_bytes(32)
        self._enc_key = hmac.new(master, b"encrypt", hashlib.sha256).digest()
        self._mac_key = hmac.new(master, b"synthetic-iv", hashlib.sha256).digest()
        # The account's biz: base64 of a 10-digit number, as Weixin's (e.g. MjM5Mzc0OTEwMA==).
        self.biz = base64.b64encode(str(10**9 + secrets.randbelow(9 * 10**9)).encode()).decode()
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget every token, card, code, fault and count (the code key stays)."""
        with self.lock:
            self.calls: Counter[str] = Counter()
            self.faults: dict[str, deque[Fault]] = {}
            self._issued: dict[str, _Issued] = {}
            self._latest: dict[str, str] = {}
            self.cards: dict[str, Card] = {}
            self.codes: dict[str, UserCard] = {}
            self._activate_tickets: dict[str, _ActivateTicket] = {}

    # -- code encryption: deterministic, like Weixin's encrypt_code ----------

    def encrypt(self, value: str) -> str:
        """Deterministic, authenticated encryption (synthetic IV), standard base64 as Weixin uses."""
        raw = value.encode()
        iv = hmac.new(self._mac_key, raw, hashlib.sha256).digest()[:16]
        sealed = AES.new(self._enc_key, AES.MODE_CBC, iv).encrypt(pad(raw, 16))
        return base64.b64encode(iv + sealed).decode()

    def decrypt(self, token: str) -> str | None:
        """The plaintext of `encrypt`, or None for anything this fake did not produce."""
        try:
            blob = base64.b64decode(token, validate=True)
            if len(blob) < 32 or len(blob) % 16:
                return None
            raw = unpad(AES.new(self._enc_key, AES.MODE_CBC, blob[:16]).decrypt(blob[16:]), 16)
        except ValueError:
            return None
        expected = hmac.new(self._mac_key, raw, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(expected, blob[:16]):
            return None
        return raw.decode("utf-8", "replace")

    # -- calls and faults ------------------------------------------------------

    def count_call(self, path: str) -> None:
        """Record one call of a Weixin API path."""
        with self.lock:
            self.calls[path] += 1

    def add_fault(self, path: str, fault: Fault) -> None:
        """Queue a fault for the next `fault.remaining` calls of `path`."""
        with self.lock:
            self.faults.setdefault("/" + path.lstrip("/"), deque()).append(fault)

    def take_fault(self, path: str) -> Fault | None:
        """The fault that applies to this call of `path`, if any (consumes one use)."""
        with self.lock:
            queue = self.faults.get(path)
            if not queue:
                return None
            fault = queue[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.popleft()
            return fault

    # -- credentials -------------------------------------------------------------

    def _issue(self, kind: str, ttl: int, prefix: str) -> tuple[str, int]:
        old = self._latest.get(kind)
        if old is not None:
            self._issued[old].superseded = True
        value = prefix + secrets.token_urlsafe(48)
        self._issued[value] = _Issued(kind, self.clock() + ttl)
        self._latest[kind] = value
        return value, ttl

    def _current(self, kind: str) -> tuple[str, int] | None:
        value = self._latest.get(kind)
        if value is None:
            return None
        remaining = int(self._issued[value].expires_at - self.clock())
        return (value, remaining) if remaining > 0 else None

    def _check_account(self, appid: str, secret: str) -> None:
        if appid != self.appid:
            raise WeixinFailure(40013)
        if not hmac.compare_digest(secret.encode(), self.appsecret.encode()):
            raise WeixinFailure(40125)

    def issue_token(self, grant_type: str, appid: str, secret: str) -> tuple[str, int]:
        """cgi-bin/token: always a new token; the previous one stops working (40001)."""
        if grant_type != "client_credential":
            raise WeixinFailure(40002)
        with self.lock:
            self._check_account(appid, secret)
            return self._issue("token", self.token_ttl, "FAKETOKEN_")

    def issue_stable_token(self, grant_type: str, appid: str, secret: str, force_refresh: bool) -> tuple[str, int]:
        """cgi-bin/stable_token: the same token while valid, unless force_refresh.

        Weixin keeps stable tokens apart from cgi-bin/token ones: neither
        endpoint invalidates the other's tokens.
        """
        if grant_type != "client_credential":
            raise WeixinFailure(40002)
        with self.lock:
            self._check_account(appid, secret)
            current = self._current("stable")
            if current is not None and not force_refresh:
                return current
            return self._issue("stable", self.token_ttl, "FAKESTABLE_")

    def check_token(self, token: str | None) -> None:
        """Raise what Weixin answers for a missing, unknown, replaced or expired token."""
        if not token:
            raise WeixinFailure(41001)
        with self.lock:
            issued = self._issued.get(token)
            if issued is None or issued.kind == "ticket":
                if not token.startswith(("FAKETOKEN_", "FAKESTABLE_")):
                    raise WeixinFailure(40014)
                raise WeixinFailure(40001)
            if issued.superseded:
                raise WeixinFailure(40001)
            if issued.expires_at <= self.clock():
                raise WeixinFailure(42001)

    def card_ticket(self, ticket_type: str) -> tuple[str, int]:
        """cgi-bin/ticket/getticket?type=wx_card: the same ticket while valid."""
        if ticket_type != "wx_card":
            raise WeixinFailure(40097, "invalid args: type (this fake serves wx_card only)")
        with self.lock:
            return self._current("ticket") or self._issue("ticket", self.ticket_ttl, "FAKETICKET_")

    def valid_card_tickets(self) -> list[str]:
        """Every wx_card api_ticket still valid (a replaced one stays valid until it expires)."""
        now = self.clock()
        with self.lock:
            return [v for v, i in self._issued.items() if i.kind == "ticket" and i.expires_at > now]

    # -- cards and codes -----------------------------------------------------------

    def _new_card_id(self) -> str:
        alphabet = string.ascii_letters + string.digits + "_-"
        return "p" + "".join(secrets.choice(alphabet) for _ in range(27))

    def _card(self, card_id: str) -> Card:
        card = self.cards.get(card_id)
        if card is None:
            raise WeixinFailure(40073)
        return card

    def _code(self, code: str, card_id: str = "") -> UserCard:
        held = self.codes.get(code)
        if held is None or (card_id and held.card_id != card_id):
            raise WeixinFailure(40056)
        return held

    def create_card(self, card: Any) -> str:
        """card/create: a definition `{card_type, <type lowercased>: {base_info, ...}}`."""
        if not isinstance(card, dict):
            raise WeixinFailure(41011, "missing required field card")
        card_type = card.get("card_type")
        if card_type not in CARD_TYPES:
            raise WeixinFailure(40071)
        body = card.get(str(card_type).lower())
        if not isinstance(body, dict) or not isinstance(body.get("base_info"), dict):
            raise WeixinFailure(41011, f"missing required field {str(card_type).lower()}.base_info")
        with self.lock:
            card_id = self._new_card_id()
            self.cards[card_id] = Card(card_id, str(card_type), copy.deepcopy(card))
            return card_id

    def update_card(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """card/update: merge the patch into the definition (the card keeps its type)."""
        card_id = _text(body, "card_id")
        with self.lock:
            card = self._card(card_id)
            key = card.card_type.lower()
            patch = body.get(key)
            if not isinstance(patch, dict):
                raise WeixinFailure(41011, f"missing required field {key}")
            _merge(card.definition.setdefault(key, {}), patch)
            return {"send_check": False}

    def set_user_form(self, body: Mapping[str, Any]) -> None:
        """card/membercard/activateuserform/set: remember the form of a card."""
        card_id = _text(body, "card_id")
        with self.lock:
            self._card(card_id).user_form = {k: copy.deepcopy(v) for k, v in body.items() if k != "card_id"}

    def activate_url(self, card_id: str, outer_str: str) -> str:
        """card/membercard/activate/geturl: the plug-in parameters, URL-encoded in a URL."""
        from urllib.parse import quote

        with self.lock:
            self._card(card_id)
        return (
            "https://mp.weixin.qq.com/bizmall/activatemembercard?action=preshow"
            f"&&encrypt_card_id={quote(self.encrypt(card_id), safe='')}"
            f"&outer_str={quote(outer_str, safe='')}&biz={quote(self.biz, safe='')}#wechat_redirect"
        )

    def decrypt_code(self, encrypt_code: str) -> str:
        """card/code/decrypt: the real code, 40056 for anything not made by this fake."""
        code = self.decrypt(encrypt_code)
        if code is None or code not in self.codes:
            raise WeixinFailure(40056)
        return code

    def get_code(self, code: str, card_id: str, check_consume: bool) -> dict[str, Any]:
        """card/code/get, with Weixin's two answers for codes not in NORMAL status."""
        with self.lock:
            held = self._code(code, card_id)
            if held.status == "GIFT_SUCC":
                raise WeixinFailure(40056)  # a gifted-away code is unknown to Weixin
            if check_consume:
                if held.status == "CONSUMED":
                    raise WeixinFailure(40099)
                if held.status in ("DELETE", "GIFTING"):
                    raise WeixinFailure(40127)
            reply: dict[str, Any] = {
                "card": {"card_id": held.card_id, "begin_time": held.begin_time, "end_time": held.end_time},
                "openid": held.openid,
                "can_consume": held.status == "NORMAL",
                "outer_str": held.outer_str,
                "user_card_status": held.status,
            }
            if held.membership is not None:
                reply.update(copy.deepcopy(held.membership))
                reply["user_info"] = copy.deepcopy(held.user_info)
            return reply

    def activate_temp_info(self, activate_ticket: str) -> dict[str, Any]:
        """card/membercard/activatetempinfo/get: the submitted form, until the ticket expires."""
        with self.lock:
            ticket = self._activate_tickets.get(activate_ticket)
            if ticket is None:
                raise WeixinFailure(40097, "invalid args: activate_ticket")
            if ticket.expires_at <= self.clock():
                raise WeixinFailure(72012)
            return {"info": copy.deepcopy(ticket.info)}

    def activate(self, body: Mapping[str, Any]) -> None:
        """card/membercard/activate: attach membership data to a NORMAL code."""
        membership_number = _text(body, "membership_number")
        code = _text(body, "code")
        _check_activate_lengths(body)
        with self.lock:
            held = self._code(code, _text(body, "card_id", required=False))
            if held.status == "CONSUMED":
                raise WeixinFailure(40099)
            if held.status != "NORMAL":
                raise WeixinFailure(40127)
            held.membership = {
                "membership_number": membership_number,
                "bonus": int(body.get("init_bonus") or 0),
                "balance": int(body.get("init_balance") or 0),
            }
            for key in ("background_pic_url", "activate_begin_time", "activate_end_time", "init_bonus_record",
                        "init_custom_field_value1", "init_custom_field_value2", "init_custom_field_value3"):
                if key in body:
                    held.membership[key] = body[key]
            held.activations += 1

    # -- sandbox: what users do in the Weixin app -------------------------------------

    def _event(self, event: str, openid: str, **fields: str) -> PushEvent:
        base = {"FromUserName": openid, "CreateTime": str(int(self.clock())), "MsgType": "event", "Event": event}
        return PushEvent(event, openid, {**base, **fields})

    def _check_card_ext(self, card_id: str, openid: str, card_ext: str) -> dict[str, str]:
        """Verify a cardExt as wx.addCard does: the signature over the wx_card api_ticket."""
        try:
            ext = json.loads(card_ext)
        except ValueError:
            raise WeixinFailure(40080, "invalid card ext: not JSON") from None
        if not isinstance(ext, dict):
            raise WeixinFailure(40080, "invalid card ext: not an object")
        values = {k: str(ext.get(k) or "") for k in ("code", "openid", "timestamp", "nonce_str", "signature", "outer_str")}
        if values["openid"] and values["openid"] != openid:
            raise WeixinFailure(40080, "invalid card ext: openid is another user")
        for ticket in self.valid_card_tickets():
            parts = [ticket, values["timestamp"], card_id, values["code"], values["openid"], values["nonce_str"]]
            digest = hashlib.sha1("".join(sorted(p for p in parts if p)).encode()).hexdigest()
            if hmac.compare_digest(digest, values["signature"]):
                return values
        raise WeixinFailure(40080, "invalid card ext: signature mismatch")

    def add_card(
        self, card_id: str, openid: str, code: str = "", outer_str: str = "", unionid: str = "",
        card_ext: str = "",
    ) -> tuple[UserCard, list[PushEvent]]:
        """The user adds a card (wx.addCard); with `card_ext` its signature is checked."""
        with self.lock:
            if card_ext:
                ext = self._check_card_ext(card_id, openid, card_ext)
                code = code or ext["code"]
                outer_str = outer_str or ext["outer_str"]
            if card_id not in self.cards:
                # Sandbox convenience: a card nobody created is a plain coupon.
                self.cards[card_id] = Card(card_id, "GENERAL_COUPON", {"card_type": "GENERAL_COUPON"})
            if code and code in self.codes:
                raise WeixinFailure(40116, "invalid code: already issued")
            while not code or code in self.codes:
                code = f"{secrets.randbelow(10**12):012d}"
            now = int(self.clock())
            held = UserCard(card_id, code, openid, outer_str=outer_str, unionid=unionid,
                            begin_time=now, end_time=now + 30 * 86400)
            self.codes[code] = held
            return held, [self._received(held)]

    def _received(self, held: UserCard, giver: str = "") -> PushEvent:
        return self._event(
            "user_get_card", held.openid, CardId=held.card_id, UserCardCode=held.code,
            IsGiveByFriend="1" if giver else "0", FriendUserName=giver, OuterId="0",
            OldUserCardCode=held.old_code, OuterStr=held.outer_str, IsRestoreMemberCard="0",
            IsRecommendByFriend="0", UnionId=held.unionid,
        )

    def _normal(self, card_id: str, code: str) -> UserCard:
        held = self._code(code, card_id)
        if held.status == "CONSUMED":
            raise WeixinFailure(40099)
        if held.status != "NORMAL":
            raise WeixinFailure(40127)
        return held

    def delete_card(self, card_id: str, code: str) -> tuple[UserCard, list[PushEvent]]:
        """The user deletes the card from Cards & Offers."""
        with self.lock:
            held = self._code(code, card_id)
            if held.status in ("DELETE", "GIFT_SUCC"):
                raise WeixinFailure(40127)
            held.status = "DELETE"
            return held, [self._event("user_del_card", held.openid, CardId=card_id, UserCardCode=code)]

    def consume_card(self, card_id: str, code: str, source: str = "FROM_API") -> tuple[UserCard, list[PushEvent]]:
        """The code is consumed (redeemed)."""
        with self.lock:
            held = self._normal(card_id, code)
            held.status = "CONSUMED"
            return held, [self._event(
                "user_consume_card", held.openid, CardId=card_id, UserCardCode=code, ConsumeSource=source,
                LocationName="", StaffOpenId="", VerifyCode="", RemarkAmount="", OuterStr=held.outer_str,
            )]

    def gift_card(self, card_id: str, code: str, to_openid: str) -> tuple[UserCard, list[PushEvent]]:
        """The holder gifts the card and the friend accepts: a new code for the friend."""
        with self.lock:
            old = self._normal(card_id, code)
            if to_openid == old.openid:
                raise WeixinFailure(40097, "invalid args: cannot gift to oneself")
            new_code = ""
            while not new_code or new_code in self.codes:
                new_code = f"{secrets.randbelow(10**12):012d}"
            old.status = "GIFT_SUCC"
            new = UserCard(card_id, new_code, to_openid, old_code=old.code,
                           begin_time=old.begin_time, end_time=old.end_time)
            self.codes[new_code] = new
            gifting = self._event(
                "user_gifting_card", old.openid, CardId=card_id, UserCardCode=old.code,
                IsReturnBack="0", FriendUserName=to_openid, IsChatRoom="0",
            )
            return new, [gifting, self._received(new, giver=old.openid)]

    def set_status(self, card_id: str, code: str, status: str) -> UserCard:
        """Force a status (EXPIRE, GIFTING...) without any push."""
        if status not in CODE_STATUSES:
            raise WeixinFailure(40097, f"invalid args: status must be one of {', '.join(CODE_STATUSES)}")
        with self.lock:
            held = self._code(code, card_id)
            held.status = status
            return held

    def submit_activation(
        self, card_id: str, code: str, openid: str, info: Mapping[str, Any], ttl: int | None = None,
    ) -> tuple[dict[str, Any], list[PushEvent]]:
        """The user fills the activation component of a member card, as its card/create data says.

        Redirect-based (wx_activate_after_submit true): the plug-in hands the
        Mini Program {activate_ticket, card_id, encrypt_code}; the card is not
        active until card/membercard/activate. Non-redirect: Weixin activates
        the card at once (membership number = code) and pushes
        submit_membercard_user_info; card/code/get then returns the form.
        """
        with self.lock:
            card = self._card(card_id)
            member = card.definition.get("member_card") if card.card_type == "MEMBER_CARD" else None
            if not isinstance(member, dict) or member.get("wx_activate") is not True:
                raise WeixinFailure(40097, "invalid args: the card has no activation component (wx_activate)")
            held = self._normal(card_id, code)
            if held.openid != openid:
                raise WeixinFailure(40097, "invalid args: openid does not hold this code")
            if held.membership is not None:
                raise WeixinFailure(40097, "invalid args: the card is already activated")
            form = {
                "common_field_list": copy.deepcopy(list(info.get("common_field_list") or [])),
                "custom_field_list": copy.deepcopy(list(info.get("custom_field_list") or [])),
            }
            held.user_info = copy.deepcopy(form)
            if member.get("wx_activate_after_submit") is True:
                ticket = secrets.token_urlsafe(24)
                lifetime = self.activate_ticket_ttl if ttl is None else ttl
                self._activate_tickets[ticket] = _ActivateTicket(card_id, code, form, self.clock() + lifetime)
                return {"activate_ticket": ticket, "card_id": card_id, "encrypt_code": self.encrypt(code)}, []
            held.membership = {"membership_number": code, "bonus": 0, "balance": 0}
            event = self._event("submit_membercard_user_info", held.openid, CardId=card_id, UserCardCode=code)
            return {"card_id": card_id, "code": code, "encrypt_code": self.encrypt(code), "activated": True}, [event]

    def submit_activation_form(
        self, card_id: str, code: str, info: Mapping[str, Any], ttl: int | None = None,
    ) -> tuple[str, list[PushEvent]]:
        """The user submits the activation plug-in's form: an activate_ticket for the Mini Program."""
        with self.lock:
            held = self._normal(card_id, code)
            form = {
                "common_field_list": list(info.get("common_field_list") or []),
                "custom_field_list": list(info.get("custom_field_list") or []),
            }
            held.user_info = copy.deepcopy(form)
            ticket = secrets.token_urlsafe(24)
            lifetime = self.activate_ticket_ttl if ttl is None else ttl
            self._activate_tickets[ticket] = _ActivateTicket(card_id, code, form, self.clock() + lifetime)
            event = self._event("submit_membercard_user_info", held.openid, CardId=card_id, UserCardCode=code)
            return ticket, [event]


# card/membercard/activate's documented limits, in bytes; the fake answers 40097 beyond them.
ACTIVATE_LIMITS = {
    "membership_number": 20, "code": 20, "card_id": 32, "background_pic_url": 128,
    "init_custom_field_value1": 12, "init_custom_field_value2": 12, "init_custom_field_value3": 12,
}  # fmt: skip


def _check_activate_lengths(body: Mapping[str, Any]) -> None:
    for name, limit in ACTIVATE_LIMITS.items():
        value = body.get(name)
        if value is not None and len(str(value).encode("utf-8")) > limit:
            raise WeixinFailure(40097, f"invalid args: {name} longer than {limit} bytes")


def form_info(fields: Mapping[str, Any], custom_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A {name: value} form as Weixin's info: common_field_list and custom_field_list."""

    def listed(values: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, value in values.items():
            if isinstance(value, list):
                out.append({"name": str(name), "value_list": [str(v) for v in value]})
            else:
                out.append({"name": str(name), "value": str(value)})
        return out

    return {"common_field_list": listed(fields), "custom_field_list": listed(custom_fields or {})}


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
