"""Card configuration: every local validation error with its JSON path, the example files, and `wxcoupon cards`."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from workers.cardconfig import (
    validate_activate_request,
    validate_activation_form,
    validate_card,
    validate_card_patch,
)
from workers.cli import main
from workers.fake_weixin import FakeWeixin

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CARD_FILES = ("member_card.json", "member_card_non_redirect.json")


def load(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text())


def test_the_example_files_pass_validation() -> None:
    """The shipped examples are valid as they are (a card with the activation component and entries, a form, a patch)."""
    for name in CARD_FILES:
        assert validate_card(load(name)) == [], name
    assert validate_activation_form(load("activation_form.json")) == []
    assert validate_card_patch(load("member_card_patch.json")) == []
    card = load("member_card.json")["card"]["member_card"]
    assert card["wx_activate"] is True and card["wx_activate_after_submit"] is True  # redirect-based
    assert sum(k.endswith("_app_brand_user_name") for k in {**card, **card["base_info"]}) >= 4  # Mini Program entries


def mutated(change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(load("member_card.json"))
    change(doc["card"]["member_card"])
    return doc


def _set(**values: Any) -> Any:
    return lambda body: body.update(values)


def _base(**values: Any) -> Any:
    return lambda body: body["base_info"].update(values)


def _drop(*names: str) -> Any:
    def change(body: dict[str, Any]) -> None:
        for name in names:
            body.pop(name, None)
            body.get("base_info", {}).pop(name, None)

    return change


M = "$.card.member_card"


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (_set(wx_activate=False), f"{M}.wx_activate_after_submit", "needs wx_activate"),
        (_drop("wx_activate"), f"{M}.wx_activate_after_submit", "needs wx_activate"),
        (_set(auto_activate=True), f"{M}.auto_activate", "cannot be true with wx_activate"),
        (_set(wx_activate="yes"), f"{M}.wx_activate", "true or false"),
        (_drop("activate_app_brand_user_name", "activate_app_brand_pass"), f"{M}.activate_app_brand_user_name",
         "redirect-based"),
        (_set(activate_app_brand_user_name="wx86a091e50ad4aaaa"), f"{M}.activate_app_brand_user_name", "not the original id"),
        (_set(bonus_app_brand_user_name="gh_86a091e50ad4"), f"{M}.bonus_app_brand_user_name", "followed by @app"),
        (_set(bonus_app_brand_user_name="gh_86a091e50@app"), f"{M}.bonus_app_brand_user_name", "original id"),
        (_base(custom_app_brand_user_name="gh_86a091e50ad4!@app"), f"{M}.base_info.custom_app_brand_user_name", "@app"),
        (_base(promotion_app_brand_pass="https://example.com/page"), f"{M}.base_info.promotion_app_brand_pass", "not a URL"),
        (_base(center_app_brand_pass="/pages/pay/index"), f"{M}.base_info.center_app_brand_pass", "leading /"),
        (_base(center_app_brand_pass="pages/pay index"), f"{M}.base_info.center_app_brand_pass", "page path"),
        (_base(center_app_brand_pass="p/" + "x" * 130), f"{M}.base_info.center_app_brand_pass", "128 bytes"),
        (_base(custom_app_brand_pass=""), f"{M}.base_info.custom_app_brand_pass", "page path"),
        (_drop("custom_app_brand_pass"), f"{M}.base_info.custom_app_brand_pass", "required with custom_app_brand_user_name"),
        (_drop("bonus_app_brand_user_name"), f"{M}.bonus_app_brand_user_name", "required with bonus_app_brand_pass"),
        (lambda b: b["custom_field1"].update(app_brand_user_name="gh_x@app"), f"{M}.custom_field1.app_brand_user_name",
         "original id"),
        (lambda b: b["custom_field1"].pop("app_brand_pass"), f"{M}.custom_field1.app_brand_pass", "required"),
        (lambda b: b["custom_cell1"].update(app_brand_pass="http://x.cn"), f"{M}.custom_cell1.app_brand_pass", "not a URL"),
        (_set(custom_cell2="cell"), f"{M}.custom_cell2", "must be an object"),
        (_set(background_pic_url="https://mmbiz.qlogo.cn/" + "a" * 110), f"{M}.background_pic_url", "at most 128"),
        (_drop("base_info"), f"{M}.base_info", "must be an object"),
    ],
)
def test_every_card_error_names_its_field(change: Any, path: str, words: str) -> None:
    """Each broken rule gives a problem at the field's JSON path with a message that says why."""
    problems = validate_card(mutated(change))
    assert [p.path for p in problems] == [path], problems
    assert words in problems[0].message


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ([], "$"),
        ({}, "$.card"),
        ({"card": {"card_type": "LOYALTY"}}, "$.card.card_type"),
        ({"card": {"card_type": "MEMBER_CARD"}}, "$.card.member_card"),
        ({"card": {"card_type": "GENERAL_COUPON", "general_coupon": {"base_info": {}, "wx_activate": True}}},
         "$.card.general_coupon.wx_activate"),
    ],
)
def test_malformed_card_documents(doc: Any, path: str) -> None:
    assert [p.path for p in validate_card(doc)] == [path]


