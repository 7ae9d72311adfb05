"""Build test pushes with the project's one push builder."""
from __future__ import annotations

import time
from typing import Any

from webhook.config import Settings
from webhook.envelope import seal_push
from webhook.events import sample_fields


def make_push(
    settings: Settings, event: str = "user_get_card", mode: str = "safe", **overrides: Any
) -> tuple[dict[str, str], bytes]:
    """A push for `event` as Weixin would send it to this account, fresh timestamp."""
    overrides.setdefault("CreateTime", int(time.time()))
    fields = sample_fields(event, **overrides)
    return seal_push(fields, token=settings.token, aes_key=settings.aes_key, appid=settings.appid, mode=mode)
