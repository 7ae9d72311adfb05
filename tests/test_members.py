"""Member data at rest and membership numbers: encryption and key rotation, numbering under
concurrency, the settings that drive them, and `wxcoupon members`."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from cryptography.fernet import Fernet

from webhook.config import ConfigError, Settings, load_settings
from webhook.members import MemberSource, members, membership_numbers
from webhook.pii import DataCipher, MissingDataKeyError, UndecryptableError, cipher_for, generate_key
from webhook.store import make_engine
from workers.cli import main
from workers.membership import (
    MembershipNumberError,
    assign_membership_number,
    format_number,
    number_for_code,
    store_member,
)

MOBILE = "15912340987"
NAME = "Qiu Lanfang-Zed"
FORM = {"common_field_list": [{"name": "USER_FORM_INFO_FLAG_MOBILE", "value": MOBILE},
                              {"name": "USER_FORM_INFO_FLAG_NAME", "value": NAME}],
        "custom_field_list": [{"name": "Milk", "value_list": ["Oat", "Soy"]}]}


# -- encryption ------------------------------------------------------------------------------------


def test_data_round_trips_and_is_not_readable_at_rest() -> None:
    """A token holds the value; it is neither the value nor the same twice (random IV)."""
    cipher = DataCipher([generate_key()])
    token = cipher.encrypt_json(FORM)
    assert cipher.decrypt_json(token) == FORM
    assert MOBILE not in token and NAME not in token and token != cipher.encrypt_json(FORM)


def test_rotation_moves_values_to_the_first_key() -> None:
    """Old tokens open while the old key is listed second; after rotate, the new key alone opens them."""
    old, new = generate_key(), generate_key()
    token = DataCipher([old]).encrypt_json(FORM)
    both = DataCipher([new, old])
    assert both.decrypt_json(token) == FORM
    rotated = both.rotate(token)
    assert DataCipher([new]).decrypt_json(rotated) == FORM
    with pytest.raises(UndecryptableError):
        DataCipher([old]).decrypt_json(rotated)


def test_altered_or_foreign_tokens_are_refused() -> None:
    """Authenticated: a flipped byte or another key's token is an error, never garbage."""
    cipher = DataCipher([generate_key()])
    token = cipher.encrypt_json(FORM)
    tampered = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    for bad in (tampered, DataCipher([generate_key()]).encrypt_json(FORM), "not a token", "é"):
        with pytest.raises(UndecryptableError):
            cipher.decrypt_json(bad)


def test_missing_key_names_the_variable(settings: Settings) -> None:
    """No WXCOUPON_DATA_KEY: a clear error naming it, and nothing in the repr of a cipher."""
    with pytest.raises(MissingDataKeyError, match="WXCOUPON_DATA_KEY"):
        cipher_for(settings)
    key = generate_key()
    assert key not in repr(DataCipher([key])) and key not in repr(settings.with_overrides(data_keys=(key,)))


def test_digest_is_keyed() -> None:
    """The dedupe digest of a form depends on the key: not a plain hash anyone could recompute."""
    a, b = DataCipher([generate_key()]), DataCipher([generate_key()])
    assert a.digest_json(FORM) == a.digest_json(json.loads(json.dumps(FORM)))
    assert a.digest_json(FORM) != b.digest_json(FORM)


# -- settings ---------------------------------------------------------------------------------------

BASE_ENV = {"WECHAT_TOKEN": "wxcoupontesttoken"}


def test_member_settings_are_read_and_validated() -> None:
    """Keys, strategy, prefix and initial values as configured."""
    k1, k2 = generate_key(), generate_key()
    s = load_settings({**BASE_ENV, "WXCOUPON_DATA_KEY": f"{k1}, {k2}", "WXCOUPON_MEMBERSHIP_NUMBER": "sequence",
                       "WXCOUPON_MEMBERSHIP_PREFIX": "VIP", "WXCOUPON_INIT_BONUS": "100", "WXCOUPON_INIT_BALANCE": "0",
                       "WXCOUPON_INIT_BONUS_RECORD": "welcome", "WXCOUPON_INIT_CUSTOM_FIELD_VALUES": "金卡,,VIP"},
                      dotenv=False)
    assert s.data_keys == (k1, k2)
    assert (s.membership_number, s.membership_prefix, s.init_bonus, s.init_balance, s.init_bonus_record) == (
        "sequence", "VIP", 100, 0, "welcome")
    assert s.init_custom_field_values == ("金卡", "", "VIP")
    default = load_settings(BASE_ENV, dotenv=False)
    assert (default.data_keys, default.membership_number, default.init_bonus) == ((), "code", None)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"WXCOUPON_DATA_KEY": "short"}, "WXCOUPON_DATA_KEY"),
        ({"WXCOUPON_DATA_KEY": f"{Fernet.generate_key().decode()},bad"}, "WXCOUPON_DATA_KEY key 2"),
        ({"WXCOUPON_MEMBERSHIP_NUMBER": "random"}, "WXCOUPON_MEMBERSHIP_NUMBER"),
        ({"WXCOUPON_MEMBERSHIP_PREFIX": "VIP"}, "WXCOUPON_MEMBERSHIP_PREFIX"),  # only with sequence
        ({"WXCOUPON_MEMBERSHIP_NUMBER": "sequence", "WXCOUPON_MEMBERSHIP_PREFIX": "A" * 13}, "WXCOUPON_MEMBERSHIP_PREFIX"),
        ({"WXCOUPON_MEMBERSHIP_NUMBER": "sequence", "WXCOUPON_MEMBERSHIP_PREFIX": "V P"}, "WXCOUPON_MEMBERSHIP_PREFIX"),
        ({"WXCOUPON_INIT_CUSTOM_FIELD_VALUES": "金卡会员等级"}, "WXCOUPON_INIT_CUSTOM_FIELD_VALUES value 1"),
        ({"WXCOUPON_INIT_CUSTOM_FIELD_VALUES": "a,b,c,d"}, "WXCOUPON_INIT_CUSTOM_FIELD_VALUES"),
        ({"WXCOUPON_INIT_BONUS": "lots"}, "WXCOUPON_INIT_BONUS"),
        ({"WXCOUPON_INIT_BALANCE": "-5"}, "WXCOUPON_INIT_BALANCE"),
    ],
)
def test_bad_member_settings_stop_at_start_naming_the_variable(env: dict[str, str], variable: str) -> None:
    """Each malformed value is a ConfigError whose message names its variable."""
    with pytest.raises(ConfigError, match=variable):
        load_settings({**BASE_ENV, **env}, dotenv=False)


