"""The scenario file format, as typed models.

One model per idea an admin writes. Validation messages are phrased for the
admin who wrote the file; the loader adds file, line and field. The JSON
Schema editors use (scenarios/scenario.schema.json) is generated from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .durations import format_duration, parse_duration
from .regex import compile_search
from .versions import parse_version

__all__ = [
    "AbsenceSpec",
    "AggregateSpec",
    "AllCondition",
    "AnyCondition",
    "AttributeCondition",
    "ButtonAction",
    "ButtonSpec",
    "CapsSpec",
    "ChannelName",
    "Comparison",
    "Condition",
    "CountSpec",
    "CueSpec",
    "DwellCondition",
    "EventCondition",
    "FeedbackSpec",
    "IdleCondition",
    "ImageSpec",
    "LayoutName",
    "LocaleSpec",
    "MilestoneCondition",
    "MilestoneSpec",
    "NotCondition",
    "OutcomeSpec",
    "PolicySpec",
    "RateSpec",
    "Scalar",
    "ScenarioFile",
    "ScenarioSpec",
    "ScheduleSpec",
    "ScoreCondition",
    "SegmentCondition",
    "SegmentSpec",
    "StreakSpec",
    "VariantSpec",
    "WhenAwaySpec",
    "children",
    "walk",
]

Scalar = str | int | float | bool

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: 30s, 10m, 1h30m, 2d, 500ms, or seconds as a number.",
        }
    ),
]


def parse_share(value: object) -> float:
    """A share of subjects: '10%' or a fraction 0.1, between 0 and 1."""
    if isinstance(value, bool):
        raise ValueError("expected a share such as 10% or 0.1")
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*%\s*", value):
        share = float(value.strip().rstrip("%")) / 100
    elif isinstance(value, int | float):
        share = float(value)
    else:
        raise ValueError(f"{value!r} is not a share; write e.g. 10% or 0.1")
    if not 0 <= share <= 1:
        raise ValueError("a share must be between 0% and 100% (a fraction between 0 and 1)")
    return share


Share = Annotated[
    float,
    BeforeValidator(parse_share),
    PlainSerializer(lambda share: f"{share * 100:g}%", return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)?%$"},
                {"type": "number", "minimum": 0, "maximum": 1},
            ],
            "description": "A share of users: 10% or a fraction such as 0.1.",
        }
    ),
]

# Ids of scenarios, queues, skills, segments and milestones: the names people already use (Sales_Closers_Tier2).
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# App ids are matched against the SDK's Hello, which allows lowercase only.
_APP_ID = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_EVENT = r"^[a-z][a-z0-9_.:-]{0,63}$"
# Context keys the SDK sends; custom ones live under attributes.* and user.*.
_ATTRIBUTE = (
    r"^(app\.(id|version)|device\.(os|os_version|model|locale|timezone)|location\.(country|region|city)"
    r"|user\.[A-Za-z0-9_.-]{1,64}|attributes\.[A-Za-z0-9_.-]{1,64}|consent)$"
)

_ATTRIBUTE_RE = re.compile(_ATTRIBUTE)

# What each pattern means, for error messages in words rather than regular expressions.
PATTERN_WORDS = {
    _ID: "is not a valid id; use up to 64 letters, digits, '_', '-' or '.', starting with a letter or digit",
    _APP_ID: "is not a valid app id; use up to 64 lowercase letters, digits, '_', '-' or '.', "
    "starting with a letter or digit (as the SDK sends it)",
    _EVENT: "is not a valid event name; use up to 64 lowercase letters, digits, '_', '.', ':' or '-', "
    "starting with a letter",
    r"^[A-Za-z0-9_.-]{1,64}$": "is not a valid property name; use up to 64 letters, digits, '_', '-' or '.'",
}


class _Strict(BaseModel):
    # Unknown keys are typos an admin wants to hear about, not ignore.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ChannelName(StrEnum):
    audio = "audio"
    screen_share = "screen_share"
    chat = "chat"
    video = "video"


class Comparison(_Strict):
    """Operators on one value. Several operators in one block must all hold."""

    equals: Scalar | None = None
    not_equals: Scalar | None = None
    in_: list[Scalar] | None = Field(default=None, alias="in", min_length=1)
    not_in: list[Scalar] | None = Field(default=None, min_length=1)
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None
    version_eq: str | None = None
    version_lt: str | None = None
    version_lte: str | None = None
    version_gt: str | None = None
    version_gte: str | None = None
    matches: str | None = Field(
        default=None, description="A regular expression in RE2 syntax (linear time), searched anywhere."
    )
    exists: bool | None = None

    @field_validator("version_eq", "version_lt", "version_lte", "version_gt", "version_gte")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None:
            parse_version(value)
        return value

    @field_validator("matches")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            compile_search(value)  # a RegexError (a ValueError) names what RE2 cannot run
        return value

    @model_validator(mode="after")
    def _needs_operator(self) -> Comparison:
        if not self.operators():
            raise ValueError(
                "needs at least one operator: equals, not_equals, in, not_in, gt, gte, lt, lte, "
                "version_eq, version_lt, version_lte, version_gt, version_gte, matches, exists"
            )
        return self

    def operators(self) -> dict[str, Any]:
        return {
            name: value for name, value in ((n, getattr(self, n)) for n in type(self).model_fields) if value is not None
        }


class AttributeCondition(Comparison):
    """A fact about the device, app or user: `attribute: user.tier` plus operators."""

    attribute: str = Field(
        json_schema_extra={"pattern": _ATTRIBUTE},
        description="app.version, device.os, device.model, location.country, user.tier, attributes.<key>…",
    )

    @field_validator("attribute")
    @classmethod
    def _known(cls, value: str) -> str:
        if not _ATTRIBUTE_RE.match(value):
            raise ValueError(
                f"unknown attribute {value!r}; use app.id, app.version, device.os, device.os_version, "
                "device.model, device.locale, device.timezone, location.country, location.region, "
                "location.city, consent, user.<name> or attributes.<name>"
            )
        return value

    def operators(self) -> dict[str, Any]:
        ops = super().operators()
        ops.pop("attribute", None)
        return ops


class CountSpec(_Strict):
    at_least: int = Field(default=1, ge=1)
    at_most: int | None = Field(default=None, ge=0)
    within: Duration = Field(description="The sliding window the occurrences must fall in.")

    @model_validator(mode="after")
    def _range(self) -> CountSpec:
        if self.at_most is not None and self.at_most < self.at_least:
            raise ValueError("at_most must not be smaller than at_least")
        if self.within <= 0:
            raise ValueError("within must be longer than zero")
        return self


class RateSpec(_Strict):
    """Occurrences per `per` (default a minute), averaged over the window `within`."""

    at_least: float | None = Field(default=None, ge=0)
    at_most: float | None = Field(default=None, ge=0)
    per: Duration = 60.0
    within: Duration

    @model_validator(mode="after")
    def _bounds(self) -> RateSpec:
        if self.at_least is None and self.at_most is None:
            raise ValueError("give at_least or at_most")
        if self.within <= 0 or self.per <= 0:
            raise ValueError("within and per must be longer than zero")
        return self


class StreakSpec(_Strict):
    """N occurrences in a row, with none of the `broken_by` events in between."""

    at_least: int = Field(ge=1)
    broken_by: list[Annotated[str, Field(pattern=_EVENT)]] = Field(min_length=1)
    within: Duration | None = None

    @field_validator("broken_by", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class AggregateSpec(Comparison):
    """An aggregate of a numeric property over the window, compared with the operators."""

    fn: Literal["avg", "max", "min", "sum"]
    property: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    within: Duration

    def operators(self) -> dict[str, Any]:
        ops = super().operators()
        for name in ("fn", "property", "within"):
            ops.pop(name, None)
        return ops


class AbsenceSpec(_Strict):
    """Not followed by `event` within `within` (fires from a server timer)."""

    event: list[Annotated[str, Field(pattern=_EVENT)]] = Field(min_length=1)
    within: Duration

    @field_validator("event", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class EventCondition(_Strict):
    """Something the app reported: `event: sync_failed`.

    Without a measure, the most recent occurrence must match `where` (e.g. the
    last sync took over 30 s). At most one measure may be given: `count`
    (occurrences in a sliding window), `rate`, `streak` (in a row, not broken
    by another event), `aggregate` (avg/max/min/sum of a property over a
    window) or `not_followed_by` (absence: fires from a timer once `within`
    has passed after the event without the follow-up).
    """

    event: str = Field(pattern=_EVENT)
    where: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], Comparison] | None = Field(
        default=None, description="Conditions on the event's properties, by property name."
    )
    count: CountSpec | None = None
    rate: RateSpec | None = None
    streak: StreakSpec | None = None
    aggregate: AggregateSpec | None = None
    not_followed_by: AbsenceSpec | None = None
    within: Duration | None = Field(
        default=None, description="Without a measure: the last occurrence must be this recent."
    )

    @model_validator(mode="after")
    def _one_measure(self) -> EventCondition:
        given = [n for n in ("count", "rate", "streak", "aggregate", "not_followed_by") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give at most one of count, rate, streak, aggregate, not_followed_by (got {given})")
        if given and self.within is not None:
            raise ValueError(f"give `within` inside `{given[0]}`, not beside it")
        return self


class IdleCondition(_Strict):
    """No signal at all from the device for this long (fires from a server timer)."""

    idle: Duration

    @field_validator("idle")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("idle must be longer than zero")
        return value


class DwellSpec(_Strict):
    screen: str = Field(min_length=1, max_length=200)
    at_least: Duration


class DwellCondition(_Strict):
    """Still on a screen after a while: the last `screen_viewed` event's `screen` property."""

    dwell: DwellSpec


