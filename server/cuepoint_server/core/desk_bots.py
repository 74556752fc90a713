"""Built-in bots: a queue served by a scripted chat (scenario files, `routing.queues[].bot`).

An engagement routed to a bot queue is taken at once by the queue's bot, so "otherwise to a bot" needs
no associate signed in. The bot greets, lists its choices, answers a choice given by number or label,
and hands the user over to its human queue when they choose a hand-over or write one of its keywords.
Its lines are stored before they are shown, like any chat line.
"""

from __future__ import annotations

import re
import uuid

import structlog

from ..scenarios.model import BotSpec
from ..storage import ChatRecord
from .desk_conversation import Conversation
from .engagement_model import Engagement
from .model import ChatLine
from .sessions import AssociateSession

__all__ = ["BOT_PREFIX", "Bots"]

log = structlog.get_logger("cuepoint.core.engagements")

BOT_PREFIX = "bot:"


class Bots(Conversation):
    def _bot_for(self, queue: str) -> BotSpec | None:
        spec = self.engine.scenarios.routing.queues.get(queue)
        return spec.bot if spec is not None else None

    def has_capacity(self, queue: str, skills: tuple[str, ...] = (), app_id: str = "", channel: str = "") -> bool:
        """Someone can take an engagement of this app, queue and channel now: its built-in bot, else an
        associate with the skills who serves the app and has room for the channel."""
        return self._bot_for(queue) is not None or self.router.has_capacity(queue, skills, app_id, channel)

    def _bot_take(self, engagement: Engagement, bot: BotSpec) -> None:
        """The bot takes the engagement: assigned at once, greeting and choices on their way."""
        now = self.clock.now()
        # A session of its own that is never signed in: nothing is queued for it (closed drops what it
        # is sent), it counts against no associate's capacity and no queue's availability.
        session = AssociateSession(
            associate_id=f"{BOT_PREFIX}{engagement.queue}",
            display_name=bot.name,
            queues=(engagement.queue,),
            capacity=1,
            idle_since=now,
            closed=True,
        )
        engagement.state, engagement.associate, engagement.assigned_at = "assigned", session, now
        self._save(engagement, "engagement.assigned")
        self._notify_device(engagement)
        self._emit("engagement.assigned", engagement)
        log.info("engagement.bot", engagement_id=engagement.engagement_id, queue=engagement.queue)
        lines = [bot.greeting]
        if bot.choices:
            lines.append("\n".join(f"{i}. {c.label}" for i, c in enumerate(bot.choices, 1)))
        self._spawn(self._bot_say(engagement, lines))

    async def _heard(self, engagement: Engagement, party: str, text: str) -> None:
        if party == "user" and self.served_by_bot(engagement):
            await self._bot_hear(engagement, text)

    def served_by_bot(self, engagement: Engagement) -> bool:
        associate = engagement.associate
        return associate is not None and associate.associate_id.startswith(BOT_PREFIX) and associate.closed

    async def _bot_hear(self, engagement: Engagement, text: str) -> None:
        """The user wrote to the bot: answer a choice, hand over, or say it did not understand."""
        bot = self._bot_for(engagement.queue)
        if bot is None or not engagement.open:
            return
        said = text.strip().lower()
        words = set(re.findall(r"[\w']+", said))
        choice = None
        for i, option in enumerate(bot.choices, 1):
            if said in (str(i), option.label.lower()):
                choice = option
                break
        wants_person = any(k.lower() in words or k.lower() == said for k in bot.handover_keywords)
        if wants_person or (choice is not None and choice.handover):
            reply = [choice.reply] if choice is not None and choice.reply else []
            await self._bot_say(engagement, [*reply, bot.handover_message])
            self._bot_hand_over(engagement, bot.handover_queue)
        elif choice is not None:
            await self._bot_say(engagement, [choice.reply or choice.label])
        else:
            await self._bot_say(engagement, [bot.fallback])

    def _bot_hand_over(self, engagement: Engagement, queue: str) -> None:
        """From the bot to a human queue: queued again there, like any new engagement."""
        if not engagement.open:
            return
        log.info("engagement.handover", engagement_id=engagement.engagement_id, queue=queue)
        engagement.queue, engagement.state = queue, "queued"
        engagement.associate, engagement.assigned_at = None, None
        self._save(engagement)
        self._notify_device(engagement)
        self._route_again(engagement)

    def _route_again(self, engagement: Engagement) -> None:
        raise NotImplementedError  # routing (desk_routing.py) provides it

    async def _bot_say(self, engagement: Engagement, lines: list[str]) -> None:
        for text in lines:
            if not engagement.open:
                return
            line = ChatLine(engagement.engagement_id, uuid.uuid4().hex, "associate", text, self.clock.now())
            await self.store.save_chat(ChatRecord(line.message_id, line.engagement_id, "associate", text, line.time))
            self._to_device(engagement, line)
