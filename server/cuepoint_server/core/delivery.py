"""Delivery between replicas: a message for a stream another replica holds is a stored row first (issue 14).

`send` commits the message as a row of the delivery outbox (storage/delivery_rows.py) for its recipient (a
name for one stream: an associate's link, a stand-in, a device), then publishes only "row N is ready for R"
on the bus, to the replica known to hold R (or to every replica when that is not known). The replica that
holds R takes R's rows in id order by deleting them (one holder, one taker: a row is sent once) and hands
them to R's receiver, one claim at a time per recipient, so they arrive in the order they were stored.

The bus stays at most once: a wake-up it loses is made good by `sweep` (every cluster sweep), which takes
whatever waits for the recipients this replica holds; a wake-up it repeats finds its row gone (or is
recognised at once) and sends nothing twice. Rows whose recipient nobody holds any more are dropped after
RETENTION. One process alone (no `--bus`) has no one to deliver to and never writes a row.

Cost per message delivered: one row; PostgreSQL: one round trip to store it, one to take it (shared with
whatever else waits for the same recipient); one bus message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..clock import Clock
from ..storage import Store
from .bus import Bus

__all__ = ["DELIVER", "RETENTION", "Delivery", "DeliveryFaults", "Receiver"]

log = structlog.get_logger("cuepoint.core.delivery")

# Topic of the wake-ups: key = the replica holding the recipient, "" (every replica) when not known.
DELIVER = "deliver"
# Seconds a row waits for a holder before it is dropped: many sweeps, so only a recipient gone everywhere.
RETENTION = 120.0
# Rows taken per claim statement.
CLAIM_LIMIT = 500
# Row ids remembered as delivered, to skip a repeated wake-up without asking storage.
REMEMBERED = 4096

# What a recipient's holder does with one message body.
Receiver = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DeliveryFaults:
    """Test-only faults on the wake-ups this replica receives (`cuepoint serve --test-delivery-faults`):
    every `drop_every`-th is dropped, and with `replay` every other one is handled twice, so tests prove
    that rows, not bus messages, carry the traffic. `announcements_dropped`: the first N associate-link
    announcements heard from other replicas (api/associate_links.py) are dropped, as a late one would be."""

    drop_every: int = 0
    replay: bool = False
    announcements_dropped: int = 0

    @classmethod
    def parse(cls, text: str) -> DeliveryFaults:
        """``drop=N,replay,desk=N`` (any part may be left out)."""
        drop, replay, desk = 0, False, 0
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name == "drop" and value.isdigit() and int(value) > 0:
                drop = int(value)
            elif name == "replay" and not value:
                replay = True
            elif name == "desk" and value.isdigit():
                desk = int(value)
            else:
                raise ValueError(f"--test-delivery-faults: unknown part {part!r} (expected drop=N,replay,desk=N)")
        return cls(drop, replay, desk)


class Delivery:
    def __init__(self, store: Store, bus: Bus, clock: Clock, faults: DeliveryFaults | None = None) -> None:
        self.store, self.bus, self.clock = store, bus, clock
        self.faults = faults or DeliveryFaults()
        self._held: dict[str, Receiver] = {}
        # Recipients held by rule rather than one by one (devices: whichever are connected here).
        self._finders: list[Callable[[str], Receiver | None]] = []
        self._claims: dict[str, tuple[asyncio.Lock, int]] = {}
        self._delivered: deque[int] = deque(maxlen=REMEMBERED)
        self._delivered_set: set[int] = set()
        self._wakeups = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False

    async def start(self) -> None:
        await self.bus.subscribe(DELIVER, self.bus.replica_id, self._on_wakeup)
        await self.bus.subscribe(DELIVER, "", self._on_wakeup)
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(Exception):
                await self.bus.unsubscribe(DELIVER, self.bus.replica_id)
                await self.bus.unsubscribe(DELIVER, "")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    # -- holding recipients ---------------------------------------------------------------------------

    def hold(self, recipient: str, receive: Receiver) -> None:
        """This replica holds `recipient`'s stream from now on: what waits for it is taken at once."""
        self._held[recipient] = receive
        self._spawn(self.claim(recipient))

    def release(self, recipient: str) -> None:
        self._held.pop(recipient, None)

    def hold_by(self, finder: Callable[[str], Receiver | None]) -> None:
        """Hold every recipient `finder` has a receiver for (asked at each wake-up and sweep)."""
        self._finders.append(finder)

    def _receiver(self, recipient: str) -> Receiver | None:
        receive = self._held.get(recipient)
        if receive is not None:
            return receive
        for finder in self._finders:
            if (receive := finder(recipient)) is not None:
                return receive
        return None

    # -- sending --------------------------------------------------------------------------------------

    async def send(
        self, recipient: str, body: bytes, *, replica: str = "", engagement_id: str = "", device_id: str = ""
    ) -> int:
        """Store `body` for `recipient`, then wake its holder (`replica`, or every replica). Durable once
        awaited; the wake-up may be lost (the holder's sweep finds the row). `engagement_id` and
        `device_id`: whose data it carries (erasing the user deletes it)."""
        row = await self.store.enqueue_delivery(
            recipient, body, self.clock.now(), engagement_id=engagement_id, device_id=device_id
        )
        try:
            await self.bus.publish(DELIVER, replica, {"id": row, "to": recipient})
        except Exception:
            log.warning("delivery.wakeup_failed", recipient=recipient, row=row, exc_info=True)
        return row

    # -- receiving ------------------------------------------------------------------------------------

    async def _on_wakeup(self, _key: str, body: dict[str, Any]) -> None:
        self._wakeups += 1
        if self.faults.drop_every and self._wakeups % self.faults.drop_every == 0:
            log.info("delivery.fault_dropped", row=body.get("id"))
            return
        await self._woken(body)
        if self.faults.replay:
            await self._woken(body)

    async def _woken(self, body: dict[str, Any]) -> None:
        row, recipient = int(body.get("id", 0)), str(body.get("to", ""))
        if row in self._delivered_set or self._receiver(recipient) is None:
            return  # a repeated wake-up, or a recipient another replica holds
        await self.claim(recipient)

    async def claim(self, recipient: str) -> int:
        """Take what waits for `recipient` (if held here) and hand it over in id order; how many."""
        lock, users = self._claims.get(recipient) or (asyncio.Lock(), 0)
        self._claims[recipient] = (lock, users + 1)
        taken = 0
        try:
            async with lock:
                while (receive := self._receiver(recipient)) is not None:
                    rows = await self.store.claim_deliveries(recipient, limit=CLAIM_LIMIT)
                    for row, body in rows:
                        self._remember(row)
                        try:
                            await receive(body)
                        except Exception:
                            log.exception("delivery.receiver_failed", recipient=recipient, row=row)
                    taken += len(rows)
                    if len(rows) < CLAIM_LIMIT:
                        break
        finally:
            lock, users = self._claims[recipient]
            if users <= 1:
                del self._claims[recipient]
            else:
                self._claims[recipient] = (lock, users - 1)
        return taken

    def _remember(self, row: int) -> None:
        if len(self._delivered) == self._delivered.maxlen:
            self._delivered_set.discard(self._delivered[0])
        self._delivered.append(row)
        self._delivered_set.add(row)

    async def sweep(self) -> None:
        """Take what waits for any recipient held here (wake-ups the bus lost); drop rows nobody took."""
        for recipient in await self.store.delivery_recipients():
            if self._receiver(recipient) is not None:
                taken = await self.claim(recipient)
                if taken:
                    log.info("delivery.recovered", recipient=recipient, rows=taken)
        await self.store.expire_deliveries(self.clock.now() - RETENTION)

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.warning("delivery.claim_failed", exc_info=True)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