class MilestoneCondition(_Strict):
    """A named milestone (defined under `milestones:`) was reached in this session."""

    milestone: str = Field(pattern=_ID)


class SegmentCondition(_Strict):
    """The device is in a named segment (defined under `segments:`)."""

    segment: str = Field(pattern=_ID)


class ScoreCondition(_Strict):
    """A predicted outcome probability (an outcome declared under `outcomes:`) passes the bounds."""

    score: str = Field(pattern=_ID, description="The id of an outcome declared with score: true or shadow.")
    gt: float | None = Field(default=None, ge=0, le=1)
    gte: float | None = Field(default=None, ge=0, le=1)
    lt: float | None = Field(default=None, ge=0, le=1)
    lte: float | None = Field(default=None, ge=0, le=1)
    trained: bool = Field(
        default=False,
        description="Hold only once the outcome's model is trained (not while it scores the base rate).",
    )

    @model_validator(mode="after")
    def _needs_bound(self) -> ScoreCondition:
        if not self.bounds():
            raise ValueError("needs at least one bound: gt, gte, lt or lte (a probability between 0 and 1)")
        return self

    def bounds(self) -> dict[str, float]:
        return {n: v for n in ("gt", "gte", "lt", "lte") if (v := getattr(self, n)) is not None}


class AllCondition(_Strict):
    all: list[Condition] = Field(min_length=1, description="Every condition must hold. Must not be empty.")


