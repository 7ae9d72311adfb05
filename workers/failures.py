"""Which failures are worth retrying, and how RQ retries them."""
from __future__ import annotations

import redis
from rq import Retry
from sqlalchemy.exc import OperationalError

# SQLSTATE classes that psycopg reports as OperationalError although a row's own
# values cause them, so that no retry can cure them: 54, program limit exceeded
# (an index row too large for a B-tree, e.g. a card code of a few kB).
ROW_SQLSTATE_CLASSES = ("54",)


def job_retry(intervals: tuple[int, ...]) -> Retry | None:
    """The RQ retry policy of a batch job (WXCOUPON_RETRY_INTERVALS).

    Transient failures retry after these delays; after the last one the row is
    `dead` and only a replay revives it.
    """
    if not intervals:
        return None
    return Retry(max=len(intervals), interval=list(intervals))


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later attempt may not meet (busy, network, locks)."""
    from webhook.weixin_api import AmbiguousTimeoutError, TokenError, TransientWeixinError

    if isinstance(exc, AmbiguousTimeoutError):
        # The change may have been applied; repeating it blindly is not safe.
        return False
    if isinstance(exc, (TransientWeixinError, TokenError)):
        return True
    # Network failures reach the jobs only as TransientWeixinError: the client maps them.
    return isinstance(exc, (redis.RedisError, OperationalError)) and not is_row_error(exc)


def is_row_error(exc: BaseException) -> bool:
    """True for a database error that the row's own values cause (not the database being busy or away)."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(exc, OperationalError) and isinstance(sqlstate, str) and sqlstate[:2] in ROW_SQLSTATE_CLASSES


def describe(exc: BaseException) -> str:
    """A short error text for the status column: type and message, no payload."""
    return f"{type(exc).__name__}: {exc}"[:1000]


def loggable(exc: BaseException) -> str:
    """The error for a log line: exception types only, and a database's own first line.

    A SQLAlchemy error's text carries the statement's parameters (the rows'
    codes and openids), and a driver's detail lines can quote a value: neither
    may reach a log. The full text goes to the row's last_error instead.
    """
    orig = getattr(exc, "orig", None)
    if orig is None:
        return type(exc).__name__
    text = f"{type(exc).__name__} ({type(orig).__name__})"
    if isinstance(exc, OperationalError):  # busy, locked, deadlock, gone: the first line says which, with no value
        first = str(orig).strip().splitlines()
        text += f": {first[0][:120]}" if first else ""
    return text
