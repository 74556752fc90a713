"""`cuepoint simulate`: replay a recorded signal trace through the real engine.

The same `Core` the server runs (core/service.py), on a `ManualClock` and an
in-memory store, without gRPC. Each trace line first moves the clock to its
time, firing due timers in order (cue expiry, and any later time-driven
timers) with their outcomes stamped at their own deadlines, then calls the
core as the device API would. The timeline names every cue offered, when, and
for scenarios that qualified but were not offered, why (the arbiter's
`blocked` reasons). Output holds no ids or wall-clock times: cues are cue#1,
cue#2, ... in order, and times are offsets from the trace start, so two runs
print the same bytes.

Trace format (JSON lines; blank lines and lines starting with # are skipped):

    {"t": 0, "device": "d1", "hello": {"app_id": "fitkit", "consent": "full",
        "context": {"app.version": "4.2.0", "user.tier": "premium"}}}
    {"t": 60, "device": "d1", "event": "sync_failed", "props": {"reason": "timeout"}}
    {"t": 70, "device": "d1", "context": {"set": {"app.version": "4.3.0"}, "clear": ["user.tier"]}}
    {"t": 80, "device": "d1", "respond": {"cue": "last", "kind": "declined"}}
    {"t": 85, "device": "d1", "respond": {"cue": "cue#2", "kind": "accepted", "button": "chat"}}
    {"t": 90, "device": "d1", "close": true}
    {"t": 900}

Associates (simulate_desk.py) sign in and out, claim, reject, chat and wrap up; devices may also chat,
answer a fallback offer and end their engagement:

    {"t": 0, "associate": "ann", "sign_in": {"queues": ["vip"], "skills": ["billing"], "capacity": 1}}
    {"t": 95, "associate": "ann", "chat": "Hi, I'm Ann."}
    {"t": 96, "device": "d1", "chat": "Thanks!"}
    {"t": 99, "device": "d1", "fallback": {"option": "callback", "phone": "+1 555 0100", "at": 3600}}
    {"t": 120, "associate": "ann", "wrap_up": {"disposition": "resolved", "notes": "cache cleared"}}
    {"t": 130, "associate": "ann", "sign_out": true}

`t` is seconds since the trace start, or an ISO-8601 time (UTC when it has no
offset). The trace starts at the first line's time when that is ISO-8601,
otherwise at 2024-01-01T00:00:00Z. Times never go backwards. A line with only
`t` just moves the clock (so timers up to then fire).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .clock import ManualClock, TimerHandle
from .core.errors import CoreError
from .core.model import (
    Ack,
    CueOffer,
    EngagementUpdate,
    Hello,
    IncomingBatch,
    IncomingSignal,
    Scalar,
    SessionFailed,
    Withdrawal,
)
from .core.service import Core
from .core.sessions import DeviceSession
from .core.validation import CONTEXT_KEY
from .engine.engine import Engine
from .engine.scenario_set import ScenarioSet
from .scenarios.compiler import CompiledScenario
from .simulate_desk import (
    ASSOCIATE_ACTIONS,
    DESK_DEVICE_ACTIONS,
    DeskReplay,
    ReplayError,
    check_associate_action,
    check_desk_device_action,
)
from .storage import DecisionRecord, SqliteStore

__all__ = [
    "DEFAULT_START",
    "Outcome",
    "Simulation",
    "Step",
    "TraceError",
    "TraceIssue",
    "parse_trace",
    "render_json",
    "render_text",
    "simulate",
    "simulate_files",
]

# 2024-01-01T00:00:00Z, a Monday: the start of traces whose times are offsets.
DEFAULT_START = 1_704_067_200.0
ACTIONS = ("hello", "event", "context", "respond", "close", *DESK_DEVICE_ACTIONS)
ONE_OF = ", ".join(ACTIONS)
ASSOCIATE_ONE_OF = ", ".join(ASSOCIATE_ACTIONS)
RESPONSES = ("accepted", "declined", "dismissed", "expired", "opened")
CONSENTS = ("none", "essential", "full")
CUE_LABEL = re.compile(r"^cue#[1-9][0-9]*$")


@dataclass(frozen=True, slots=True)
class TraceIssue:
    line: int
    message: str
    file: str = "trace"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class TraceError(Exception):
    """The trace has problems (every structural one, or the first the core rejected)."""

    def __init__(self, issues: Sequence[TraceIssue]) -> None:
        self.issues = list(issues)
        # What the replay printed before the core rejected a line.
        self.outcomes: list[Outcome] = []
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass(frozen=True, slots=True)
class Step:
    line: int
    # Seconds since the trace start.
    t: float
    device: str = ""
    action: str = ""  # one of ACTIONS (or of ASSOCIATE_ACTIONS), or "" for a clock-only line
    data: dict[str, Any] = field(default_factory=dict)
    # An associate's line (simulate_desk.py): who; `device` is then empty.
    associate: str = ""


@dataclass(frozen=True, slots=True)
class Trace:
    start: float
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Outcome:
    # Seconds since the trace start.
    t: float
    device: str
    # cue | resent | pending_push | withdrawn | blocked | answered | engagement | session_failed
    kind: str
    # The trace line that caused it; None for timer-driven outcomes.
    line: int | None
    data: dict[str, Any]
    # `device` names an associate (simulate_desk.py).
    associate: bool = False

    def text(self) -> str:
        d = self.data
        head = f"{offset(self.t)} {self.device}"
        if self.kind == "cue":
            shown = "".join(f" {key}={d[key]}" for key in ("variant", "locale") if d.get(key))
            lines = [f"{head} CUE {d['scenario']} {d['channel']} {_quote(d['message'])} ({d['cue']}){shown}"]
            lines += [f"    because {path}: {text}" for path, text in d["because"]]
            for outcome, score in (d.get("scores") or {}).items():
                top = ", ".join(f"{name} {value:+.2f}" for name, value in score.get("top_features", []))
                head = f"    score {outcome} {score.get('probability', 0):.3f} ({score.get('status', '')})"
                lines.append(f"{head}: {top}" if top else head)
            return "\n".join(lines)
        if self.kind == "blocked":
            return f"{head} BLOCKED {d['scenario']} {d['reason']} {d['detail']}".rstrip()
        if self.kind == "not_qualified":
            lines = [f"{head} NOT {d['scenario']}"]
            lines += [f"    no {path}: {expected} (observed: {seen})" for path, expected, seen in d["failing"]]
            return "\n".join(lines)
        if self.kind == "withdrawn":
            return f"{head} WITHDRAWN {d['cue']} {d['reason']}"
        if self.kind == "answered":
            pressed = f" button={d['button']}" if d.get("button") else ""
            return f"{head} ANSWERED {d['cue']} {d['response']}{pressed}"
        if self.kind == "pending_push":
            return f"{head} PENDING_PUSH {d['cue']} until {d['until']}"
        if self.kind == "resent":
            return f"{head} RESENT {d['cue']} {d['scenario']}"
        if self.kind == "engagement":
            who = f" associate={d['associate']}" if d["associate"] else ""
            line = f" position={d['position']}" if d.get("position") else ""
            wait = f" wait={d['wait']:g}s" if d.get("wait") is not None else ""
            callback = f" callback_at={d['callback_at']}" if d.get("callback_at") else ""
            return f"{head} ENGAGEMENT {d['cue']} {d['state']} queue={d['queue']}{who}{line}{wait}{callback}"
        if self.kind in ("assigned", "offered"):
            extra = "".join(f" {key}={d[key]}" for key in ("role",) if d.get(key))
            callback = " callback" if d.get("kind") == "callback" else ""
            verb = self.kind.upper()
            return f"{head} {verb} {d['cue']} queue={d['queue']} priority={d['priority']}{callback}{extra}"
        if self.kind == "signed_in":
            shown = " ".join(f"{k}={v}" for k, v in d.items() if v is not True) + "".join(
                f" {k}" for k, v in d.items() if v is True
            )
            return f"{head} SIGNED_IN {shown}"
        if self.kind == "chat":
            return f"{head} CHAT {d['cue']} {d['sender']} {_quote(d['text'])}"
        if self.kind == "fallback":
            return f"{head} FALLBACK {d['cue']} {','.join(d['options'])}"
        if self.kind == "ended":
            return f"{head} ENDED {d['cue']} {d['disposition']} by={d['by']}"
        return f"{head} {self.kind.upper()} {' '.join(str(v) for v in d.values())}".rstrip()

    def as_dict(self) -> dict[str, Any]:
        who = "associate" if self.associate else "device"
        head = {"t": self.t, "at": offset(self.t), who: self.device, "line": self.line}
        return {**head, "outcome": self.kind, **self.data}


def offset(seconds: float) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"+{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# -- parsing ---------------------------------------------------------------


def _absolute(value: str) -> float:
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value))


def _scalars(where: str, value: object) -> tuple[dict[str, Scalar], str | None]:
    if not isinstance(value, dict):
        return {}, f"{where}: expected an object of key: value"
    for key, item in value.items():
        if not _is_scalar(item):
            return {}, f"{where}[{key!r}]: expected a string, number or boolean"
    return value, None


def _check_action(action: str, value: object) -> str | None:
    """The problem with an action's payload, or None."""
    if action == "hello":
        if not isinstance(value, dict):
            return "hello: expected an object with app_id, context and consent"
        unknown = set(value) - {"app_id", "context", "consent"}
        if unknown:
            return f"hello: unknown field {sorted(unknown)[0]!r}"
        if not isinstance(value.get("app_id"), str) or not value["app_id"]:
            return "hello.app_id: required string"
        if value.get("consent", "essential") not in CONSENTS:
            return f"hello.consent: must be one of {', '.join(CONSENTS)}"
        context, problem = _scalars("hello.context", value.get("context", {}))
        if problem:
            return problem
        for key in context:
            if not CONTEXT_KEY.match(key):
                return f"hello.context[{key!r}]: unknown context key (use app.version, user.tier, ...)"
        return None
    if action == "event":
        return None if isinstance(value, str) and value else "event: expected an event name"
    if action == "context":
        if not isinstance(value, dict) or not set(value) <= {"set", "clear"}:
            return 'context: expected {"set": {...}, "clear": [...]}'
        _, problem = _scalars("context.set", value.get("set", {}))
        if problem:
            return problem
        clear = value.get("clear", [])
        if not isinstance(clear, list) or not all(isinstance(k, str) for k in clear):
            return "context.clear: expected a list of context keys"
        return None
    if action == "respond":
        if not isinstance(value, dict) or not {"cue", "kind"} <= set(value) <= {"cue", "kind", "button"}:
            return (
                'respond: expected {"cue": "last" or "cue#N", "kind": "accepted"|"declined"|"dismissed"}'
                ' and optionally "button": "<button id>"'
            )
        if not isinstance(value.get("button", ""), str):
            return "respond.button: expected a button id"
        if value["cue"] != "last" and not (isinstance(value["cue"], str) and CUE_LABEL.match(value["cue"])):
            return f'respond.cue: expected "last" or "cue#N", got {value["cue"]!r}'
        if value["kind"] not in RESPONSES:
            return f"respond.kind: must be one of {', '.join(RESPONSES)}"
        return None
    if action == "close":
        return None if value is True else "close: expected true"
    return check_desk_device_action(action, value)