class AnyCondition(_Strict):
    any: list[Condition] = Field(min_length=1, description="At least one must hold. Must not be empty.")


class NotCondition(_Strict):
    not_: Condition = Field(alias="not")


CONDITION_KINDS = ("all", "any", "not", "attribute", "event", "idle", "dwell", "milestone", "segment", "score")


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    if not isinstance(value, dict):
        return None
    for key in CONDITION_KINDS:
        if key in value:
            return key
    return None


Condition = Annotated[
    Annotated[AllCondition, Tag("all")]
    | Annotated[AnyCondition, Tag("any")]
    | Annotated[NotCondition, Tag("not")]
    | Annotated[AttributeCondition, Tag("attribute")]
    | Annotated[EventCondition, Tag("event")]
    | Annotated[IdleCondition, Tag("idle")]
    | Annotated[DwellCondition, Tag("dwell")]
    | Annotated[MilestoneCondition, Tag("milestone")]
    | Annotated[SegmentCondition, Tag("segment")]
    | Annotated[ScoreCondition, Tag("score")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition_kind",
        custom_error_message="a condition needs one of the keys all, any, not, attribute, event, idle, dwell, "
        "milestone, segment or score",
    ),
]

AllCondition.model_rebuild()
AnyCondition.model_rebuild()
NotCondition.model_rebuild()


