"""Card configuration checked locally, before anything is sent to Weixin.

Pure functions: a parsed JSON document in, every problem out, each with the
JSON path of the field it is about (`$.card.member_card.wx_activate`). The
rules are the ones the seed and the protocol notes state:

- activation: `wx_activate_after_submit` (redirect-based activation
  component) needs `wx_activate`; `wx_activate` excludes `auto_activate`; a
  redirect-based card names the Mini Program page that receives the ticket
  (`activate_app_brand_user_name` / `activate_app_brand_pass`);
- Mini Program entries: every `*_app_brand_user_name` is an original id
  followed by `@app` (`gh_86a091e50ad4@app`), every `*_app_brand_pass` a page
  path (`API/cardPage`), and they come in pairs;
- lengths (in UTF-8 bytes): membership_number and code 20, card_id 32,
  background_pic_url 128, init_custom_field_value1..3 12;
- activation form field ids are Weixin's USER_FORM_INFO_FLAG_* ids. The seed
  lists the education field as USER_FORM_INFO_FLAG_EDUCATION_BACKGRO (in both
  of its field tables) while one sample answer shows ..._BACKGROUND: forms sent
  to Weixin must use the listed id; the other spelling gets a hint.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhook.members import COMMON_FIELD_IDS, FIELD_ID_ALIASES, MAX_CARD_ID, MAX_CODE, MAX_MEMBERSHIP_NUMBER

CARD_TYPES = (
    "MEMBER_CARD", "GENERAL_COUPON", "GROUPON", "CASH", "DISCOUNT", "GIFT", "SCENIC_TICKET", "MOVIE_TICKET",
    "BOARDING_PASS", "MEETING_TICKET", "BUS_TICKET",
)  # fmt: skip
ENTRY_HOLDERS = ("custom_field1", "custom_field2", "custom_field3", "custom_cell1", "custom_cell2")
FORM_KEYS = ("card_id", "service_statement", "bind_old_card", "required_form", "optional_form")
FORM_PART_KEYS = ("can_modify", "common_field_id_list", "custom_field_list", "rich_field_list")
RICH_FIELD_TYPES = ("FORM_FIELD_RADIO", "FORM_FIELD_SELECT", "FORM_FIELD_CHECK_BOX")
MAX_BACKGROUND_PIC_URL = 128
MAX_CUSTOM_FIELD_VALUE = 12
MAX_PAGE_PATH = 128
USER_NAME_SUFFIX = "app_brand_user_name"  # custom_app_brand_user_name, or app_brand_user_name in custom_field1
PASS_SUFFIX = "app_brand_pass"

_USER_NAME_RE = re.compile(r"^gh_[0-9A-Za-z]{12}@app$")
# A page path inside the Mini Program, optionally with a query: API/cardPage, pages/card/index?from=card
_PAGE_PATH_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*(\?[A-Za-z0-9_.~%=&-]*)?$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a document, at a JSON path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _nbytes(value: str) -> int:
    return len(value.encode("utf-8"))


class _Checker:
    """Collects problems while walking one document."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def obj(self, value: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.add(path, "must be an object")
            return None
        return value

    def max_bytes(self, parent: Mapping[str, Any], name: str, path: str, limit: int, required: bool = False) -> None:
        value = parent.get(name)
        if value is None or value == "":
            if required:
                self.add(f"{path}.{name}", "is required")
            return
        if not isinstance(value, str):
            self.add(f"{path}.{name}", "must be a string")
        elif _nbytes(value) > limit:
            self.add(f"{path}.{name}", f"is {_nbytes(value)} bytes; Weixin takes at most {limit}")

    def boolean(self, parent: Mapping[str, Any], name: str, path: str) -> None:
        if name in parent and not isinstance(parent[name], bool):
            self.add(f"{path}.{name}", "must be true or false")

    def user_name(self, value: Any, path: str) -> None:
        if isinstance(value, str) and _USER_NAME_RE.match(value):
            return
        hint = ""
        if isinstance(value, str) and value.startswith("wx"):
            hint = " (an appid such as wx... is not the original id)"
        self.add(path, f"must be the Mini Program's original id followed by @app, e.g. gh_86a091e50ad4@app{hint}")

    def page_path(self, value: Any, path: str) -> None:
        if not isinstance(value, str) or not value:
            self.add(path, "must be a Mini Program page path such as API/cardPage")
        elif "://" in value:
            self.add(path, "must be a Mini Program page path such as API/cardPage, not a URL")
        elif value.startswith("/"):
            self.add(path, "must be a page path without a leading /, e.g. API/cardPage")
        elif _nbytes(value) > MAX_PAGE_PATH:
            self.add(path, f"is longer than {MAX_PAGE_PATH} bytes")
        elif not _PAGE_PATH_RE.match(value):
            self.add(path, "must be a page path of letters, digits, _ - . separated by /, e.g. API/cardPage")

    def entries(self, level: Mapping[str, Any], path: str) -> None:
        """The *_app_brand_user_name / *_app_brand_pass pairs directly in one object."""
        for key, value in level.items():
            if key == USER_NAME_SUFFIX or key.endswith("_" + USER_NAME_SUFFIX):
                self.user_name(value, f"{path}.{key}")
                partner = key[: -len(USER_NAME_SUFFIX)] + PASS_SUFFIX
                if partner not in level:
                    self.add(f"{path}.{partner}", f"is required with {key} (the page to open)")
            elif key == PASS_SUFFIX or key.endswith("_" + PASS_SUFFIX):
                self.page_path(value, f"{path}.{key}")
                partner = key[: -len(PASS_SUFFIX)] + USER_NAME_SUFFIX
                if partner not in level:
                    self.add(f"{path}.{partner}", f"is required with {key} (the Mini Program to open)")

    def card_body(self, body: dict[str, Any], path: str, card_type: str | None, creating: bool) -> None:
        base_info = body.get("base_info")
        if creating or base_info is not None:
            base = self.obj(base_info, f"{path}.base_info")
            if base is not None:
                self.entries(base, f"{path}.base_info")
        self.entries(body, path)
        for holder in ENTRY_HOLDERS:
            if holder in body:
                inner = self.obj(body[holder], f"{path}.{holder}")
                if inner is not None:
                    self.entries(inner, f"{path}.{holder}")
        self.max_bytes(body, "background_pic_url", path, MAX_BACKGROUND_PIC_URL)
        if card_type == "MEMBER_CARD":
            self.activation(body, path, creating)
        else:
            for key in ("wx_activate", "wx_activate_after_submit"):
                if key in body:
                    self.add(f"{path}.{key}", "only member cards have the activation component")

    def activation(self, body: Mapping[str, Any], path: str, creating: bool) -> None:
        for key in ("wx_activate", "wx_activate_after_submit", "auto_activate"):
            self.boolean(body, key, path)
        wx_activate = body.get("wx_activate") is True
        if body.get("wx_activate_after_submit") is True:
            # Missing, or false: a non-boolean is reported above already.
            if body.get("wx_activate", False) is False and (creating or "wx_activate" in body):
                self.add(f"{path}.wx_activate_after_submit",
                         "needs wx_activate: true (it is a mode of the activation component)")
            names = ("activate_app_brand_user_name", "activate_app_brand_pass")
            if creating and not any(name in body for name in names):  # one of the two: the pair check tells
                self.add(
                    f"{path}.{names[0]}",
                    f"and {names[1]} are required for redirect-based activation (wx_activate_after_submit: true): "
                    "the Mini Program page that receives the activate_ticket",
                )
        if wx_activate and body.get("auto_activate") is True:
            self.add(f"{path}.auto_activate", "cannot be true with wx_activate: true (a card has one activation method)")

    def card_id(self, doc: Mapping[str, Any], expected: str | None) -> None:
        if "card_id" not in doc:
            return
        value = doc["card_id"]
        if not isinstance(value, str) or not value:
            self.add("$.card_id", "must be a non-empty string")
        elif _nbytes(value) > MAX_CARD_ID:
            self.add("$.card_id", f"is longer than {MAX_CARD_ID} bytes")
        elif expected is not None and value != expected:
            self.add("$.card_id", f"is {value!r} but --card-id is {expected!r}")

    def form_part(self, part: dict[str, Any], path: str) -> list[str]:
        for key in part:
            if key not in FORM_PART_KEYS:
                self.add(f"{path}.{key}", f"is not a form field (expected {', '.join(FORM_PART_KEYS)})")
        self.boolean(part, "can_modify", path)
        ids: list[str] = []
        listed = part.get("common_field_id_list", [])
        if not isinstance(listed, list):
            self.add(f"{path}.common_field_id_list", "must be a list of USER_FORM_INFO_FLAG_* ids")
            listed = []
        for i, field_id in enumerate(listed):
            at = f"{path}.common_field_id_list[{i}]"
            if field_id in FIELD_ID_ALIASES:
                listed_id = FIELD_ID_ALIASES[field_id]
                self.add(at, f"use {listed_id}: the id Weixin's field lists give ({field_id} only appears in answers)")
            elif field_id not in COMMON_FIELD_IDS:
                self.add(at, f"is not a USER_FORM_INFO_FLAG_* field id (one of {', '.join(COMMON_FIELD_IDS)})")
            elif field_id in ids:
                self.add(at, "is listed twice")
            else:
                ids.append(field_id)
        custom = part.get("custom_field_list", [])
        if not isinstance(custom, list) or not all(isinstance(c, str) and c for c in custom):
            self.add(f"{path}.custom_field_list", "must be a list of field names (non-empty strings)")
        rich = part.get("rich_field_list", [])
        if not isinstance(rich, list):
            self.add(f"{path}.rich_field_list", "must be a list of {type, name, values}")
            rich = []
        for i, item in enumerate(rich):
            at = f"{path}.rich_field_list[{i}]"
            entry = self.obj(item, at)
            if entry is None:
                continue
            if entry.get("type") not in RICH_FIELD_TYPES:
                self.add(f"{at}.type", f"must be one of {', '.join(RICH_FIELD_TYPES)}")
            if not isinstance(entry.get("name"), str) or not entry.get("name"):
                self.add(f"{at}.name", "is required")
            values = entry.get("values")
            if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
                self.add(f"{at}.values", "must be a non-empty list of strings")
        return ids

    def link(self, doc: Mapping[str, Any], name: str) -> None:
        if name not in doc:
            return
        link = self.obj(doc[name], f"$.{name}")
        if link is None:
            return
        if not isinstance(link.get("name"), str) or not link.get("name"):
            self.add(f"$.{name}.name", "is required")
        url = link.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            self.add(f"$.{name}.url", "must be an http(s) URL")


