"""Plain records persisted by the storage layer.

They hold only builtin types so the storage layer stays independent of protobuf and gRPC; the API layer
converts at its edge. Times are epoch seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

ContextValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    app_id: str
    device_id: str
    user_id: str
    started_at: float
    context: dict[str, ContextValue]
    consent: str
    # Set by SqliteStore.end_session; saving a record with None keeps an already stored end time.
    ended_at: float | None = None
    # user_id is the session's identity (verified by a user token, or taken at its word without auth), so
    # its journey stitches with the user's other sessions; False: the user id is only claimed.
    identified: bool = False


# A NamedTuple: one per stored signal on the ingest path, where a frozen dataclass's __init__ costs
# several times more.
class SignalRecord(NamedTuple):
    device_id: str
    signal_id: str
    session_id: str
    kind: str  # "event" | "context"
    name: str  # event name, or "" for a context update
    time: float  # event time, already corrected for device clock skew
    received_at: float
    payload: Mapping[str, Any]  # JSON-serialisable: event properties or the context change


@dataclass(frozen=True, slots=True)
class CueRecord:
    cue_id: str
    scenario_id: str
    app_id: str
    device_id: str
    subject: str  # user id or device id that caps and cooldowns apply to
    session_id: str
    created_at: float
    expires_at: float
    channel: str
    message: str
    status: str  # "offered" | "accepted" | "declined" | "dismissed" | "expired" | "withdrawn" | "lost"
    responded_at: float | None
    explanation: dict[str, Any]
    variant: str = ""  # the A/B variant shown, "" when the scenario has none
    locale: str = ""  # the locale whose text was shown, "" for the default
    button_id: str = ""  # the button the user answered with, if any


@dataclass(frozen=True, slots=True)
class EngagementRecord:
    engagement_id: str
    cue_id: str
    app_id: str
    device_id: str
    session_id: str
    queue: str
    state: str  # "queued" | "assigned" | "ended" | "callback_requested"
    channel: str
    created_at: float
    assigned_at: float | None
    ended_at: float | None
    associate_id: str
    disposition: str
    notes: str
    context: dict[str, Any]
    subject: str = ""
    scenario_id: str = ""
    priority: int = 0
    outcome: str = ""  # "" | "pending" | "achieved" | "not_achieved"
    ended_by: str = ""  # "" | "associate" | "user" | "system"
    # A callback the user chose (state "callback_requested" until then): queued again at this time.
    callback_at: float | None = None
    callback_number: str = ""
    # When the associate wrapped it up: with the end, or later when the user left first; None: not yet.
    wrapped_up_at: float | None = None
    # The outcome the associate recorded at wrap-up (one of the queue's), and whether it counts as success.
    wrap_up_outcome: str = ""
    wrap_up_success: bool = False
    # The user's answer to the fallback that keeps it open ("chat": it goes on as a chat, waiting in line), ""
    # when none: an engagement restored or adopted elsewhere is not offered its fallback again.
    fallback_choice: str = ""


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A qualifying scenario's arbitration outcome: offered, or blocked and why."""

    time: float
    app_id: str
    device_id: str
    subject: str
    session_id: str
    scenario_id: str
    outcome: str  # "offered" | "blocked"
    reason: str  # "" when offered; priority | cooldown | cap | declined | schedule | no_capacity | ...
    detail: str
    cue_id: str  # the cue when offered, else ""
    outcome_milestone: str = ""  # the scenario's outcome milestone, if it has one (funnel conversion)


@dataclass(frozen=True, slots=True)
class MilestoneRecord:
    """A milestone a session reached (once per session)."""

    time: float
    app_id: str
    device_id: str
    session_id: str
    milestone_id: str


@dataclass(frozen=True, slots=True)
class ChatRecord:
    message_id: str
    engagement_id: str
    sender: str  # "user" | "associate" | "system"
    text: str
    time: float


@dataclass(frozen=True, slots=True)
class TransferRecord:
    engagement_id: str
    time: float
    from_associate_id: str
    to_associate_id: str
    to_queue: str
    mode: str  # "blind" | "consult"
    note: str


@dataclass(frozen=True, slots=True)
class ParticipationRecord:
    engagement_id: str
    associate_id: str
    role: str  # "conference" | "consult" | "monitor" | "barge"
    joined_at: float
    left_at: float | None
    disposition: str
    notes: str


@dataclass(frozen=True, slots=True)
class ChannelChangeRecord:
    engagement_id: str
    time: float
    request_id: str
    from_channel: str
    to_channel: str
    requested_by: str
    accepted: bool


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """A satisfaction rating given after an engagement ended (one per engagement)."""

    engagement_id: str
    cue_id: str
    scenario_id: str
    queue: str
    associate_id: str
    variant: str
    kind: str  # "csat" (1-5) | "nps" (0-10)
    score: int
    comment: str
    time: float


@dataclass(frozen=True, slots=True)
class DeviceCredentialRecord:
    """A device id's credential: the SHA-256 of its secret (the secret itself is never stored)."""

    device_id: str
    app_id: str
    secret_sha256: bytes = field(repr=False)
    issued_at: float
    # When the install first presented the secret; None while it never has (an SDK that predates them).
    confirmed_at: float | None = None


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """A session labelled for an outcome: reached or not, with its scoring moments (features, prediction)."""

    id: int
    outcome: str
    session_id: str
    reached: bool
    examples: list[tuple[dict[str, float], float]]
    time: float


@dataclass(frozen=True, slots=True)
class SwitchRecord:
    """An operations switch set through AdminService, kept across restarts.

    scope "offers" (scope_id ""): on = offers flowing, off = paused; scope "scenario" (scope_id: its id):
    on = enabled, off = disabled.
    """

    scope: str
    scope_id: str
    on: bool
    reason: str
    time: float


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """One running replica as it last reported itself (core/cluster.py writes it on every sweep).

    Whether it is still alive is the reader's judgement from ``last_seen`` (core/replicas.py), never a
    stored flag: a replica that was SIGKILLed cannot say it died.
    """

    replica_id: str  # the bus's replica id (core/bus.py)
    started_at: float
    last_seen: float  # the heartbeat: when it last wrote this row (its core clock)
    address: str  # where its gRPC port listens (host:port as bound)
    host: str  # the machine it runs on, and its process id
    scenarios_version: str  # the scenarios folder's digest it serves (12 hex; "" without a folder)
    draining: bool  # stopping: takes no new streams, finishes what it holds


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """An outcome model's learned state, its version, the trainer epoch that saved it and its cursor."""

    outcome: str
    version: int
    epoch: int
    cursor: int  # id of the last labelled session learned
    state: dict[str, Any]
    saved_at: float


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    """One webhook delivery in the durable outbox: what to POST where, and how far it got."""

    delivery_id: str
    url: str
    kind: str  # e.g. cue.offered, engagement.ended
    body: str  # the JSON document POSTed, fixed when the event happened
    created_at: float
    state: str  # pending | dead (delivered rows are deleted)
    attempts: int
    next_attempt_at: float
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class TimerRecord:
    """A deadline stored as a row (storage/timer_rows.py): any replica may claim it once due, and its effect
    commits together with marking it done, so it fires once even if the replica that armed it died."""

    timer_id: str  # "<kind>:<target>": re-arming the same deadline updates one row
    kind: str  # cue_expiry | callback
    target: str  # the cue id / engagement id the effect applies to
    due_at: float
    owner: str  # the replica that armed it (its liveness: the lease "replica:<owner>")
    state: str = "armed"  # armed | done
    claimed_by: str = ""
    claimed_until: float = 0.0
    fired_at: float | None = None
