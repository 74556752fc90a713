"""Domain messages in and out of the core, as plain dataclasses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from ..engine.state import Scalar
from ..scenarios.compiler import RuleMatch
from ..scenarios.content import Button, Image

__all__ = [
    "NO_PROPS",
    "Ack",
    "AssociateSignIn",
    "CueOffer",
    "EngagementContext",
    "EngagementEnded",
    "EngagementUpdate",
    "EngagementView",
    "EventColumns",
    "Forwarded",
    "Hello",
    "IncomingBatch",
    "IncomingSignal",
    "JourneyItem",
    "Scalar",
    "SessionFailed",
    "Withdrawal",
]

CONSENT_LEVELS = ("none", "essential", "full")


_EMPTY: Mapping[str, Scalar] = MappingProxyType({})
# The properties of a signal that has none: shared, read-only.
NO_PROPS = _EMPTY


@dataclass(frozen=True, slots=True)
class Hello:
    app_id: str
    device_id: str
    # Flat context keys as scenario files address them: app.version, user.tier…
    context: dict[str, Scalar]
    consent: str = "essential"
    sdk_version: str = ""
    resume_session_id: str = ""
    device_secret: str = field(default="", repr=False)
    # A JWT from the app's backend asserting the user id (core/user_tokens.py).
    user_token: str = field(default="", repr=False)
    # Cues the client accepted whose engagement it has not seen end (desk_routing.py: tell_ended).
    engaged_cue_ids: tuple[str, ...] = ()


# A NamedTuple, not a frozen dataclass: one is built per signal on the ingest path, and a frozen
# dataclass's __init__ costs several times more (it sets each field through object.__setattr__).
class IncomingSignal(NamedTuple):
    id: str
    # Device clock, epoch seconds; None when the client sent none.
    time: float | None
    kind: str  # "event" | "context" | "" (unset: invalid)
    name: str = ""
    # Shared read-only empties as defaults: nothing mutates an incoming signal.
    props: Mapping[str, Scalar] = _EMPTY
    context_set: Mapping[str, Scalar] = _EMPTY
    clear_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IncomingBatch:
    batch_id: str
    sent_at: float | None
    signals: tuple[IncomingSignal, ...]
    # Sent as SignalColumns: errors name its columns instead of signals.signals[i].
    columnar: bool = False


# Not frozen: a frozen dataclass sets each of its nine fields through object.__setattr__, ~3.6 of the ~19 us
# that converting an unbatched client's one-signal message took (its lists were never immutable anyway).
@dataclass(slots=True)
class EventColumns:
    """A batch of events as columns: what ingest validates and applies once per batch (core/ingest.py).

    api/convert.py builds it from a SignalColumns, and from a SignalBatch that carries only events, so the
    hot path holds a list per field instead of an object per signal. Nothing changes it once built.
    """

    batch_id: str
    sent_at: float | None
    ids: list[str]
    times: list[float | None]  # device clock, epoch seconds; None where the client sent none
    names: list[str]
    # Per signal (the shared empty mapping where it has none).
    props: list[Mapping[str, Scalar]]
    # False: it arrived as SignalBatch rows, so errors name signals.signals[i] (see `rows`).
    columnar: bool = True
    # Every string and every double property value, when the wire form had them as columns (validation
    # checks these whole); None: validation reads them from `props`.
    strings: Sequence[str] | None = None
    doubles: Sequence[float] | None = None
    # Every signal's property keys, when the wire form gave them once for the batch (SignalColumns.shape_keys):
    # validation checks these instead of each signal's.
    keys: Sequence[str] | None = None

    def rows(self) -> IncomingBatch:
        """The same batch as one object per signal (what the signal-by-signal path and its errors use)."""
        signals = tuple(
            IncomingSignal(i, t, "event", n, p)
            for i, t, n, p in zip(self.ids, self.times, self.names, self.props, strict=True)
        )
        return IncomingBatch(self.batch_id, self.sent_at, signals, columnar=self.columnar)


@dataclass(frozen=True, slots=True)
class CueOffer:
    cue_id: str
    scenario_id: str
    message: str
    channel: str
    upgrades: tuple[str, ...]
    created_at: float
    expires_at: float
    title: str = ""
    image: Image | None = None
    # Labels already in the chosen locale.
    buttons: tuple[Button, ...] = ()
    layout: str = ""  # "" | banner | modal | bubble
    variant: str = ""  # the A/B variant shown, "" without variants
    locale: str = ""  # the locale whose texts were chosen, "" for the default

    def button(self, button_id: str) -> Button | None:
        return next((b for b in self.buttons if b.id == button_id), None)

    def content(self) -> dict[str, Any]:
        """Presentation beyond message and channel, as JSON, kept with the stored cue to re-offer it.

        "image" only when the cue has one (readers take a missing image as none): a null in the stored
        explanation would send its JSON down the stdlib encoder's slower path (storage/json_text.py)."""
        content: dict[str, Any] = {
            "title": self.title,
            "upgrades": list(self.upgrades),
            "buttons": [[b.id, b.label, b.action, b.channel, b.url] for b in self.buttons],
            "layout": self.layout,
        }
        if self.image is not None:
            content["image"] = {"url": self.image.url, "alt": self.image.alt}
        return content


