"""The bus over NATS (`cuepoint serve --bus nats://HOST:4222`): replicas reach each other's streams.

Core NATS subjects `<prefix>.<topic>` (broadcasts) and `<prefix>.<topic>.<hex key>` (one device or
associate; hex so any id is a valid subject token). NATS is only the way to the replica that holds a
stream, never the owner of state (as Centrifugo and the Socket.IO adapter use their brokers): a message lost
while NATS or a replica reconnects is recovered from storage, which is why `reconnect_listeners` exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .core.bus import BusHandler, new_replica_id

__all__ = ["NatsBus"]

log = structlog.get_logger("cuepoint.bus")


class NatsBus:
    shared = True

    def __init__(self, client: Client, prefix: str, replica_id: str) -> None:
        self.replica_id = replica_id
        self._nc = client
        self._prefix = prefix
        self._subs: dict[tuple[str, str], Subscription] = {}
        # Called after NATS comes back: what was published meanwhile is read again from storage.
        self.reconnect_listeners: list[Callable[[], None]] = []

    @classmethod
    async def connect(cls, url: str, *, prefix: str = "cuepoint", replica_id: str | None = None) -> NatsBus:
        rid = replica_id or new_replica_id()
        holder: list[NatsBus] = []

        async def reconnected() -> None:
            log.warning("bus.reconnected", replica=rid)
            for listener in holder[0].reconnect_listeners if holder else ():
                listener()

        async def disconnected() -> None:
            log.warning("bus.disconnected", replica=rid)

        async def error(exc: Exception) -> None:
            log.warning("bus.error", error=repr(exc))

        client = await nats.connect(
            url,
            name=f"cuepoint-{rid}",
            connect_timeout=5,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            reconnected_cb=reconnected,
            disconnected_cb=disconnected,
            error_cb=error,
        )
        bus = cls(client, prefix, rid)
        holder.append(bus)
        return bus

    def _subject(self, topic: str, key: str) -> str:
        base = f"{self._prefix}.{topic}"
        return f"{base}.{key.encode().hex()}" if key else base

    async def publish(self, topic: str, key: str, body: Mapping[str, Any]) -> None:
        data = json.dumps({**body, "replica": self.replica_id}, separators=(",", ":")).encode()
        await self._nc.publish(self._subject(topic, key), data)

    async def subscribe(self, topic: str, key: str, handler: BusHandler) -> None:
        async def deliver(msg: Msg) -> None:
            try:
                await handler(key, json.loads(msg.data))
            except Exception:
                log.exception("bus.handler_failed", topic=topic)

        await self.unsubscribe(topic, key)
        self._subs[(topic, key)] = await self._nc.subscribe(self._subject(topic, key), cb=deliver)

    async def unsubscribe(self, topic: str, key: str) -> None:
        sub = self._subs.pop((topic, key), None)
        if sub is not None and not self._nc.is_closed:
            await sub.unsubscribe()

    async def close(self) -> None:
        self._subs.clear()
        if not self._nc.is_closed:
            await self._nc.drain()
