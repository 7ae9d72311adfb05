"""The project's fake Weixin: a real HTTP server on loopback with the account's state.

    fake = FakeWeixin(appid="wx...", appsecret="...").start()
    client = WeixinClient(fake.url, fake.appid, fake.appsecret, redis)
    added = fake.add_card("pCARD", "oOPENID")      # {code, encrypt_code, ...}
    fake.inject_fault("/card/code/get", errcode=-1, count=2)
    fake.inject_fault("/card/code/get", raw=b'{"errcode": 1e999}')  # any body at all
    fake.stop()

It implements Weixin's API paths (see app.py), the /sandbox/ paths that stand
in for what a user does in the Weixin app and, with `push_to`, pushes the
matching events to the merchant's server, signed and encrypted in safe mode.
"""
from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from .app import create_app, make_fault, run_sandbox_action
from .pushes import DEFAULT_RETRY_DELAY, DEFAULT_TIMEOUT, DEFAULT_TRIES, Pusher
from .state import (
    DEFAULT_ACTIVATE_TICKET_TTL,
    DEFAULT_TICKET_TTL,
    DEFAULT_TOKEN_TTL,
    FakeState,
    WeixinFailure,
)
from .server import ServerThread

__all__ = ["FakeWeixin", "FakeWeixinError", "DEFAULT_APPID", "DEFAULT_APPSECRET"]

DEFAULT_APPID = "wxfa4e0000000000aa"  # used when no account is configured
DEFAULT_APPSECRET = "fakeweixinappsecret0000000000000"