def test_all_problems_are_reported_at_once() -> None:
    """A file with several mistakes gets all of them, not the first."""
    def change(body: dict[str, Any]) -> None:
        body.update(auto_activate=True, bonus_app_brand_pass="/x")
        body["base_info"]["custom_app_brand_user_name"] = "nope"

    paths = {p.path for p in validate_card(mutated(change))}
    assert paths == {f"{M}.auto_activate", f"{M}.bonus_app_brand_pass", f"{M}.base_info.custom_app_brand_user_name"}


@pytest.mark.parametrize(
    ("doc", "card_id", "path", "words"),
    [
        ({"member_card": {"wx_activate": False, "wx_activate_after_submit": True}}, None,
         "$.member_card.wx_activate_after_submit", "needs wx_activate"),
        ({"member_card": {"base_info": {"custom_app_brand_user_name": "gh_86a091e50ad4"}}}, None,
         "$.member_card.base_info.custom_app_brand_user_name", "@app"),
        ({"member_card": {}, "general_coupon": {}}, None, "$", "exactly one"),
        ({"title": "x"}, None, "$.title", "not a card/update field"),
        ({"card_id": "pOther", "member_card": {}}, "pMine", "$.card_id", "--card-id"),
        ({"card_id": "p" * 33, "member_card": {}}, None, "$.card_id", "32 bytes"),
        ({"member_card": {"background_pic_url": "h" * 129}}, None, "$.member_card.background_pic_url", "128"),
    ],
)
def test_patch_errors(doc: Any, card_id: str | None, path: str, words: str) -> None:
    """card/update bodies: the same entry and activation rules, plus the shape of a patch."""
    problems = validate_card_patch(doc, card_id)
    assert path in [p.path for p in problems], problems
    assert any(words in p.message for p in problems if p.path == path)


def test_a_patch_may_turn_on_redirect_activation_without_repeating_the_rest() -> None:
    """A patch cannot know the card's other settings: only contradictions inside it are errors."""
    assert validate_card_patch({"member_card": {"wx_activate_after_submit": True}}) == []


FORM_FIELD = "USER_FORM_INFO_FLAG_MOBILE"


