"""Settings: read once from the environment into a frozen, typed object."""
from __future__ import annotations

import base64
import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Defaults, one place. Each is documented in README's configuration table.
DEFAULT_TIMESTAMP_TOLERANCE = 300  # seconds of clock skew accepted on pushes
DEFAULT_MAX_BODY = 64 * 1024  # Weixin pushes are a few KiB; 413 above this
DEFAULT_INSTANCE_PATH = "instance"  # relative to the working directory
DEFAULT_API_BASE = "https://api.weixin.qq.com"
DEFAULT_DISPATCH_INTERVAL = 0.5  # seconds between outbox polls in a worker
DEFAULT_DISPATCH_BATCH = 800  # events moved to RQ per dispatcher pass (per outbox)
# Events handled by one RQ job. A job costs ~6 ms of worker CPU whatever its
# size (RQ's own bookkeeping, a transaction, its statements): at 50 that was
# half of a worker's CPU per event; bench/workers.py measures the difference.
DEFAULT_JOB_BATCH = 200
DEFAULT_RETRY_INTERVALS = (10, 60, 300)  # seconds before each RQ retry of a transient failure
DEFAULT_SQLITE_SYNCHRONOUS = "FULL"  # fsync on every commit: acked means on disk
DEV_ENV_FILE = "dev.env"  # the local account `wxcoupon dev` generates, in the instance folder
DEFAULT_REAP_INTERVAL = 30.0  # seconds between a worker's scans for stuck or orphaned work
DEFAULT_HEARTBEAT_TTL = 15.0  # a worker not heard from for this long is dead
MIN_ADMIN_KEY = 16  # characters: the admin key guards replays, so no short ones
MIN_MP_API_KEY = 24  # characters: the Mini Program backend's bearer key
DEFAULT_RECOVERY_DELAY = 600.0  # seconds a Mini Program record waits for its push before card/code/get
DEFAULT_RECOVERY_GIVE_UP = 7 * 86400.0  # seconds after its decoding a waiting record is no longer looked up
MEMBERSHIP_STRATEGIES = ("code", "sequence")  # WXCOUPON_MEMBERSHIP_NUMBER: the code itself, or prefix + sequence
MAX_MEMBERSHIP_PREFIX = 12  # prefix + at least 8 sequence digits fit Weixin's 20-character membership_number
MAX_CUSTOM_FIELD_VALUE = 12  # bytes of an init_custom_field_value (card/membercard/activate)

