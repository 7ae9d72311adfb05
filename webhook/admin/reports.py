"""The reconciliation report shown on the admin page.

A placeholder until reconciliation provides its report to the web side: it
returns None, and the page says so. The page renders whatever mapping this
returns: scalar values as a summary table, lists of mappings as tables.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection


def reconciliation_report(conn: Connection) -> dict[str, Any] | None:
    """The latest reconciliation report, or None when there is none yet."""
    return None
