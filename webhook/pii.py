"""Personal data at rest: authenticated encryption with the keys of WXCOUPON_DATA_KEY.

Member data (mobile, name, ID number, birthday, email, address, custom fields)
is stored only as Fernet tokens (AES-128-CBC + HMAC-SHA256, from the
`cryptography` package). WXCOUPON_DATA_KEY holds one or more comma-separated
keys: the first encrypts, every one decrypts, so a key can be rotated by
putting a new key first, running `wxcoupon members rotate-key`, then dropping
the old one. Nothing here logs a value or puts one into an exception message.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .config import Settings

DATA_KEY_VARIABLE = "WXCOUPON_DATA_KEY"


class MissingDataKeyError(Exception):
    """Member data must be stored or read but WXCOUPON_DATA_KEY is not set."""

    def __init__(self) -> None:
        super().__init__(
            f"{DATA_KEY_VARIABLE} is not set: member data is personal data and is only stored encrypted "
            "(set it to a Fernet key; see README, Member cards)"
        )


class UndecryptableError(Exception):
    """A stored token that no key of WXCOUPON_DATA_KEY opens (wrong key, or altered data)."""

    def __init__(self) -> None:
        super().__init__(f"no key in {DATA_KEY_VARIABLE} decrypts this value (a key was removed too early?)")


def generate_key() -> str:
    """A new random data key, in the form WXCOUPON_DATA_KEY takes."""
    return Fernet.generate_key().decode("ascii")


class DataCipher:
    """Encrypt and decrypt JSON values with a key list: the first encrypts, all decrypt."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise MissingDataKeyError()
        self._fernet = MultiFernet([Fernet(key.encode("ascii")) for key in keys])
        self._primary = Fernet(keys[0].encode("ascii"))
        self._digest_key = hmac.new(base64.urlsafe_b64decode(keys[0]), b"wxcoupon dedupe digest", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "DataCipher(keys=[redacted])"

    def encrypt_json(self, value: Any) -> str:
        """A token holding `value` as JSON, sealed with the first key."""
        raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return self._primary.encrypt(raw).decode("ascii")

    def decrypt_json(self, token: str) -> Any:
        """The JSON value of a token sealed with any of the keys."""
        try:
            raw = self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise UndecryptableError() from None
        return json.loads(raw.decode("utf-8"))

    def digest_json(self, value: Any) -> str:
        """A keyed digest of `value` (HMAC-SHA256 under a key derived from the first key), for dedupe keys.

        Unlike a plain hash, it cannot be reversed by trying every mobile number.
        """
        raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return hmac.new(self._digest_key, raw, hashlib.sha256).hexdigest()

    def rotate(self, token: str) -> str:
        """The same value re-sealed with the first key."""
        try:
            return self._fernet.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeEncodeError):
            raise UndecryptableError() from None


def cipher_for(settings: Settings) -> DataCipher:
    """The data cipher of these settings; MissingDataKeyError when WXCOUPON_DATA_KEY is unset."""
    return DataCipher(settings.data_keys)