@pytest.mark.parametrize(
    ("doc", "path", "words"),
    [
        ({}, "$", "required_form or optional_form"),
        ({"required_form": {"common_field_id_list": ["USER_FORM_INFO_FLAG_PHONE"]}},
         "$.required_form.common_field_id_list[0]", "is not a USER_FORM_INFO_FLAG_* field id"),
        ({"required_form": {"common_field_id_list": ["USER_FORM_INFO_FLAG_EDUCATION_BACKGROUND"]}},
         "$.required_form.common_field_id_list[0]", "use USER_FORM_INFO_FLAG_EDUCATION_BACKGRO"),
        ({"required_form": {"common_field_id_list": [FORM_FIELD, FORM_FIELD]}},
         "$.required_form.common_field_id_list[1]", "twice"),
        ({"required_form": {"common_field_id_list": [FORM_FIELD]}, "optional_form": {"common_field_id_list": [FORM_FIELD]}},
         "$.optional_form.common_field_id_list", "already in required_form"),
        ({"required_form": {"common_field_id_list": FORM_FIELD}}, "$.required_form.common_field_id_list", "list"),
        ({"required_form": {"can_modify": "no"}}, "$.required_form.can_modify", "true or false"),
        ({"required_form": {"custom_field_list": [""]}}, "$.required_form.custom_field_list", "field names"),
        ({"required_form": {"rich_field_list": [{"type": "FORM_FIELD_TEXT", "name": "a", "values": ["x"]}]}},
         "$.required_form.rich_field_list[0].type", "FORM_FIELD_RADIO"),
        ({"required_form": {"rich_field_list": [{"type": "FORM_FIELD_RADIO", "name": "a", "values": []}]}},
         "$.required_form.rich_field_list[0].values", "non-empty"),
        ({"required_form": {"extra": 1}}, "$.required_form.extra", "not a form field"),
        ({"required_form": {}, "service_statement": {"name": "Terms", "url": "ftp://x"}}, "$.service_statement.url",
         "http(s)"),
        ({"required_form": {}, "bind_old_card": {"url": "https://x"}}, "$.bind_old_card.name", "required"),
        ({"required_form": {}, "welcome": "hi"}, "$.welcome", "not an activation form field"),
        ({"card_id": "pOther", "required_form": {}}, "$.card_id", "--card-id"),
    ],
)
def test_activation_form_errors(doc: Any, path: str, words: str) -> None:
    """Field ids from the USER_FORM_INFO_FLAG_* set, each once; the form's shape."""
    problems = validate_activation_form(doc, "pMine")
    assert [p.path for p in problems] == [path], problems
    assert words in problems[0].message


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"code": "1"}, "$.membership_number"),
        ({"membership_number": "M" * 21, "code": "1"}, "$.membership_number"),
        ({"membership_number": "M1", "code": "1" * 21}, "$.code"),
        ({"membership_number": "M1", "code": "1", "card_id": "p" * 33}, "$.card_id"),
        ({"membership_number": "M1", "code": "1", "init_custom_field_value2": "金卡会员等级"}, "$.init_custom_field_value2"),
        ({"membership_number": "M1", "code": "1", "background_pic_url": "h" * 129}, "$.background_pic_url"),
        ({"membership_number": "M1", "code": "1", "init_bonus": -1}, "$.init_bonus"),
        ({"membership_number": "M1", "code": "1", "init_balance": True}, "$.init_balance"),
    ],
)
def test_activate_request_limits(body: dict[str, Any], path: str) -> None:
    """The seed's limits on card/membercard/activate (bytes: 12 for custom values, 20 for numbers and codes)."""
    assert [p.path for p in validate_activate_request(body)] == [path]
    assert validate_activate_request({"membership_number": "M" * 20, "code": "1" * 20,
                                      "init_custom_field_value1": "金卡会员"}) == []  # exactly at the limits


# -- wxcoupon cards ---------------------------------------------------------------------------


