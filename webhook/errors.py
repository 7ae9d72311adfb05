"""Typed errors of the intake pipeline; the view maps each to an HTTP status."""
from __future__ import annotations


class WebhookError(Exception):
    """A push that cannot be accepted; `reason` is short, safe to log and to return."""

    status: int = 400
    reason: str = "bad request"

    def __init__(self, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(self.reason)


class AuthenticationError(WebhookError):
    """The push is not provably from Weixin for this account (HTTP 403)."""

    status = 403
    reason = "authentication failed"


class SignatureError(AuthenticationError):
    """`signature` or `msg_signature` does not match."""

    reason = "invalid signature"


class StaleTimestampError(AuthenticationError):
    """The timestamp is outside the accepted clock skew."""

    reason = "stale timestamp"


class AppIdMismatchError(AuthenticationError):
    """The decrypted message names another appid."""

    reason = "appid mismatch"


class MalformedError(WebhookError):
    """The request is not a well-formed push (HTTP 400)."""

    status = 400
    reason = "malformed request"


class DecryptError(MalformedError):
    """The ciphertext is not valid base64, padding or length."""

    reason = "cannot decrypt"


class XMLError(MalformedError):
    """The body is not acceptable XML (not XML, DTD, entities, wrong root)."""

    reason = "invalid xml"


class PayloadTooLargeError(WebhookError):
    """The body is over the configured cap (HTTP 413)."""

    status = 413
    reason = "payload too large"


class StoreUnavailableError(WebhookError):
    """The event could not be committed; Weixin must retry (HTTP 503)."""

    status = 503
    reason = "store unavailable"