@dataclass(frozen=True, slots=True)
class Ack:
    batch_id: str
    signal_ids: tuple[str, ...]
    duplicate_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Withdrawal:
    cue_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class EngagementUpdate:
    engagement_id: str
    cue_id: str
    state: str  # queued | assigned | ended
    channel: str
    queue: str
    associate_name: str
    time: float
    disposition: str = ""
    # While queued and in line: 1 for the next to be served (core/queue_wait.py); 0 otherwise.
    queue_position: int = 0
    # Seconds, while queued and estimable; None: no basis for an estimate.
    estimated_wait: float | None = None
    # For a callback_requested update: when the user will be called back.
    callback_at: float | None = None


@dataclass(frozen=True, slots=True)
class UserVerified:
    """Whether a user token presented by the device verified; sent once per token."""

    user_id: str
    verified: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Forwarded:
    """An event another replica rendered for an associate whose stream is held here; sent on as it is."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """Ends a stream from the core's side (e.g. storage failing).

    With `error`, the API layer maps that error to its status; an empty reason
    and no error ends the stream cleanly.
    """

    reason: str
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class JourneyItem:
    signal_id: str
    time: float
    kind: str
    name: str
    payload: dict[str, Any]


def milestone_item(session_id: str, milestone_id: str, at: float) -> JourneyItem:
    """A milestone a session reached, as a journey entry; its id is stable so a desk shows it once."""
    return JourneyItem(f"milestone:{session_id}:{milestone_id}", at, "milestone", milestone_id, {})


@dataclass(frozen=True, slots=True)
class EngagementContext:
    app_id: str
    device_id: str
    user_id: str
    context: dict[str, Scalar]
    user_attributes: dict[str, Scalar]
    consent: str
    journey: tuple[JourneyItem, ...]
    trigger: dict[str, Any]
    cue: CueOffer
    redacted_fields: tuple[str, ...]
    prior_engagements: tuple[PriorEngagement, ...] = ()
    priority: int = 0
    # user_id was asserted by a valid user token; False: the device only claims it.
    user_verified: bool = False
    # Outcome id -> {probability, status, top_features}: predict.registry.describe_scores at routing.
    scores: dict[str, Any] = field(default_factory=dict)
    # Earlier cues to the same user (or device) and how each ended, oldest first: the journey's offers.
    prior_cues: tuple[PriorCue, ...] = ()
    # The routing rule that sent it to its queue (None: the scenario's own queue, no rule matched).
    routing_rule: RuleMatch | None = None


@dataclass(frozen=True, slots=True)
class EngagementView:
    engagement_id: str
    cue_id: str
    queue: str
    state: str
    channel: str
    created_at: float
    associate_id: str
    associate_name: str
    context: EngagementContext
    # What a receiving associate reads beyond the context: the chat so far (after
    # a transfer or on joining), earlier transfers, their own part and who else is on it.
    transcript: tuple[ChatLine, ...] = ()
    transfers: tuple[TransferInfo, ...] = ()
    role: str = "owner"
    participants: tuple[ParticipantInfo, ...] = ()
    # "live" (the user waits in the app) or "callback" (call the user back on callback_number, who asked
    # for callback_at).
    kind: str = "live"
    callback_at: float | None = None
    callback_number: str = ""
    # Events of the device that arrived after it was assigned (the live journey so far).
    journey_since: tuple[JourneyItem, ...] = ()


@dataclass(frozen=True, slots=True)
class AssociateSignIn:
    associate_id: str
    display_name: str
    queues: tuple[str, ...]
    capacity: int
    skills: tuple[str, ...] = ()
    manual_claim: bool = False
    presence: str = "available"
    # Queues whose engagements this associate supervises (monitor, whisper, barge in).
    supervised_queues: tuple[str, ...] = ()
    # The apps whose engagements this associate may take, see or act on; empty: every app. Set from
    # the associate's credential (api/auth.py), never from the request.
    apps: tuple[str, ...] = ()
    # (channel, limit): at most `limit` engagements held while one of them is on `channel`.
    channel_capacity: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class EngagementEnded:
    engagement_id: str
    disposition: str
    ended_by: str = "associate"


# -- engagement traffic (issue: engagements) -----------------------------------------

PARTIES = ("user", "associate", "system")
CALL_SIGNAL_KINDS = ("offer", "answer", "candidate", "hangup")
FALLBACKS = ("callback", "chat", "cancel")


@dataclass(frozen=True, slots=True)
class ChatLine:
    engagement_id: str
    message_id: str
    sender: str  # user | associate | system
    text: str
    time: float
    # Which associate wrote it (several may share an engagement); empty for the user and the system.
    sender_id: str = ""
    sender_name: str = ""
    # To the associates only: never relayed to the device, never stored in the transcript.
    whisper: bool = False


@dataclass(frozen=True, slots=True)
class UpgradeAsk:
    engagement_id: str
    request_id: str
    channel: str
    requested_by: str


@dataclass(frozen=True, slots=True)
class ChannelChanged:
    engagement_id: str
    request_id: str
    channel: str
    requested_by: str
    accepted: bool
    time: float


@dataclass(frozen=True, slots=True)
class CallSignalRelay:
    engagement_id: str
    kind: str  # offer | answer | candidate | hangup
    payload: bytes
    sender: str


@dataclass(frozen=True, slots=True)
class FallbackOffered:
    engagement_id: str
    options: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class EngagementOffered:
    """Offered to a manual-claim associate, who must claim or reject it."""

    view: EngagementView


@dataclass(frozen=True, slots=True)
class OfferWithdrawn:
    engagement_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class JourneyAppended:
    """Signals of an engaged device, stored after the engagement's context was taken: the live journey."""

    engagement_id: str
    items: tuple[JourneyItem, ...]