class LayoutName(StrEnum):
    """How the app should present the cue (a hint: the app decides)."""

    banner = "banner"
    modal = "modal"
    bubble = "bubble"


class ButtonAction(StrEnum):
    accept = "accept"
    decline = "decline"
    dismiss = "dismiss"
    open_url = "open_url"


# A deep link (fitkit://sync/help) or a web address: any scheme, no spaces.
_URL = r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$"
_LOCALE = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


class ImageSpec(_Strict):
    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2000, description="An http(s) image address.")
    alt: str = Field(min_length=1, max_length=200, description="Alternative text, read out by screen readers.")


class ButtonSpec(_Strict):
    """One of up to three buttons; the answer records which one was pressed."""

    id: str = Field(pattern=_ID, description="Reported back when pressed, e.g. `call`.")
    label: str = Field(min_length=1, max_length=40)
    action: ButtonAction = Field(description="accept (on `channel`), decline, dismiss or open_url (`url`).")
    channel: ChannelName | None = Field(
        default=None, description="accept only: the channel to engage on; default the cue's channel."
    )
    url: str | None = Field(
        default=None, pattern=_URL, max_length=2000, description="open_url only: a deep link or web address."
    )

    @model_validator(mode="after")
    def _action_fields(self) -> ButtonSpec:
        if self.channel is not None and self.action is not ButtonAction.accept:
            raise ValueError("`channel` is only for an accept button")
        if (self.url is not None) != (self.action is ButtonAction.open_url):
            raise ValueError("an open_url button needs `url`, and only it may have one")
        return self


class LocaleSpec(_Strict):
    """Texts for one locale; what is left out falls back to the default text."""

    title: str | None = Field(default=None, max_length=100)
    message: str | None = Field(default=None, min_length=1, max_length=500)
    buttons: dict[Annotated[str, Field(pattern=_ID)], Annotated[str, Field(min_length=1, max_length=40)]] = Field(
        default_factory=dict, description="Button id -> label."
    )
    image_alt: str | None = Field(default=None, min_length=1, max_length=200)


class FeedbackSpec(_Strict):
    """Ask the user for a rating when the engagement ends."""

    kind: Literal["csat", "nps"] = Field(description="csat: 1 to 5; nps: 0 to 10 (would you recommend us?).")
    question: str = Field(default="", max_length=200, description="Shown to the user; a default fits the kind.")
    comment: bool = Field(default=True, description="Whether the user may add a comment.")


class WhenAwaySpec(_Strict):
    """What to do with a cue the device cannot be shown because it is not connected."""

    fallback: Literal["webhook"] = Field(
        description="webhook: post cue.pending_push (through the webhook outbox) so the app's push service can "
        "bring the user back; the cue waits for the device until its ttl ends."
    )
    ttl: Duration | None = Field(
        default=None,
        description="How long a cue offered while the device is away waits for it to return (default: the cue's "
        "ttl). Expired and recorded after that, never shown.",
    )

    @model_validator(mode="after")
    def _ttl(self) -> WhenAwaySpec:
        if self.ttl is not None and not 0 < self.ttl <= 7 * 86400:
            raise ValueError("ttl must be longer than zero and at most 7d")
        return self


