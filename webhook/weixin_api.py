"""Weixin server API client: one thin method per API, typed errors, shared tokens.

The access_token and the `wx_card` api_ticket live in Redis so every process of
the service shares them; a Redis lock makes sure only one process refreshes
them at a time (several refreshers would invalidate each other's tokens and
cause 40001 "not latest"). Each client also keeps what it read for a few
seconds (never past the Redis key's expiry), so a busy worker does not pay a
Redis round trip per call; a token replaced meanwhile by another process is
refused by Weixin (40001), and the one refresh that follows reads Redis first.
Every HTTP call has a timeout; calls that change state on Weixin's side are
never retried once the request may have been sent, and any answer to them that
is not Weixin's readable verdict (a 5xx, an unreadable reply) is
AmbiguousTimeoutError: the change may have been applied.
Nothing secret is logged or put into an exception message: log lines carry the
API path and the errcode only.
A reply is trusted as little as a request from the Internet: at most
MAX_REPLY_BYTES of it are read, and webhook.weixin_reply checks the rest (strict
JSON, errcode, errmsg, the fields callers read); anything unusable is
WeixinAPIError(ERRCODE_BAD_RESPONSE). The typed errors and ERRCODE_* constants
are defined there and re-exported here, where callers import them from.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit
from urllib.request import getproxies, proxy_bypass

import certifi
import urllib3
from redis import Redis
from redis.exceptions import LockError
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util.ssl_match_hostname import CertificateError

from webhook import metrics
from webhook.config import ConfigError, Settings

# Re-exported: callers import the errors, the errcodes and the limits from here.
from webhook.weixin_reply import (
    DEFAULT_EXPIRES_IN,
    ERRCODE_BAD_RESPONSE,
    ERRCODE_HTTP,
    ERRCODE_LOCK,
    ERRCODE_NETWORK,
    ERRCODE_TIMEOUT,
    MAX_ERRMSG_CHARS,
    MAX_EXPIRES_IN,
    MAX_ID_CHARS,
    MAX_REPLY_DEPTH,
    MAX_TEXT_CHARS,
    CardUnavailableError,
    CodeConsumedError,
    InvalidCodeError,
    QuotaError,
    TicketExpiredError,
    TokenError,
    TransientWeixinError,
    WeixinAPIError,
    bad_reply,
    check_activate_temp_info_reply,
    check_code_reply,
    error_for,
    parse_reply,
    reply_errcode,
    reply_errmsg,
    reply_expires_in,
    reply_text,
)

log = logging.getLogger("wxcoupon.weixin")  # under wxcoupon's handler and format, like every line of the service

# Defaults, one place.
DEFAULT_TIMEOUT = 4.0  # seconds, connect and read each
DEFAULT_RETRY_ATTEMPTS = 3  # tries in all for transient failures (-1, 5xx, 408, 429, network)
DEFAULT_BACKOFF_BASE = 0.2  # seconds before the 2nd try; doubles each try
DEFAULT_BACKOFF_MAX = 2.0  # cap of one backoff sleep
POOL_SIZE = 10  # kept-alive connections per host (a worker runs a few calls at once)
DEFAULT_KEY_PREFIX = "wxcoupon:weixin"  # Redis keys: <prefix>:<appid>:...
TOKEN_EXPIRY_MARGIN = 300  # cache a credential this much shorter than expires_in
LOCAL_CACHE_SECONDS = 10.0  # a client reuses a credential read from Redis this long at most
MAX_REPLY_BYTES = 4 * 1024 * 1024  # read no more of a reply (Weixin's are a few KiB): a worker's memory is bounded

# Besides 5xx: statuses with which a server or proxy turns a request away
# without acting on it (timed out reading it; rate limited), as safe to retry.
_REFUSED_UNREAD = frozenset({408, 429})

TokenEndpoint = Literal["stable_token", "token"]


class AmbiguousTimeoutError(WeixinAPIError):
    """A call that changes state may have been sent and got no usable answer: it may have been applied.

    No answer in time, the connection lost or a TLS error after the request may
    have gone, an HTTP 5xx, or a reply that cannot be read. (The name is older
    than the cases after the timeout.)
    """


@contextlib.contextmanager
def _observed(path: str) -> Iterator[None]:
    """Count one HTTP exchange by path and errcode, and time it (wxcoupon_weixin_api_*)."""
    started = time.perf_counter()
    try:
        yield
    except WeixinAPIError as exc:
        metrics.observe_weixin_call(path, exc.errcode, time.perf_counter() - started)  # it labels our own codes
        raise
    metrics.observe_weixin_call(path, 0, time.perf_counter() - started)


def _pool_for(api_base: str) -> urllib3.PoolManager:
    """A connection pool for `api_base`, with the environment's proxy and CA bundle read once, now.

    The client talks to urllib3 directly: requests re-merges settings,
    cookies, hooks and headers on every call, which cost about 0.3 ms of CPU
    per call, as much as the rest of a call to a nearby server. What requests
    took from the environment is taken here the same way: `https_proxy` /
    `http_proxy` / `all_proxy` unless `no_proxy` covers the host (the standard
    library's reading of them), and `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` or
    certifi's bundle for verifying certificates. Redirects are not followed and
    urllib3 retries nothing: the client's own policy decides what is retried.
    """
    parts = urlsplit(api_base)
    ca_certs = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    options: dict[str, Any] = {"maxsize": POOL_SIZE, "retries": False, "ca_certs": ca_certs}
    proxies = getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not proxy_bypass(parts.hostname or ""):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


class WeixinClient:
    """Weixin server API client for one Official Account, shared-token aware."""

    def __init__(
        self,
        api_base: str,
        appid: str,
        appsecret: str,
        redis: Redis,
        timeout: float = DEFAULT_TIMEOUT,
        http: urllib3.PoolManager | None = None,
        *,
        retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        token_endpoint: TokenEndpoint = "stable_token",
        key_prefix: str = DEFAULT_KEY_PREFIX,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retry_attempts < 1:
            raise ValueError("retry_attempts must be at least 1")
        self.api_base = api_base.rstrip("/")
        self.appid = appid
        self._appsecret = appsecret
        self._redis = redis
        self.timeout = timeout
        self._http = http or _pool_for(self.api_base)
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self.retry_attempts = retry_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.token_endpoint: TokenEndpoint = token_endpoint
        self._prefix = f"{key_prefix}:{appid}"
        self._sleep = sleep
        # Redis key -> (credential, time.monotonic() after which it must be read again).
        self._local: dict[str, tuple[str, float]] = {}
        # A refresher may spend every attempt on its timeouts (the reply's deadline of two, and one last
        # read) and the backoffs between them; the lock must outlive that, and waiters wait as long.
        self.lock_timeout = retry_attempts * (3 * timeout + backoff_max) + 5.0

    def __repr__(self) -> str:
        return f"WeixinClient(api_base={self.api_base!r}, appid={self.appid!r})"

    @classmethod
    def from_settings(cls, settings: Settings, redis: Redis, **options: Any) -> WeixinClient:
        """A client for the account of `settings` (needs WECHAT_APPID and WECHAT_APPSECRET)."""
        if not settings.appid:
            raise ConfigError("WECHAT_APPID is required to call the Weixin API")
        if not settings.appsecret:
            raise ConfigError("WECHAT_APPSECRET is required to call the Weixin API")
        options.setdefault("key_prefix", f"{settings.queue_prefix}:weixin")
        return cls(settings.api_base, settings.appid, settings.appsecret, redis, **options)

    # -- credentials -------------------------------------------------------

    @property
    def access_token_key(self) -> str:
        """Redis key of the cached access_token."""
        return f"{self._prefix}:access_token"

    @property
    def card_ticket_key(self) -> str:
        """Redis key of the cached wx_card api_ticket."""
        return f"{self._prefix}:ticket:wx_card"

    def get_access_token(self) -> str:
        """The shared access_token, fetched and cached when there is none.

        https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/getStableAccessToken.html
        (`cgi-bin/stable_token`, the default) or, with token_endpoint="token",
        https://developers.weixin.qq.com/doc/offiaccount/Basic_Information/Get_access_token.html
        """
        return self._cached(self.access_token_key, self._fetch_access_token)

    def get_card_api_ticket(self) -> str:
        """The shared `wx_card` api_ticket that signs cardExt, cached like the token.

        https://developers.weixin.qq.com/doc/offiaccount/OA_Web_Apps/JS-SDK.html (appendix 4, card api_ticket)
        """
        return self._cached(self.card_ticket_key, self._fetch_card_ticket)

    def invalidate_access_token(self, failed: str) -> str:
        """Replace `failed` with a fresh token, unless another process already did."""
        return self._cached(self.access_token_key, self._fetch_access_token, failed=failed)

    def _fetch_access_token(self) -> tuple[str, int]:
        body = {"grant_type": "client_credential", "appid": self.appid, "secret": self._appsecret}
        if self.token_endpoint == "stable_token":
            path = "cgi-bin/stable_token"
            data = self._call("POST", path, {**body, "force_refresh": False}, authenticated=False)
        else:
            path = "cgi-bin/token"
            data = self._call("GET", path, params=body, authenticated=False)
        return reply_text(data, "access_token", path, MAX_TEXT_CHARS), reply_expires_in(data, path)

    def _fetch_card_ticket(self) -> tuple[str, int]:
        path = "cgi-bin/ticket/getticket"
        data = self._call("GET", path, params={"type": "wx_card"})
        return reply_text(data, "ticket", path, MAX_TEXT_CHARS), reply_expires_in(data, path)

    def _cached(self, key: str, fetch: Callable[[], tuple[str, int]], failed: str | None = None) -> str:
        """A credential from this client's short-lived copy, else Redis, refreshing it under the lock when needed.

        With `failed`, the copy is skipped and the value in Redis is only
        replaced while it is still the one that failed: another process may
        have refreshed it already.
        """
        if failed is None:
            local = self._local.get(key)
            if local is not None and time.monotonic() < local[1]:
                return local[0]
        value = self._get(key)
        if value is not None and value != failed:
            return value
        lock = self._redis.lock(f"{key}:lock", timeout=self.lock_timeout, sleep=0.05, blocking_timeout=self.lock_timeout)
        if not lock.acquire():
            value = self._get(key)
            if value is not None and value != failed:
                return value
            raise TransientWeixinError(ERRCODE_LOCK, "credential refresh lock not acquired in time", key.rsplit(":", 1)[-1])
        try:
            value = self._get(key)
            if value is not None and value != failed:
                return value  # refreshed by another process while we waited
            try:
                value, expires_in = fetch()
            except WeixinAPIError:
                if key == self.access_token_key:
                    metrics.count_token_refresh("error")
                raise
            if key == self.access_token_key:
                metrics.count_token_refresh("ok")
            ttl = max(1, expires_in - min(TOKEN_EXPIRY_MARGIN, expires_in // 4))
            self._redis.set(key, value, ex=ttl)
            self._keep(key, value, ttl * 1000)
            log.info("weixin credential %s refreshed (expires_in=%d)", key.rsplit(":", 1)[-1], expires_in)
            return value
        finally:
            try:
                lock.release()
            except LockError:
                log.warning("weixin credential lock %s expired before release", key.rsplit(":", 1)[-1])

    def _get(self, key: str) -> str | None:
        """The credential in Redis (None when there is none), kept locally until it is due again."""
        self._local.pop(key, None)
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        raw, ttl_ms = pipe.execute()
        if raw is None:
            return None
        value = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._keep(key, value, ttl_ms)
        return value

    def _keep(self, key: str, value: str, ttl_ms: int) -> None:
        """Remember `value` for LOCAL_CACHE_SECONDS, or less if Redis drops it sooner."""
        if ttl_ms > 0:  # -1: no expiry set (put there by hand); -2: gone since the GET
            self._local[key] = (value, time.monotonic() + min(LOCAL_CACHE_SECONDS, ttl_ms / 1000))

    # -- the APIs -----------------------------------------------------------

    def decrypt_code(self, encrypt_code: str) -> str:
        """The real code behind an encrypted one (wx.addCard result, coupon redirect).

        https://developers.weixin.qq.com/doc/offiaccount/Cards_and_Offer/Redeeming_a_coupon_voucher_or_card.html
        """
        data = self._call("POST", "card/code/decrypt", {"encrypt_code": encrypt_code})
        return reply_text(data, "code", "card/code/decrypt")

    def get_code(self, code: str, card_id: str | None = None, check_consume: bool = False) -> dict[str, Any]:
        """Holder, card and status of a code (`user_card_status`, `can_consume`, membership).

        With check_consume=False a consumed or deleted code is reported through
        `user_card_status` instead of 40099/40127.
        https://developers.weixin.qq.com/doc/offiaccount/Cards_and_Offer/Managing_Coupons_Vouchers_and_Cards.html
        """
        body: dict[str, Any] = {"code": code, "check_consume": check_consume}
        if card_id is not None:
            body["card_id"] = card_id
        data = self._call("POST", "card/code/get", body)
        check_code_reply(data, "card/code/get")
        return data

    def get_activate_temp_info(self, activate_ticket: str) -> dict[str, Any]:
        """The form a user submitted in the activation plug-in; the reply's `info` holds the fields.

        https://developers.weixin.qq.com/doc/offiaccount/Cards_and_Offer/Membership_Cards/Create_a_membership_card.html
        """
        path = "card/membercard/activatetempinfo/get"
        data = self._call("POST", path, {"activate_ticket": activate_ticket})
        check_activate_temp_info_reply(data, path)
        return data

    def activate_member_card(self, **fields: Any) -> dict[str, Any]:
        """Activate a member card (membership_number and code required). Not retried once sent.

        https://developers.weixin.qq.com/doc/offiaccount/Cards_and_Offer/Membership_Cards/Create_a_membership_card.html
        """
        for required in ("membership_number", "code"):
            if not fields.get(required):
                raise ValueError(f"activate_member_card needs {required}")
        return self._call("POST", "card/membercard/activate", dict(fields), idempotent=False)

    def get_activate_url(self, card_id: str, outer_str: str | None = None) -> str:
        """The URL whose query carries encrypt_card_id, outer_str and biz for the activation plug-in.

        https://developers.weixin.qq.com/miniprogram/en/dev/framework/open-ability/card/membership-card.html
        """
        body = {"card_id": card_id}
        if outer_str is not None:
            body["outer_str"] = outer_str
        data = self._call("POST", "card/membercard/activate/geturl", body)
        return reply_text(data, "url", "card/membercard/activate/geturl", MAX_TEXT_CHARS)

    def set_activate_user_form(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Set the fields of the activation form (card_id, required_form, optional_form...).

        https://developers.weixin.qq.com/doc/offiaccount/Cards_and_Offer/Membership_Cards/Create_a_membership_card.html
        """
        return self._call("POST", "card/membercard/activateuserform/set", dict(payload), idempotent=False)

    def create_card(self, card: Mapping[str, Any]) -> str:
        """Create a card from `{card_type, <type>: {base_info, ...}}`; returns its card_id.

        https://developers.weixin.qq.com/doc/offiaccount/Cards_and_Offer/Create_a_Coupon_Voucher_or_Card.html
        """
        data = self._call("POST", "card/create", {"card": dict(card)}, idempotent=False)
        return reply_text(data, "card_id", "card/create")

    def update_card(self, card_id: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Change a card: `patch` is `{<type>: {base_info: {...}, ...}}`; the reply has send_check.

        https://developers.weixin.qq.com/doc/offiaccount/Cards_and_Offer/Managing_Coupons_Vouchers_and_Cards.html
        """
        return self._call("POST", "card/update", {"card_id": card_id, **patch}, idempotent=False)

    # -- transport ------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        idempotent: bool = True,
        authenticated: bool = True,
    ) -> dict[str, Any]:
        """One API call with the token policy and bounded retries around it."""
        token_retried = False
        attempt = 1
        while True:
            token = self.get_access_token() if authenticated else None
            try:
                with _observed(path):
                    return self._request(method, path, body, params, token, idempotent)
            except TokenError as exc:
                if token is None or token_retried:
                    raise
                token_retried = True  # once: a second refusal is not a stale token
                log.warning("weixin %s errcode=%d: refreshing the access_token once", path, exc.errcode)
                self.invalidate_access_token(token)
            except TransientWeixinError as exc:
                if attempt >= self.retry_attempts:
                    raise
                delay = self._backoff(attempt)
                log.warning(
                    "weixin %s errcode=%d attempt %d/%d, retrying in %.2fs",
                    path, exc.errcode, attempt, self.retry_attempts, delay,
                )
                attempt += 1
                self._sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half fixed, half random, capped."""
        cap = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return cap / 2 + random.uniform(0, cap / 2)

    def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, str] | None,
        token: str | None,
        idempotent: bool,
    ) -> dict[str, Any]:
        """One HTTP exchange mapped to a dict or a typed error."""
        query = dict(params or {})
        if token is not None:
            query["access_token"] = token
        data = None
        # identity: a compressed reply could expand far past MAX_REPLY_BYTES (and is refused as unreadable).
        headers = {"Accept-Encoding": "identity"}
        if body is not None:
            # Weixin stores \\uXXXX escapes literally: send UTF-8 as is.
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json; charset=utf-8"
        url = f"{self.api_base}/{path}"
        if query:
            url = f"{url}?{urlencode(query)}"
        status, raw = self._exchange(method, url, data, headers, path, idempotent)
        if status >= 500 and not idempotent:
            # A 5xx comes from Weixin or a gateway after the request went in: it may have been applied.
            raise AmbiguousTimeoutError(ERRCODE_HTTP, f"HTTP {status} after sending; outcome unknown", path)
        if status >= 500 or status in _REFUSED_UNREAD:
            raise TransientWeixinError(ERRCODE_HTTP, f"HTTP {status}", path)
        if status != 200:
            raise WeixinAPIError(ERRCODE_HTTP, f"HTTP {status}", path)
        try:
            if raw is None:
                raise bad_reply(f"reply is longer than {MAX_REPLY_BYTES} bytes", path)
            reply = parse_reply(raw, path)
            errcode = reply_errcode(reply, path)
        except WeixinAPIError as exc:
            if idempotent:
                raise
            # An answer that says nothing usable about a change is no answer: it may have been applied.
            raise AmbiguousTimeoutError(exc.errcode, f"{exc.errmsg} after sending; outcome unknown", path) from None
        if errcode != 0:
            log.warning("weixin %s errcode=%d", path, errcode)
            raise error_for(errcode, reply_errmsg(reply.get("errmsg"), (self._appsecret, token)), path)
        log.debug("weixin %s ok", path)
        return reply

    def _exchange(
        self, method: str, url: str, data: bytes | None, headers: dict[str, str], path: str, idempotent: bool,
    ) -> tuple[int, bytes | None]:
        """Send one request; its status and body (None: longer than MAX_REPLY_BYTES). Raises `from None`:
        urllib3's messages quote the URL, and the URL carries the access_token."""
        deadline = time.monotonic() + 2 * self.timeout  # the whole reply's: connect and headers, then the body
        try:
            response = self._http.request(
                method, url, body=data, headers=headers, timeout=self._timeout, retries=False, redirect=False,
                preload_content=False, decode_content=False,
            )
        except NewConnectionError:  # refused, unresolvable, unreachable (before the timeout check: a subclass)
            raise TransientWeixinError(ERRCODE_NETWORK, "connection failed (request not sent)", path) from None
        except ConnectTimeoutError:
            raise TransientWeixinError(ERRCODE_NETWORK, "connect timed out (request not sent)", path) from None
        except ReadTimeoutError:
            raise _unanswered(ERRCODE_TIMEOUT, "read timed out", path, idempotent) from None
        except SSLError as exc:
            if exc.args and isinstance(exc.args[0], (ssl.SSLCertVerificationError, CertificateError)):
                # The certificate is checked in the handshake, before the request: nothing was sent.
                raise TransientWeixinError(ERRCODE_NETWORK, "TLS certificate refused (request not sent)",
                                           path) from None
            # On a pooled connection (its handshake long done) a TLS error comes while sending or reading
            # the answer: the request may have gone.
            raise _unanswered(ERRCODE_NETWORK, "TLS error", path, idempotent) from None
        except (ProtocolError, ProxyError, OSError) as exc:
            if isinstance(exc, ProxyError) and isinstance(exc.original_error, (NewConnectionError, ConnectTimeoutError)):
                # The proxy refused, unresolvable or unreachable, or not connected in time: nothing was sent.
                raise TransientWeixinError(ERRCODE_NETWORK, "connection failed (request not sent)", path) from None
            raise _unanswered(ERRCODE_NETWORK, "connection lost", path, idempotent) from None
        except HTTPError as exc:
            raise WeixinAPIError(ERRCODE_NETWORK, f"request failed ({type(exc).__name__})", path) from None
        try:
            return response.status, _read_capped(response, deadline)
        except ReadTimeoutError:
            raise _unanswered(ERRCODE_TIMEOUT, "read timed out", path, idempotent) from None
        except _TooSlow:
            raise _unanswered(ERRCODE_TIMEOUT, "reply too slow", path, idempotent) from None
        except (HTTPError, OSError):
            # Cut off inside the reply (a TLS error here is no handshake's): the request was sent.
            raise _unanswered(ERRCODE_NETWORK, "connection lost", path, idempotent) from None