@dataclass(frozen=True, slots=True)
class PriorCue:
    cue_id: str
    created_at: float
    scenario_id: str
    status: str  # offered | accepted | declined | dismissed | expired | withdrawn


@dataclass(frozen=True, slots=True)
class PriorEngagement:
    engagement_id: str
    created_at: float
    scenario_id: str
    disposition: str
    notes: str
    outcome: str
    # What the associate recorded at wrap-up (the queue's outcomes), beside the automatic `outcome` check.
    wrap_up_outcome: str = ""


# -- contact-center operations: transfer, conference, supervision -----------------------

PARTICIPANT_ROLES = ("owner", "conference", "consult", "monitor", "barge")
TRANSFER_MODES = ("blind", "consult")


@dataclass(frozen=True, slots=True)
class ParticipantInfo:
    associate_id: str
    display_name: str
    role: str  # one of PARTICIPANT_ROLES


@dataclass(frozen=True, slots=True)
class TransferInfo:
    from_associate_id: str
    to_associate_id: str
    to_queue: str
    mode: str  # blind | consult
    note: str
    time: float


@dataclass(frozen=True, slots=True)
class EngagementJoined:
    """To an associate added to an engagement (conference, consult, monitor, barge)."""

    view: EngagementView


@dataclass(frozen=True, slots=True)
class SupervisedSnapshot:
    """To supervisors of the engagement's queue, whenever its state or people change."""

    engagement_id: str
    queue: str
    state: str
    channel: str
    associate_id: str
    participants: tuple[ParticipantInfo, ...]
    time: float


@dataclass(frozen=True, slots=True)
class FeedbackAsked:
    """After an engagement ended: please rate it (csat low..high or nps), maybe with a comment."""

    engagement_id: str
    kind: str  # csat | nps
    question: str
    min_score: int
    max_score: int
    comment_allowed: bool


@dataclass(frozen=True, slots=True)
class InvitationResult:
    """The answer to the inviter: the cue sent, or why the policy held it back."""

    device_id: str
    cue_id: str  # empty when not invited
    blocked_reason: str = ""
    detail: str = ""