class CueSpec(_Strict):
    message: str = Field(
        min_length=1,
        max_length=500,
        description="Shown to the user. {{ key }} inserts a context value, e.g. {{ user.first_name }}; "
        '{{ key | default("there") }} gives a fallback.',
    )
    title: str = Field(default="", max_length=100)
    channel: ChannelName
    upgrades: list[ChannelName] = Field(default_factory=list, description="Channels it may upgrade to.")
    ttl: Duration = Field(default=60.0, description="How long the offer stays up before it expires.")
    queue: str = Field(default="default", pattern=_ID, description="Associate queue for the engagement.")
    priority: int = Field(
        default=0, ge=-1000, le=1000, description="Engagement priority in its queue; higher is served first."
    )
    skills: list[Annotated[str, Field(pattern=_ID)]] = Field(
        default_factory=list, description="Skills the associate must have."
    )
    image: ImageSpec | None = None
    buttons: list[ButtonSpec] = Field(default_factory=list, max_length=3, description="At most three buttons.")
    layout: LayoutName | None = Field(default=None, description="A presentation hint: banner, modal or bubble.")
    locales: dict[Annotated[str, Field(pattern=_LOCALE)], LocaleSpec] = Field(
        default_factory=dict,
        description="Texts per locale (pt-BR, pt, de...), chosen from device.locale: pt-BR, then pt, then the "
        "default. Placeholders must be the default text's.",
    )
    feedback: FeedbackSpec | None = Field(default=None, description="Ask for a rating when the engagement ends.")
    when_away: WhenAwaySpec | None = Field(
        default=None,
        description="A fallback for when the device is not connected: the scenario fires from a timer while it is "
        "away, or it drops before the cue reaches it.",
    )

    @model_validator(mode="after")
    def _upgrades(self) -> CueSpec:
        if self.channel in self.upgrades:
            raise ValueError(f"upgrades must not repeat the initial channel {self.channel.value!r}")
        if self.ttl <= 0:
            raise ValueError("ttl must be longer than zero")
        ids = [b.id for b in self.buttons]
        if len(set(ids)) != len(ids):
            raise ValueError("button ids must be unique")
        return self


# Cue fields a variant may replace; the rest (ttl, queue, priority, skills, feedback) is the scenario's.
VARIANT_FIELDS = ("message", "title", "channel", "upgrades", "image", "buttons", "layout", "locales")


class VariantSpec(_Strict):
    """An A/B variant: replaces some of the cue's content. The first variant listed is the control."""

    id: str = Field(pattern=_ID, description="Recorded on every cue it shows and in the funnel.")
    weight: float = Field(default=1.0, gt=0, le=1_000_000, description="Relative share of users.")
    message: str | None = Field(default=None, min_length=1, max_length=500)
    title: str | None = Field(default=None, max_length=100)
    channel: ChannelName | None = None
    upgrades: list[ChannelName] | None = None
    image: ImageSpec | None = None
    buttons: list[ButtonSpec] | None = Field(default=None, max_length=3)
    layout: LayoutName | None = None
    locales: dict[Annotated[str, Field(pattern=_LOCALE)], LocaleSpec] | None = None


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_CLOCK = r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$"


def _every_day() -> list[Weekday]:
    return ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class HoursSpec(_Strict):
    days: list[Weekday] = Field(default_factory=_every_day, min_length=1)
    from_: str = Field(alias="from", pattern=_CLOCK, description="Local time HH:MM.")
    to: str = Field(pattern=_CLOCK, description="Local time HH:MM; before `from` spans midnight.")


class ScheduleSpec(_Strict):
    """When offers may be made. Outside it, a qualifying scenario is blocked with reason `schedule`."""

    timezone: str = Field(
        default="UTC", description="An IANA zone, or `user` for the device's own zone (device.timezone)."
    )
    hours: list[HoursSpec] = Field(default_factory=list, description="Open windows; empty means all day.")
    start: datetime | None = Field(default=None, description="Not before this instant (ISO 8601).")
    end: datetime | None = Field(default=None, description="Not after this instant (ISO 8601).")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value != "user":
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}; use an IANA name such as Europe/Paris") from None
        return value

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _order(self) -> ScheduleSpec:
        if self.start and self.end and self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class CapsSpec(_Strict):
    """Most offers per session and per rolling 24 hours."""

    per_session: int | None = Field(default=None, ge=0)
    per_day: int | None = Field(default=None, ge=0)