def validate_card(doc: Any) -> list[Problem]:
    """Problems of a card/create body: {"card": {"card_type": ..., "<type>": {"base_info": ...}}}."""
    check = _Checker()
    root = check.obj(doc, "$")
    if root is None:
        return check.problems
    card = check.obj(root.get("card"), "$.card")
    if card is None:
        return check.problems
    card_type = card.get("card_type")
    if card_type not in CARD_TYPES:
        check.add("$.card.card_type", f"must be one of {', '.join(CARD_TYPES)}")
        return check.problems
    key = str(card_type).lower()
    body = check.obj(card.get(key), f"$.card.{key}")
    if body is not None:
        check.card_body(body, f"$.card.{key}", str(card_type), creating=True)
    return check.problems


def validate_card_patch(doc: Any, card_id: str | None = None) -> list[Problem]:
    """Problems of a card/update body: {"member_card": {...}} (card_id optional, must match)."""
    check = _Checker()
    root = check.obj(doc, "$")
    if root is None:
        return check.problems
    check.card_id(root, card_id)
    type_keys = [k for k in root if k.upper() in CARD_TYPES]
    for key in root:
        if key != "card_id" and key not in type_keys:
            check.add(f"$.{key}", "is not a card/update field (expected card_id and one card type, e.g. member_card)")
    if len(type_keys) != 1:
        check.add("$", "must hold exactly one card type object, e.g. member_card")
        return check.problems
    key = type_keys[0]
    body = check.obj(root[key], f"$.{key}")
    if body is not None:
        check.card_body(body, f"$.{key}", key.upper(), creating=False)
    return check.problems


