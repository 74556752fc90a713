"""Webhooks: the cue and engagement lifecycle, and erasures, POSTed to a CRM from a durable outbox.

Each event becomes one outbox row per receiver that wants it (storage: `webhook_outbox`), committed in the
same transaction as the change it reports (the core builds them with `rows`), so a delivery survives
restarts: a row leaves the outbox only once the receiver answered 2xx.
Failed attempts (network errors, 429, 5xx) are retried with exponential backoff and jitter; after the last
attempt, or on any other 4xx, the row stays as dead, listed by AdminService.ListDeadWebhooks and sent again by
RedeliverWebhook. Delivery is at least once: a receiver de-duplicates by the body's `id`.

Each POST is signed (HMAC-SHA256 over "<timestamp>.<body>", sent as `X-Cuepoint-Signature: t=<timestamp>,
v1=<hex>`, so the receiver can reject forgeries and replays). Deliveries run on background tasks and never
hold up evaluation or the engagement flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from .storage import Store, WebhookRecord

__all__ = ["COMMITTED_BY_CORE", "EVENTS", "WebhookConfig", "WebhookDispatcher", "sign", "verify"]

log = structlog.get_logger("cuepoint.webhooks")

EVENTS = (
    "cue.offered",
    "cue.answered",
    "cue.withdrawn",
    "cue.pending_push",
    "engagement.queued",
    "engagement.assigned",
    "engagement.transferred",
    "engagement.callback_scheduled",
    "engagement.ended",
    "engagement.wrapped_up",
    "engagement.outcome",
    "feedback.received",
    "user.erased",
)
# Events whose outbox rows the core commits in the same transaction as what they report (Core.webhook_rows,
# through the Store's methods that take `webhooks`): a crash keeps both or neither.
COMMITTED_BY_CORE = frozenset(set(EVENTS) - {"user.erased"})
# Sent from memory, never written to the outbox: an erasure notice on disk would store the erased user id
# again, in a file the erasure has just scrubbed. Retried with backoff like the rest, lost on a restart.
_NOT_STORED = frozenset({"user.erased"})
# Deliveries in flight at once, across receivers.
_CONCURRENCY = 16
# The loop looks at the outbox at least this often, even without a wake-up (e.g. another process's rows).
_POLL = 5.0


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret: str
    events: tuple[str, ...] = EVENTS
    max_attempts: int = 8
    # First retry after this many seconds, doubling each time (with jitter), at most max_backoff.
    backoff: float = 1.0
    max_backoff: float = 3600.0
    timeout: float = 10.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver runs: a valid signature, made recently."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


class WebhookDispatcher:
    """Writes lifecycle events to the outbox (`emit`) and delivers due rows (a background loop)."""

    def __init__(
        self,
        hooks: tuple[WebhookConfig, ...],
        store: Store,
        *,
        now: Callable[[], float] = time.time,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.hooks = hooks
        self._by_url = {hook.url: hook for hook in hooks}
        self._store = store
        self._now = now
        self._client = client or httpx.AsyncClient()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._deliveries: dict[str, asyncio.Task[None]] = {}
        # Deliveries whose attempt ended while the outbox was being read (_deliver_due).
        self._reading = False
        self._ended_during_read: set[str] = set()
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cuepoint-webhooks")

    def wake(self) -> None:
        self._wake.set()

    def rows(self, kind: str, payload: dict[str, Any]) -> list[WebhookRecord]:
        """The outbox rows of an event, one per receiver that wants it (the core commits cue.offered's itself)."""
        hooks = [hook for hook in self.hooks if kind in hook.events]
        now = self._now()
        event = {"id": uuid.uuid4().hex, "type": kind, "time": now, "data": payload}
        body = json.dumps(event, default=str, sort_keys=True)
        return [WebhookRecord(uuid.uuid4().hex, hook.url, kind, body, now, "pending", 0, now) for hook in hooks]

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        """A lifecycle event: one outbox row per receiver that wants it, written now (in the background)."""
        if kind in COMMITTED_BY_CORE:
            return
        rows = self.rows(kind, payload)
        if not rows:
            return
        if kind in _NOT_STORED:
            for rec in rows:
                self._start(rec, stored=False)
            return
        task = asyncio.ensure_future(self._enqueue(rows))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _enqueue(self, rows: list[WebhookRecord]) -> None:
        try:
            await self._store.enqueue_webhooks(rows)
        except Exception:
            log.exception("webhook.enqueue_failed", kind=rows[0].kind)
            return
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._deliver_due()
                wait = _POLL
                due = await self._store.next_webhook_due()
                if due is not None:
                    wait = min(wait, max(0.0, due - self._now()))
            except Exception:
                log.exception("webhook.loop_failed")
                wait = _POLL
            self._wake.clear()
            # asyncio.timeout, not wait_for, which in Python 3.11 can swallow a cancel arriving as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait if wait > 0 else 0.01):
                    await self._wake.wait()

    async def _deliver_due(self) -> None:
        room = _CONCURRENCY - len(self._deliveries)
        if room <= 0:
            return
        # An attempt that ends while the read is in flight may be in what it returns, as it was before its
        # row was deleted (delivered) or moved on (retry later): not started again from this read.
        self._ended_during_read = set()
        self._reading = True
        try:
            due = await self._store.due_webhooks(self._now(), limit=room + len(self._deliveries))
        finally:
            self._reading = False
        for rec in due:
            if rec.delivery_id in self._deliveries or rec.delivery_id in self._ended_during_read:
                continue
            if len(self._deliveries) >= _CONCURRENCY:
                break
            self._start(rec, stored=True)

    def _start(self, rec: WebhookRecord, *, stored: bool) -> None:
        work = self._attempt(rec) if stored else self._from_memory(rec)
        task = asyncio.create_task(work, name=rec.delivery_id)
        self._deliveries[rec.delivery_id] = task
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._deliveries.pop(task.get_name(), None)
        if self._reading:
            self._ended_during_read.add(task.get_name())
        self._wake.set()

    async def _from_memory(self, rec: WebhookRecord) -> None:
        hook = self._by_url[rec.url]
        for attempt in range(1, hook.max_attempts + 1):
            error, retry = await self._post(hook, rec, attempt)
            if not error:
                self.delivered += 1
                log.info("webhook.delivered", url=hook.url, kind=rec.kind, attempt=attempt)
                return
            if not retry:
                break
            await asyncio.sleep(min(hook.backoff * 2 ** (attempt - 1), hook.max_backoff) * (0.5 + random.random() / 2))
        self.failed += 1
        log.error("webhook.gave_up", url=hook.url, kind=rec.kind)

    async def _post(self, hook: WebhookConfig, rec: WebhookRecord, attempt: int) -> tuple[str, bool]:
        """One POST: ("", False) when taken, else (error, whether to retry)."""
        body = rec.body.encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "x-cuepoint-event": rec.kind,
            "x-cuepoint-delivery": rec.delivery_id,
            "x-cuepoint-signature": sign(hook.secret, timestamp, body),
            "x-cuepoint-attempt": str(attempt),
        }
        try:
            response = await self._client.post(hook.url, content=body, headers=headers, timeout=hook.timeout)
        except httpx.HTTPError as exc:
            return type(exc).__name__, True
        if response.status_code < 300:
            return "", False
        return f"HTTP {response.status_code}", response.status_code == 429 or response.status_code >= 500

    async def _attempt(self, rec: WebhookRecord) -> None:
        hook = self._by_url.get(rec.url)
        attempt = rec.attempts + 1
        if hook is None:
            await self._failed(rec, attempt, "no webhook is configured for this URL any more", retry=False, hook=None)
            return
        error, retry = await self._post(hook, rec, attempt)
        if not error:
            await self._store.webhook_attempted(
                rec.delivery_id, delivered=True, attempts=attempt, next_attempt_at=0.0, error="", dead=False
            )
            self.delivered += 1
            log.info("webhook.delivered", url=hook.url, kind=rec.kind, attempt=attempt)
            return
        await self._failed(rec, attempt, error, retry=retry, hook=hook)

    async def _failed(
        self, rec: WebhookRecord, attempt: int, error: str, *, retry: bool, hook: WebhookConfig | None
    ) -> None:
        dead = not retry or hook is None or attempt >= hook.max_attempts
        delay = 0.0
        if hook is not None and not dead:
            delay = min(hook.backoff * 2 ** (attempt - 1), hook.max_backoff) * (0.5 + random.random() / 2)
        await self._store.webhook_attempted(
            rec.delivery_id,
            delivered=False,
            attempts=attempt,
            next_attempt_at=self._now() + delay,
            error=error,
            dead=dead,
        )
        if dead:
            self.failed += 1
            log.error("webhook.dead", url=rec.url, kind=rec.kind, attempts=attempt, error=error)
        else:
            log.warning("webhook.retry", url=rec.url, kind=rec.kind, attempt=attempt, error=error, delay=delay)

    async def close(self) -> None:
        """Finish writing emitted events to the outbox; stop delivering (what is left waits in the outbox)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._deliveries.values()):
            task.cancel()
        if self._deliveries:
            await asyncio.gather(*list(self._deliveries.values()), return_exceptions=True)
        await self._client.aclose()