DeclineMemory = Annotated[
    float | Literal["never", "session"],
    BeforeValidator(lambda v: v if v in ("never", "session") else parse_duration(v)),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": ["never", "session"]},
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"},
                {"type": "number", "minimum": 0},
            ]
        }
    ),
]


class ScenarioSpec(_Strict):
    """One engagement scenario: who (target), when (trigger), what (cue)."""

    id: str = Field(pattern=_ID, description="Unique across all loaded files.")
    name: str = Field(default="", max_length=200)
    description: str = ""
    enabled: bool = True
    priority: int = Field(
        default=0,
        ge=-1_000_000,
        le=1_000_000,
        description="When several scenarios qualify at once, the highest fires; ties go to the "
        "scenario id that sorts first.",
    )
    apps: list[Annotated[str, Field(pattern=_APP_ID)]] = Field(
        default_factory=list, description="App ids this applies to; empty means every app."
    )
    target: Condition | None = Field(default=None, description="Who: conditions on the context.")
    trigger: Condition = Field(description="When: conditions evaluated as signals arrive and timers fire.")
    cue: CueSpec
    cooldown: Duration = Field(
        default=0.0, description="After an offer, do not offer this scenario to the same user for this long."
    )
    caps: CapsSpec | None = None
    after_decline: DeclineMemory = Field(
        default="session",
        description="After the user declines: not again this session (default), for a duration, or never.",
    )
    schedule: ScheduleSpec | None = None
    engagement_outcome: OutcomeCheckSpec | None = Field(
        default=None, description="How to judge an engagement's outcome, e.g. sync_succeeded within 10m."
    )
    outcome: str | None = Field(
        default=None,
        pattern=_ID,
        description="A milestone that means success: once reached, the scenario is no longer offered "
        "this session and a pending cue is withdrawn.",
    )
    holdout: Share = Field(
        default=0.0,
        description="A control group: this share of users (a stable hash of user and scenario) qualifies but is "
        "never offered (blocked: holdout), so reports can compare its conversion with the treated group's.",
    )
    variants: list[VariantSpec] = Field(
        default_factory=list,
        description="A/B variants of the cue, at least two; the first is the control. Each user (a stable hash "
        "of user and scenario) sees one, in proportion to the weights.",
    )

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: list[VariantSpec]) -> list[VariantSpec]:
        if len(value) == 1:
            raise ValueError("give at least two variants (the first is the control), or none")
        ids = [v.id for v in value]
        if len(set(ids)) != len(ids):
            raise ValueError("variant ids must be unique")
        return value

    @field_validator("trigger")
    @classmethod
    def _trigger_has_driver(cls, value: Condition) -> Condition:
        if not any(isinstance(c, _DRIVERS) for c in walk(value)):
            raise ValueError(
                "a trigger must mention an event, idle, dwell, milestone, segment or score, so it knows when to "
                "evaluate"
            )
        return value


class OutcomeCheckSpec(_Strict):
    """After an engagement ends: did this event follow within the window? Stored as its outcome."""

    event: str = Field(pattern=_EVENT)
    where: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], Comparison] | None = None
    within: Duration


FallbackName = Literal["callback", "chat", "cancel"]


def _all_fallbacks() -> list[FallbackName]:
    return ["callback", "chat", "cancel"]


class BotChoice(_Strict):
    """An answer the bot offers: the user types its number or its label."""

    label: str = Field(min_length=1, max_length=100)
    reply: str = Field(default="", max_length=1000, description="What the bot answers when chosen.")
    handover: bool = Field(default=False, description="Choosing it hands the user over to a person.")


