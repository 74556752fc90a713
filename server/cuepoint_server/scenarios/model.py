"""The scenario file format, as typed models.

One model per idea an admin writes. Validation messages are phrased for the
admin who wrote the file; the loader adds file, line and field. The JSON
Schema editors use (scenarios/scenario.schema.json) is generated from here.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

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
from .versions import parse_version

__all__ = [
    "AllCondition",
    "AnyCondition",
    "AttributeCondition",
    "ChannelName",
    "Comparison",
    "Condition",
    "CountSpec",
    "CueSpec",
    "EventCondition",
    "NotCondition",
    "Scalar",
    "ScenarioSpec",
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

_ID = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_EVENT = r"^[a-z][a-z0-9_.:-]{0,63}$"
# Context keys the SDK sends; custom ones live under attributes.* and user.*.
_ATTRIBUTE = (
    r"^(app\.(id|version)|device\.(os|os_version|model|locale|timezone)|location\.(country|region|city)"
    r"|user\.[A-Za-z0-9_.-]{1,64}|attributes\.[A-Za-z0-9_.-]{1,64}|consent)$"
)

_ATTRIBUTE_RE = re.compile(_ATTRIBUTE)


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
    matches: str | None = Field(default=None, description="A Python regular expression, searched anywhere.")
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
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
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
            name: value
            for name, value in ((n, getattr(self, n)) for n in type(self).model_fields)
            if value is not None
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


class EventCondition(_Strict):
    """Something the app reported: `event: sync_failed`, optionally counted in a window.

    Without `count`, the most recent occurrence of the event must match `where`
    (e.g. the last sync took over 30 s). With `count`, the number of matching
    occurrences inside the sliding window `within` must be in range.
    """

    event: str = Field(pattern=_EVENT)
    where: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], Comparison] | None = Field(
        default=None, description="Conditions on the event's properties, by property name."
    )
    count: CountSpec | None = None
    within: Duration | None = Field(
        default=None, description="Without count: the last occurrence must be this recent."
    )

    @model_validator(mode="after")
    def _within(self) -> EventCondition:
        if self.count is not None and self.within is not None:
            raise ValueError("give `within` inside `count`, not beside it")
        return self


class AllCondition(_Strict):
    all: list[Condition] = Field(min_length=1, description="Every condition must hold. Must not be empty.")


class AnyCondition(_Strict):
    any: list[Condition] = Field(min_length=1, description="At least one must hold. Must not be empty.")


class NotCondition(_Strict):
    not_: Condition = Field(alias="not")


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    if not isinstance(value, dict):
        return None
    for key in ("all", "any", "not", "attribute", "event"):
        if key in value:
            return key
    return None


Condition = Annotated[
    Annotated[AllCondition, Tag("all")]
    | Annotated[AnyCondition, Tag("any")]
    | Annotated[NotCondition, Tag("not")]
    | Annotated[AttributeCondition, Tag("attribute")]
    | Annotated[EventCondition, Tag("event")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition_kind",
        custom_error_message="a condition needs one of the keys all, any, not, attribute or event",
    ),
]

AllCondition.model_rebuild()
AnyCondition.model_rebuild()
NotCondition.model_rebuild()


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

    @model_validator(mode="after")
    def _upgrades(self) -> CueSpec:
        if self.channel in self.upgrades:
            raise ValueError(f"upgrades must not repeat the initial channel {self.channel.value!r}")
        if self.ttl <= 0:
            raise ValueError("ttl must be longer than zero")
        return self


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
    apps: list[Annotated[str, Field(pattern=_ID)]] = Field(
        default_factory=list, description="App ids this applies to; empty means every app."
    )
    target: Condition | None = Field(default=None, description="Who: conditions on the context.")
    trigger: Condition = Field(description="When: conditions evaluated as signals arrive.")
    cue: CueSpec
    cooldown: Duration = Field(
        default=0.0, description="After an offer, do not offer this scenario to the same user for this long."
    )

    @field_validator("trigger")
    @classmethod
    def _trigger_has_event(cls, value: Condition) -> Condition:
        if not _mentions_event(value):
            raise ValueError("a trigger must mention at least one event, so it knows when to evaluate")
        return value


def _mentions_event(cond: Any) -> bool:
    if isinstance(cond, EventCondition):
        return True
    if isinstance(cond, AllCondition):
        return any(_mentions_event(c) for c in cond.all)
    if isinstance(cond, AnyCondition):
        return any(_mentions_event(c) for c in cond.any)
    if isinstance(cond, NotCondition):
        return _mentions_event(cond.not_)
    return False


class ScenarioFile(_Strict):
    """A file holds one scenario, a list of them, or `scenarios: [...]`."""

    scenarios: list[ScenarioSpec]


FileKind = Literal["single", "list"]
