"""The fake Weixin's member-card side over real HTTP: the activation component's two kinds and activate's errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from webhook.weixin_api import WeixinAPIError, WeixinClient
from workers.fake_weixin import FakeWeixin, FakeWeixinError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FIELDS = {"USER_FORM_INFO_FLAG_MOBILE": "15500000000", "USER_FORM_INFO_FLAG_NAME": "HK"}


def create(fake: FakeWeixin, name: str) -> str:
    return fake.state.create_card(json.loads((EXAMPLES / name).read_text())["card"])


def submit(fake: FakeWeixin, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{fake.url}/sandbox/submit-activation", json=body, timeout=5)


def test_redirect_card_hands_back_a_ticket_and_stays_inactive(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """wx_activate_after_submit: the plug-in's extraData; temp info has the form; no membership until activate."""
    card_id = create(fake_weixin, "member_card.json")
    added = fake_weixin.add_card(card_id, "oUser")
    resp = submit(fake_weixin, {"card_id": card_id, "code": added["code"], "openid": "oUser", "fields": FIELDS,
                                "custom_fields": {"Milk": ["Oat"]}})
    assert resp.status_code == 200
    extra = resp.json()
    assert weixin_client.decrypt_code(extra["encrypt_code"]) == added["code"] and extra["card_id"] == card_id
    info = weixin_client.get_activate_temp_info(extra["activate_ticket"])["info"]
    assert info["common_field_list"] == [{"name": k, "value": v} for k, v in FIELDS.items()]
    assert info["custom_field_list"] == [{"name": "Milk", "value_list": ["Oat"]}]
    assert "membership_number" not in weixin_client.get_code(added["code"], card_id=card_id)
    weixin_client.activate_member_card(membership_number="M1", code=added["code"], card_id=card_id, init_balance=5)
    held = weixin_client.get_code(added["code"], card_id=card_id)
    assert (held["membership_number"], held["balance"], held["bonus"]) == ("M1", 5, 0)
    assert held["user_info"]["common_field_list"] == info["common_field_list"]


def test_non_redirect_card_is_activated_by_weixin(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    """wx_activate without after_submit: activated at once, membership number = code, the form in card/code/get."""
    card_id = create(fake_weixin, "member_card_non_redirect.json")
    added = fake_weixin.add_card(card_id, "oUser")
    result = fake_weixin.submit_activation(card_id, added["code"], "oUser", fields=FIELDS)
    assert result["activated"] is True and "activate_ticket" not in result
    held = weixin_client.get_code(added["code"], card_id=card_id)
    assert held["membership_number"] == added["code"]
    assert {f["name"]: f["value"] for f in held["user_info"]["common_field_list"]} == FIELDS
    assert fake_weixin.state.codes[added["code"]].activations == 0  # not through card/membercard/activate


@pytest.mark.parametrize(
    ("change", "errcode"),
    [
        ({"card_id": "pNoSuchCard"}, 40073),
        ({"openid": "oSomeoneElse"}, 40097),
        ({"fields": ["x"]}, 40097),
        ({"code": None}, 41011),
    ],
)
def test_submit_activation_refusals(fake_weixin: FakeWeixin, change: dict[str, Any], errcode: int) -> None:
    """Unknown card, someone else's code, a malformed form, a missing field: 400 with Weixin's errcode."""
    card_id = create(fake_weixin, "member_card.json")
    added = fake_weixin.add_card(card_id, "oUser")
    body = {"card_id": card_id, "code": added["code"], "openid": "oUser", "fields": FIELDS, **change}
    resp = submit(fake_weixin, {k: v for k, v in body.items() if v is not None})
    assert resp.status_code == 400 and resp.json()["errcode"] == errcode


def test_cards_without_the_component_or_already_active_are_refused(fake_weixin: FakeWeixin) -> None:
    """A coupon, or a member card already activated, has no activation form to fill."""
    added = fake_weixin.add_card("pPlainCoupon", "oUser")
    with pytest.raises(FakeWeixinError) as caught:
        fake_weixin.submit_activation("pPlainCoupon", added["code"], "oUser", fields=FIELDS)
    assert caught.value.errcode == 40097 and "wx_activate" in caught.value.errmsg
    card_id = create(fake_weixin, "member_card_non_redirect.json")
    held = fake_weixin.add_card(card_id, "oUser")
    fake_weixin.submit_activation(card_id, held["code"], "oUser", fields=FIELDS)
    with pytest.raises(FakeWeixinError, match="already activated"):
        fake_weixin.submit_activation(card_id, held["code"], "oUser", fields=FIELDS)


@pytest.mark.parametrize(
    ("fields", "errcode"),
    [
        ({"membership_number": "M" * 21}, 40097),
        ({"init_custom_field_value1": "金卡会员等级"}, 40097),  # 18 bytes
        ({"background_pic_url": "https://mmbiz.qlogo.cn/" + "a" * 110}, 40097),
        ({"membership_number": ""}, 41011),
    ],
)
def test_activate_errors_like_weixin(
    fake_weixin: FakeWeixin, weixin_client: WeixinClient, fields: dict[str, Any], errcode: int
) -> None:
    """card/membercard/activate refuses what breaks its documented limits; nothing is applied."""
    card_id = create(fake_weixin, "member_card.json")
    added = fake_weixin.add_card(card_id, "oUser")
    body = {"membership_number": "M1", "code": added["code"], "card_id": card_id, **fields}
    token = weixin_client.get_access_token()
    reply = requests.post(f"{fake_weixin.url}/card/membercard/activate", params={"access_token": token},
                          json=body, timeout=5).json()
    assert reply["errcode"] == errcode
    assert fake_weixin.state.codes[added["code"]].activations == 0


def test_activating_a_deleted_card_is_40127(fake_weixin: FakeWeixin, weixin_client: WeixinClient) -> None:
    card_id = create(fake_weixin, "member_card.json")
    added = fake_weixin.add_card(card_id, "oUser")
    fake_weixin.delete_card(card_id, added["code"])
    with pytest.raises(WeixinAPIError) as caught:
        weixin_client.activate_member_card(membership_number="M1", code=added["code"], card_id=card_id)
    assert caught.value.errcode == 40127
