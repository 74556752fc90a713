"""The engagement follows its device: a device (re)connecting here makes this replica its engagement's holder.

A device acts on its engagement (chat, fallback choice, end...) and hears of it only where the engagement is
held in memory (core/desk_base.py), so a device whose stream reached another replica than its engagement
(a load balancer, `max_connection_age`, a replica that died or drained) would be cut off from it. So when a
device's stream opens here (`follow_device`) and its open engagement is owned elsewhere (`engagement_owners`):

- its owner is gone (no registry row within the ttl): this replica adopts what gone replicas owned at once
  (core/recovery.py `adopt_orphans`), this engagement among them, instead of waiting for a sweep;
- its owner is alive: this replica asks it to hand it over. The request is a row of the delivery outbox
  (core/delivery.py) for `follow:<owner>`, so a lost bus message delays it, never loses it; the owner moves
  the engagement (core/desk_handover.py: alarms stopped, its row, owner row, slots and timer rows moved in
  one transaction while it still owns it) and answers with a row for `follow:<this replica>`. This replica
  then takes it from storage as it stands. Until then it checks again every RETRY seconds (an answer it
  did not get, an owner that died meanwhile, an engagement that moved on), asking again every ASK_AGAIN.

Whichever way it arrives, the device is told where it stands (and its fallback, if offered), and hears the
associates' lines said while it was on its way. Its own actions on the engagement wait for that
(`followed`, at most FOLLOW_WAIT), so none is refused as "no engagement for this device" meanwhile. A single
process (no `--bus`) never asks anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog

from ..storage import EngagementRecord
from .cluster import Cluster
from .replicas import SWEEP_EVERY
from .sessions import DeviceSession

__all__ = ["FOLLOW_WAIT", "Follow"]

log = structlog.get_logger("cuepoint.core")

# A device's action on an engagement still on its way waits at most this many seconds for it.
FOLLOW_WAIT = 10.0
# Seconds between checks of an engagement asked for, and between requests to the same owner.
RETRY, ASK_AGAIN = 0.25, 2.0
# Seconds after which a device's engagement that never came is left where it is (logged).
GIVE_UP = 120.0


def follow_recipient(replica: str) -> str:
    """The delivery outbox recipient of hand-over requests and answers for `replica`."""
    return f"follow:{replica}"


class Follow(Cluster):
    _follows: dict[str, asyncio.Task[None]] | None = None
    _answers: dict[str, tuple[asyncio.Event, dict[str, Any]]] | None = None

    async def join_cluster(self, address: str = "", sweep_every: float = SWEEP_EVERY) -> None:
        await super().join_cluster(address, sweep_every)
        if self.bus.shared and self.delivery is not None:
            self._follows, self._answers = {}, {}
            self.delivery.hold(follow_recipient(self.bus.replica_id), self._on_follow)

    async def leave_cluster(self) -> None:
        if self.delivery is not None:
            self.delivery.release(follow_recipient(self.bus.replica_id))
        for task in list((self._follows or {}).values()):
            task.cancel()
        await super().leave_cluster()

    # -- the device's side: where its stream opened ------------------------------------------------------

    def follow_device(self, session: DeviceSession) -> None:
        """A device's stream opened here: if its open engagement is held elsewhere, bring it here."""
        follows = self._follows
        if follows is None or self.desk.active_for(session.device_id) is not None:
            return
        running = follows.get(session.device_id)
        if running is not None and not running.done():
            return  # a reconnect while it is on its way: it arrives for this stream too
        task = asyncio.get_running_loop().create_task(self._follow(session.device_id, session.started_at))
        follows[session.device_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            if follows.get(session.device_id) is finished:
                del follows[session.device_id]
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("follow.failed", device_id=session.device_id, error=repr(finished.exception()))

        task.add_done_callback(done)

    async def followed(self, session: DeviceSession, engagement_id: str) -> None:
        """Before a device acts on `engagement_id`: wait (a while) for it if it is still on its way here."""
        if not engagement_id or self._follows is None or self.desk.get(engagement_id) is not None:
            return
        task = self._follows.get(session.device_id)
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), FOLLOW_WAIT)

    async def holder_of(self, engagement_id: str) -> str:
        """The replica holding `engagement_id` now, as far as this one can tell ("" if none is named): this
        one, the one it was just handed to, or its owner in storage once a hand-over under way here ends."""
        if self.desk.get(engagement_id) is not None:
            return self.bus.replica_id
        moving = self.desk.moving(engagement_id)
        if moving is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                went = await asyncio.wait_for(asyncio.shield(moving), FOLLOW_WAIT)
                if went:
                    return went
        return self.desk.moved_to(engagement_id) or await self.store.owner_of(engagement_id)

    async def _follow(self, device_id: str, since: float) -> None:
        records = await self.store.engagements_for_device(device_id)
        for record in records:
            if record.state in ("queued", "assigned") and record.callback_at is None:
                if await self._bring(record, device_id, since):
                    session = self._reg.sessions.get(device_id)
                    if session is not None and not session.closed:
                        # Where it stands (its fallback too, if offered), and what was said meanwhile.
                        self.desk.resume_device(session)
                        self.desk.replay_since(record.engagement_id, since)

    async def _bring(self, record: EngagementRecord, device_id: str, since: float) -> bool:
        """Hold `record`'s engagement here; True once it is held here, False if it ended or stays elsewhere."""
        engagement_id, me = record.engagement_id, self.bus.replica_id
        assert self._answers is not None and self.delivery is not None
        loop = asyncio.get_running_loop()
        until = loop.time() + GIVE_UP
        asked: tuple[str, float] = ("", 0.0)
        answered = asyncio.Event()
        self._answers[engagement_id] = (answered, {})
        self.desk.incoming = self.desk.incoming | {engagement_id}
        try:
            while loop.time() < until:
                if self.desk.get(engagement_id) is not None:
                    return True
                stored = await self.store.get_engagement(engagement_id)
                if stored is None or stored.state not in ("queued", "assigned") or stored.callback_at is not None:
                    return False
                owner = await self.store.owner_of(engagement_id)
                if owner == me:
                    # Handed here (its answer lost or not read yet), or adopted here already.
                    _, answer = self._answers[engagement_id]
                    return await self.desk.take(stored, answer.get("hints")) or self.desk.get(engagement_id) is not None
                if not owner or owner not in await self.live_replicas():
                    log.info("follow.adopting", engagement_id=engagement_id, owner=owner)
                    await self.adopt_orphans()  # at once, not at the next sweep
                    if self.desk.get(engagement_id) is not None:
                        return True
                elif asked[0] != owner or loop.time() - asked[1] >= ASK_AGAIN:
                    body = {"ask": engagement_id, "to": me, "at": since}
                    await self.delivery.send(
                        follow_recipient(owner),
                        json.dumps(body).encode(),
                        replica=owner,
                        engagement_id=engagement_id,
                        device_id=device_id,
                    )
                    log.info("follow.asked", engagement_id=engagement_id, owner=owner)
                    asked = (owner, loop.time())
                answered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), RETRY)
                _, answer = self._answers[engagement_id]
                if answer.get("result") == "kept" and asked[0] == answer.get("from"):
                    # The device went back to it, or it is not one to move (a conference): it stays there.
                    log.info("follow.kept_there", engagement_id=engagement_id, owner=asked[0])
                    return False
            log.warning("follow.gave_up", engagement_id=engagement_id)
            return False
        finally:
            self._answers.pop(engagement_id, None)
            self.desk.incoming = self.desk.incoming - {engagement_id}

    # -- the holder's side, and the answers --------------------------------------------------------------

    async def _on_follow(self, data: bytes) -> None:
        body = json.loads(data)
        if "ask" in body:
            engagement_id, to = str(body["ask"]), str(body.get("to", ""))
            answer = await self.desk.hand_over(engagement_id, to, float(body.get("at", 0.0)))
            answer.update(answer=engagement_id, **{"from": self.bus.replica_id})
            if to and self.delivery is not None:
                await self.delivery.send(
                    follow_recipient(to), json.dumps(answer).encode(), replica=to, engagement_id=engagement_id
                )
            return
        waiting = (self._answers or {}).get(str(body.get("answer", "")))
        if waiting is not None:
            waiting[1].clear()
            waiting[1].update(body)
            waiting[0].set()
