"""Plain-Python views of the Cuepoint vocabulary.

Apps and associates' tools work with these frozen dataclasses and enums, never
with protobuf messages: the wire format can evolve (and ``_convert`` absorbs
it) without breaking code written against this module. Times are float epoch
seconds; an absent time is ``None`` rather than 0 so "unknown" is never
mistaken for 1970.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeAlias

__all__ = [
    "AssignedEngagement",
    "ButtonAction",
    "CallSignal",
    "CallSignalKind",
    "Channel",
    "ChannelChange",
    "ChatMessage",
    "ConnectionState",
    "Consent",
    "Context",
    "Cue",
    "CueButton",
    "CueImage",
    "CueLayout",
    "CueResponse",
    "CueWithdrawal",
    "EngagementContext",
    "EngagementEnded",
    "EngagementState",
    "EngagementUpdate",
    "FallbackOffer",
    "FallbackOption",
    "FeedbackKind",
    "FeedbackRequest",
    "InvitationResult",
    "JourneyEntry",
    "Location",
    "MatchedCondition",
    "OutcomeScore",
    "Participant",
    "ParticipantRole",
    "Party",
    "Presence",
    "PriorCue",
    "PriorEngagement",
    "RoutingRuleMatch",
    "Scalar",
    "ServerEvent",
    "SupervisedEngagement",
    "Transfer",
    "TransferMode",
    "Trigger",
    "UpgradeRequest",
    "User",
    "UserVerification",
]

Scalar: TypeAlias = str | int | float | bool
"""An attribute or property value. Integers stay integers on the wire."""


class Consent(enum.Enum):
    """What the user agreed to share; the server stores and forwards accordingly."""

    NONE = "none"
    """Nothing persisted beyond the live session; no identity kept."""
    ESSENTIAL = "essential"
    """Journey kept for the engagement; user attributes withheld from associates."""
    FULL = "full"
    """Journey and user attributes may be shared with associates."""


class Channel(enum.Enum):
    """How a cue engages the user."""

    AUDIO = "audio"
    SCREEN_SHARE = "screen_share"
    CHAT = "chat"
    VIDEO = "video"


class CueResponse(enum.Enum):
    """The user's answer to a cue."""

    ACCEPTED = "accepted"
    DECLINED = "declined"
    DISMISSED = "dismissed"
    """Closed without an answer (swiped away)."""
    EXPIRED = "expired"
    """Shown but timed out on the device."""
    OPENED = "opened"
    """The user pressed a button that opens a link (:attr:`ButtonAction.OPEN_URL`)."""


class CueLayout(enum.Enum):
    """How the scenario suggests presenting a cue (a hint: the app decides)."""

    BANNER = "banner"
    MODAL = "modal"
    BUBBLE = "bubble"


class ButtonAction(enum.Enum):
    """What a cue button does; pass the button to :meth:`Client.press`."""

    ACCEPT = "accept"
    """Accept, on the button's ``channel``."""
    DECLINE = "decline"
    DISMISS = "dismiss"
    OPEN_URL = "open_url"
    """Open the button's ``url`` (a deep link or web address)."""

    @property
    def response(self) -> CueResponse:
        """The answer pressing such a button gives."""
        return _BUTTON_RESPONSES[self]


class EngagementState(enum.Enum):
    """Where an accepted cue's engagement is. Members are in lifecycle order."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    CALLBACK_REQUESTED = "callback_requested"
    """Nobody was available in time and the user asked to be called back
    (a :class:`FallbackOption.CALLBACK` choice). Nobody will be assigned live."""
    ENDED = "ended"

    @property
    def rank(self) -> int:
        """Position in the lifecycle, so "at least ASSIGNED" is a comparison.

        QUEUED < ASSIGNED < CALLBACK_REQUESTED < ENDED: a callback request
        replaces the live assignment, and the engagement may still end later.
        """
        return _STATE_RANK[self]


_STATE_RANK = {
    EngagementState.QUEUED: 1,
    EngagementState.ASSIGNED: 2,
    EngagementState.CALLBACK_REQUESTED: 3,
    EngagementState.ENDED: 4,
}


class Party(enum.Enum):
    """Who said or did something in an engagement."""

    USER = "user"
    """The app's user, i.e. the device side."""
    ASSOCIATE = "associate"
    SYSTEM = "system"
    """The server itself, e.g. a fallback to chat or an automatic notice."""


