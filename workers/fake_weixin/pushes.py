"""Pushing events to the merchant's server as Weixin does: signed, encrypted, retried.

A background thread takes events from a queue and POSTs each one, in safe mode,
to the push target: up to `tries` tries, each with its own timeout; a try
succeeds when the reply is HTTP 200 with an empty body or `success`, as Weixin
expects. Every delivery and every try is kept for `GET /sandbox/pushes`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import requests

from .state import PushEvent

log = logging.getLogger(__name__)

DEFAULT_TRIES = 3  # Weixin: three tries in all
DEFAULT_TIMEOUT = 5.0  # Weixin: no answer in 5 s is a failure
DEFAULT_RETRY_DELAY = 0.0  # Weixin retries as soon as a try fails


@dataclass
class Attempt:
    """One try of one delivery."""

    status: int | None  # HTTP status, None when there was no reply
    error: str  # "" on success; else why the try failed
    elapsed_ms: int


@dataclass
class Delivery:
    """One pushed event and what became of it."""

    id: int
    event: str
    openid: str
    card_id: str
    code: str
    state: str = "pending"  # pending | delivered | failed
    attempts: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class Pusher:
    """Delivers `PushEvent`s to one URL from a background thread, in order."""

    def __init__(
        self,
        url: str,
        *,
        token: str,
        aes_key: bytes,
        appid: str,
        original_id: str | None = None,
        tries: int = DEFAULT_TRIES,
        timeout: float = DEFAULT_TIMEOUT,
        retry_delay: float = DEFAULT_RETRY_DELAY,
    ) -> None:
        # Imported here so the fake serves the API even where pushing is not wanted.
        from webhook.envelope import seal_push
        from webhook.events import sample_fields

        self._seal = seal_push
        self._sample = sample_fields
        self.url = url
        self._token = token
        self._aes_key = aes_key
        self._appid = appid
        self._original_id = original_id
        self.tries = tries
        self.timeout = timeout
        self.retry_delay = retry_delay
        self._queue: queue.Queue[tuple[Delivery, PushEvent] | None] = queue.Queue()
        self._deliveries: list[Delivery] = []
        self._done = threading.Condition()
        self._session = requests.Session()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the delivery thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fake-weixin-pusher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after the delivery in progress; undelivered events stay `pending`."""
        if self._thread is not None:
            while True:  # drop what is queued: stopping must not wait for 15 s windows
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
        self._session.close()

    def submit(self, events: list[PushEvent]) -> list[int]:
        """Queue events for delivery; returns their delivery ids."""
        ids = []
        with self._done:
            for event in events:
                delivery = Delivery(
                    id=len(self._deliveries) + 1, event=event.event, openid=event.openid,
                    card_id=event.fields.get("CardId", ""), code=event.fields.get("UserCardCode", ""),
                )
                self._deliveries.append(delivery)
                self._queue.put((delivery, event))
                ids.append(delivery.id)
        return ids

    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery so far, oldest first."""
        with self._done:
            return [d.to_dict() for d in self._deliveries]

    def clear(self) -> None:
        """Forget past deliveries (sandbox reset); queued ones are dropped."""
        with self._done:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._deliveries.clear()

    def wait(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """Block until `count` deliveries are finished (delivered or failed); returns all."""
        deadline = time.monotonic() + timeout
        with self._done:
            while sum(d.state != "pending" for d in self._deliveries) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fewer than {count} pushes finished in {timeout} s")
                self._done.wait(left)
            return [d.to_dict() for d in self._deliveries]

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            delivery, event = item
            try:
                self._deliver(delivery, event)
            except Exception:  # a bug here must not kill the thread silently
                log.exception("fake weixin: push %d could not be built", delivery.id)
                self._finish(delivery, "failed")

    def _deliver(self, delivery: Delivery, event: PushEvent) -> None:
        overrides = dict(event.fields)
        if self._original_id:
            overrides["ToUserName"] = self._original_id
        fields = self._sample(event.event, **overrides)
        for attempt in range(1, self.tries + 1):
            # Sealed per try: a fresh timestamp and nonce, the same message.
            params, body = self._seal(
                fields, token=self._token, aes_key=self._aes_key, appid=self._appid, mode="safe",
                openid=event.openid,
            )
            started = time.monotonic()
            status: int | None = None
            try:
                reply = self._session.post(
                    self.url, params=params, data=body, headers={"Content-Type": "text/xml"},
                    timeout=(self.timeout, self.timeout),
                )
                status = reply.status_code
                text = reply.content.strip()
                error = "" if status == 200 and text in (b"", b"success") else f"HTTP {status}"
            except requests.RequestException as exc:
                error = type(exc).__name__
            with self._done:
                delivery.attempts.append(Attempt(status, error, int((time.monotonic() - started) * 1000)))
            if not error:
                self._finish(delivery, "delivered")
                return
            log.info("fake weixin: push %d (%s) try %d/%d failed: %s",
                     delivery.id, event.event, attempt, self.tries, error)
            if attempt < self.tries and self.retry_delay:
                time.sleep(self.retry_delay)
        self._finish(delivery, "failed")

    def _finish(self, delivery: Delivery, state: str) -> None:
        with self._done:
            delivery.state = state
            self._done.notify_all()