def _associate_step(number: int, t: float, item: dict[str, Any], signed_in: set[str]) -> Step | str:
    """An associate's line as a Step, or what is wrong with it (simulate_desk.py has the actions)."""
    if "device" in item:
        return "a line has a device or an associate, not both"
    name = item["associate"]
    if not isinstance(name, str) or not name:
        return "associate: required string"
    unknown = sorted(set(item) - {"t", "associate", *ASSOCIATE_ACTIONS})
    if unknown:
        return f"unknown field {unknown[0]!r}; a line has t, associate and one of: {ASSOCIATE_ONE_OF}"
    actions = [a for a in ASSOCIATE_ACTIONS if a in item]
    if not actions:
        return f"a line with an associate needs one of: {ASSOCIATE_ONE_OF}"
    if len(actions) > 1:
        return f"one action per line; found {' and '.join(actions)}"
    action = actions[0]
    error = check_associate_action(action, item[action])
    if error is not None:
        return error
    if action == "sign_in":
        signed_in.add(name)
    elif name not in signed_in:
        return f"associate {name!r} has not signed in yet; start it with a sign_in line"
    elif action == "sign_out":
        signed_in.discard(name)
    return Step(number, t, "", action, {action: item[action]}, associate=name)


def parse_trace(text: str, name: str = "trace") -> Trace:
    """Check every line; raise TraceError listing every problem, with line numbers."""
    issues: list[TraceIssue] = []
    steps: list[Step] = []
    start: float | None = None
    previous = 0.0
    devices: set[str] = set()
    associates: set[str] = set()

    def problem(line: int, message: str) -> None:
        issues.append(TraceIssue(line, message, name))

    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            item = json.loads(stripped)
        except json.JSONDecodeError as exc:
            problem(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(item, dict):
            problem(number, "expected a JSON object")
            continue
        # Time.
        t_value = item.get("t")
        if isinstance(t_value, bool) or not isinstance(t_value, int | float | str):
            problem(number, "t: required; seconds since the trace start, or an ISO-8601 time")
            continue
        if isinstance(t_value, str):
            try:
                absolute = _absolute(t_value)
            except ValueError:
                problem(number, f"t: {t_value!r} is not an ISO-8601 time")
                continue
            if start is None:
                start = absolute
            t = absolute - start
        else:
            if not math.isfinite(t_value) or t_value < 0:
                problem(number, "t: must be a finite number of seconds, 0 or more")
                continue
            if start is None:
                start = DEFAULT_START
            t = float(t_value)
        if t < previous:
            problem(number, f"t: goes back in time ({offset(t)} after {offset(previous)})")
            continue
        previous = t
        if "associate" in item:
            step = _associate_step(number, t, item, associates)
            if isinstance(step, str):
                problem(number, step)
            else:
                steps.append(step)
            continue
        # What happens.
        actions = [a for a in ACTIONS if a in item]
        unknown = sorted(set(item) - {"t", "device", "props", *ACTIONS})
        if unknown:
            problem(number, f"unknown field {unknown[0]!r}; a line has t, device and one of: {ONE_OF}")
            continue
        if "props" in item and actions != ["event"]:
            problem(number, "props: only an event line has props")
            continue
        if not actions:
            if "device" in item:
                problem(number, f"a line with a device needs one of: {ONE_OF}")
                continue
            steps.append(Step(number, t))
            continue
        if len(actions) > 1:
            problem(number, f"one action per line; found {' and '.join(actions)}")
            continue
        action = actions[0]
        device = item.get("device")
        if not isinstance(device, str) or not device:
            problem(number, "device: required string")
            continue
        error = _check_action(action, item[action])
        if error is None and action == "event":
            _, error = _scalars("props", item.get("props", {}))
        if error is not None:
            problem(number, error)
            continue
        if action == "hello":
            devices.add(device)
        elif device not in devices:
            problem(number, f"device {device!r} has not said hello yet; start it with a hello line")
            continue
        data = {action: item[action]}
        if action == "event":
            data["props"] = item.get("props", {})
        steps.append(Step(number, t, device, action, data))
    if issues:
        raise TraceError(issues)
    return Trace(start if start is not None else DEFAULT_START, tuple(steps))


# -- running ----------------------------------------------------------------


class _SimClock(ManualClock):
    """A ManualClock that also tells when its next timer is due."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self._dues: list[float] = []

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        heapq.heappush(self._dues, when)
        return super().call_at(when, callback)

    def next_due(self, until: float) -> float | None:
        while self._dues and self._dues[0] < self.now():
            heapq.heappop(self._dues)
        if self._dues and self._dues[0] <= until:
            return heapq.heappop(self._dues)
        return None


class Simulation:
    """One replay: a private Core, clock and in-memory store."""

    def __init__(
        self, scenarios: ScenarioSet, *, start: float = DEFAULT_START, name: str = "trace", why: bool = False
    ) -> None:
        self.scenarios = scenarios
        # --why: after each line, the scenarios it concerned that did not qualify, with the failing conditions.
        self.why = why
        self.start = start
        self.name = name
        self.clock = _SimClock(start)
        self.outcomes: list[Outcome] = []
        self._core: Core | None = None
        self._store: SqliteStore | None = None
        self._sessions: dict[str, DeviceSession] = {}
        self._labels: dict[str, str] = {}  # real cue id -> cue#N
        self._ids: dict[str, str] = {}  # cue#N -> real cue id
        self._last_cue: dict[str, str] = {}  # device -> real cue id
        # Blocked decisions not yet printed: by the cue their decision offered
        # (printed right after that cue), or still unattached.
        self._blocked_by_cue: dict[str, list[DecisionRecord]] = {}
        self._blocked_open: list[DecisionRecord] = []
        self._line: int | None = None
        self._pushes: list[dict[str, Any]] = []  # cue.pending_push events not yet printed
        self._pushed: set[str] = set()
        self._away_settled: list[dict[str, Any]] = []
        self._desk: DeskReplay | None = None

    @property
    def core(self) -> Core:
        assert self._core is not None, "call open() first"
        return self._core

    async def open(self) -> None:
        self._store = await SqliteStore.open(":memory:")
        self._core = Core(self._store, Engine(self.scenarios), self.clock)
        self._core.decision_listeners.append(self._on_decision)
        self._core.cue_listeners.append(self._on_cue_event)
        self._desk = DeskReplay(self._core, self._emit, self._label, self.start)

    def _on_cue_event(self, kind: str, payload: dict[str, Any]) -> None:
        # A device that is away sees nothing: its cue waiting for it (when_away) and that cue's expiry are
        # printed from the core's events instead.
        if kind == "cue.pending_push":
            self._pushes.append(payload)
            self._pushed.add(payload["cue_id"])
        elif kind == "cue.withdrawn" and payload["cue_id"] in self._pushed:
            if payload["device_id"] not in self._sessions:
                self._away_settled.append(payload)

    async def close(self) -> None:
        if self._desk is not None:
            self._desk.sign_out_all()
        if self._core is not None:
            for session in list(self._sessions.values()):
                await self._core.close_session(session)
            await self._core.drain()
        if self._store is not None:
            await self._store.close()

    def _on_decision(self, record: DecisionRecord) -> None:
        # The core reports a decision's blocked scenarios, then the offer (if any).
        if record.outcome == "blocked":
            self._blocked_open.append(record)
        elif record.cue_id:
            mine = [r for r in self._blocked_open if r.device_id == record.device_id]
            self._blocked_open = [r for r in self._blocked_open if r.device_id != record.device_id]
            self._blocked_by_cue[record.cue_id] = mine

    async def run(self, steps: Iterable[Step]) -> list[Outcome]:
        for step in steps:
            await self._advance(step.t)
            self._line = step.line
            try:
                await self._apply(step)
            except CoreError as exc:
                issue = TraceIssue(step.line, f"rejected by the server: {exc}", self.name)
                raise TraceError([issue]) from None
            except ReplayError as exc:
                raise TraceError([TraceIssue(step.line, str(exc), self.name)]) from None
            await self._collect()
            self._line = None
        return self.outcomes

    async def _advance(self, t: float) -> None:
        target = self.start + t
        while (due := self.clock.next_due(target)) is not None:
            self.clock.set(due)
            await self._collect()
        self.clock.set(target)
        await self._collect()

    async def _apply(self, step: Step) -> None:
        core, device, data = self.core, step.device, step.data
        if not step.action:  # a clock-only line: _advance() did it all
            return
        assert self._desk is not None
        if step.associate:
            await self._desk.associate(step.associate, step.action, data[step.action], self._ids.get)
            return
        if step.action == "hello":
            hello = data["hello"]
            previous = self._sessions.pop(device, None)
            if previous is not None:
                await core.close_session(previous)
            self._sessions[device] = await core.open_session(
                Hello(
                    app_id=hello["app_id"],
                    device_id=device,
                    context=dict(hello.get("context", {})),
                    consent=hello.get("consent", "essential"),
                )
            )
            return
        session = self._sessions.get(device)
        if session is None:
            raise TraceError([TraceIssue(step.line, f"device {device!r} has no open session", self.name)])
        signal_id = f"line-{step.line}"
        if step.action == "event":
            signal = IncomingSignal(signal_id, None, "event", data["event"], props=dict(data["props"]))
            core.ingest(session, IncomingBatch(signal_id, None, (signal,)))
            if self.why:
                self._why_not(device, core.engine.scenarios.candidates([data["event"]]))
        elif step.action == "context":
            update = data["context"]
            signal = IncomingSignal(
                signal_id,
                None,
                "context",
                context_set=dict(update.get("set", {})),
                clear_keys=tuple(update.get("clear", ())),
            )
            core.ingest(session, IncomingBatch(signal_id, None, (signal,)))
            if self.why:
                keys = [*update.get("set", {}), *update.get("clear", ())]
                self._why_not(device, core.engine.scenarios.keyed(keys))
        elif step.action == "respond":
            answer = data["respond"]
            label = answer["cue"]
            cue_id = self._last_cue.get(device) if label == "last" else self._ids.get(label)
            if cue_id is None:
                what = "no cue was offered to this device yet" if label == "last" else f"no {label} yet"
                raise TraceError([TraceIssue(step.line, f"respond.cue: {what}", self.name)])
            pressed = {"button": answer["button"]} if answer.get("button") else {}
            self._emit(device, "answered", cue=self._labels[cue_id], response=answer["kind"], **pressed)
            await core.respond(session, cue_id, answer["kind"], str(answer.get("button", "")))
        elif step.action == "close":
            del self._sessions[device]
            await core.close_session(session)
        else:  # chat, fallback, end: the device's engagement (simulate_desk.py)
            await self._desk.device(session, step.action, data[step.action])

    async def _settle(self) -> None:
        # Acks, stored cues and expiry withdrawals finish in background tasks.
        for _ in range(3):
            await self.core.drain()
            await asyncio.sleep(0)

    async def _collect(self) -> None:
        await self._settle()
        for device, session in list(self._sessions.items()):
            while not session.outbox.empty():
                await self._message(device, session.outbox.get_nowait())
        await self._away()
        if self._desk is not None:
            self._desk.collect()
        # Decisions that offered nothing (and any whose cue went unseen).
        leftover, self._blocked_open = self._blocked_open, []
        for records in self._blocked_by_cue.values():
            leftover.extend(records)
        self._blocked_by_cue.clear()
        self._blocked(leftover)

    async def _away(self) -> None:
        pushes, self._pushes = self._pushes, []
        for push in pushes:
            device, cue_id = push["device_id"], push["cue_id"]
            offer = self.core.pending_offer(device)
            if cue_id not in self._labels and offer is not None and offer.cue_id == cue_id:
                await self._message(device, offer)  # the cue as made, though no device sees it yet
            until = offset(push["expires_at"] - self.start)
            self._emit(device, "pending_push", cue=self._label(cue_id), until=until)
        settled, self._away_settled = self._away_settled, []
        for payload in settled:
            self._emit(payload["device_id"], "withdrawn", cue=self._label(payload["cue_id"]), reason=payload["reason"])

    async def _message(self, device: str, message: object) -> None:
        if isinstance(message, Ack):
            return
        if isinstance(message, CueOffer):
            if message.cue_id in self._labels:
                self._emit(device, "resent", cue=self._labels[message.cue_id], scenario=message.scenario_id)
                return
            # A/B variant and locale only when the scenario has them, so older timelines read as before.
            shown = (("variant", message.variant), ("locale", message.locale))
            extra: dict[str, Any] = {key: value for key, value in shown if value}
            label = self._labels[message.cue_id] = f"cue#{len(self._labels) + 1}"
            self._ids[label] = message.cue_id
            self._last_cue[device] = message.cue_id
            stored = await self.core.store.get_cue(message.cue_id)
            because = _conditions(stored.explanation if stored is not None else {})
            # Predicted outcome scores at the offer, only when the files declare outcomes.
            scores = (stored.explanation.get("scores") if stored is not None else None) or {}
            if scores:
                extra["scores"] = scores
            self._emit(
                device,
                "cue",
                cue=label,
                scenario=message.scenario_id,
                channel=message.channel,
                upgrades=list(message.upgrades),
                message=message.message,
                expires_at=offset(message.expires_at - self.start),
                because=because,
                **extra,
            )
            self._blocked(self._blocked_by_cue.pop(message.cue_id, []))
        elif isinstance(message, Withdrawal):
            self._emit(device, "withdrawn", cue=self._label(message.cue_id), reason=message.reason)
        elif isinstance(message, EngagementUpdate):
            # While queued: the place in line and the estimated wait the device is told (core/queue_wait.py).
            waiting: dict[str, Any] = {"position": message.queue_position} if message.queue_position else {}
            if message.estimated_wait is not None:
                waiting["wait"] = round(message.estimated_wait, 3)
            if message.callback_at is not None:
                waiting["callback_at"] = offset(message.callback_at - self.start)
            if self._desk is not None:
                self._desk.seen_engagement(message.engagement_id, message.cue_id)
            self._emit(
                device,
                "engagement",
                cue=self._label(message.cue_id),
                state=message.state,
                queue=message.queue,
                associate=message.associate_name,
                **waiting,
            )
        elif isinstance(message, SessionFailed):
            self._emit(device, "session_failed", reason=message.reason)
        elif self._desk is not None:
            self._desk.to_device(device, message)

    def _why_not(self, device: str, candidates: Iterable[CompiledScenario]) -> None:
        concerned = {s.id for s in candidates}
        for check in self.core.explain_scenarios(device):
            if check.scenario_id in concerned and check.status == "not_qualified":
                failing = [[c.path, c.expected, c.observed] for c in check.conditions if not c.holds]
                self._emit(device, "not_qualified", scenario=check.scenario_id, failing=failing)

    def _label(self, cue_id: str) -> str:
        return self._labels.get(cue_id, "cue#?")

    def _blocked(self, records: Iterable[DecisionRecord]) -> None:
        for r in records:
            self._emit(r.device_id, "blocked", scenario=r.scenario_id, reason=r.reason, detail=r.detail)

    def _emit(self, device: str, kind: str, /, *, by_associate: bool = False, **data: Any) -> None:
        t = round(self.clock.now() - self.start, 6)
        self.outcomes.append(Outcome(t, device, kind, self._line, data, by_associate))


def _conditions(explanation: dict[str, Any]) -> list[list[str]]:
    out = []
    for item in explanation.get("conditions") or ():
        if isinstance(item, list | tuple) and len(item) == 2:
            out.append([str(item[0]), str(item[1])])
    return out


async def simulate(scenarios: ScenarioSet, trace: Trace, *, name: str = "trace", why: bool = False) -> list[Outcome]:
    """Replay `trace` against `scenarios`; TraceError names the line the core rejected."""
    simulation = Simulation(scenarios, start=trace.start, name=name, why=why)
    await simulation.open()
    try:
        return await simulation.run(trace.steps)
    except TraceError as exc:
        exc.outcomes = list(simulation.outcomes)
        raise
    finally:
        await simulation.close()


def simulate_files(directory: str | Path, trace_path: str | Path, *, why: bool = False) -> list[Outcome]:
    """Load the scenario folder and the trace, and replay (raises ScenarioError / TraceError)."""
    scenarios = ScenarioSet.load(str(directory))
    path = Path(trace_path)
    trace = parse_trace(path.read_text(encoding="utf-8"), str(path))
    return asyncio.run(simulate(scenarios, trace, name=str(path), why=why))


def render_text(outcomes: Sequence[Outcome]) -> str:
    lines = [o.text() for o in outcomes]
    counts = {kind: sum(1 for o in outcomes if o.kind == kind) for kind in ("cue", "blocked", "withdrawn", "assigned")}
    summary = f"-- {counts['cue']} cue(s) offered, {counts['blocked']} blocked, {counts['withdrawn']} withdrawn"
    if counts["assigned"]:
        summary += f", {counts['assigned']} assigned"
    lines.append(summary)
    return "\n".join(lines) + "\n"


def render_json(outcomes: Sequence[Outcome]) -> str:
    return "".join(json.dumps(o.as_dict(), ensure_ascii=False) + "\n" for o in outcomes)
