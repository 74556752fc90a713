"""The bus: how one replica reaches the others, beside the Store protocol (storage/base.py).

Storage owns every fact; the bus only carries wake-ups ("the switches changed", "outbox row N is ready for
device D"), so a message lost on the way is recovered from storage (the receiver re-reads what the message
points at on reconnect or on its periodic sweep) and a message delivered twice changes nothing twice.

`LocalBus` serves the single-process default: every stream lives in this process, so a broadcast has no
one else to reach. `bus_nats.NatsBus` (`cuepoint serve --bus nats://HOST:4222`) spans replicas. The core
knows only this protocol.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["OPS", "ROOM", "Bus", "BusHandler", "LocalBus", "new_replica_id"]

# (key, body): the body a publisher sent, and the key (device id, associate id, "" for broadcasts) it went to.
BusHandler = Callable[[str, dict[str, Any]], Awaitable[None]]

# Broadcast topic: an operations switch changed (pause, a scenario switch); receivers re-read the switches.
OPS = "ops"
# Broadcast topic: an associate got room (a slot given back, core/desk_shared.py); receivers offer them
# what waits in their lines.
ROOM = "room"


def new_replica_id() -> str:
    return uuid.uuid4().hex[:12]


@runtime_checkable
class Bus(Protocol):
    """Topic + key addressing; bodies are JSON-able mappings. Delivery is at most once: storage recovers."""

    # Who this replica is; a publisher stamps it on each body as "replica", so a receiver can skip its own.
    replica_id: str

    # True when other replicas may exist (timers, switches and presence must then be read from storage).
    shared: bool

    async def publish(self, topic: str, key: str, body: Mapping[str, Any]) -> None:
        """Send `body` to whoever subscribed to (topic, key) on any replica (this one included)."""
        ...

    async def subscribe(self, topic: str, key: str, handler: BusHandler) -> None:
        """Receive what is published to (topic, key); key "" receives the topic's broadcasts."""
        ...

    async def unsubscribe(self, topic: str, key: str) -> None: ...

    async def close(self) -> None: ...


class LocalBus:
    """One process: delivers to this process's own subscribers, in order, at once."""

    shared = False

    def __init__(self, replica_id: str | None = None) -> None:
        self.replica_id = replica_id or new_replica_id()
        self._handlers: dict[tuple[str, str], BusHandler] = {}

    async def publish(self, topic: str, key: str, body: Mapping[str, Any]) -> None:
        handler = self._handlers.get((topic, key))
        if handler is not None:
            await handler(key, {**body, "replica": self.replica_id})

    async def subscribe(self, topic: str, key: str, handler: BusHandler) -> None:
        self._handlers[(topic, key)] = handler

    async def unsubscribe(self, topic: str, key: str) -> None:
        self._handlers.pop((topic, key), None)

    async def close(self) -> None:
        self._handlers.clear()