# -- membership numbers -------------------------------------------------------------------------------


def test_number_formats_and_their_limits(settings: Settings) -> None:
    """prefix + 8 digits; the code itself; nothing over Weixin's 20 characters."""
    s = settings.with_overrides(membership_number="sequence", membership_prefix="AAA")
    assert format_number(s, 1) == "AAA00000001"
    with pytest.raises(MembershipNumberError):
        format_number(s.with_overrides(membership_prefix="A" * 12), 10**9)
    assert number_for_code("316510891298") == "316510891298"
    with pytest.raises(MembershipNumberError, match="sequence"):
        number_for_code("1" * 21)


def test_sequence_numbers_are_unique_and_reused_per_card_under_concurrent_workers(settings: Settings) -> None:
    """Eight threads: forty cards get forty distinct numbers; one card raced by all gets one number."""
    s = settings.with_overrides(membership_number="sequence", membership_prefix="M")
    engine = make_engine(s)
    codes = [f"{880000000000 + i}" for i in range(40)]
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def run(mine: list[str]) -> None:
        try:
            start.wait()
            for code in [*mine, "shared-code"]:
                number = assign_membership_number(engine, s, "pCardSeq", code)
                with lock:
                    got.setdefault(code, []).append(number)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(codes[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    distinct = [got[c][0] for c in codes]
    assert len(set(distinct)) == 40 and all(len(n) <= 20 and n.startswith("M") for n in distinct)
    assert len(got["shared-code"]) == 8 and len(set(got["shared-code"])) == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(membership_numbers)).scalar_one() == 41
    # Never reused: even with every member and number row gone, the next one is higher.
    highest = max(int(n[1:]) for n in [*distinct, got["shared-code"][0]])
    with engine.begin() as conn:
        conn.execute(members.delete())
        conn.execute(membership_numbers.delete())
    assert int(assign_membership_number(engine, s, "pCardSeq", "new-code")[1:]) > highest
    engine.dispose()


def test_code_strategy_uses_the_code_and_keeps_a_number_once_given(settings: Settings) -> None:
    """WXCOUPON_MEMBERSHIP_NUMBER=code: the number is the code; a second call reads it back."""
    engine = make_engine(settings)
    assert assign_membership_number(engine, settings, "pCard", "316510891298") == "316510891298"
    seq = settings.with_overrides(membership_number="sequence")
    assert assign_membership_number(engine, seq, "pCard", "316510891298") == "316510891298"  # kept
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(membership_numbers)).scalar_one() == 0
    engine.dispose()


# -- wxcoupon members ---------------------------------------------------------------------------------


