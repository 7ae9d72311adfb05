"""cardExt signatures: the protocol page's known-answer vectors."""
from __future__ import annotations

import json

import pytest

from webhook.cardext import build_card_ext, card_ext_json, card_signature

TICKET = "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg"


@pytest.mark.parametrize(
    ("code", "openid", "expected"),
    [
        ("", "", "22dce6bad4db532d4a2ef82ca2ca7bbe1e10ef28"),
        ("random_code", "", "2e9c6d12952246e071717d7baeab20c30420b5cd"),
        ("", "random_openid", "ded860a5dd4467312764bd86e544ad0579cbfad0"),
        ("random_code", "random_openid", "950dc1842852457ea573d4d6af34879c1ec093c8"),
    ],
)
def test_known_answer_vectors(code: str, openid: str, expected: str) -> None:
    """The four vectors of weixin-protocol.md section 5, with and without code/openid."""
    assert card_signature(TICKET, "1414587457", "random_card_id", code, openid, "Wm3WZYTPz0wzccnW") == expected
    ext = build_card_ext(TICKET, "random_card_id", code=code or None, openid=openid or None,
                         timestamp=1414587457, nonce_str="Wm3WZYTPz0wzccnW", outer_str="channel-7")
    assert ext["signature"] == expected
    assert ext["outer_str"] == "channel-7"  # carried but not signed
    assert ("code" in ext) == bool(code) and ("openid" in ext) == bool(openid)


def test_card_ext_is_a_json_string_with_fresh_nonce() -> None:
    """Each cardExt has its own random nonce and the current time; JSON as wx.addCard takes it."""
    a, b = build_card_ext(TICKET, "pCard"), build_card_ext(TICKET, "pCard")
    assert a["nonce_str"] != b["nonce_str"] and len(str(a["nonce_str"])) == 16
    assert json.loads(card_ext_json(a)) == a
