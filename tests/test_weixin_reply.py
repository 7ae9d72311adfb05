"""What webhook.weixin_reply makes of Weixin's replies, tested as pure functions: no HTTP, no Redis (the same checks
over HTTP through WeixinClient, against the fake Weixin, are in test_weixin_api.py)."""
from __future__ import annotations

from webhook import weixin_reply as wr


def test_error_classes_by_errcode() -> None:
    """Each behaviour-changing errcode has its class; others are plain WeixinAPIError."""
    assert type(wr.error_for(-1, "busy")) is wr.TransientWeixinError
    assert all(type(wr.error_for(c, "")) is wr.TokenError for c in (40001, 40014, 42001))
    assert type(wr.error_for(45009, "")) is wr.QuotaError
    assert all(type(wr.error_for(c, "")) is wr.InvalidCodeError for c in (40056, 40116))
    assert type(wr.error_for(40099, "")) is wr.CodeConsumedError
    assert type(wr.error_for(40127, "")) is wr.CardUnavailableError
    assert type(wr.error_for(72012, "")) is wr.TicketExpiredError
    assert type(wr.error_for(40080, "invalid card ext")) is wr.WeixinAPIError
    assert str(wr.error_for(45009, "quota", "card/code/get")) == "card/code/get: errcode 45009: quota"