class FakeWeixinError(Exception):
    """A sandbox action was refused; carries the errcode the fake answered."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


class FakeWeixin:
    """The fake Weixin server: `start()`, `url`, sandbox helpers, `stop()`."""

    def __init__(
        self,
        *,
        appid: str = DEFAULT_APPID,
        appsecret: str = DEFAULT_APPSECRET,
        host: str = "127.0.0.1",
        port: int = 0,
        token_ttl: int = DEFAULT_TOKEN_TTL,
        ticket_ttl: int = DEFAULT_TICKET_TTL,
        activate_ticket_ttl: int = DEFAULT_ACTIVATE_TICKET_TTL,
        push_to: str | None = None,
        token: str | None = None,
        aes_key: bytes | None = None,
        original_id: str | None = None,
        push_tries: int = DEFAULT_TRIES,
        push_timeout: float = DEFAULT_TIMEOUT,
        push_retry_delay: float = DEFAULT_RETRY_DELAY,
        secret: bytes | None = None,
        quiet: bool = True,
    ) -> None:
        self.appid = appid
        self.appsecret = appsecret
        self.state = FakeState(
            appid, appsecret, token_ttl=token_ttl, ticket_ttl=ticket_ttl,
            activate_ticket_ttl=activate_ticket_ttl, secret=secret,
        )
        self.pusher: Pusher | None = None
        if push_to:
            if not token or not aes_key:
                raise ValueError("push_to needs the account's token and aes_key (pushes are sent in safe mode)")
            self.pusher = Pusher(
                push_to, token=token, aes_key=aes_key, appid=appid, original_id=original_id,
                tries=push_tries, timeout=push_timeout, retry_delay=push_retry_delay,
            )
        self._host = host
        self._port = port
        self._quiet = quiet
        self._server: ServerThread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> FakeWeixin:
        """Listen (an ephemeral port when port=0) and serve from a background thread."""
        if self._server is not None:
            return self
        app = create_app(self.state, self.pusher)
        # Tests run thousands of requests: only the foreground server logs each one.
        self._server = ServerThread(app, self._host, self._port, access_log=not self._quiet).start()
        if self.pusher is not None:
            self.pusher.start()
        if not self._quiet:
            logging.getLogger(__name__).info("fake weixin listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and pushing; the port is released."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self.pusher is not None:
            self.pusher.stop()

    def __enter__(self) -> FakeWeixin:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port it listens on (known once started)."""
        if self._server is None:
            raise RuntimeError("FakeWeixin is not started")
        return self._server.port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321 (use it as WECHAT_API_BASE)."""
        host = self._host if ":" not in self._host else f"[{self._host}]"
        return f"http://{host}:{self.port}"

    # -- observation and faults ----------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Calls per Weixin API path so far (what GET /sandbox/stats reports)."""
        with self.state.lock:
            return dict(self.state.calls)

    def calls(self, path: str) -> int:
        """Calls of one path so far, e.g. calls("/cgi-bin/stable_token")."""
        with self.state.lock:
            return self.state.calls["/" + path.lstrip("/")]

    def inject_fault(
        self,
        path: str,
        *,
        errcode: int | None = None,
        count: int = 1,
        latency_ms: int = 0,
        drop: bool = False,
        http_status: int | None = None,
        errmsg: str | None = None,
        raw: bytes | str | None = None,
        chunked: bool = False,
        content_encoding: str | None = None,
        applied: bool = False,
    ) -> None:
        """Misbehave on the next `count` calls of `path` (as POST /sandbox/faults).

        `raw` replies with that body as is (str: its UTF-8), with `http_status`
        or 200: any reply a broken upstream could send. `chunked` sends it
        with no Content-Length; `content_encoding` labels it (nothing is encoded).
        `applied` lets the call happen first (a card is activated, created...)
        and then answers with the fault instead: a change made whose answer was lost.
        """
        body: dict[str, Any] = {"path": path, "count": count, "latency_ms": latency_ms, "drop": drop,
                                "chunked": chunked, "applied": applied}
        for name, value in (("errcode", errcode), ("http_status", http_status), ("errmsg", errmsg), ("raw", raw),
                            ("content_encoding", content_encoding)):
            if value is not None:
                body[name] = value
        try:
            self.state.add_fault(*make_fault(body))
        except WeixinFailure as failure:
            raise FakeWeixinError(failure.errcode, failure.errmsg) from None

    def reset(self) -> None:
        """Forget all state, faults, counts and past pushes (as POST /sandbox/reset)."""
        self.state.reset()
        if self.pusher is not None:
            self.pusher.clear()

    def pushes(self) -> list[dict[str, Any]]:
        """Every push delivery so far with its tries (as GET /sandbox/pushes)."""
        return self.pusher.deliveries() if self.pusher else []

    def wait_for_pushes(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until `count` pushes are delivered or given up; returns all deliveries."""
        if self.pusher is None:
            raise RuntimeError("FakeWeixin was started without push_to")
        return self.pusher.wait(count, timeout)

    # -- sandbox: what the user does in the Weixin app ---------------------------------

    def _sandbox(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return run_sandbox_action(self.state, self.pusher, action, {k: v for k, v in body.items() if v is not None})
        except WeixinFailure as failure:
            raise FakeWeixinError(failure.errcode, failure.errmsg) from None

    def add_card(
        self, card_id: str, openid: str, code: str | None = None, outer_str: str | None = None,
        unionid: str | None = None, card_ext: str | None = None,
    ) -> dict[str, Any]:
        """The user adds a card (wx.addCard): returns {card_id, code, encrypt_code}."""
        return self._sandbox("add-card", {"card_id": card_id, "openid": openid, "code": code,
                                          "outer_str": outer_str, "unionid": unionid, "card_ext": card_ext})

    def delete_card(self, card_id: str, code: str) -> dict[str, Any]:
        """The user deletes the card (pushes user_del_card)."""
        return self._sandbox("delete-card", {"card_id": card_id, "code": code})

    def consume_card(self, card_id: str, code: str, consume_source: str | None = None) -> dict[str, Any]:
        """The code is consumed (pushes user_consume_card)."""
        return self._sandbox("consume-card", {"card_id": card_id, "code": code, "consume_source": consume_source})

    def gift_card(self, card_id: str, code: str, to_openid: str) -> dict[str, Any]:
        """The holder gifts the card and `to_openid` accepts: returns the new code."""
        return self._sandbox("gift-card", {"card_id": card_id, "code": code, "to_openid": to_openid})

    def submit_activation_form(
        self, card_id: str, code: str, common_field_list: list[dict[str, Any]] | None = None,
        custom_field_list: list[dict[str, Any]] | None = None, expires_in: int | None = None,
    ) -> dict[str, Any]:
        """The user fills the activation plug-in's form: returns {activate_ticket, card_id, encrypt_code}."""
        return self._sandbox("activate-form", {
            "card_id": card_id, "code": code, "common_field_list": common_field_list or [],
            "custom_field_list": custom_field_list or [], "expires_in": expires_in,
        })

    def submit_activation(
        self, card_id: str, code: str, openid: str, fields: dict[str, Any] | None = None,
        custom_fields: dict[str, Any] | None = None, expires_in: int | None = None,
    ) -> dict[str, Any]:
        """The user fills a member card's activation component (POST /sandbox/submit-activation).

        Redirect-based card: returns {activate_ticket, card_id, encrypt_code}; non-redirect:
        Weixin activates the card and pushes submit_membercard_user_info.
        """
        return self._sandbox("submit-activation", {
            "card_id": card_id, "code": code, "openid": openid, "fields": fields or {},
            "custom_fields": custom_fields or {}, "expires_in": expires_in,
        })

    def set_status(self, card_id: str, code: str, status: str) -> dict[str, Any]:
        """Force a code's status (e.g. EXPIRE), without a push."""
        return self._sandbox("set-status", {"card_id": card_id, "code": code, "status": status})
