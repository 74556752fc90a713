"""Webhooks: POST engagement start/end (with the context payload), feedback ratings and user erasures to a CRM.

Each delivery is signed (HMAC-SHA256 over "<timestamp>.<body>", sent as
`X-Cuepoint-Signature: t=<timestamp>,v1=<hex>`, so the receiver can reject
forgeries and replays) and retried with exponential backoff and jitter on
network errors, 429 and 5xx. Deliveries run on a background task and never
hold up the engagement flow.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

__all__ = ["WebhookConfig", "WebhookDispatcher", "sign", "verify"]

log = structlog.get_logger("cuepoint.webhooks")

# user.erased tells the CRM to erase the user too: {"user_id", "erased_at", "deleted": rows per table}.
EVENTS = ("engagement.started", "engagement.ended", "user.erased", "feedback.received")


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret: str
    events: tuple[str, ...] = EVENTS
    max_attempts: int = 6
    # First retry after this many seconds, doubling each time (with jitter).
    backoff: float = 0.5
    max_backoff: float = 60.0
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
    def __init__(self, hooks: tuple[WebhookConfig, ...], *, client: httpx.AsyncClient | None = None) -> None:
        self.hooks = hooks
        self._client = client or httpx.AsyncClient()
        self._queue: asyncio.Queue[tuple[WebhookConfig, str, bytes]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cuepoint-webhooks")

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        body = json.dumps({"type": kind, "data": payload}, default=str, sort_keys=True).encode()
        for hook in self.hooks:
            if kind in hook.events:
                self._queue.put_nowait((hook, kind, body))

    async def _run(self) -> None:
        while True:
            hook, kind, body = await self._queue.get()
            # Each delivery retries on its own so one slow receiver does not stall the rest.
            task = asyncio.create_task(self._deliver(hook, kind, body))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, hook: WebhookConfig, kind: str, body: bytes) -> None:
        delay = hook.backoff
        for attempt in range(1, hook.max_attempts + 1):
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "x-cuepoint-event": kind,
                "x-cuepoint-signature": sign(hook.secret, timestamp, body),
                "x-cuepoint-attempt": str(attempt),
            }
            try:
                response = await self._client.post(hook.url, content=body, headers=headers, timeout=hook.timeout)
                if response.status_code < 300:
                    self.delivered += 1
                    log.info("webhook.delivered", url=hook.url, kind=kind, attempt=attempt)
                    return
                retry = response.status_code == 429 or response.status_code >= 500
                log.warning("webhook.rejected", url=hook.url, kind=kind, status=response.status_code, attempt=attempt)
                if not retry:
                    break
            except httpx.HTTPError as exc:
                log.warning("webhook.error", url=hook.url, kind=kind, error=type(exc).__name__, attempt=attempt)
            if attempt < hook.max_attempts:
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, hook.max_backoff)
        self.failed += 1
        log.error("webhook.gave_up", url=hook.url, kind=kind)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in self._deliveries:
            task.cancel()
        await self._client.aclose()