class BotSpec(_Strict):
    """A built-in bot serving a queue: a scripted chat, with a hand-over to a human queue."""

    name: str = Field(default="Assistant", min_length=1, max_length=100)
    greeting: str = Field(min_length=1, max_length=1000)
    choices: list[BotChoice] = Field(default_factory=list, max_length=20)
    handover_queue: str = Field(pattern=_ID, description="The human queue a hand-over goes to.")
    handover_keywords: list[Annotated[str, Field(min_length=1, max_length=50)]] = Field(
        default_factory=lambda: ["agent", "human", "person"],
        description="A user message containing one of these words (any case) asks for a person.",
    )
    handover_message: str = Field(default="Connecting you with a person.", min_length=1, max_length=1000)
    fallback: str = Field(
        default="Sorry, I did not understand. Type a number, or 'agent' to talk to a person.",
        min_length=1,
        max_length=1000,
    )


class WrapUpOutcomeSpec(_Strict):
    """An outcome the associate records at wrap-up; `success` ones count as the funnel's outcome step."""

    id: str = Field(pattern=_ID)
    label: str = Field(default="", max_length=100, description="Shown on the desk; the id when empty.")
    success: bool = Field(default=False, description="Counts as the engagement achieving its outcome.")


def default_wrap_up_outcomes() -> list[WrapUpOutcomeSpec]:
    """A queue that lists none offers these three."""
    return [
        WrapUpOutcomeSpec(id="resolved", label="Resolved", success=True),
        WrapUpOutcomeSpec(id="converted", label="Converted", success=True),
        WrapUpOutcomeSpec(id="not_resolved", label="Not resolved", success=False),
    ]


class QueueSpec(_Strict):
    id: str = Field(pattern=_ID)
    bot: BotSpec | None = Field(
        default=None, description="Served by this built-in bot: no associate needs to be signed in."
    )
    fallback_after: Duration | None = Field(
        default=None, description="If nobody takes the engagement this long, offer the user the fallbacks."
    )
    fallback: list[FallbackName] = Field(default_factory=_all_fallbacks, min_length=1)
    offer_timeout: Duration = Field(
        default=30.0, description="An offer to a manual-claim associate lapses after this and moves on."
    )
    feedback: FeedbackSpec | None = Field(
        default=None, description="Ask for a rating when an engagement of this queue ends (unless its cue asks)."
    )
    dispositions: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        description="Wrap-up codes associates of this queue choose from; empty: any code is accepted.",
    )
    canned_replies: list[Annotated[str, Field(min_length=1, max_length=4000)]] = Field(
        default_factory=list, description="Ready-made chat lines the associate desk offers for this queue."
    )
    channel_capacity: dict[ChannelName, Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=dict,
        description="Per channel, the most engagements an associate holds while handling one of this queue on "
        "that channel (chat: 3, audio: 1 = three chats, or one call alone). The tighter of this and the "
        "associate's own limit applies; capacity bounds the total.",
    )
    outcomes: list[WrapUpOutcomeSpec] = Field(
        default_factory=list,
        max_length=20,
        description="Outcomes associates record at wrap-up; empty: resolved and converted (success), not_resolved.",
    )

    @field_validator("outcomes")
    @classmethod
    def _unique_outcomes(cls, value: list[WrapUpOutcomeSpec]) -> list[WrapUpOutcomeSpec]:
        ids = [o.id for o in value]
        if len(set(ids)) != len(ids):
            raise ValueError("outcome ids must be unique")
        return value

    @property
    def wrap_up_outcomes(self) -> list[WrapUpOutcomeSpec]:
        return self.outcomes or default_wrap_up_outcomes()

    @model_validator(mode="after")
    def _handover_elsewhere(self) -> QueueSpec:
        if self.bot is not None and self.bot.handover_queue == self.id:
            raise ValueError("bot.handover_queue must be another queue than the bot's own")
        return self