class CallSignalKind(enum.Enum):
    """What an opaque call-setup signal carries (e.g. WebRTC SDP or ICE)."""

    OFFER = "offer"
    ANSWER = "answer"
    CANDIDATE = "candidate"
    HANGUP = "hangup"


class FallbackOption(enum.Enum):
    """What the user may choose when nobody could take the engagement in time."""

    CALLBACK = "callback"
    """Be called back later (the number comes from the context or the choice)."""
    CHAT = "chat"
    """Continue in chat, which needs no associate waiting on the line."""
    CANCEL = "cancel"
    """Give up; the engagement ends with disposition ``cancelled``."""


class EngagementKind(enum.Enum):
    """Whether the user waits in the app, or asked to be called back."""

    LIVE = "live"
    CALLBACK = "callback"
    """The user chose a callback (:class:`FallbackOption.CALLBACK`): phone them on
    ``callback_number``; the engagement was queued again at ``callback_at``."""


class Presence(enum.Enum):
    """An associate's availability for new engagements."""

    AVAILABLE = "available"
    """Takes engagements, up to capacity."""
    BUSY = "busy"
    """Signed in, takes nothing new."""
    AWAY = "away"


class ParticipantRole(enum.Enum):
    """How an associate takes part in an engagement."""

    OWNER = "owner"
    """Holds it: routes and wraps it up."""
    CONFERENCE = "conference"
    """Added by the owner; chats with the user and wraps up their own part."""
    CONSULT = "consult"
    """Consulted before a transfer; talks to the associates only (whispers)."""
    MONITOR = "monitor"
    """A supervisor watching read-only (may whisper)."""
    BARGE = "barge"
    """A supervisor who joined the conversation."""


class TransferMode(enum.Enum):
    BLIND = "blind"
    """The engagement moves at once."""
    CONSULT = "consult"
    """The target joins first; ``complete_transfer`` hands over."""


@dataclass(frozen=True)
class Participant:
    associate_id: str
    display_name: str
    role: ParticipantRole


@dataclass(frozen=True)
class Transfer:
    from_associate_id: str
    to_associate_id: str
    to_queue: str
    mode: TransferMode
    note: str = ""
    time: float | None = None


@dataclass(frozen=True)
class SupervisedEngagement:
    """For supervisors: an engagement of a supervised queue, as it is now."""

    engagement_id: str
    queue: str
    state: EngagementState | None
    channel: Channel | None
    associate_id: str
    participants: tuple[Participant, ...] = ()
    time: float | None = None


@dataclass(frozen=True)
class InvitationResult:
    """The server's answer to :meth:`AssociateClient.invite`."""

    device_id: str
    cue_id: str
    """The cue sent to the device; empty when the policy held the invitation back."""
    blocked_reason: str = ""
    """Why not: e.g. ``cue_pending``, ``engagement_active``, ``min_gap``, ``cap``, ``paused``, ``declined``."""
    detail: str = ""

    @property
    def invited(self) -> bool:
        return bool(self.cue_id)


class ConnectionState(enum.Enum):
    """Where a device :class:`~cuepoint.Client`'s link to the server stands.

    ``CONNECTING`` (until the first Welcome) -> ``CONNECTED`` <-> ``STALE`` ->
    ``CLOSED``. While ``STALE`` the client reconnects with backoff by itself and
    ``track()`` keeps buffering; nothing the app tracked is lost by going stale.
    """

    CONNECTING = "connecting"
    """Opening the first session (``start()`` / ``connect()`` in progress, or not started)."""
    CONNECTED = "connected"
    """A session is open: signals flow and are acked, cues arrive."""
    STALE = "stale"
    """The stream broke; reconnecting with backoff. Signals are buffered (and journaled, with
    ``ClientConfig.outbox_path``) and resent with their ids once a new session is open."""
    CLOSED = "closed"
    """Closed by the app, or failed for good (``client.failure`` says why). Final."""


@dataclass(frozen=True)
class Location:
    country: str = ""
    """ISO 3166-1 alpha-2."""
    region: str = ""
    city: str = ""