@pytest.fixture
def cards_env(fake_weixin: FakeWeixin, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeWeixin:
    """`wxcoupon` pointed at the fake Weixin for its account."""
    env = {"WECHAT_TOKEN": "wxcoupontesttoken", "WECHAT_APPID": fake_weixin.appid,
           "WECHAT_APPSECRET": fake_weixin.appsecret, "WECHAT_API_BASE": fake_weixin.url, "REDIS_URL": redis_url,
           "WXCOUPON_INSTANCE_PATH": str(tmp_path / "instance")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return fake_weixin


def test_cards_create_update_and_form_reach_weixin(cards_env: FakeWeixin) -> None:
    """The example files, validated then sent: the fake Weixin holds the card, its patch and its form."""
    runner = CliRunner()
    created = runner.invoke(main, ["cards", "create", "--file", str(EXAMPLES / "member_card.json")])
    assert created.exit_code == 0, created.output
    card_id = created.stdout.strip()
    definition = cards_env.state.cards[card_id].definition["member_card"]
    assert definition["wx_activate_after_submit"] is True
    updated = runner.invoke(main, ["cards", "update", "--card-id", card_id, "--file", str(EXAMPLES / "member_card_patch.json")])
    assert updated.exit_code == 0, updated.output
    assert definition["base_info"]["custom_app_brand_pass"] == "pages/order/index?from=card"
    form = runner.invoke(main, ["cards", "set-activation-form", "--card-id", card_id,
                                "--file", str(EXAMPLES / "activation_form.json")])
    assert form.exit_code == 0, form.output
    user_form = cards_env.state.cards[card_id].user_form
    assert user_form is not None
    assert user_form["required_form"]["common_field_id_list"] == ["USER_FORM_INFO_FLAG_MOBILE", "USER_FORM_INFO_FLAG_NAME"]


def test_an_invalid_file_is_never_sent(cards_env: FakeWeixin, tmp_path: Path) -> None:
    """Every problem printed with its path, exit status non-zero, no call made to Weixin."""
    bad = mutated(lambda b: b.update(auto_activate=True, activate_app_brand_pass="https://x"))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = CliRunner().invoke(main, ["cards", "create", "--file", str(path)])
    assert result.exit_code != 0
    assert f"{M}.auto_activate" in result.output and f"{M}.activate_app_brand_pass" in result.output
    assert "2 problem(s)" in result.output and "nothing was sent" in result.output
    (tmp_path / "broken.json").write_text("{")
    broken = CliRunner().invoke(main, ["cards", "validate", "--kind", "card", "--file", str(tmp_path / "broken.json")])
    assert broken.exit_code != 0 and "not JSON" in broken.output
    assert cards_env.stats() == {}


def test_weixin_refusals_are_reported(cards_env: FakeWeixin) -> None:
    """A card Weixin does not know: the errcode is shown."""
    result = CliRunner().invoke(main, ["cards", "update", "--card-id", "pUnknown",
                                       "--file", str(EXAMPLES / "member_card_patch.json")])
    assert result.exit_code != 0 and "40073" in result.output


def test_a_create_whose_answer_was_lost_says_it_may_have_been_applied(cards_env: FakeWeixin) -> None:
    """card/create made the card, then a gateway answered 502: not 'refused', and not sent a second time."""
    cards_env.inject_fault("/card/create", applied=True, http_status=502)
    result = CliRunner().invoke(main, ["cards", "create", "--file", str(EXAMPLES / "member_card.json")])
    assert result.exit_code != 0
    assert "refused" not in result.output and "may have applied it" in result.output
    assert cards_env.calls("/card/create") == 1 and len(cards_env.state.cards) == 1


def test_validate_needs_no_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cards validate` is local only: it works with no account configured."""
    monkeypatch.delenv("WECHAT_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["cards", "validate", "--kind", "form", "--file", str(EXAMPLES / "activation_form.json")])
    assert result.exit_code == 0 and "ok" in result.output


def test_redis_is_only_needed_to_send(cards_env: FakeWeixin, redis_client: redis.Redis) -> None:
    """The access_token the command fetched is shared through Redis like every other process's."""
    CliRunner().invoke(main, ["cards", "create", "--file", str(EXAMPLES / "member_card_non_redirect.json")])
    assert any(b"access_token" in key for key in redis_client.keys())