class RoutingRuleSpec(_Strict):
    """First matching rule wins, when an engagement is created."""

    name: str = Field(
        default="",
        max_length=100,
        description="Shown to the associate under 'why this engagement'; else the rule's place, routing.rules[N].",
    )
    when: Condition
    queue: str | None = Field(default=None, pattern=_ID, description="Route to this queue instead.")
    priority: int = Field(default=0, ge=-1000, le=1000, description="Added to the engagement's priority.")
    skills: list[Annotated[str, Field(pattern=_ID)]] = Field(default_factory=list)
    apps: list[Annotated[str, Field(pattern=_APP_ID)]] = Field(
        default_factory=list, description="Only for engagements of these apps; empty means every app."
    )
    scenarios: list[Annotated[str, Field(pattern=_ID)]] = Field(
        default_factory=list, description="Only for engagements started by these scenarios' cues; empty means all."
    )


class RoutingSpec(_Strict):
    """Queues and routing rules. Rules may use `score` leaves (outcome probabilities computed by the server)."""

    queues: list[QueueSpec] = Field(default_factory=list)
    rules: list[RoutingRuleSpec] = Field(default_factory=list)


class DefinitionSpec(_Strict):
    id: str = Field(pattern=_ID)
    name: str = Field(default="", max_length=200)
    description: str = ""
    when: Condition


class SegmentSpec(DefinitionSpec):
    """A named, reusable set of conditions; referenced with `segment: <id>`."""


class MilestoneSpec(DefinitionSpec):
    """A named step of the journey, reached (once per session) when `when` holds."""

    @field_validator("when")
    @classmethod
    def _has_event(cls, value: Condition) -> Condition:
        if not any(isinstance(c, EventCondition) for c in walk(value)):
            raise ValueError("a milestone must mention an event, so it knows when it is reached")
        return value


class OutcomeSpec(_Strict):
    """An outcome to predict: P(milestone reached within the session | journey so far), learned online."""

    id: str = Field(pattern=_ID)
    milestone: str = Field(pattern=_ID, description="The milestone (under `milestones:`) that means it happened.")
    within: Literal["session"] = Field(default="session", description="The horizon: the rest of the session.")
    score: bool | Literal["shadow"] = Field(
        default=True,
        description="true: scored and usable in conditions; shadow: scored and recorded, but score conditions "
        "on it never hold (a dry run); false: not scored.",
    )
    min_sessions: int = Field(
        default=200,
        ge=1,
        le=1_000_000,
        description="Labelled sessions needed before the model's own score is used; until then the score is "
        "the base rate (Beta prior) and marked training.",
    )


class PolicySpec(_Strict):
    """Rules across all scenarios, per user. At most one policy across the loaded files."""

    min_gap: Duration = Field(default=0.0, description="Least time between any two cues to the same user.")
    caps: CapsSpec | None = Field(default=None, description="Most cues per session / per day, all scenarios.")
    require_capacity: bool = Field(
        default=False,
        description="Offer only when an associate of the cue's queue is available (blocked: no_capacity).",
    )
    offers_paused: bool = Field(default=False, description="Emergency switch: no offers at all while true.")
    after_engagement: Literal["session", "none"] = Field(
        default="session", description="After an engagement, offer nothing more in the same session."
    )


class ScenarioFile(_Strict):
    """A file holds one scenario, a list of them, or any of these sections."""

    scenarios: list[ScenarioSpec] = Field(default_factory=list)
    segments: list[SegmentSpec] = Field(default_factory=list)
    milestones: list[MilestoneSpec] = Field(default_factory=list)
    outcomes: list[OutcomeSpec] = Field(default_factory=list)
    policy: PolicySpec | None = None
    routing: RoutingSpec | None = None


def children(cond: Any) -> list[Any]:
    if isinstance(cond, AllCondition):
        return list(cond.all)
    if isinstance(cond, AnyCondition):
        return list(cond.any)
    if isinstance(cond, NotCondition):
        return [cond.not_]
    return []


def walk(cond: Any) -> Iterator[Any]:
    yield cond
    for child in children(cond):
        yield from walk(child)


_DRIVERS = (EventCondition, IdleCondition, DwellCondition, MilestoneCondition, SegmentCondition, ScoreCondition)