@dataclass(frozen=True)
class Context:
    """Device and app facts sent with the Hello and changed by ``set_context``."""

    app_version: str = ""
    os: str = ""
    os_version: str = ""
    device_model: str = ""
    locale: str = ""
    timezone: str = ""
    """IANA zone name, e.g. ``Europe/Paris``."""
    location: Location | None = None
    attributes: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class User:
    """The signed-in user; leave ``user_id`` empty while anonymous."""

    user_id: str = ""
    tier: str = ""
    attributes: Mapping[str, Scalar] = field(default_factory=dict)


_BUTTON_RESPONSES = {
    ButtonAction.ACCEPT: CueResponse.ACCEPTED,
    ButtonAction.DECLINE: CueResponse.DECLINED,
    ButtonAction.DISMISS: CueResponse.DISMISSED,
    ButtonAction.OPEN_URL: CueResponse.OPENED,
}


@dataclass(frozen=True)
class CueImage:
    url: str
    alt_text: str = ""
    """For screen readers, in the chosen locale."""


@dataclass(frozen=True)
class CueButton:
    """One of up to three buttons of a cue; answer with :meth:`Client.press`."""

    button_id: str
    label: str = ""
    """In the chosen locale."""
    action: ButtonAction | None = None
    channel: Channel | None = None
    """ACCEPT only: the channel the engagement starts on."""
    url: str = ""
    """OPEN_URL only: the deep link or web address to open."""


@dataclass(frozen=True)
class Cue:
    """An offer of help for the app to present."""

    cue_id: str
    scenario_id: str = ""
    message: str = ""
    channel: Channel | None = None
    allowed_upgrades: tuple[Channel, ...] = ()
    created_at: float | None = None
    expires_at: float | None = None
    """After this the offer lapses and should no longer be shown."""
    title: str = ""
    image: CueImage | None = None
    buttons: tuple[CueButton, ...] = ()
    """At most three; when empty the app shows its own accept and decline."""
    layout: CueLayout | None = None
    variant: str = ""
    """The A/B variant shown ("" without variants); the same for a user on every device."""
    locale: str = ""
    """The locale whose texts were chosen ("pt" for a pt-BR device with only pt); "" for the default."""

    def button(self, button_id: str) -> CueButton | None:
        return next((b for b in self.buttons if b.button_id == button_id), None)

    def is_expired(self, now: float | None = None) -> bool:
        """Whether ``expires_at`` has passed at ``now`` (default: ``time.time()``)."""
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at


@dataclass(frozen=True)
class CueWithdrawal:
    """The server took a cue back; the app should stop presenting it."""

    cue_id: str
    reason: str = ""
    """Machine-readable, e.g. ``expired`` or ``condition_cleared``."""


@dataclass(frozen=True)
class EngagementUpdate:
    """Progress of the engagement started by accepting a cue."""

    engagement_id: str
    cue_id: str
    state: EngagementState | None = None
    channel: Channel | None = None
    queue: str = ""
    associate_name: str = ""
    """Display name of the associate, once assigned."""
    time: float | None = None
    disposition: str = ""
    """Set on ENDED: the associate's wrap-up code (e.g. ``resolved``), ``user_ended``
    when the user ended it, ``cancelled`` after a :class:`FallbackOption.CANCEL`."""
    queue_position: int = 0
    """While QUEUED and waiting in line: 1 for the next to be served, 2 behind it, ...;
    0 when not in line (not queued, or being offered to an associate right now)."""
    estimated_wait: float | None = None
    """While QUEUED: seconds until an associate likely takes it, from the queue's recent
    handling times and staffing; None when the server has no basis for an estimate."""
    callback_at: float | None = None
    """On CALLBACK_REQUESTED: when the user will be called back (epoch seconds). The
    callback runs without the app; the next update is ENDED."""


@dataclass(frozen=True)
class ChatMessage:
    """One chat message of an engagement, as relayed (and numbered) by the server.

    Both sides receive every message, their own included, so each sees the
    authoritative transcript in the server's order.
    """

    engagement_id: str
    message_id: str = ""
    """Server-assigned; empty only on messages never relayed."""
    sender: Party | None = None
    text: str = ""
    time: float | None = None
    sender_id: str = ""
    """Which associate wrote it (several may share an engagement); empty for the user and the system."""
    sender_name: str = ""
    whisper: bool = False
    """To the associates only (a supervisor or consulted colleague); the user never sees these."""


