"""The desk side of `cuepoint simulate`: associates in a trace, and what the engagement desk does with them.

Trace lines with an ``associate`` sign associates in and out (queues, skills, capacity, manual claim,
presence), claim or reject offers, chat and wrap up; device lines may chat, answer a fallback offer and
end their engagement. They drive the same core methods AssociateService and DeviceService call, so a
replay shows routing as the server does it: the queue the rules pick, the priority, which associate gets
each engagement (priority, then age; the longest-idle associate with the skills), offers to claim and
their lapse, the fallback and callbacks. Engagements are named by the cue that started them (cue#N), so
the output stays free of ids. See simulate.py for the rest of the format.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from .core.model import (
    FALLBACKS,
    AssociateSignIn,
    ChatLine,
    EngagementEnded,
    EngagementOffered,
    EngagementView,
    FallbackOffered,
    OfferWithdrawn,
)
from .core.service import Core
from .core.sessions import AssociateSession, DeviceSession

__all__ = [
    "ASSOCIATE_ACTIONS",
    "DESK_DEVICE_ACTIONS",
    "DeskReplay",
    "check_associate_action",
    "check_desk_device_action",
]

ASSOCIATE_ACTIONS = ("sign_in", "presence", "sign_out", "claim", "reject", "chat", "wrap_up")
# Device actions about its engagement (the rest are in simulate.ACTIONS).
DESK_DEVICE_ACTIONS = ("chat", "fallback", "end")
PRESENCES = ("available", "busy", "away")
_CUE_LABEL = re.compile(r"^cue#[1-9][0-9]*$")
_SIGN_IN_FIELDS = {"queues", "skills", "capacity", "manual_claim", "presence", "name"}


class ReplayError(Exception):
    """A line the replay cannot act on (no such offer or engagement); simulate names its line."""


def _which(where: str, value: object) -> str | None:
    if value == "last" or (isinstance(value, str) and _CUE_LABEL.match(value)):
        return None
    return f'{where}: expected "last" or "cue#N", got {value!r}'


def _text(where: str, value: object) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"{where}: expected a non-empty text"


def check_associate_action(action: str, value: object) -> str | None:
    """The problem with an associate action's payload, or None."""
    if action == "sign_in":
        if not isinstance(value, dict):
            return "sign_in: expected an object with queues, skills, capacity, manual_claim, presence, name"
        unknown = sorted(set(value) - _SIGN_IN_FIELDS)
        if unknown:
            return f"sign_in: unknown field {unknown[0]!r}"
        for key in ("queues", "skills"):
            items = value.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
                return f"sign_in.{key}: expected a list of names"
        capacity = value.get("capacity", 1)
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            return "sign_in.capacity: expected a number of engagements at once"
        if not isinstance(value.get("manual_claim", False), bool):
            return "sign_in.manual_claim: expected true or false"
        if value.get("presence", "available") not in PRESENCES:
            return f"sign_in.presence: must be one of {', '.join(PRESENCES)}"
        if not isinstance(value.get("name", ""), str):
            return "sign_in.name: expected a display name"
        return None
    if action == "presence":
        return None if value in PRESENCES else f"presence: must be one of {', '.join(PRESENCES)}"
    if action == "sign_out":
        return None if value is True else "sign_out: expected true"
    if action in ("claim", "reject"):
        return _which(action, value)
    if action == "chat":
        if isinstance(value, dict):
            if not {"text"} <= set(value) <= {"text", "cue"}:
                return 'chat: expected a text, or {"text": ..., "cue": "cue#N"}'
            return _text("chat.text", value["text"]) or _which("chat.cue", value.get("cue", "last"))
        return _text("chat", value)
    if action == "wrap_up":
        if not isinstance(value, dict) or not {"disposition"} <= set(value) <= {"disposition", "notes", "cue"}:
            return 'wrap_up: expected {"disposition": ..., "notes": ..., "cue": "cue#N"} (notes and cue optional)'
        if not isinstance(value.get("notes", ""), str):
            return "wrap_up.notes: expected a text"
        return _text("wrap_up.disposition", value["disposition"]) or _which("wrap_up.cue", value.get("cue", "last"))
    raise AssertionError(action)


