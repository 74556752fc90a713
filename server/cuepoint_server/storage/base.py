"""The storage interface the core and the engagement desk are written against.

`SqliteStore` (sqlite.py) is one implementation; a scale-out backend (PostgreSQL) implements the same
protocol. Every method is a whole unit of work: writes that must hold together (an offer and the signals
that fired it, an accept and the engagement it starts) are one method, one transaction, so no backend ever
hands a connection or a transaction upward, and nothing above this package builds SQL. An awaited write is
durable; every write is idempotent by its record's id, so a retried or replayed one changes nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .audit_log import AuditRecord
from .journal import JournalBatch
from .records import (
    ChannelChangeRecord,
    ChatRecord,
    CueRecord,
    DecisionRecord,
    DeviceCredentialRecord,
    EngagementRecord,
    FeedbackRecord,
    LabelRecord,
    MilestoneRecord,
    ModelRecord,
    ParticipationRecord,
    ReplicaRecord,
    SessionRecord,
    SignalRecord,
    SwitchRecord,
    TimerRecord,
    TransferRecord,
    WebhookRecord,
)

__all__ = [
    "AcceptOutcome",
    "FunnelSlice",
    "OfferCommit",
    "OfferGuard",
    "OfferResult",
    "SlotClaim",
    "SlotResult",
    "Store",
    "StoreClosedError",
    "StoreStats",
]


class StoreClosedError(RuntimeError):
    """The store was closed before (or while) the operation could run."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    batches: int  # committed write transactions
    ops: int  # committed write calls
    rows: int  # committed rows: inserted signals plus one per upsert/update statement
    failed_ops: int  # write calls that raised to their caller


@dataclass(frozen=True, slots=True)
class OfferGuard:
    """The per-user policy of one offered cue, checked again inside the commit against stored cues.

    Several replicas decide for the same user (two devices, two processes), each from its own memory. So the
    commit takes the subject's lock (PostgreSQL: a transaction-scoped advisory lock on the subject), reads
    the subject's stored cues (those created at or after ``since``, of ``session_id``, and each scenario's
    latest decline however old: offer_guard.HISTORY_WHERE) and calls ``check``: a reason (reason, detail)
    refuses the cue. ``check`` is the arbiter's own rule (engine/arbiter.py), so storage holds no policy,
    only the data and the lock. ``check`` reads only the history it is given and values fixed when the guard
    was made, so a store may call it on its database thread (SQLite does: the commit is then one hop to that
    thread).
    """

    cue_id: str
    subject: str
    session_id: str
    since: float
    check: Callable[[Sequence[CueRecord]], tuple[str, str] | None]
    # This process's memory of the subject holds every cue stored for it (core/remembered.py), so the read
    # can only agree with the decision. A store that knows no other process writes to it skips the read
    # (SqliteStore alone on its file); any other store reads as always.
    memory_whole: bool = False


class OfferResult(NamedTuple):
    """What `Store.commit_offer` did: signal ids skipped as stored before, and cues refused by their guard.

    A refused cue was not stored (nor its cue.offered webhook rows); its "offered" decision was stored as
    blocked with the refusal's reason. Everything else of the commit was.
    """

    skipped: list[str]
    refused: dict[str, tuple[str, str]]
    # cue id -> the associate whose slot the commit reserved for it (OfferCommit.slots).
    slotted: Mapping[str, str] = {}


