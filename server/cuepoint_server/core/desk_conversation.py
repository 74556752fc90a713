"""Talking inside an engagement: chat relay and channel upgrades that need the other side's consent."""

from __future__ import annotations

import uuid

import structlog

from ..storage import ChannelChangeRecord, ChatRecord
from .desk_base import DeskBase
from .engagement_model import TRANSCRIPT_KEPT, Engagement
from .errors import InvalidInput
from .model import (
    ChannelChanged,
    ChatLine,
    UpgradeAsk,
)
from .sessions import AssociateSession, DeviceSession

__all__ = ["CHANNELS", "MAX_CHAT", "Conversation"]

log = structlog.get_logger("cuepoint.core.engagements")

MAX_CHAT = 4000
CHANNELS = ("audio", "screen_share", "chat", "video")


class Conversation(DeskBase):
    async def chat(self, party: str, engagement: Engagement, text: str, by: AssociateSession | None = None) -> None:
        line = self._line("chat", party, engagement, text, by)
        await self.store.save_chat(ChatRecord(line.message_id, line.engagement_id, party, text, line.time))
        engagement.transcript.append(line)
        del engagement.transcript[:-TRANSCRIPT_KEPT]
        # Every side gets every line, the sender included: one ordered transcript. On the
        # associates' side that is the owner and whoever joined (conference, consult, supervisors).
        self._to_device(engagement, line)
        for associate in engagement.associates():
            associate.send(line)
        await self._heard(engagement, party, text)

    async def _heard(self, engagement: Engagement, party: str, text: str) -> None:
        """A line was relayed; a built-in bot (desk_bots.py) answers the user's."""

    def _line(
        self,
        kind: str,
        party: str,
        engagement: Engagement,
        text: str,
        by: AssociateSession | None,
        *,
        whisper: bool = False,
    ) -> ChatLine:
        """A new line of chat or whisper (``kind`` names the request in errors), checked before anyone sees it."""
        if not text.strip() or len(text) > MAX_CHAT:
            raise InvalidInput(f"{kind}.text", f"required; at most {MAX_CHAT} characters")
        if not engagement.open:
            raise InvalidInput(f"{kind}.engagement_id", "the engagement has ended")
        return ChatLine(
            engagement.engagement_id,
            uuid.uuid4().hex,
            party,
            text,
            self.clock.now(),
            sender_id=by.associate_id if by is not None else "",
            sender_name=by.display_name if by is not None else "",
            whisper=whisper,
        )

    def device_engagement(self, session: DeviceSession, engagement_id: str, field_name: str) -> Engagement:
        return self._of_device(session, engagement_id, field_name)

    def associate_engagement(self, associate: AssociateSession, engagement_id: str) -> Engagement:
        return self._of_associate(associate, engagement_id)

    def request_upgrade(self, party: str, engagement: Engagement, request_id: str, channel: str) -> None:
        if not request_id or len(request_id) > 64:
            raise InvalidInput("upgrade_request.request_id", "required; at most 64 characters")
        if channel not in CHANNELS:
            raise InvalidInput("upgrade_request.channel", "must be audio, screen_share, chat or video")
        now = self.clock.now()
        if (
            engagement.state != "assigned"
            or channel == engagement.channel
            or channel not in engagement.allowed_channels
        ):
            # Refused at once: not allowed by the scenario, or nobody to ask yet.
            self._change_channel(engagement, request_id, channel, party, False, now, only=party)
            return
        engagement.pending_upgrades[request_id] = (channel, party)
        ask = UpgradeAsk(engagement.engagement_id, request_id, channel, party)
        self._to_other(engagement, party, ask)

    def respond_upgrade(self, party: str, engagement: Engagement, request_id: str, accepted: bool) -> None:
        pending = engagement.pending_upgrades.get(request_id)
        if pending is None or pending[1] == party:
            raise InvalidInput("upgrade_response.request_id", f"no upgrade request {request_id!r} awaits your answer")
        del engagement.pending_upgrades[request_id]
        channel, requested_by = pending
        self._change_channel(engagement, request_id, channel, requested_by, accepted, self.clock.now())

    def _change_channel(
        self,
        engagement: Engagement,
        request_id: str,
        channel: str,
        requested_by: str,
        accepted: bool,
        now: float,
        only: str | None = None,
    ) -> None:
        previous = engagement.channel
        if accepted:
            engagement.channel = channel
            # Whoever holds it now holds an engagement of the new channel (capacity per channel counts it so).
            for holder in engagement.associates():
                if engagement.engagement_id in holder.held:
                    holder.held[engagement.engagement_id] = (channel, holder.held[engagement.engagement_id][1])
            self._save(engagement)
        self._spawn(
            self.store.save_channel_change(
                ChannelChangeRecord(
                    engagement.engagement_id, now, request_id, previous, channel, requested_by, accepted
                )
            )
        )
        change = ChannelChanged(engagement.engagement_id, request_id, channel, requested_by, accepted, now)
        if only in (None, "user", "system"):
            self._to_device(engagement, change)
        if only in (None, "associate") and engagement.associate is not None:
            engagement.associate.send(change)
        log.info("engagement.channel", engagement_id=engagement.engagement_id, channel=channel, accepted=accepted)