_AES_KEY_RE = re.compile(r"^[A-Za-z0-9]{43}$")
_APPID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def decode_aes_key(value: str, variable: str = "WECHAT_AES_KEY") -> bytes:
    """Turn a 43-character EncodingAESKey into the 32-byte AES key."""
    if not _AES_KEY_RE.match(value):
        raise ConfigError(f"{variable} must be 43 characters of A-Z, a-z, 0-9 (got {len(value)} characters)")
    return base64.b64decode(value + "=")


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, validated."""

    token: str
    appid: str | None = None
    appsecret: str | None = field(default=None, repr=False)
    encoding_aes_key: str | None = field(default=None, repr=False)
    previous_encoding_aes_key: str | None = field(default=None, repr=False)
    timestamp_tolerance: int = DEFAULT_TIMESTAMP_TOLERANCE
    database_url: str = ""
    redis_url: str | None = None  # None: embedded Redis in the instance folder
    instance_path: Path = Path(DEFAULT_INSTANCE_PATH)
    max_body: int = DEFAULT_MAX_BODY
    api_base: str = DEFAULT_API_BASE
    dispatch_interval: float = DEFAULT_DISPATCH_INTERVAL
    dispatch_batch: int = DEFAULT_DISPATCH_BATCH
    job_batch: int = DEFAULT_JOB_BATCH
    retry_intervals: tuple[int, ...] = DEFAULT_RETRY_INTERVALS
    sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS
    queue_prefix: str = "wxcoupon"
    log_format: str = "text"
    admin_key: str | None = field(default=None, repr=False)  # None: no admin page
    mp_api_key: str | None = field(default=None, repr=False)  # None: /api/mp answers 503
    recovery_delay: float = DEFAULT_RECOVERY_DELAY
    recovery_give_up: float = DEFAULT_RECOVERY_GIVE_UP
    reap_interval: float = DEFAULT_REAP_INTERVAL
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL
    proxies: int = 0  # reverse proxies in front whose X-Forwarded-* headers are trusted
    data_keys: tuple[str, ...] = field(default=(), repr=False)  # WXCOUPON_DATA_KEY: first encrypts, all decrypt
    membership_number: str = "code"  # code | sequence
    membership_prefix: str = ""
    init_bonus: int | None = None  # None: not sent (Weixin's default, 0)
    init_balance: int | None = None
    init_bonus_record: str | None = None
    init_custom_field_values: tuple[str, ...] = ()  # custom_field1..3; "" leaves one unset

    def __post_init__(self) -> None:
        if not self.database_url:
            url = f"sqlite:///{(self.instance_path / 'wxcoupon.sqlite3').resolve()}"
            object.__setattr__(self, "database_url", url)

    @functools.cached_property
    def aes_keys(self) -> tuple[bytes, ...]:
        """The AES keys to try when decrypting: current first, then previous (decoded once)."""
        keys = []
        for variable, value in (
            ("WECHAT_AES_KEY", self.encoding_aes_key),
            ("WECHAT_PREVIOUS_AES_KEY", self.previous_encoding_aes_key),
        ):
            if value:
                keys.append(decode_aes_key(value, variable))
        return tuple(keys)

    @property
    def aes_key(self) -> bytes | None:
        """The current AES key (used to encrypt), or None in plaintext-only setups."""
        keys = self.aes_keys
        return keys[0] if self.encoding_aes_key else None

    @property
    def embedded_redis_path(self) -> Path:
        """Where the embedded Redis keeps its data when REDIS_URL is unset."""
        return (self.instance_path / "redis.db").resolve()

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some values replaced (tests, CLI flags)."""
        return replace(self, **changes)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer (got {raw!r})") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum} (got {value})")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number (got {raw!r})") from None
    if not math.isfinite(value):  # nan passes every comparison; both fail later, far from the variable
        raise ConfigError(f"{name} must be a number of seconds (got {raw!r})")
    if value <= 0:
        raise ConfigError(f"{name} must be positive (got {value})")
    return value