@pytest.fixture
def cli_env(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment a `wxcoupon` command reads, on the test database, with a data key."""
    key = generate_key()
    env = {"WECHAT_TOKEN": settings.token, "DATABASE_URL": settings.database_url,
           "WXCOUPON_INSTANCE_PATH": str(tmp_path / "instance"), "WXCOUPON_DATA_KEY": key}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return env


def _stored_member(settings: Settings, key: str) -> None:
    engine = make_engine(settings)
    with engine.begin() as conn:
        store_member(conn, DataCipher([key]), "pCardShow", "880000000123", source=MemberSource.REDIRECT, data=FORM,
                     membership_number="WX00000007", mp_openid="oMP_show_user", oa_openid="oOA_show_user", bonus=100)
    engine.dispose()


def test_members_show_masks_personal_data_unless_revealed(settings: Settings, cli_env: dict[str, str]) -> None:
    """Masked by default (text and JSON); --reveal shows the values."""
    _stored_member(settings, cli_env["WXCOUPON_DATA_KEY"])
    runner = CliRunner()
    args = ["members", "show", "--card-id", "pCardShow", "--code", "880000000123"]
    masked = runner.invoke(main, args)
    assert masked.exit_code == 0, masked.output
    assert "WX00000007" in masked.output and "USER_FORM_INFO_FLAG_MOBILE" in masked.output
    assert MOBILE not in masked.output and NAME not in masked.output and "oMP_show_user" not in masked.output
    assert "15*******87" in masked.output
    as_json = runner.invoke(main, [*args, "--json"])
    data = json.loads(as_json.stdout)
    assert data["fields"]["USER_FORM_INFO_FLAG_MOBILE"] == "15*******87" and MOBILE not in as_json.output
    assert data["custom_fields"]["Milk"] == ["O**", "S**"]
    revealed = json.loads(runner.invoke(main, [*args, "--json", "--reveal"]).stdout)
    assert revealed["fields"] == {"USER_FORM_INFO_FLAG_MOBILE": MOBILE, "USER_FORM_INFO_FLAG_NAME": NAME}
    assert revealed["mp_openid"] == "oMP_show_user" and revealed["membership_number"] == "WX00000007"
    missing = runner.invoke(main, ["members", "show", "--card-id", "pCardShow", "--code", "0"])
    assert missing.exit_code != 0 and "no member" in missing.output


def test_members_show_without_the_key_names_it(
    settings: Settings, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored data but no WXCOUPON_DATA_KEY: an error naming it, nothing revealed."""
    _stored_member(settings, cli_env["WXCOUPON_DATA_KEY"])
    monkeypatch.delenv("WXCOUPON_DATA_KEY")
    result = CliRunner().invoke(main, ["members", "show", "--card-id", "pCardShow", "--code", "880000000123"])
    assert result.exit_code != 0 and "WXCOUPON_DATA_KEY" in result.output and MOBILE not in result.output


def test_rotate_key_reencrypts_every_row_with_the_first_key(
    settings: Settings, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New key first, old second, rotate-key: afterwards the new key alone opens everything."""
    old = cli_env["WXCOUPON_DATA_KEY"]
    _stored_member(settings, old)
    new = generate_key()
    monkeypatch.setenv("WXCOUPON_DATA_KEY", f"{new},{old}")
    result = CliRunner().invoke(main, ["members", "rotate-key", "--batch", "1"])
    assert result.exit_code == 0, result.output
    assert "members.data_enc" in result.output and "rotated 1" in result.output
    engine = make_engine(settings)
    with engine.connect() as conn:
        token = conn.execute(sa.select(members.c.data_enc)).scalar_one()
    engine.dispose()
    assert DataCipher([new]).decrypt_json(token) == FORM
    monkeypatch.setenv("WXCOUPON_DATA_KEY", new)
    shown = CliRunner().invoke(main, ["members", "show", "--card-id", "pCardShow", "--code", "880000000123", "--reveal"])
    assert MOBILE in shown.output
    # A key that opens nothing: the command says so and fails.
    monkeypatch.setenv("WXCOUPON_DATA_KEY", generate_key())
    bad = CliRunner().invoke(main, ["members", "rotate-key"])
    assert bad.exit_code != 0 and "undecryptable 1" in bad.output


def test_rotate_key_without_a_key_names_the_variable(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WXCOUPON_DATA_KEY")
    result = CliRunner().invoke(main, ["members", "rotate-key"])
    assert result.exit_code != 0 and "WXCOUPON_DATA_KEY" in result.output


def test_dev_account_carries_a_data_key_and_old_ones_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`wxcoupon dev` writes WXCOUPON_DATA_KEY into dev.env, and adds one to a dev.env written before."""
    from workers.cli.dev import add_missing_data_key, write_dev_account

    monkeypatch.delenv("WXCOUPON_DATA_KEY", raising=False)
    account = write_dev_account(tmp_path / "dev.env")
    DataCipher([account["WXCOUPON_DATA_KEY"]])  # a valid Fernet key
    env: dict[str, Any] = dict(line.split("=", 1) for line in (tmp_path / "dev.env").read_text().splitlines()[1:])
    assert load_settings(env, dotenv=False).data_keys == (account["WXCOUPON_DATA_KEY"],)
    old = tmp_path / "old.env"
    old.write_text("WECHAT_TOKEN=abcdef\n")
    assert add_missing_data_key(old) is True and add_missing_data_key(old) is False
    assert old.read_text().count("WXCOUPON_DATA_KEY=") == 1


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2**63, -(2**63) - 1, True, "x", None, ""])
def test_int_or_none_takes_only_what_a_bigint_column_holds(value: Any) -> None:
    """Bonus and balance from a Weixin reply: anything that is no integer a BIGINT column holds is None,
    never an exception (an infinite float raised OverflowError)."""
    from workers.member_info import int_or_none

    assert int_or_none(value) is None
    assert int_or_none(2**63 - 1) == 2**63 - 1 and int_or_none("-5") == -5
