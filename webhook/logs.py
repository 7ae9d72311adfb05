"""Logging: readable lines in development, one JSON object per line in production."""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from flask import Flask

from .config import Settings

# Attributes every LogRecord has; anything else was passed with `extra=` and is
# emitted as a field of the JSON line.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a JSON line."""
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A readable line with the extra fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render the record with its extra fields."""
        line = super().format(record)
        extras = [f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")]
        return f"{line} {' '.join(extras)}" if extras else line


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send wxcoupon's logs to stderr in the chosen format (idempotent)."""
    root = logging.getLogger("wxcoupon")
    if getattr(root, "_wxcoupon_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    root._wxcoupon_configured = True  # type: ignore[attr-defined]


def init_app(app: Flask, settings: Settings) -> None:
    """Configure logging for the web process."""
    configure_logging(settings.log_format)