@dataclass(frozen=True)
class UpgradeRequest:
    """A request, by the other side, to move the engagement to ``channel``.

    Answer it with ``respond_upgrade(request, accept)``.
    """

    engagement_id: str
    request_id: str
    """Chosen by the requester; the resulting :class:`ChannelChange` carries it."""
    channel: Channel | None = None
    requested_by: Party | None = None


@dataclass(frozen=True)
class ChannelChange:
    """The outcome of an upgrade request, sent to both sides.

    ``accepted=True`` means the engagement's channel is now ``channel``; False
    means it was declined (or the channel is not among the cue's allowed
    upgrades) and nothing changed. Also sent with ``requested_by=SYSTEM`` when a
    fallback moves the engagement to chat.
    """

    engagement_id: str
    request_id: str = ""
    channel: Channel | None = None
    requested_by: Party | None = None
    accepted: bool = False
    time: float | None = None


@dataclass(frozen=True)
class CallSignal:
    """Opaque call-setup signalling relayed between device and associate."""

    engagement_id: str
    kind: CallSignalKind | None = None
    payload: bytes = b""
    """At most 64 KiB; the server does not look inside."""
    sender: Party | None = None


@dataclass(frozen=True)
class FallbackOffer:
    """Nobody took the engagement in time: offer the user these alternatives.

    Answer with ``Engagement.choose_fallback(option)``.
    """

    engagement_id: str
    options: tuple[FallbackOption, ...] = ()
    message: str = ""
    """Text for the user, e.g. "Everyone is busy. How should we continue?"."""


@dataclass(frozen=True)
class UserVerification:
    """Whether the user token the app gave (``connect(user_token=...)``, ``set_user_token``) verified.

    Verified: ``user_id`` is the token's subject, and the user's journey, caps and decline memory follow
    them across devices. Not verified (``reason`` says why, e.g. "expired"): the user id is only claimed,
    stays with this device, and associates see it as unverified. Refresh an expired token with
    ``set_user_token``.
    """

    user_id: str
    verified: bool
    reason: str = ""


class FeedbackKind(enum.Enum):
    CSAT = "csat"
    """Customer satisfaction, 1 to 5."""
    NPS = "nps"
    """Net promoter score: how likely to recommend, 0 to 10."""


@dataclass(frozen=True)
class FeedbackRequest:
    """An engagement ended and the scenario or queue asks for a rating.

    Show ``question`` with a scale from ``min_score`` to ``max_score``; answer with
    :meth:`Client.give_feedback` (or not at all).
    """

    engagement_id: str
    kind: FeedbackKind | None = None
    question: str = ""
    min_score: int = 0
    max_score: int = 0
    comment_allowed: bool = False


ServerEvent: TypeAlias = Cue | CueWithdrawal | EngagementUpdate | UserVerification
"""Anything the server pushes to a device, as yielded by ``Client.events()``."""


@dataclass(frozen=True)
class JourneyEntry:
    """One device signal in an engagement's timeline.

    Context changes are flattened into ``properties`` keyed by the scenario
    paths (``app.version``, ``device.os``, ``attributes.plan``, ``user.tier``,
    ...), so an associate reads both kinds the same way.
    """

    signal_id: str
    time: float | None
    kind: Literal["event", "context"]
    name: str
    """The event name, or ``context_update`` for context changes."""
    properties: Mapping[str, Scalar] = field(default_factory=dict)
    cleared_keys: tuple[str, ...] = ()
    """Context keys a context change removed."""


class MatchedCondition(NamedTuple):
    """One leaf condition that held when the cue fired."""

    path: str
    """Where it sits in the scenario file, e.g. ``trigger.all[0]``."""
    description: str
    """Readable form, e.g. ``count(sync_failed) >= 3 within 10m (observed 3)``."""


@dataclass(frozen=True)
class Trigger:
    """Why a cue fired: the scenario and the conditions that held."""

    scenario_id: str
    scenario_name: str = ""
    scenario_file: str = ""
    priority: int = 0
    conditions: tuple[MatchedCondition, ...] = ()
    signal_ids: tuple[str, ...] = ()
    """Signals whose arrival made the scenario fire."""


@dataclass(frozen=True)
class OutcomeScore:
    """The server's predicted probability of an outcome (e.g. a purchase) within the session, explained."""

    outcome: str
    probability: float
    status: str = ""
    """``training`` (too few labelled sessions: the base rate), ``trained`` or ``shadow`` (not used in rules)."""
    top_features: tuple[tuple[str, float], ...] = ()
    """The features that moved it most: (name, weight x standardised value), largest first."""