def check_desk_device_action(action: str, value: object) -> str | None:
    """The problem with a device's engagement action, or None."""
    if action == "chat":
        return _text("chat", value)
    if action == "end":
        return None if value is True else "end: expected true"
    if action == "fallback":
        if not isinstance(value, dict) or not {"option"} <= set(value) <= {"option", "phone", "at"}:
            return 'fallback: expected {"option": "callback"|"chat"|"cancel", "phone": ..., "at": seconds}'
        if value["option"] not in FALLBACKS:
            return f"fallback.option: must be one of {', '.join(FALLBACKS)}"
        if not isinstance(value.get("phone", ""), str):
            return "fallback.phone: expected a phone number"
        at = value.get("at", 0)
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0:
            return "fallback.at: seconds since the trace start, 0 or more"
        return None
    raise AssertionError(action)


# (actor, kind, data): Simulation._emit.
Emit = Callable[..., None]


class DeskReplay:
    """Associates of one replay, their actions, and what the desk sends them (and devices) as outcomes."""

    def __init__(self, core: Core, emit: Emit, label: Callable[[str], str], start: float) -> None:
        self.core = core
        self._emit = emit
        self._label = label  # real cue id -> cue#N
        self._start = start
        self.associates: dict[str, AssociateSession] = {}
        self._offers: dict[str, str] = {}  # associate -> latest offered engagement id
        self._held: dict[str, list[str]] = {}  # associate -> engagement ids received, oldest first
        self._by_cue: dict[str, str] = {}  # real cue id -> engagement id
        self._chat_seen: set[str] = set()

    # -- actions ------------------------------------------------------------------------------------

    async def associate(self, name: str, action: str, value: Any, cue_ids: Callable[[str], str | None]) -> None:
        core = self.core
        if action == "sign_in":
            previous = self.associates.pop(name, None)
            if previous is not None:
                core.sign_out(previous)
            queues = tuple(value.get("queues") or ("default",))
            shown: dict[str, Any] = {"queues": ",".join(queues)}
            if value.get("skills"):
                shown["skills"] = ",".join(value["skills"])
            shown["capacity"] = int(value.get("capacity", 1))
            if value.get("manual_claim"):
                shown["manual_claim"] = True
            if value.get("presence", "available") != "available":
                shown["presence"] = value["presence"]
            self._emit(name, "signed_in", by_associate=True, **shown)
            self.associates[name] = core.sign_in(
                AssociateSignIn(
                    associate_id=name,
                    display_name=str(value.get("name") or name),
                    queues=queues,
                    capacity=int(value.get("capacity", 1)),
                    skills=tuple(value.get("skills", ())),
                    manual_claim=bool(value.get("manual_claim", False)),
                    presence=str(value.get("presence", "available")),
                )
            )
            return
        session = self.associates[name]
        if action == "sign_out":
            self._emit(name, "signed_out", by_associate=True)
            del self.associates[name]
            core.sign_out(session)
        elif action == "presence":
            self._emit(name, "presence", by_associate=True, presence=value)
            core.desk.set_presence(session, value)
        elif action in ("claim", "reject"):
            engagement_id = self._pick(name, value, cue_ids, self._offers.get(name), f"{action}: no offer")
            if action == "claim":
                core.desk.claim(session, engagement_id)
            else:
                self._emit(name, "rejected", by_associate=True, cue=self._cue(engagement_id))
                core.desk.reject(session, engagement_id, "")
        elif action == "chat":
            text, which = (value["text"], value.get("cue", "last")) if isinstance(value, dict) else (value, "last")
            engagement_id = self._pick(name, which, cue_ids, self._current(name), "chat: no engagement")
            engagement = core.desk.speaking_engagement(session, engagement_id)
            await core.desk.chat("associate", engagement, text, by=session)
        elif action == "wrap_up":
            which = value.get("cue", "last")
            engagement_id = self._pick(name, which, cue_ids, self._current(name), "wrap_up: no engagement")
            await core.end_engagement(session, engagement_id, value["disposition"], value.get("notes", ""))

    async def device(self, session: DeviceSession, action: str, value: Any) -> None:
        """A device's engagement action: on its latest engagement."""
        desk = self.core.desk
        engagement_id = self._of_device(session.device_id)
        if engagement_id is None:
            raise ReplayError(f"{action}: device {session.device_id!r} has no engagement")
        if action == "chat":
            await desk.chat("user", desk.device_engagement(session, engagement_id, "chat.engagement_id"), value)
        elif action == "end":
            await desk.end_by_user(session, engagement_id)
        elif action == "fallback":
            at = self._start + float(value["at"]) if "at" in value else None
            await desk.choose_fallback(session, engagement_id, value["option"], str(value.get("phone", "")), at)

    def sign_out_all(self) -> None:
        for session in list(self.associates.values()):
            self.core.sign_out(session)
        self.associates.clear()

    def _pick(self, name: str, which: str, cue_ids: Callable[[str], str | None], last: str | None, missing: str) -> str:
        if which == "last":
            if last is None:
                raise ReplayError(f"{missing} for {name!r} yet")
            return last
        cue_id = cue_ids(which)
        engagement_id = self._by_cue.get(cue_id or "")
        if engagement_id is None:
            raise ReplayError(f"{missing}: {which} started no engagement")
        return engagement_id

    def _current(self, name: str) -> str | None:
        """The associate's latest engagement still open."""
        for engagement_id in reversed(self._held.get(name, [])):
            engagement = self.core.desk.get(engagement_id)
            if engagement is not None and engagement.open:
                return engagement_id
        return None

    def _of_device(self, device_id: str) -> str | None:
        active = self.core.desk.active_for(device_id)
        if active:
            return active
        mine = [eid for eid in self._by_cue.values() if (e := self.core.desk.get(eid)) and e.device_id == device_id]
        return mine[-1] if mine else None

    # -- what comes back ----------------------------------------------------------------------------

    def seen_engagement(self, engagement_id: str, cue_id: str) -> None:
        self._by_cue[cue_id] = engagement_id

    def _cue(self, engagement_id: str) -> str:
        engagement = self.core.desk.get(engagement_id)
        if engagement is not None:
            self._by_cue[engagement.cue_id] = engagement_id
            return self._label(engagement.cue_id)
        cue_id = next((c for c, e in self._by_cue.items() if e == engagement_id), "")
        return self._label(cue_id)

    def to_device(self, device: str, message: object) -> bool:
        """A desk message in a device's outbox as an outcome; False if it is not one."""
        if isinstance(message, FallbackOffered):
            self._emit(device, "fallback", cue=self._cue(message.engagement_id), options=list(message.options))
            return True
        if isinstance(message, ChatLine):
            self._chat(message, device)
            return True
        return False

    def collect(self) -> None:
        """Drain every associate's outbox, in sign-in order."""
        for name, session in list(self.associates.items()):
            while not session.outbox.empty():
                self._to_associate(name, session.outbox.get_nowait())

    def _to_associate(self, name: str, message: object) -> None:
        if isinstance(message, EngagementOffered | EngagementView):
            view = message.view if isinstance(message, EngagementOffered) else message
            self._by_cue[view.cue_id] = view.engagement_id
            shown: dict[str, Any] = {
                "cue": self._label(view.cue_id),
                "queue": view.queue,
                "priority": view.context.priority,
                "kind": view.kind,
            }
            if view.role != "owner":
                shown["role"] = view.role
            if isinstance(message, EngagementOffered):
                self._offers[name] = view.engagement_id
                self._emit(name, "offered", by_associate=True, **shown)
            else:
                self._held.setdefault(name, []).append(view.engagement_id)
                self._emit(name, "assigned", by_associate=True, **shown)
        elif isinstance(message, OfferWithdrawn):
            self._emit(
                name, "offer_withdrawn", by_associate=True, cue=self._cue(message.engagement_id), reason=message.reason
            )
        elif isinstance(message, EngagementEnded):
            self._emit(
                name,
                "ended",
                by_associate=True,
                cue=self._cue(message.engagement_id),
                disposition=message.disposition,
                by=message.ended_by,
            )
        elif isinstance(message, ChatLine):
            self._chat(message, "")

    def _chat(self, line: ChatLine, device: str) -> None:
        # Every side receives every line: printed once, under whoever wrote it.
        if line.whisper or line.message_id in self._chat_seen:
            return
        self._chat_seen.add(line.message_id)
        engagement = self.core.desk.get(line.engagement_id)
        actor = line.sender_id or device or (engagement.device_id if engagement is not None else "")
        self._emit(
            actor,
            "chat",
            by_associate=bool(line.sender_id),
            cue=self._cue(line.engagement_id),
            sender=line.sender,
            text=line.text,
        )