# -- an exchange's outcome ------------------------------------------------------------------


def _unanswered(errcode: int, what: str, path: str, idempotent: bool) -> WeixinAPIError:
    """A request sent without a whole answer: retried only when it changes nothing."""
    if idempotent:
        return TransientWeixinError(errcode, what, path)
    return AmbiguousTimeoutError(errcode, f"{what} after sending; outcome unknown", path)


class _TooSlow(Exception):
    """A reply whose body was still coming at its deadline."""


def _read_capped(response: urllib3.BaseHTTPResponse, deadline: float) -> bytes | None:
    """The body, or None when it is longer than MAX_REPLY_BYTES; the connection goes back to the pool.

    Each read takes what has arrived (read1: one receive, which waits the read
    timeout at most), and none starts after `deadline` (time.monotonic()): a
    reply sent a few bytes at a time, each within the read timeout, ends there
    with _TooSlow instead of holding the worker (and a token refresh's lock).
    """
    try:
        if response.length_remaining is not None and response.length_remaining > MAX_REPLY_BYTES:
            response.close()  # the rest may never end: drop the connection instead of draining it
            return None
        parts: list[bytes] = []
        size = 0
        while part := response.read1(MAX_REPLY_BYTES + 1 - size):
            parts.append(part)
            size += len(part)
            if size > MAX_REPLY_BYTES:
                response.close()
                return None
            if time.monotonic() > deadline:
                response.close()
                raise _TooSlow
        if response.length_remaining:  # fewer bytes than its Content-Length: cut off, as urllib3 says
            response.close()
            raise ProtocolError("reply shorter than its Content-Length")
        return b"".join(parts)
    finally:
        response.release_conn()