@dataclass(frozen=True)
class EngagementContext:
    """Everything an associate gets about the device, user and journey."""

    app_id: str
    device_id: str
    user_id: str = ""
    context: Context = field(default_factory=Context)
    user: User | None = None
    """``None`` when consent withholds user facts (see ``redacted_fields``)."""
    consent: Consent | None = None
    journey: tuple[JourneyEntry, ...] = ()
    """Recent signals, oldest first."""
    trigger: Trigger | None = None
    cue: Cue | None = None
    redacted_fields: tuple[str, ...] = ()
    segments: tuple[str, ...] = ()
    """Named segments the device is in."""
    milestones: tuple[str, ...] = ()
    """Milestones the device reached this session."""
    prior_engagements: tuple[PriorEngagement, ...] = ()
    """Earlier engagements of this user (or device), newest first, with their wrap-up."""
    priority: int = 0
    """The engagement's routing priority (higher is served first)."""
    user_verified: bool = False
    """``user_id`` was asserted by the app backend's token; False: the device only claims it."""
    scores: tuple[OutcomeScore, ...] = ()
    """Predicted outcome probabilities when the engagement was routed, with their top features."""
    prior_cues: tuple[PriorCue, ...] = ()
    """Earlier cues to this user (or device), oldest first, with how each ended."""
    routing_rule: RoutingRuleMatch | None = None
    """The routing rule that sent it to its queue; ``None`` when none matched (the scenario's queue)."""


@dataclass(frozen=True)
class PriorCue:
    """An earlier cue to the same user or device and how it ended."""

    cue_id: str
    created_at: float | None = None
    scenario_id: str = ""
    status: str = ""
    """``offered`` (still on screen), ``accepted``, ``declined``, ``dismissed``, ``expired``, ``withdrawn``
    or ``opened``."""


@dataclass(frozen=True)
class RoutingRuleMatch:
    """The routing rule that sent an engagement to its queue, and its conditions that held."""

    index: int
    name: str = ""
    """Empty when the rule is unnamed: it is ``routing.rules[index]``."""
    file: str = ""
    line: int = 0
    queue: str = ""
    priority: int = 0
    skills: tuple[str, ...] = ()
    conditions: tuple[MatchedCondition, ...] = ()


@dataclass(frozen=True)
class PriorEngagement:
    """An earlier engagement of the same user or device, for the associate."""

    engagement_id: str
    created_at: float | None = None
    scenario_id: str = ""
    disposition: str = ""
    notes: str = ""
    outcome: str = ""
    """The scenario's engagement_outcome check: ``pending``, ``achieved`` or ``not_achieved`` ("" without one)."""
    wrap_up_outcome: str = ""
    """What the associate recorded at wrap-up (one of the queue's outcomes)."""


@dataclass(frozen=True)
class AssignedEngagement:
    """An engagement routed to this associate, with its full context."""

    engagement_id: str
    cue_id: str
    queue: str
    channel: Channel | None
    created_at: float | None
    context: EngagementContext
    state: EngagementState | None = None
    associate_id: str = ""
    associate_name: str = ""
    transcript: tuple[ChatMessage, ...] = ()
    """The chat so far when it reached you: after a transfer or on joining, what was already said."""
    transfers: tuple[Transfer, ...] = ()
    role: ParticipantRole = ParticipantRole.OWNER
    """Your part: OWNER unless you joined it (conference, consult, monitor, barge-in)."""
    participants: tuple[Participant, ...] = ()
    """Associates on it besides the owner."""
    kind: EngagementKind = EngagementKind.LIVE
    """CALLBACK: the user asked to be called back at ``callback_at`` on ``callback_number``."""
    callback_at: float | None = None
    callback_number: str = ""

    def describe(self) -> str:
        """A readable multi-line briefing: device, user, why the cue fired, journey."""
        return "\n".join(_describe_lines(self))


@dataclass(frozen=True)
class EngagementEnded:
    """An engagement ended, by the associate or by the device side."""

    engagement_id: str
    disposition: str = ""
    ended_by: Party | None = None
    """Who ended it. After the user ended it the associate may still send a wrap-up."""


# --- describe() -------------------------------------------------------------


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _fmt_date(t: float | None) -> str:
    if t is None:
        return "????-??-?? --:--Z"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + "Z"


