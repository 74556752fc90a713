"""A device comes back (a reconnect, a restart, another replica): what it missed while it had no stream.

The desk sends a device everything on its current stream, if it has one (desk_base.py `_to_device`); what
falls in the gap (a reconnect's backoff, a link gone dark whose stream the server still thinks open) is
told again here when the device says Hello: where its live engagement stands, the recent chat, an upgrade
the associate asked for, a fallback not yet answered; and an engagement that ended meanwhile, with its
feedback question. Clients skip what they already have (message ids, request ids; device.proto).
"""

from __future__ import annotations

from .desk_feedback import Feedback
from .model import EngagementUpdate, UpgradeAsk
from .sessions import DeviceSession

__all__ = ["Reconnect"]


class Reconnect(Feedback):
    def resume_device(self, session: DeviceSession) -> None:
        """A device (re)connected: tell it where its live engagement stands, and what it missed of it."""
        engagement = self._engagements.get(self._active_by_device.get(session.device_id, ""))
        if engagement is None:
            return
        self._notify_device(engagement)
        # The kept transcript, after the update that binds the engagement id to the device's handle.
        for line in engagement.transcript:
            self._to_device(engagement, line)
        for request_id, (channel, requested_by) in engagement.pending_upgrades.items():
            if requested_by != "user":
                self._to_device(engagement, UpgradeAsk(engagement.engagement_id, request_id, channel, requested_by))
        if engagement.state == "queued" and engagement.fallback_offered and engagement.callback_at is None:
            # Offered and not yet answered: it may have fallen due while the device was away, or, across
            # replicas, connected elsewhere (or to a replica that died since). A callback being made is
            # offered nothing: its user answered already.
            self._tell_fallback(engagement)

    async def tell_ended(self, session: DeviceSession, cue_ids: tuple[str, ...]) -> None:
        """A device (re)connected naming cues whose engagement it has not seen end (Hello.engaged_cue_ids):
        each that ended while no stream of the device was there to hear it is answered with its final state,
        and its feedback question if it wants a rating and has none yet.

        Read from storage, not memory: the end may have come before a restart, or on another replica.
        """
        live = self._active_by_device.get(session.device_id, "")
        for cue_id in cue_ids:
            record = await self.store.engagement_for_cue(cue_id)
            if record is None or (record.app_id, record.device_id) != (session.app_id, session.device_id):
                continue  # not this device's
            if record.state != "ended" or record.engagement_id == live:
                continue  # still live: resume_device (or, across replicas, follow_device) answers it
            asked = self._feedback_question(record.engagement_id, record.scenario_id, record.queue)
            if asked is not None and await self.store.get_feedback(record.engagement_id) is not None:
                asked = None
            if session.closed:
                return
            associate = self.router.find(record.associate_id)
            session.send(
                EngagementUpdate(
                    engagement_id=record.engagement_id,
                    cue_id=record.cue_id,
                    state="ended",
                    channel=record.channel,
                    queue=record.queue,
                    associate_name=associate.display_name if associate is not None else "",
                    time=record.ended_at if record.ended_at is not None else self.clock.now(),
                    disposition=record.disposition,
                )
            )
            if asked is not None:
                session.send(asked)
