"""What webhook.weixin_reply makes of Weixin's replies, tested as pure functions: no HTTP, no Redis (the same checks
over HTTP through WeixinClient, against the fake Weixin, are in test_weixin_api.py)."""
from __future__ import annotations

from webhook.weixin_reply import (
    CardUnavailableError,
    CodeConsumedError,
    InvalidCodeError,
    QuotaError,
    TicketExpiredError,
    TokenError,
    TransientWeixinError,
    WeixinAPIError,
    error_for,
)


def test_error_classes_by_errcode() -> None:
    """Each behaviour-changing errcode has its class; others are plain WeixinAPIError."""
    assert type(error_for(-1, "busy")) is TransientWeixinError
    assert all(type(error_for(c, "")) is TokenError for c in (40001, 40014, 42001))
    assert type(error_for(45009, "")) is QuotaError
    assert all(type(error_for(c, "")) is InvalidCodeError for c in (40056, 40116))
    assert type(error_for(40099, "")) is CodeConsumedError
    assert type(error_for(40127, "")) is CardUnavailableError
    assert type(error_for(72012, "")) is TicketExpiredError
    assert type(error_for(40080, "invalid card ext")) is WeixinAPIError
    assert str(error_for(45009, "quota", "card/code/get")) == "card/code/get: errcode 45009: quota"
