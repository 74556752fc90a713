"""Protobuf <-> domain conversion. The only module that knows both shapes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from functools import cache, partial
from itertools import repeat
from operator import truediv
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from cuepoint.v1 import associate_pb2, common_pb2, device_pb2

from ..core.errors import InvalidInput
from ..core.model import (
    NO_PROPS,
    Ack,
    AssociateSignIn,
    ChatLine,
    CueOffer,
    EngagementEnded,
    EngagementUpdate,
    EngagementView,
    EventColumns,
    Hello,
    IncomingBatch,
    IncomingSignal,
    JourneyItem,
    ParticipantInfo,
    Scalar,
    SupervisedSnapshot,
    Withdrawal,
)
from ..core.validation import Limits
from ..scenarios.compiler import RuleMatch

__all__ = [
    "ack_to_proto",
    "batch_from_columns",
    "batch_from_proto",
    "cue_to_proto",
    "engagement_ended_to_proto",
    "engagement_to_proto",
    "engagement_update_to_proto",
    "hello_from_proto",
    "sign_in_from_proto",
    "timestamp",
    "withdrawal_to_proto",
]

CHANNELS = {
    "audio": common_pb2.CHANNEL_AUDIO,
    "screen_share": common_pb2.CHANNEL_SCREEN_SHARE,
    "chat": common_pb2.CHANNEL_CHAT,
    "video": common_pb2.CHANNEL_VIDEO,
}
CONSENT = {
    common_pb2.CONSENT_LEVEL_UNSPECIFIED: "essential",
    common_pb2.CONSENT_LEVEL_NONE: "none",
    common_pb2.CONSENT_LEVEL_ESSENTIAL: "essential",
    common_pb2.CONSENT_LEVEL_FULL: "full",
}
CONSENT_TO_PROTO = {v: k for k, v in CONSENT.items() if k != common_pb2.CONSENT_LEVEL_UNSPECIFIED}
RESPONSES = {
    common_pb2.CUE_RESPONSE_KIND_ACCEPTED: "accepted",
    common_pb2.CUE_RESPONSE_KIND_DECLINED: "declined",
    common_pb2.CUE_RESPONSE_KIND_DISMISSED: "dismissed",
    common_pb2.CUE_RESPONSE_KIND_EXPIRED: "expired",
    common_pb2.CUE_RESPONSE_KIND_OPENED: "opened",
}
LAYOUTS = {
    "banner": common_pb2.CUE_LAYOUT_BANNER,
    "modal": common_pb2.CUE_LAYOUT_MODAL,
    "bubble": common_pb2.CUE_LAYOUT_BUBBLE,
}
BUTTON_ACTIONS = {
    "accept": common_pb2.CUE_BUTTON_ACTION_ACCEPT,
    "decline": common_pb2.CUE_BUTTON_ACTION_DECLINE,
    "dismiss": common_pb2.CUE_BUTTON_ACTION_DISMISS,
    "open_url": common_pb2.CUE_BUTTON_ACTION_OPEN_URL,
}
STATES = {
    "queued": common_pb2.ENGAGEMENT_STATE_QUEUED,
    "assigned": common_pb2.ENGAGEMENT_STATE_ASSIGNED,
    "ended": common_pb2.ENGAGEMENT_STATE_ENDED,
    "callback_requested": common_pb2.ENGAGEMENT_STATE_CALLBACK_REQUESTED,
}
ROLES = {
    "owner": common_pb2.PARTICIPANT_ROLE_OWNER,
    "conference": common_pb2.PARTICIPANT_ROLE_CONFERENCE,
    "consult": common_pb2.PARTICIPANT_ROLE_CONSULT,
    "monitor": common_pb2.PARTICIPANT_ROLE_MONITOR,
    "barge": common_pb2.PARTICIPANT_ROLE_BARGE,
}
CUE_STATUS_TO_PROTO = {
    "offered": common_pb2.CUE_STATUS_OFFERED,
    "accepted": common_pb2.CUE_STATUS_ACCEPTED,
    "declined": common_pb2.CUE_STATUS_DECLINED,
    "dismissed": common_pb2.CUE_STATUS_DISMISSED,
    "expired": common_pb2.CUE_STATUS_EXPIRED,
    "withdrawn": common_pb2.CUE_STATUS_WITHDRAWN,
    "opened": common_pb2.CUE_STATUS_OPENED,
}
TRANSFER_MODES = {"blind": common_pb2.TRANSFER_MODE_BLIND, "consult": common_pb2.TRANSFER_MODE_CONSULT}
PARTIES = {"user": common_pb2.PARTY_USER, "associate": common_pb2.PARTY_ASSOCIATE, "system": common_pb2.PARTY_SYSTEM}
# Well-known Context fields and the flat keys scenario files use for them.
CONTEXT_FIELDS = {
    "app_version": "app.version",
    "os": "device.os",
    "os_version": "device.os_version",
    "device_model": "device.model",
    "locale": "device.locale",
    "timezone": "device.timezone",
}
LOCATION_FIELDS = {"country": "location.country", "region": "location.region", "city": "location.city"}


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def duration(seconds: float) -> Duration:
    out = Duration()
    out.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return out


def _seconds(ts: Timestamp, field: str) -> float:
    # protobuf checks the range only in its JSON and datetime helpers; a negative or overflowing nanos
    # would otherwise shift the time silently.
    if not 0 <= ts.nanos <= 999_999_999:
        raise InvalidInput(f"{field}.nanos", f"must be between 0 and 999999999, got {ts.nanos}")
    return ts.seconds + ts.nanos / 1e9


def _value(field: str, value: common_pb2.AttributeValue) -> Scalar:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidInput(field, "attribute value has no kind set")
    result: Scalar = getattr(value, kind)
    return result


def _values(field: str | Callable[[], str], values: Mapping[str, common_pb2.AttributeValue]) -> dict[str, Scalar]:
    """Attribute map to plain values. ``field`` may be a callable: the hot path (every property of every
    signal) then builds the field name only when there is an error to report."""
    if len(values) > Limits.max_props:
        raise InvalidInput(_name(field), f"more than {Limits.max_props} entries")
    out: dict[str, Scalar] = {}
    # Keys then lookups: a protobuf map's items() goes through the pure-Python ItemsView, ~1.5x slower.
    for key in values:
        v = values[key]
        kind = v.WhichOneof("kind")
        out[key] = getattr(v, kind) if kind is not None else _value(f"{_name(field)}[{key!r}]", v)
    return out


def _name(field: str | Callable[[], str]) -> str:
    return field if isinstance(field, str) else field()


def _to_value(value: Scalar) -> common_pb2.AttributeValue:
    if isinstance(value, bool):
        return common_pb2.AttributeValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AttributeValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AttributeValue(double_value=value)
    return common_pb2.AttributeValue(string_value=str(value))


def flatten_context(field: str, ctx: common_pb2.Context, user: common_pb2.UserIdentity | None) -> dict[str, Scalar]:
    """Proto context to flat keys; empty strings mean "not given"."""
    out: dict[str, Scalar] = {}
    # These values repeat across a fleet (app version, OS, model, locale, timezone, country, tier): interned,
    # every device's context shares one copy of each (a device holds its context while connected). CPython
    # frees an interned string once nothing else refers to it.
    for name, key in CONTEXT_FIELDS.items():
        value = getattr(ctx, name)
        if value:
            out[key] = sys.intern(value)
    for name, key in LOCATION_FIELDS.items():
        value = getattr(ctx.location, name)
        if value:
            out[key] = sys.intern(value)
    for key, value in _values(f"{field}.attributes", ctx.attributes).items():
        out[f"attributes.{key}"] = value
    if user is not None:
        if user.user_id:
            out["user.id"] = user.user_id
        if user.tier:
            out["user.tier"] = sys.intern(user.tier)
        for key, value in _values(f"{field}.user.attributes", user.attributes).items():
            if key in ("id", "tier"):
                raise InvalidInput(f"user.attributes[{key!r}]", "reserved; use user_id / tier")
            out[f"user.{key}"] = value
    return out


def context_to_proto(flat: Mapping[str, Scalar]) -> common_pb2.Context:
    ctx = common_pb2.Context()
    for name, key in CONTEXT_FIELDS.items():
        if key in flat:
            setattr(ctx, name, str(flat[key]))
    for name, key in LOCATION_FIELDS.items():
        if key in flat:
            setattr(ctx.location, name, str(flat[key]))
    for key, value in flat.items():
        if key.startswith("attributes."):
            ctx.attributes[key.removeprefix("attributes.")].CopyFrom(_to_value(value))
    return ctx


def hello_from_proto(msg: device_pb2.Hello) -> Hello:
    if msg.consent.level not in CONSENT:
        raise InvalidInput("hello.consent.level", f"unknown consent level {msg.consent.level}")
    return Hello(
        app_id=sys.intern(msg.app_id),  # a few apps, many devices: one copy for every session and state
        device_id=msg.device_id,
        context=flatten_context("hello.context", msg.context, msg.user if msg.HasField("user") else None),
        consent=CONSENT[msg.consent.level],
        sdk_version=msg.sdk_version[:64],
        resume_session_id=msg.resume_session_id[:64],
        device_secret=msg.device_secret[:256],
        user_token=msg.user_token,
        engaged_cue_ids=tuple(msg.engaged_cue_ids),
    )


def batch_from_proto(msg: device_pb2.SignalBatch) -> IncomingBatch | EventColumns:
    """A row batch: as EventColumns when it carries only events (ingest's per-batch path), else per signal."""
    size = msg.ByteSize()
    if size > Limits.max_batch_bytes:
        raise InvalidInput("signals", f"batch of {size} bytes exceeds {Limits.max_batch_bytes} bytes")
    ids: list[str] = []
    times: list[float | None] = []
    names: list[str] = []
    props: list[Mapping[str, Scalar]] = []
    for i, s in enumerate(msg.signals):
        if s.WhichOneof("kind") != "event":
            return _rows_from_proto(msg)
        ids.append(s.id)
        times.append(_seconds(s.time, f"signals.signals[{i}].time") if s.HasField("time") else None)
        event = s.event
        names.append(event.name)
        values = event.properties
        props.append(_values(partial("signals.signals[{}].event.properties".format, i), values) if values else NO_PROPS)
    sent_at = _seconds(msg.sent_at, "signals.sent_at") if msg.HasField("sent_at") else None
    return EventColumns(msg.batch_id, sent_at, ids, times, names, props, columnar=False)


def _rows_from_proto(msg: device_pb2.SignalBatch) -> IncomingBatch:
    signals = []
    for i, s in enumerate(msg.signals):
        time = _seconds(s.time, f"signals.signals[{i}].time") if s.HasField("time") else None
        kind = s.WhichOneof("kind")
        if kind == "event":
            event = s.event
            props = event.properties
            signals.append(
                IncomingSignal(
                    s.id,
                    time,
                    "event",
                    event.name,
                    _values(partial("signals.signals[{}].event.properties".format, i), props) if props else {},
                )
            )
        elif kind == "context":
            update = s.context
            flat = flatten_context(
                f"signals.signals[{i}].context", update.context, update.user if update.HasField("user") else None
            )
            signals.append(IncomingSignal(s.id, time, "context", context_set=flat, clear_keys=tuple(update.clear_keys)))
        else:
            signals.append(IncomingSignal(s.id, time, ""))
    sent_at = _seconds(msg.sent_at, "signals.sent_at") if msg.HasField("sent_at") else None
    return IncomingBatch(msg.batch_id, sent_at, tuple(signals))


_PROPERTY_COLUMNS: dict[int, str] = {
    device_pb2.PROPERTY_TYPE_STRING: "string_values",
    device_pb2.PROPERTY_TYPE_INT: "int_values",
    device_pb2.PROPERTY_TYPE_DOUBLE: "double_values",
    device_pb2.PROPERTY_TYPE_BOOL: "bool_values",
}


def _column_error(column: str, index: int, text: str) -> InvalidInput:
    return InvalidInput(f"signal_columns.{column}[{index}]", text)


def batch_from_columns(msg: device_pb2.SignalColumns) -> EventColumns:
    """A columnar batch of events as EventColumns (validated by the core, once per batch).

    Columns are read whole (a list per column, C loops); the per-signal work is one dict for a signal
    with properties; strings arrive once per batch.
    """
    size = msg.ByteSize()
    if size > Limits.max_batch_bytes:
        raise InvalidInput("signal_columns", f"batch of {size} bytes exceeds {Limits.max_batch_bytes} bytes")
    ids = msg.ids.split(" ") if msg.ids else []
    n = len(ids)
    if n > Limits.max_signals_per_batch:
        raise InvalidInput("signal_columns.ids", f"batch of {n} exceeds {Limits.max_signals_per_batch} signals")
    shaped = bool(msg.shape_keys or msg.shape_types)
    for column in ("times_us", "names") if shaped else ("times_us", "names", "prop_counts"):
        if len(getattr(msg, column)) != n:
            raise InvalidInput(f"signal_columns.{column}", f"{len(getattr(msg, column))} entries for {n} signals")
    strings = list(msg.strings)
    names = _strings_at(msg, strings, "names")
    times_us = list(msg.times_us)
    # 0: the client sent no time. Either way a C loop (map), not Python code per signal.
    times: list[float | None] = (
        [t / 1e6 if t else None for t in times_us] if 0 in times_us else list(map(truediv, times_us, repeat(1e6)))
    )
    string_values: list[str] = []
    doubles: list[float] = []
    keys: list[str] | None = None
    props: list[Mapping[str, Scalar]]
    counts: list[int] = [] if shaped else list(msg.prop_counts)
    if not shaped and not any(counts):
        props = [NO_PROPS] * n
    else:
        string_values = _strings_at(msg, strings, "string_values")
        doubles = list(msg.double_values)
        if shaped:
            keys = _strings_at(msg, strings, "shape_keys")
            props = _shaped_props(msg, keys, string_values, doubles, n)
        else:
            props = _counted_props(msg, strings, string_values, doubles, counts)
    sent_at = _seconds(msg.sent_at, "signal_columns.sent_at") if msg.HasField("sent_at") else None
    return EventColumns(
        msg.batch_id, sent_at, ids, times, names, props, strings=string_values, doubles=doubles, keys=keys
    )


def _shaped_props(
    msg: device_pb2.SignalColumns, keys: list[str], string_values: list[str], doubles: list[float], n: int
) -> list[Mapping[str, Scalar]]:
    """Each signal's properties when the batch gives their keys (``keys``) and types once (shape_keys,
    shape_types): no per-property keys, types or counts to read or compare (issue 13)."""
    if msg.prop_counts or msg.prop_keys or msg.prop_types:
        raise InvalidInput(
            "signal_columns.shape_keys", "give shape_keys or prop_counts, prop_keys and prop_types, not both"
        )
    width = len(keys)
    if len(msg.shape_types) != width:
        raise InvalidInput("signal_columns.shape_types", f"{len(msg.shape_types)} entries for {width} shape_keys")
    if width > Limits.max_props:
        raise InvalidInput("signal_columns.shape_keys", f"more than {Limits.max_props} properties")
    if len(set(keys)) != width:
        raise InvalidInput("signal_columns.shape_keys", "a property key repeated")
    shape: list[int] = list(msg.shape_types)
    values = _column_values(msg, shape * n, string_values, doubles, width)
    return _dicts_of_width(width)(keys, values)


def _counted_props(
    msg: device_pb2.SignalColumns, strings: list[str], string_values: list[str], doubles: list[float], counts: list[int]
) -> list[Mapping[str, Scalar]]:
    """Each signal's properties from prop_counts, prop_keys and prop_types."""
    n = len(counts)
    if max(counts) > Limits.max_props:
        bad = next(i for i, c in enumerate(counts) if c > Limits.max_props)
        raise _column_error("prop_counts", bad, f"more than {Limits.max_props} properties")
    total = sum(counts)
    width = counts[0]
    if len(msg.prop_types) != total or len(msg.prop_keys) != total:
        raise InvalidInput("signal_columns.prop_types", f"prop_keys and prop_types need {total} entries each")
    values = _column_values(msg, list(msg.prop_types), string_values, doubles, width if counts.count(width) == n else 0)
    keys = _strings_at(msg, strings, "prop_keys")
    props: list[Mapping[str, Scalar]]
    if counts.count(width) == n and keys == keys[:width] * n:
        # The usual shape (every event of the batch with the same keys): one dict display per signal.
        props = _dicts_of_width(width)(keys[:width], values)
    else:
        props = []
        at = 0
        for count in counts:
            if count:
                props.append(dict(zip(keys[at : at + count], values[at : at + count], strict=True)))
                at += count
            else:
                props.append(NO_PROPS)
    if sum(map(len, props)) != total:
        at = 0
        for count, found in zip(counts, props, strict=True):
            if len(found) != count:
                raise _column_error("prop_keys", at, "a property key repeated within one signal")
            at += count
    return props


@cache
def _dicts_of_width(width: int) -> Callable[[list[str], list[Scalar]], list[Mapping[str, Scalar]]]:
    """For ``width`` properties per signal: (keys, values in property order) -> one dict per signal.

    A comprehension with a dict display (``{k0: v0, k1: v1}``) builds each dict about 3x faster than
    ``dict(zip(keys, chunk))`` (0.16 against 0.53 us per signal of two properties), and Python has no
    display of variable width, so the function is compiled once per width, as `dataclasses` and
    `namedtuple` compile theirs. Only the integer ``width`` enters the source (at most Limits.max_props).
    """
    if not 0 < width <= Limits.max_props:
        raise ValueError(f"width {width} outside 1..{Limits.max_props}")
    keys = "".join(f"k{i}, " for i in range(width))
    values = "".join(f"v{i}, " for i in range(width))
    display = ", ".join(f"k{i}: v{i}" for i in range(width))
    strides = ", ".join(f"values[{i}::{width}]" for i in range(width))
    source = (
        f"def dicts(keys, values):\n"
        f"    {keys}= keys\n"
        f"    return [{{{display}}} for {values}in zip({strides})]\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # the source holds nothing but generated names and integers
    built: Callable[[list[str], list[Scalar]], list[Mapping[str, Scalar]]] = namespace["dicts"]
    return built


def _strings_at(msg: device_pb2.SignalColumns, strings: list[str], column: str) -> list[str]:
    indexes = getattr(msg, column)
    try:
        return list(map(strings.__getitem__, indexes))
    except IndexError:
        bad = next(i for i, k in enumerate(indexes) if k >= len(strings))
        raise _column_error(column, bad, f"index {indexes[bad]} beyond the {len(strings)} strings") from None


def _column_values(
    msg: device_pb2.SignalColumns, types: list[int], string_values: list[str], doubles: list[float], width: int
) -> list[Scalar]:
    """Every property's value in property order (``types``: each property's type), taken from its type's column.

    ``width``: every signal's number of properties when they all have the same (else 0).
    """
    total = len(types)
    columns: dict[int, list[Scalar]] = {
        device_pb2.PROPERTY_TYPE_STRING: list(string_values),
        device_pb2.PROPERTY_TYPE_INT: list(msg.int_values),
        device_pb2.PROPERTY_TYPE_DOUBLE: list(doubles),
        device_pb2.PROPERTY_TYPE_BOOL: list(msg.bool_values),
    }
    # An error names the property's entry in prop_types, or the key's in shape_types (given once per batch).
    shaped = bool(msg.shape_types)
    field = "shape_types" if shaped else "prop_types"
    if len(set(types)) == 1 and types[0] in columns:
        values = columns[types[0]]  # one type: the column is the values
        if len(values) != total or sum(len(c) for c in columns.values()) != total:
            raise InvalidInput(f"signal_columns.{_PROPERTY_COLUMNS[types[0]]}", f"needs {total} entries")
        return values
    interleaved = _interleave(types, columns, width, total) if width else None
    if interleaved is not None:
        return interleaved
    taken = dict.fromkeys(columns, 0)
    out: list[Scalar] = []
    for i, kind in enumerate(types):
        column = columns.get(kind)
        entry = i % width if shaped else i
        if column is None:
            raise _column_error(field, entry, f"unknown or unspecified property type {kind}")
        at = taken[kind]
        if at >= len(column):
            raise InvalidInput(f"signal_columns.{_PROPERTY_COLUMNS[kind]}", f"too few entries for {field}[{entry}]")
        out.append(column[at])
        taken[kind] = at + 1
    for typ, used in taken.items():
        if used != len(columns[typ]):
            text = f"{len(columns[typ])} entries, {used} used"
            raise InvalidInput(f"signal_columns.{_PROPERTY_COLUMNS[typ]}", text)
    return out


def _interleave(types: list[int], columns: dict[int, list[Scalar]], width: int, total: int) -> list[Scalar] | None:
    """The usual shape with mixed types (every signal with the same property types in the same order, e.g.
    a string then an int): each position's values are a stride of its type's column, copied by slice
    assignment. None for any other shape (the caller's loop then finds what is wrong).
    """
    pattern = types[:width]
    if types != pattern * (total // width) or any(kind not in columns for kind in pattern):
        return None
    per_signal = {kind: pattern.count(kind) for kind in columns}
    if any(len(columns[kind]) * width != per_signal[kind] * total for kind in columns):
        return None
    out: list[Scalar] = list(types)  # every entry is overwritten below
    seen = dict.fromkeys(columns, 0)
    for position, kind in enumerate(pattern):
        out[position::width] = columns[kind][seen[kind] :: per_signal[kind]]
        seen[kind] += 1
    return out


def response_from_proto(msg: device_pb2.CueResponse) -> tuple[str, str, str]:
    """(cue id, response, button id or "")."""
    response = RESPONSES.get(msg.kind)
    if response is None:
        raise InvalidInput("cue_response.kind", f"unknown or unspecified response kind {msg.kind}")
    if not msg.cue_id:
        raise InvalidInput("cue_response.cue_id", "required")
    if len(msg.button_id) > 64:
        raise InvalidInput("cue_response.button_id", "at most 64 characters")
    return msg.cue_id, response, msg.button_id


def cue_to_proto(cue: CueOffer) -> common_pb2.Cue:
    msg = common_pb2.Cue(
        cue_id=cue.cue_id,
        scenario_id=cue.scenario_id,
        message=cue.message,
        channel=CHANNELS[cue.channel],
        allowed_upgrades=[CHANNELS[c] for c in cue.upgrades],
        created_at=timestamp(cue.created_at),
        expires_at=timestamp(cue.expires_at),
        title=cue.title,
        buttons=[
            common_pb2.CueButton(
                button_id=b.id,
                label=b.label,
                action=BUTTON_ACTIONS[b.action],
                channel=CHANNELS[b.channel] if b.channel else common_pb2.CHANNEL_UNSPECIFIED,
                url=b.url,
            )
            for b in cue.buttons
        ],
        layout=LAYOUTS.get(cue.layout, common_pb2.CUE_LAYOUT_UNSPECIFIED),
        variant=cue.variant,
        locale=cue.locale,
    )
    if cue.image is not None:
        msg.image.CopyFrom(common_pb2.CueImage(url=cue.image.url, alt_text=cue.image.alt))
    return msg


def ack_to_proto(ack: Ack) -> device_pb2.SignalAck:
    return device_pb2.SignalAck(batch_id=ack.batch_id, signal_ids=ack.signal_ids, duplicate_ids=ack.duplicate_ids)


def withdrawal_to_proto(w: Withdrawal) -> device_pb2.CueWithdrawal:
    return device_pb2.CueWithdrawal(cue_id=w.cue_id, reason=w.reason)


def engagement_update_to_proto(u: EngagementUpdate) -> device_pb2.EngagementUpdate:
    return device_pb2.EngagementUpdate(
        engagement_id=u.engagement_id,
        cue_id=u.cue_id,
        state=STATES[u.state],
        channel=CHANNELS[u.channel],
        queue=u.queue,
        associate_name=u.associate_name,
        time=timestamp(u.time),
        disposition=u.disposition,
        queue_position=u.queue_position,
        estimated_wait=None if u.estimated_wait is None else duration(u.estimated_wait),
        callback_at=timestamp(u.callback_at) if u.callback_at is not None else None,
    )


def sign_in_from_proto(msg: associate_pb2.SignIn) -> AssociateSignIn:
    return AssociateSignIn(
        associate_id=msg.associate_id,
        display_name=msg.display_name,
        queues=tuple(msg.queues),
        capacity=msg.capacity,
        skills=tuple(msg.skills),
        manual_claim=msg.manual_claim,
        presence=_presence(msg.presence),
        supervised_queues=tuple(msg.supervised_queues),
        channel_capacity=tuple(
            (_channel_of(c.channel, f"sign_in.channel_capacity[{i}].channel"), c.limit)
            for i, c in enumerate(msg.channel_capacity)
        ),
    )


def _channel_of(value: int, field: str) -> str:
    for name, number in CHANNELS.items():
        if number == value:
            return name
    raise InvalidInput(field, f"unknown or unspecified channel {value}")


def _presence(value: int) -> str:
    names: dict[int, str] = {
        associate_pb2.PRESENCE_UNSPECIFIED: "available",
        associate_pb2.PRESENCE_AVAILABLE: "available",
        associate_pb2.PRESENCE_BUSY: "busy",
        associate_pb2.PRESENCE_AWAY: "away",
    }
    if value not in names:
        raise InvalidInput("sign_in.presence", f"unknown presence {value}")
    return names[value]


def _journey_entry(item: JourneyItem) -> common_pb2.JourneyEntry:
    entry = common_pb2.JourneyEntry(signal_id=item.signal_id, time=timestamp(item.time))
    if item.kind == "event":
        entry.event.name = item.name
        for key, value in item.payload.items():
            entry.event.properties[key].CopyFrom(_to_value(value))
    else:
        entry.context.context.CopyFrom(context_to_proto(item.payload.get("set", {})))
        user = {k.removeprefix("user."): v for k, v in item.payload.get("set", {}).items() if k.startswith("user.")}
        _fill_user(entry.context.user, user)
        entry.context.clear_keys.extend(item.payload.get("clear", []))
    return entry


def _fill_user(msg: common_pb2.UserIdentity, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if key == "id":
            msg.user_id = str(value)
        elif key == "tier":
            msg.tier = str(value)
        else:
            msg.attributes[key].CopyFrom(_to_value(value))


def engagement_to_proto(view: EngagementView) -> common_pb2.Engagement:
    ctx = view.context
    trigger = ctx.trigger
    user = common_pb2.UserIdentity(user_id=ctx.user_id)
    _fill_user(user, ctx.user_attributes)
    return common_pb2.Engagement(
        engagement_id=view.engagement_id,
        cue_id=view.cue_id,
        queue=view.queue,
        state=STATES[view.state],
        channel=CHANNELS[view.channel],
        created_at=timestamp(view.created_at),
        associate_id=view.associate_id,
        associate_name=view.associate_name,
        context=common_pb2.EngagementContext(
            app_id=ctx.app_id,
            device_id=ctx.device_id,
            user_id=ctx.user_id,
            context=context_to_proto(ctx.context),
            user=user,
            consent=CONSENT_TO_PROTO[ctx.consent],
            # JourneyEntry has no milestone kind: milestones reach the desk over HTTP only.
            journey=[_journey_entry(item) for item in ctx.journey if item.kind != "milestone"],
            trigger=common_pb2.TriggerExplanation(
                scenario_id=trigger.get("scenario_id", ""),
                scenario_name=trigger.get("scenario_name", ""),
                scenario_file=trigger.get("scenario_file", ""),
                priority=int(trigger.get("priority", 0)),
                conditions=[
                    common_pb2.MatchedCondition(path=path, description=text)
                    for path, text in trigger.get("conditions", [])
                ],
                signal_ids=trigger.get("signal_ids", []),
            ),
            cue=cue_to_proto(ctx.cue),
            redacted_fields=ctx.redacted_fields,
            segments=trigger.get("segments", []),
            milestones=trigger.get("milestones", []),
            prior_engagements=[
                common_pb2.PriorEngagement(
                    engagement_id=p.engagement_id,
                    created_at=timestamp(p.created_at),
                    scenario_id=p.scenario_id,
                    disposition=p.disposition,
                    notes=p.notes,
                    outcome=p.outcome,
                    wrap_up_outcome=p.wrap_up_outcome,
                )
                for p in ctx.prior_engagements
            ],
            priority=ctx.priority,
            user_verified=ctx.user_verified,
            scores=scores_to_proto(ctx.scores),
            prior_cues=[
                common_pb2.PriorCue(
                    cue_id=c.cue_id,
                    created_at=timestamp(c.created_at),
                    scenario_id=c.scenario_id,
                    status=CUE_STATUS_TO_PROTO.get(c.status, common_pb2.CUE_STATUS_UNSPECIFIED),
                )
                for c in ctx.prior_cues
            ],
            routing_rule=_rule_to_proto(ctx.routing_rule),
        ),
        transcript=[chat_to_proto(line) for line in view.transcript],
        transfers=[
            common_pb2.Transfer(
                from_associate_id=t.from_associate_id,
                to_associate_id=t.to_associate_id,
                to_queue=t.to_queue,
                mode=TRANSFER_MODES[t.mode],
                note=t.note,
                time=timestamp(t.time),
            )
            for t in view.transfers
        ],
        role=ROLES[view.role],
        participants=participants_to_proto(view.participants),
        kind=KINDS[view.kind],
        callback_at=timestamp(view.callback_at) if view.callback_at is not None else None,
        callback_number=view.callback_number,
    )


KINDS = {"live": common_pb2.ENGAGEMENT_KIND_LIVE, "callback": common_pb2.ENGAGEMENT_KIND_CALLBACK}


def callback_at_from_proto(choice: device_pb2.FallbackChoice) -> float | None:
    """The callback time a FallbackChoice asks for; None when unset (as soon as someone is free)."""
    return _seconds(choice.callback_at, "fallback_choice.callback_at") if choice.HasField("callback_at") else None


def _rule_to_proto(rule: RuleMatch | None) -> common_pb2.RoutingRuleMatch | None:
    if rule is None:
        return None
    return common_pb2.RoutingRuleMatch(
        index=rule.index,
        name=rule.name,
        file=rule.file,
        line=rule.line,
        queue=rule.queue,
        priority=rule.priority,
        skills=rule.skills,
        conditions=[common_pb2.MatchedCondition(path=path, description=text) for path, text in rule.conditions],
    )


def participants_to_proto(people: tuple[ParticipantInfo, ...]) -> list[common_pb2.Participant]:
    return [
        common_pb2.Participant(associate_id=p.associate_id, display_name=p.display_name, role=ROLES[p.role])
        for p in people
    ]


def chat_to_proto(line: ChatLine) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(
        engagement_id=line.engagement_id,
        message_id=line.message_id,
        sender=PARTIES[line.sender],
        text=line.text,
        time=timestamp(line.time),
        sender_id=line.sender_id,
        sender_name=line.sender_name,
        whisper=line.whisper,
    )


def supervised_to_proto(s: SupervisedSnapshot) -> associate_pb2.SupervisedEngagement:
    return associate_pb2.SupervisedEngagement(
        engagement_id=s.engagement_id,
        queue=s.queue,
        state=STATES[s.state],
        channel=CHANNELS[s.channel],
        associate_id=s.associate_id,
        participants=participants_to_proto(s.participants),
        time=timestamp(s.time),
    )


SCORE_STATUS = {
    "training": common_pb2.SCORE_STATUS_TRAINING,
    "trained": common_pb2.SCORE_STATUS_TRAINED,
    "shadow": common_pb2.SCORE_STATUS_SHADOW,
}


def scores_to_proto(scores: Mapping[str, Mapping[str, Any]]) -> list[common_pb2.OutcomeScore]:
    """predict.registry.describe_scores output as OutcomeScore messages."""
    return [
        common_pb2.OutcomeScore(
            outcome=outcome,
            probability=float(score.get("probability", 0.0)),
            status=SCORE_STATUS.get(str(score.get("status")), common_pb2.SCORE_STATUS_UNSPECIFIED),
            top_features=[
                common_pb2.FeatureContribution(feature=str(name), contribution=float(value))
                for name, value in score.get("top_features", [])
            ],
        )
        for outcome, score in scores.items()
    ]


def engagement_ended_to_proto(e: EngagementEnded) -> associate_pb2.EngagementEnded:
    return associate_pb2.EngagementEnded(
        engagement_id=e.engagement_id, disposition=e.disposition, ended_by=PARTIES[e.ended_by]
    )