@dataclass(slots=True)
class OfferCommit:
    """What one evaluation decided, committed in one transaction before anything of it is shown.

    The signals that were evaluated, the cues offered (and the status changes of cues it settled), every
    arbitration decision and the milestones reached: all of it is durable, or none of it.
    """

    signals: list[SignalRecord] = field(default_factory=list)
    # Or the same as whole batches (`Store.append_batch`'s form): stored one journal row each.
    batches: list[JournalBatch] = field(default_factory=list)
    cues: list[CueRecord] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    milestones: list[MilestoneRecord] = field(default_factory=list)
    # (cue_id, status, at): a cue this evaluation settled (withdrawn) beside the new one.
    statuses: list[tuple[str, str, float]] = field(default_factory=list)
    # Webhook outbox rows reporting the cues offered (cue.offered): stored with them or not at all.
    webhooks: list[WebhookRecord] = field(default_factory=list)
    # Per-user policy checked again under the subject's lock before the cues are stored (OfferGuard).
    guards: list[OfferGuard] = field(default_factory=list)
    # The offered cues' expiry timers (timer_rows.py): a cue is never stored without its deadline's row.
    timers: list[TimerRecord] = field(default_factory=list)
    # Across replicas, a cue that must hold an associate's slot while on screen (require_capacity): reserved
    # in the commit, against what every replica holds; a cue that gets no slot is refused ("no_capacity").
    slots: list[SlotClaim] = field(default_factory=list)
    # Repeating timers this evaluation fires, (timer id, due time): marked done first, only where still armed
    # at that time; if one was not (fired elsewhere, or moved), none of the cues is stored (refused,
    # FIRED_ELSEWHERE) and the rest commits as it would without them.
    fires: list[tuple[str, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.signals
            or self.batches
            or self.cues
            or self.decisions
            or self.milestones
            or self.statuses
            or self.webhooks
            or self.timers
            or self.fires
        )


@dataclass(frozen=True, slots=True)
class AcceptOutcome:
    """What `Store.accept_cue` found: ``engagement`` is the one now stored for the cue (new or earlier)."""

    accepted: bool  # False: the cue was unknown or no longer offered; nothing was written
    status: str  # the cue's status after the call ("" if unknown)
    engagement: EngagementRecord | None


@dataclass(frozen=True, slots=True)
class FunnelSlice:
    """Which decisions and cues a funnel counts (see reporting/funnel.py for the definitions)."""

    start: float | None = None
    end: float | None = None
    scenario_id: str = ""
    group_by: tuple[str, ...] = ()
    # Only these aggregates (funnel_sql.py's kinds, e.g. "desk_handling"); empty: all of them.
    kinds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SlotClaim:
    """A slot asked of one of `candidates` for `key` (an engagement id), in `Store.reserve_slot`.

    Several replicas route to the same associates; the reservation is decided in storage, under the
    candidates' row locks, against every slot they hold on any replica. ``fits`` is the core's own rule
    (the associate's capacity, channel and queue limits, presence): it gets an associate id and the
    (channel, queue) of each slot they hold anywhere, so storage holds no policy, only the data and the lock.
    """

    key: str
    channel: str
    queue: str
    replica: str
    # (associate id, idle since as this replica saw it): the idle time seeds an associate's first row.
    candidates: tuple[tuple[str, float], ...]
    # (associate id, {hold key: (channel, queue)} of every slot they hold anywhere) -> room for this one?
    fits: Callable[[str, Mapping[str, tuple[str, str]]], bool]
    # A hold this one takes over in the same transaction (an accepted cue's: the engagement inherits it), so
    # the slot is never free in between for another replica to take.
    replaces: str = ""
    # In an offer's commit (OfferCommit.slots, key: a cue id): why the cue is not offered when no slot is had.
    detail: str = ""
    # The timer row the slot comes with, given the associate who gets it (an offer's timeout, for one who must
    # claim it; None: nothing): armed with the hold, in the same transaction, so neither is stored alone.
    timer: Callable[[str], TimerRecord | None] | None = None


class SlotResult(NamedTuple):
    """What `Store.reserve_slot` did: the associate now holding the slot ("" none), and whether a candidate
    was skipped because another replica was deciding for them at that moment (worth another try soon)."""

    associate_id: str
    contended: bool
    # The row armed with the hold (SlotClaim.timer), None when none was.
    timer: TimerRecord | None = None


@runtime_checkable
class Store(Protocol):
    """Durable sessions, signal journal, cues, decisions, engagements and their conversation."""

    @property
    def stats(self) -> StoreStats: ...

    async def close(self) -> None: ...

    # -- transactions the core's promises rest on -----------------------------------------------------

    async def append_signals(self, rows: Sequence[SignalRecord]) -> list[str]:
        """Append signals; once committed, returns the ids skipped because that device stored them before.

        A (device, signal id) is stored at most once, however long ago it was first sent.
        """
        ...

    async def append_batch(self, batch: JournalBatch) -> list[str]:
        """Append one batch of one device and session as one journal row (journal.py); once committed (the
        dedupe check and the insert are one trip to the writer, one transaction), returns the ids skipped
        because that device stored them before, however long ago.
        """
        ...

    async def append_journal(self, batches: Sequence[JournalBatch]) -> list[str]:
        """`append_batch` for several batches (of any devices), in order, in one transaction: the group
        commit's form (core/ingest.py), which hands on the columns an ingested batch came as."""
        ...

    async def commit_offer(self, work: OfferCommit) -> OfferResult:
        """Commit an evaluation's signals, cue statuses, cues, decisions and milestones in one transaction.

        First, under each guarded subject's lock, every `OfferGuard` is checked against the stored cues; a
        cue it refuses is left out (see `OfferResult`). Returns the signal ids skipped as already stored,
        like `append_signals`, and the refusals.
        """
        ...

    async def merge_subject(self, source: str, target: str) -> None:
        """An anonymous device was identified: its cues (caps, cooldowns, decline memory) now count for the
        user. Under both subjects' locks, so a decision for the user on another replica sees all or none."""
        ...

    async def accept_cue(
        self,
        cue_id: str,
        responded_at: float,
        engagement: EngagementRecord,
        button_id: str = "",
        *,
        webhooks: Sequence[WebhookRecord] = (),
        owner: str = "",
        timers: Sequence[TimerRecord] = (),
    ) -> AcceptOutcome:
        """Mark an offered cue accepted and store the engagement it starts, in one transaction, with the
        webhook outbox rows that report them (cue.answered, engagement.queued). ``owner``: the replica that
        routes it (storage/slots.py), stored with it when several replicas share the database. ``timers``:
        the engagement's deadline rows (its fallback), armed in the same transaction.

        Idempotent: for a cue already accepted it returns the engagement stored for it and writes nothing
        (no webhook rows either).
        """
        ...

    # -- single writes ----------------------------------------------------------------------------
    # A `webhooks` argument: outbox rows reporting the change, committed in the same transaction as it
    # (never one without the other).

    async def save_session(self, rec: SessionRecord) -> None: ...

    async def end_session(self, session_id: str, ended_at: float) -> None: ...

    async def save_cue(self, rec: CueRecord) -> None: ...

    async def set_cue_status(
        self,
        cue_id: str,
        status: str,
        responded_at: float,
        button_id: str = "",
        *,
        webhooks: Sequence[WebhookRecord] = (),
        timer: str = "",
    ) -> bool:
        """With ``timer`` (the deadline whose effect this is, e.g. the cue's expiry): only a cue still offered
        changes, and only if the timer had not fired yet; the timer is marked done in the same transaction.
        True when the status (and its webhook rows) were written."""
        ...

    async def save_engagement(
        self, rec: EngagementRecord, *, webhooks: Sequence[WebhookRecord] = (), timer: str = "", settle: str = ""
    ) -> bool:
        """Upsert; with ``timer``, only if that timer had not fired yet, marking it done in the same
        transaction (timers as rows, below). ``settle``: a timer this change makes moot (an engagement's
        fallback once an associate has it), marked done with it if still armed. True when written."""
        ...

    async def save_chat(self, rec: ChatRecord) -> None: ...

    async def save_channel_change(self, rec: ChannelChangeRecord) -> None: ...

    async def save_transfer(self, rec: TransferRecord, *, webhooks: Sequence[WebhookRecord] = ()) -> None: ...

    async def save_participation(self, rec: ParticipationRecord) -> None:
        """Insert on joining; the same (engagement, associate, role, joined_at) again completes it on leaving."""

    async def transfers_for(self, engagement_id: str) -> list[TransferRecord]: ...

    async def participations_for(self, engagement_id: str) -> list[ParticipationRecord]: ...

    async def save_decision(self, rec: DecisionRecord) -> None: ...

    async def save_milestone(self, rec: MilestoneRecord) -> None: ...

    async def save_feedback(self, rec: FeedbackRecord, *, webhooks: Sequence[WebhookRecord] = ()) -> None:
        """Store a rating; a second answer for the same engagement is ignored, and so are its webhook rows."""
        ...

    async def set_variant_stopped(
        self, scenario_id: str, variant_id: str, stopped: bool, reason: str, at: float
    ) -> None: ...

    # -- operations switches and the webhook outbox -------------------------------------------------

    async def save_switch(self, rec: SwitchRecord) -> None:
        """Set the runtime pause or a scenario's enable/disable; durable once awaited."""
        ...

    async def switches(self) -> list[SwitchRecord]: ...

    # The replicas registry: each replica upserts its own row on every cluster sweep (the heartbeat) and
    # deletes it when it stops cleanly; readers judge liveness from last_seen (core/replicas.py).
    async def save_replica(self, rec: ReplicaRecord) -> None: ...

    async def replicas(self) -> list[ReplicaRecord]:
        """Every registered replica, alive or not, oldest first."""
        ...

    async def forget_replica(self, replica_id: str) -> None: ...

    async def forget_replicas_seen_before(self, before: float) -> None: ...

    async def enqueue_webhooks(self, rows: Sequence[WebhookRecord]) -> None:
        """Add deliveries to the outbox; durable once awaited; idempotent by delivery id."""
        ...

    async def due_webhooks(self, now: float, *, limit: int = 100) -> list[WebhookRecord]: ...

    async def next_webhook_due(self) -> float | None: ...

    async def webhook_attempted(
        self, delivery_id: str, *, delivered: bool, attempts: int, next_attempt_at: float, error: str, dead: bool
    ) -> None: ...

    async def dead_webhooks(self, *, limit: int = 100) -> list[WebhookRecord]: ...

    async def redeliver_webhook(self, delivery_id: str, now: float) -> bool: ...

    # -- timers as rows (storage/timer_rows.py; claimed by core/timer_claims.py) ------------------------

    async def arm_timers(self, rows: Sequence[TimerRecord]) -> None:
        """Store deadlines, or move armed ones / hand them to another owner; a timer done stays done."""
        ...

    async def claim_timers(
        self, holder: str, now: float, *, hold: float, own_after: float, limit: int = 100
    ) -> list[TimerRecord]:
        """Due armed timers whose owner is gone (its replicas registry row not written within `hold` seconds,
        the replica ttl), or `holder`'s own ones more than `own_after` seconds overdue, that no other claim
        holds: claimed by `holder` for `hold` seconds.
        PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so replicas claiming at once get different rows. A claim is
        not the firing: the effect's transaction (``timer=`` above, or finish_timer) fires it once."""
        ...

    async def finish_timer(self, timer_id: str, at: float) -> bool:
        """Mark a timer done without an effect (the effect was moot); True if this call did."""
        ...

    async def finish_due(self, timer_id: str, due_at: float, at: float) -> bool:
        """Mark a timer done for the due time `due_at` only (a row moved since, e.g. an offer made to the next
        associate, is another firing's); True if this call did (a row never stored counts as armed)."""
        ...

    async def get_timer(self, timer_id: str) -> TimerRecord | None:
        """One timer row as committed (an adopted engagement's offer still standing), None if none."""
        ...

    async def timers(self) -> list[TimerRecord]: ...

    async def purge_timers(self, due_before: float) -> None:
        """Drop timers that fell due before then, fired or moot (timer_rows.py: why that is safe)."""
        ...

    # -- the delivery outbox (storage/delivery_rows.py; core/delivery.py) ----------------------------

    async def enqueue_delivery(
        self, recipient: str, body: bytes, now: float, *, engagement_id: str = "", device_id: str = ""
    ) -> int:
        """Store a message for the stream `recipient` names; durable once awaited. Returns its row id."""
        ...

    async def claim_deliveries(self, recipient: str, *, limit: int = 500) -> list[tuple[int, bytes]]:
        """Take (delete) `recipient`'s oldest rows and return them (id, body) in id order. PostgreSQL: rows
        another claim holds are skipped, so a row goes to one claimer only."""
        ...

    async def delivery_recipients(self) -> list[str]:
        """The recipients that have rows waiting."""
        ...

    async def expire_deliveries(self, before: float) -> int:
        """Drop rows stored before `before` (their recipient is held nowhere); how many."""
        ...

    # -- reads ------------------------------------------------------------------------------------

    async def journey(self, device_id: str, *, limit: int = 100, since: float | None = None) -> list[SignalRecord]: ...

    async def journey_for_user(self, user_id: str, *, limit: int = 100) -> list[SignalRecord]: ...

    async def count_signals(self, device_id: str) -> int: ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def latest_session(self, device_id: str) -> SessionRecord | None:
        """The device's most recently started session (None for a device never seen)."""
        ...

    async def get_cue(self, cue_id: str) -> CueRecord | None: ...

    async def cues_for_subject(
        self, subject: str, *, since: float | None = None, scenario_id: str | None = None
    ) -> list[CueRecord]: ...

    async def cues_for_session(self, session_id: str) -> list[CueRecord]: ...

    async def decisions_for_device(
        self, device_id: str, *, limit: int = 100, since: float | None = None
    ) -> list[DecisionRecord]: ...

    async def get_engagement(self, engagement_id: str) -> EngagementRecord | None: ...

    async def engagement_for_cue(self, cue_id: str) -> EngagementRecord | None: ...

    async def engagements_for_subject(self, subject: str, *, limit: int = 20) -> list[EngagementRecord]: ...

    async def engagements_for_device(self, device_id: str) -> list[EngagementRecord]: ...

    async def chat_transcript(self, engagement_id: str) -> list[ChatRecord]: ...

    async def get_feedback(self, engagement_id: str) -> FeedbackRecord | None: ...

    async def stopped_variants(self) -> set[tuple[str, str]]: ...

    async def channel_changes(self, engagement_id: str) -> list[ChannelChangeRecord]: ...

    async def funnel_counts(self, cut: FunnelSlice) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """The funnel's aggregate queries (decisions, cues, sessions, variants), as (kind, rows)."""
        ...

    # -- recovery after a restart -----------------------------------------------------------------

    async def open_cue(self, device_id: str) -> CueRecord | None: ...

    async def open_engagements(self) -> list[EngagementRecord]: ...

    async def recent_handle_times(self, per_queue: int) -> list[tuple[str, float]]:
        """(queue, seconds from assignment to end) of each queue's last `per_queue` finished engagements that
        an associate took, oldest first: the history the wait estimate starts from after a restart."""
        ...

    async def repair_unfinished_accepts(self, now: float) -> tuple[int, int]:
        """Accepted cues without an engagement, left by versions whose accept and engagement were two commits.

        A cue still within its ttl is offered again (the device's answer is taken again, this time with its
        engagement); one past it becomes ``lost``, so it neither counts as accepted nor blocks the session.
        Returns (offered again, lost); a second call finds nothing.
        """
        ...

    async def recent_signal_ids(self, device_id: str, *, limit: int) -> list[str]: ...

    # -- routing across replicas (storage/slots.py) ------------------------------------------------------

    async def reserve_slot(self, claim: SlotClaim, now: float) -> SlotResult:
        """In one transaction: lock the candidates' rows one by one in longest-idle order (skipping those
        another transaction holds) and give `claim.key` a slot of the first one it `fits`; idempotent by key."""
        ...

    async def hold_slot(self, key: str, associate_id: str, channel: str, queue: str, replica: str, now: float) -> None:
        """Record a slot taken without a reservation (a transfer to a named associate, a conference)."""
        ...

    async def join_holding(self, rec: ParticipationRecord, channel: str, queue: str, replica: str) -> None:
        """Store a conference or consult joining (`save_participation`) and the slot it takes of the associate
        (`hold_slot`, key: the engagement id) in one transaction."""
        ...

    async def release_slot(self, key: str, associate_id: str, now: float) -> None:
        """Free a slot; an associate left holding nothing is idle since `now`."""
        ...

    async def prune_slots(self, replica: str, keep: Collection[tuple[str, str]], now: float) -> list[str]:
        """Free `replica`'s slots other than `keep` ((key, associate id)); the associates who got room."""
        ...

    async def adopt_engagements(self, replica: str, alive_since: float, now: float) -> tuple[list[str], list[str]]:
        """Take over the open engagements of replicas gone (no registry row written since `alive_since`, or
        none named; claimed before `alive_since`) and free the slots the gone ones held: (engagement ids
        adopted, oldest first; associates who got room). Two replicas adopting at once never take the same
        engagement. Owner rows of engagements no longer open are pruned in the same transaction."""
        ...

    async def take_over(self, engagement_id: str, replica: str, now: float) -> None:
        """`replica` routes `engagement_id` from now on (its owner is gone and it fired its callback)."""
        ...

    async def hand_over(self, record: EngagementRecord, from_replica: str, to_replica: str, now: float) -> bool:
        """Move an open engagement from `from_replica` (only while it still owns it) to `to_replica`: its row as
        saved now, its owner, its slots and its armed timer rows, in one transaction (storage/slots.py)."""
        ...

    async def owner_of(self, engagement_id: str) -> str: ...

    async def slot_holds(self) -> list[tuple[str, str, str]]: ...

    # -- privacy ----------------------------------------------------------------------------------

    async def forget_session_journey(self, session_id: str) -> None: ...

    async def forget_unconsented(self, *, ended_before: float) -> None: ...

    async def purge_journey(self, older_than: float) -> int: ...

    async def export_user(self, user_id: str) -> dict[str, list[dict[str, Any]]]: ...

    async def erase_user(self, user_id: str) -> dict[str, int]:
        """The user's rows, and the anonymous sessions (pre-sign-in history) of the devices they used."""
        ...

    async def checkpoint(self) -> bool:
        """Make erased data unreadable in any write-ahead log (SQLite: the WAL truncated)."""
        ...

    # -- device credentials (core/device_credentials.py) ------------------------------------------

    async def device_credential(self, device_id: str) -> DeviceCredentialRecord | None: ...

    async def issue_device_credential(self, rec: DeviceCredentialRecord) -> bool:
        """Store ``rec`` unless the device already has a credential; True if ``rec`` is the one stored."""
        ...

    async def confirm_device_credential(self, device_id: str, at: float) -> None: ...

    async def forget_device_credential(self, device_id: str) -> bool: ...

    # -- predictive scores (storage/predict_state.py; predict/trainer.py) ------------------------------

    async def save_label(
        self,
        outcome: str,
        session_id: str,
        reached: bool,
        examples: Sequence[tuple[Mapping[str, float], float]],
        time: float,
    ) -> None:
        """Append a labelled session (any process may); learned later by the lease holder."""
        ...

    async def labels_after(self, cursor: int, *, limit: int = 500) -> list[LabelRecord]: ...

    async def prune_labels(self, up_to: int) -> None: ...

    async def save_model(self, record: ModelRecord) -> None:
        """Save a model state unless a newer version, or one saved under a later lease epoch, is stored."""
        ...

    async def models(self) -> list[ModelRecord]: ...

    async def take_lease(self, name: str, holder: str, now: float, ttl: float) -> int | None:
        """Take or renew a lease; its epoch when ``holder`` holds it now, else None."""
        ...

    async def release_lease(self, name: str, holder: str) -> None: ...

    async def subject_history(self, user_id: str, device_id: str, before: float) -> tuple[int, dict[str, int]]:
        """Earlier sessions of a user (else device), and in how many of them each milestone was reached."""
        ...

    # -- the admin audit trail (append-only) ------------------------------------------------------------

    async def append_audit(self, rec: AuditRecord) -> None:
        """Append one entry; returns once it is committed."""
        ...

    async def audit_entries(
        self, *, since: float | None = None, actor: str = "", action: str = "", limit: int = 100
    ) -> list[AuditRecord]:
        """The newest `limit` entries matching, newest first."""
        ...