def _fmt_props(props: Mapping[str, Scalar]) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in props.items())


def _describe_lines(eng: AssignedEngagement) -> list[str]:
    ctx = eng.context
    dev = ctx.context
    channel = eng.channel.name if eng.channel else "?"
    queue = eng.queue or "?"
    priority = f", priority {ctx.priority}" if ctx.priority else ""
    lines = [f"Engagement {eng.engagement_id} (cue {eng.cue_id}) - queue {queue}, channel {channel}{priority}"]

    device = [
        dev.device_model or "unknown device",
        " ".join(p for p in (dev.os, dev.os_version) if p) or "unknown OS",
        f"app {ctx.app_id} {dev.app_version or '?'}".rstrip(),
    ]
    device += [p for p in (dev.locale, dev.timezone) if p]
    if dev.location is not None:
        loc = dev.location
        device.append("/".join(p for p in (loc.country, loc.region, loc.city) if p))
    lines.append(f"Device:  {ctx.device_id} - " + ", ".join(p for p in device if p))
    if dev.attributes:
        lines.append(f"         {_fmt_props(dev.attributes)}")

    consent = ctx.consent.name if ctx.consent else "UNSPECIFIED"
    who = ctx.user_id or "anonymous"
    if ctx.user is not None and ctx.user.tier:
        who += f" ({ctx.user.tier})"
    lines.append(f"User:    {who}, consent {consent}")
    if ctx.user is not None and ctx.user.attributes:
        lines.append(f"         {_fmt_props(ctx.user.attributes)}")

    fired_at = ctx.cue.created_at if ctx.cue is not None else None
    if ctx.cue is not None:
        lines.append(f"Cue:     {ctx.cue.title + ' - ' if ctx.cue.title else ''}{ctx.cue.message}")

    trigger_ids: set[str] = set()
    if ctx.trigger is not None:
        t = ctx.trigger
        where = ", ".join(p for p in (t.scenario_file, f"priority {t.priority}") if p)
        lines.append(f"Why:     scenario {t.scenario_name or t.scenario_id!r} ({where})")
        lines += [f"         - {c.path}: {c.description}" for c in t.conditions]
        trigger_ids = set(t.signal_ids)
    for score in ctx.scores:
        features = ", ".join(f"{name} {value:+.2f}" for name, value in score.top_features)
        because = f": {features}" if features else ""
        lines.append(f"Score:   P({score.outcome}) = {score.probability:.2f} ({score.status}){because}")
    if ctx.segments or ctx.milestones:
        lines.append(f"Segments: {', '.join(ctx.segments) or '-'}; milestones: {', '.join(ctx.milestones) or '-'}")

    lines.append(f"Journey: {len(ctx.journey)} signal(s), oldest first; > marks those that fired the cue")
    whens = []
    for entry in ctx.journey:
        when = _fmt_time(entry.time)
        if entry.time is not None and fired_at is not None:
            # Offset from the offer: "3 failures in the last 40 s" reads faster than clock times.
            when += f" ({entry.time - fired_at:+.1f}s)"
        whens.append(when)
    width = max(map(len, whens), default=0)
    for entry, when in zip(ctx.journey, whens, strict=True):
        mark = ">" if entry.signal_id in trigger_ids else " "
        detail = _fmt_props(entry.properties)
        if entry.cleared_keys:
            detail = (detail + " " if detail else "") + "cleared " + ",".join(entry.cleared_keys)
        lines.append(f"  {mark} {when:<{width}}  {entry.kind:<7} {entry.name}  {detail}".rstrip())

    if ctx.prior_engagements:
        lines.append(f"History: {len(ctx.prior_engagements)} prior engagement(s), newest first")
        for prior in ctx.prior_engagements:
            detail = prior.disposition or "no disposition"
            if prior.notes:
                detail += f" - {prior.notes}"
            if prior.outcome:
                detail += f" (outcome: {prior.outcome})"
            scenario = f" scenario {prior.scenario_id}" if prior.scenario_id else ""
            lines.append(f"  - {_fmt_date(prior.created_at)} {prior.engagement_id}{scenario}: {detail}")
    else:
        lines.append("History: no prior engagements")

    if ctx.redacted_fields:
        lines.append("Withheld (consent): " + ", ".join(ctx.redacted_fields))
    return lines