def validate_activation_form(doc: Any, card_id: str | None = None) -> list[Problem]:
    """Problems of a card/membercard/activateuserform/set body (card_id optional, must match)."""
    check = _Checker()
    root = check.obj(doc, "$")
    if root is None:
        return check.problems
    check.card_id(root, card_id)
    for key in root:
        if key not in FORM_KEYS:
            check.add(f"$.{key}", f"is not an activation form field (expected {', '.join(FORM_KEYS)})")
    if "required_form" not in root and "optional_form" not in root:
        check.add("$", "needs required_form or optional_form")
    seen: dict[str, str] = {}
    for part_name in ("required_form", "optional_form"):
        if part_name not in root:
            continue
        part = check.obj(root[part_name], f"$.{part_name}")
        if part is None:
            continue
        for field_id in check.form_part(part, f"$.{part_name}"):
            if field_id in seen:
                check.add(f"$.{part_name}.common_field_id_list", f"{field_id} is already in {seen[field_id]}")
            else:
                seen[field_id] = part_name
    for name in ("service_statement", "bind_old_card"):
        check.link(root, name)
    return check.problems


def validate_activate_request(body: Mapping[str, Any]) -> list[Problem]:
    """Problems of a card/membercard/activate body (the lengths the seed states)."""
    check = _Checker()
    check.max_bytes(body, "membership_number", "$", MAX_MEMBERSHIP_NUMBER, required=True)
    check.max_bytes(body, "code", "$", MAX_CODE, required=True)
    check.max_bytes(body, "card_id", "$", MAX_CARD_ID)
    check.max_bytes(body, "background_pic_url", "$", MAX_BACKGROUND_PIC_URL)
    for i in (1, 2, 3):
        check.max_bytes(body, f"init_custom_field_value{i}", "$", MAX_CUSTOM_FIELD_VALUE)
    for name in ("init_bonus", "init_balance", "activate_begin_time", "activate_end_time"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            check.add(f"$.{name}", "must be a non-negative integer")
    return check.problems