def _intervals(env: Mapping[str, str], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated seconds, e.g. 10,60,300 (got {raw!r})") from None
    if any(v < 0 for v in values):
        raise ConfigError(f"{name} must not be negative")
    return values


# The database drivers wxcoupon installs, by backend; a URL without one gets it.
_DRIVERS = {"sqlite": "pysqlite", "postgresql": "psycopg"}


def _database_url(env: Mapping[str, str]) -> str:
    """DATABASE_URL checked, with PostgreSQL's driver made explicit; "" for the default SQLite file.

    `postgres://` and `postgresql://`, the URLs that libpq tools (psql,
    pg_dump) and hosting providers use, become `postgresql+psycopg://`: the
    driver wxcoupon installs, whatever SQLAlchemy's default for the name.
    """
    raw = env.get("DATABASE_URL", "").strip()
    if not raw:
        return ""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(
            "DATABASE_URL is not a database URL (expected sqlite:///path or postgresql://user@host/db)"
        ) from None
    backend, _, driver = url.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend not in _DRIVERS:
        raise ConfigError(f"DATABASE_URL names {backend!r}: wxcoupon stores its events in SQLite or PostgreSQL")
    if driver and driver != _DRIVERS[backend]:
        raise ConfigError(f"DATABASE_URL names the driver {driver!r}: wxcoupon uses {_DRIVERS[backend]} "
                          f"({backend}:// picks it)")  # fmt: skip
    if backend == "sqlite":
        return raw
    return url.set(drivername=f"{backend}+{_DRIVERS[backend]}").render_as_string(hide_password=False)


def _redis_url(env: Mapping[str, str]) -> str | None:
    """REDIS_URL as redis-py will read it; None for the embedded Redis."""
    raw = env.get("REDIS_URL", "").strip()
    if not raw:
        return None
    from redis.connection import parse_url

    try:
        parse_url(raw)
    except ValueError as exc:  # its message names the URL's part, never the password
        raise ConfigError(f"REDIS_URL is malformed: {exc}") from None
    return raw


def _admin_key(env: Mapping[str, str]) -> str | None:
    key = env.get("WXCOUPON_ADMIN_KEY", "").strip()
    if not key:
        return None
    if len(key) < MIN_ADMIN_KEY:
        raise ConfigError(f"WXCOUPON_ADMIN_KEY must be at least {MIN_ADMIN_KEY} characters (got {len(key)})")
    return key


def _mp_api_key(env: Mapping[str, str]) -> str | None:
    key = env.get("MP_API_KEY", "").strip()
    if not key:
        return None
    if len(key) < MIN_MP_API_KEY:
        raise ConfigError(f"MP_API_KEY must be at least {MIN_MP_API_KEY} characters (got {len(key)})")
    return key


def _data_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """WXCOUPON_DATA_KEY: comma-separated Fernet keys (32 bytes, URL-safe base64), current first."""
    raw = env.get("WXCOUPON_DATA_KEY", "").strip()
    if not raw:
        return ()
    keys = tuple(part.strip() for part in raw.split(","))
    for i, key in enumerate(keys, 1):
        try:
            ok = len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32 and len(key) == 44
        except (ValueError, UnicodeEncodeError):
            ok = False
        if not ok:
            raise ConfigError(
                f"WXCOUPON_DATA_KEY key {i} is not a Fernet key (44 characters of URL-safe base64 for 32 bytes; "
                "make one with `python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
            )
    return keys


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    return _int(env, name, 0) if env.get(name, "").strip() else None


def _member_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Member-card settings: data key, membership numbers, initial values of an activation."""
    strategy = env.get("WXCOUPON_MEMBERSHIP_NUMBER", "code").strip().lower() or "code"
    if strategy not in MEMBERSHIP_STRATEGIES:
        raise ConfigError(f"WXCOUPON_MEMBERSHIP_NUMBER must be code or sequence (got {strategy!r})")
    prefix = env.get("WXCOUPON_MEMBERSHIP_PREFIX", "").strip()
    if prefix and strategy != "sequence":
        raise ConfigError("WXCOUPON_MEMBERSHIP_PREFIX needs WXCOUPON_MEMBERSHIP_NUMBER=sequence")
    if not re.fullmatch(rf"[A-Za-z0-9_-]{{0,{MAX_MEMBERSHIP_PREFIX}}}", prefix):
        raise ConfigError(
            f"WXCOUPON_MEMBERSHIP_PREFIX must be at most {MAX_MEMBERSHIP_PREFIX} of A-Z, a-z, 0-9, _ and - (got {prefix!r})"
        )
    raw_values = env.get("WXCOUPON_INIT_CUSTOM_FIELD_VALUES", "")
    values = tuple(v.strip() for v in raw_values.split(",")) if raw_values.strip() else ()
    if len(values) > 3:
        raise ConfigError("WXCOUPON_INIT_CUSTOM_FIELD_VALUES has more than 3 values (custom_field1..3)")
    for i, value in enumerate(values, 1):
        if len(value.encode("utf-8")) > MAX_CUSTOM_FIELD_VALUE:
            raise ConfigError(
                f"WXCOUPON_INIT_CUSTOM_FIELD_VALUES value {i} is {len(value.encode('utf-8'))} bytes; "
                f"Weixin takes at most {MAX_CUSTOM_FIELD_VALUE} bytes (4 Chinese characters)"
            )
    return {
        "data_keys": _data_keys(env),
        "membership_number": strategy,
        "membership_prefix": prefix,
        "init_bonus": _optional_int(env, "WXCOUPON_INIT_BONUS"),
        "init_balance": _optional_int(env, "WXCOUPON_INIT_BALANCE"),
        "init_bonus_record": env.get("WXCOUPON_INIT_BONUS_RECORD", "").strip() or None,
        "init_custom_field_values": values,
    }


def _recovery_give_up(env: Mapping[str, str]) -> float:
    give_up = _float(env, "WXCOUPON_RECOVERY_GIVE_UP", DEFAULT_RECOVERY_GIVE_UP)
    delay = _float(env, "WXCOUPON_RECOVERY_DELAY", DEFAULT_RECOVERY_DELAY)
    if give_up <= delay:
        raise ConfigError(f"WXCOUPON_RECOVERY_GIVE_UP ({give_up:g} s) must be longer than "
                          f"WXCOUPON_RECOVERY_DELAY ({delay:g} s): no record would ever be looked up")
    return give_up


def load_settings(env: Mapping[str, str] | None = None, *, dotenv: bool = True) -> Settings:
    """Read and validate settings; raises ConfigError naming the bad variable."""
    if env is None:
        if dotenv:
            from dotenv import load_dotenv

            # Real environment first, then .env, then the local account that
            # `wxcoupon dev` generated (so `simulate` reaches the dev server).
            load_dotenv(Path.cwd() / ".env", override=False)
            instance = os.environ.get("WXCOUPON_INSTANCE_PATH", "").strip() or DEFAULT_INSTANCE_PATH
            load_dotenv(Path(instance) / DEV_ENV_FILE, override=False)
        env = os.environ
    token = env.get("WECHAT_TOKEN", "").strip()
    if not token:
        raise ConfigError("WECHAT_TOKEN is required: the server token set in the Official Account console")
    if not re.fullmatch(r"[A-Za-z0-9]{3,32}", token):
        raise ConfigError("WECHAT_TOKEN must be 3 to 32 characters of A-Z, a-z, 0-9, as Weixin requires")
    aes = env.get("WECHAT_AES_KEY", "").strip() or None
    previous = env.get("WECHAT_PREVIOUS_AES_KEY", "").strip() or None
    appid = env.get("WECHAT_APPID", "").strip() or None
    if aes:
        decode_aes_key(aes, "WECHAT_AES_KEY")
        if not appid:
            raise ConfigError("WECHAT_APPID is required when WECHAT_AES_KEY is set (decrypted pushes name the appid)")
    if previous:
        decode_aes_key(previous, "WECHAT_PREVIOUS_AES_KEY")
        if not aes:
            raise ConfigError("WECHAT_PREVIOUS_AES_KEY is set but WECHAT_AES_KEY is not")
    if appid and not _APPID_RE.match(appid):
        raise ConfigError("WECHAT_APPID is malformed (expected letters, digits and _ such as wx1234...)")
    synchronous = env.get("WXCOUPON_SQLITE_SYNCHRONOUS", DEFAULT_SQLITE_SYNCHRONOUS).strip().upper()
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("WXCOUPON_SQLITE_SYNCHRONOUS must be FULL, NORMAL or EXTRA")
    log_format = env.get("WXCOUPON_LOG_FORMAT", "text").strip().lower()
    if log_format not in ("text", "json"):
        raise ConfigError("WXCOUPON_LOG_FORMAT must be text or json")
    api_base = env.get("WECHAT_API_BASE", DEFAULT_API_BASE).strip().rstrip("/")
    if not api_base.startswith(("http://", "https://")):
        raise ConfigError("WECHAT_API_BASE must be an http(s) URL")
    return Settings(
        token=token,
        appid=appid,
        appsecret=env.get("WECHAT_APPSECRET", "").strip() or None,
        encoding_aes_key=aes,
        previous_encoding_aes_key=previous,
        timestamp_tolerance=_int(env, "WECHAT_TIMESTAMP_TOLERANCE", DEFAULT_TIMESTAMP_TOLERANCE),
        database_url=_database_url(env),
        redis_url=_redis_url(env),
        instance_path=Path(env.get("WXCOUPON_INSTANCE_PATH", "").strip() or DEFAULT_INSTANCE_PATH),
        max_body=_int(env, "WXCOUPON_MAX_BODY", DEFAULT_MAX_BODY, minimum=1024),
        api_base=api_base,
        dispatch_interval=_float(env, "WXCOUPON_DISPATCH_INTERVAL", DEFAULT_DISPATCH_INTERVAL),
        dispatch_batch=_int(env, "WXCOUPON_DISPATCH_BATCH", DEFAULT_DISPATCH_BATCH, minimum=1),
        job_batch=_int(env, "WXCOUPON_JOB_BATCH", DEFAULT_JOB_BATCH, minimum=1),
        retry_intervals=_intervals(env, "WXCOUPON_RETRY_INTERVALS", DEFAULT_RETRY_INTERVALS),
        sqlite_synchronous=synchronous,
        queue_prefix=env.get("WXCOUPON_QUEUE_PREFIX", "wxcoupon").strip() or "wxcoupon",
        log_format=log_format,
        admin_key=_admin_key(env),
        mp_api_key=_mp_api_key(env),
        recovery_delay=_float(env, "WXCOUPON_RECOVERY_DELAY", DEFAULT_RECOVERY_DELAY),
        recovery_give_up=_recovery_give_up(env),
        reap_interval=_float(env, "WXCOUPON_REAP_INTERVAL", DEFAULT_REAP_INTERVAL),
        heartbeat_ttl=_float(env, "WXCOUPON_HEARTBEAT_TTL", DEFAULT_HEARTBEAT_TTL),
        proxies=_int(env, "WXCOUPON_PROXIES", 0),
        **_member_settings(env),
    )
