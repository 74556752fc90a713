"""Compile scenario condition trees into Python closures.

Closures are the fast path (measured ~630k evals/s against ~86k for CEL).
A parallel explainer re-walks the tree only when a scenario fires, to tell the
associate exactly which conditions held and with what observed values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.state import DeviceState, Scalar
from .durations import format_duration
from .loader import LoadedScenario
from .model import (
    AllCondition,
    AnyCondition,
    AttributeCondition,
    Comparison,
    EventCondition,
    NotCondition,
)
from .template import Template
from .versions import compare_versions

__all__ = ["CompiledScenario", "Explanation", "Predicate", "compile_scenario"]

Predicate = Callable[[DeviceState, float], bool]
ValueTest = Callable[[Scalar | None], bool]


@dataclass(slots=True)
class Explanation:
    conditions: list[tuple[str, str]] = field(default_factory=list)
    signal_ids: list[str] = field(default_factory=list)


Explainer = Callable[[DeviceState, float, Explanation], bool]


@dataclass(frozen=True, slots=True)
class CompiledScenario:
    id: str
    name: str
    file: str
    line: int
    priority: int
    enabled: bool
    apps: frozenset[str]
    target: Predicate | None
    trigger: Predicate
    # Event names whose arrival may change the trigger's outcome.
    events: frozenset[str]
    # Seconds of history each event needs to be kept for this scenario.
    retention: Mapping[str, float]
    template: Template
    cooldown: float
    channel: str
    upgrades: tuple[str, ...]
    ttl: float
    title: str
    queue: str
    _explain_target: Explainer | None
    _explain_trigger: Explainer

    def applies_to(self, app_id: str) -> bool:
        return not self.apps or app_id in self.apps

    def qualifies(self, state: DeviceState, now: float) -> bool:
        if self.target is not None and not self.target(state, now):
            return False
        return self.trigger(state, now)

    def explain(self, state: DeviceState, now: float) -> Explanation:
        out = Explanation()
        if self._explain_target is not None:
            self._explain_target(state, now, out)
        self._explain_trigger(state, now, out)
        return out


def compile_scenario(loaded: LoadedScenario) -> CompiledScenario:
    spec = loaded.spec
    retention: dict[str, float] = {}
    events: set[str] = set()
    trigger, explain_trigger = _compile(spec.trigger, "trigger", events, retention)
    target = explain_target = None
    if spec.target is not None:
        target, explain_target = _compile(spec.target, "target", set(), retention)
    return CompiledScenario(
        id=spec.id,
        name=spec.name or spec.id,
        file=loaded.file,
        line=loaded.line,
        priority=spec.priority,
        enabled=spec.enabled,
        apps=frozenset(spec.apps),
        target=target,
        trigger=trigger,
        events=frozenset(events),
        retention=retention,
        template=loaded.template,
        cooldown=spec.cooldown,
        channel=spec.cue.channel.value,
        upgrades=tuple(u.value for u in spec.cue.upgrades),
        ttl=spec.cue.ttl,
        title=spec.cue.title,
        queue=spec.cue.queue,
        _explain_target=explain_target,
        _explain_trigger=explain_trigger,
    )


def _compile(
    cond: Any, path: str, events: set[str], retention: dict[str, float]
) -> tuple[Predicate, Explainer]:
    if isinstance(cond, AllCondition):
        parts = [_compile(c, f"{path}.all[{i}]", events, retention) for i, c in enumerate(cond.all)]
        preds = tuple(p for p, _ in parts)
        explainers = tuple(e for _, e in parts)

        def all_pred(state: DeviceState, now: float) -> bool:
            return all(p(state, now) for p in preds)

        def all_explain(state: DeviceState, now: float, out: Explanation) -> bool:
            return all(e(state, now, out) for e in explainers)

        return all_pred, all_explain
    if isinstance(cond, AnyCondition):
        parts = [_compile(c, f"{path}.any[{i}]", events, retention) for i, c in enumerate(cond.any)]
        preds = tuple(p for p, _ in parts)
        explainers = tuple(e for _, e in parts)

        def any_pred(state: DeviceState, now: float) -> bool:
            return any(p(state, now) for p in preds)

        def any_explain(state: DeviceState, now: float, out: Explanation) -> bool:
            held = False
            for e in explainers:
                held = e(state, now, out) or held
            return held

        return any_pred, any_explain
    if isinstance(cond, NotCondition):
        inner, _ = _compile(cond.not_, f"{path}.not", events, retention)
        text = f"not ({_describe(cond.not_)})"

        def not_pred(state: DeviceState, now: float) -> bool:
            return not inner(state, now)

        def not_explain(state: DeviceState, now: float, out: Explanation) -> bool:
            held = not inner(state, now)
            if held:
                out.conditions.append((path, text))
            return held

        return not_pred, not_explain
    if isinstance(cond, AttributeCondition):
        return _compile_attribute(cond, path)
    if isinstance(cond, EventCondition):
        events.add(cond.event)
        window = cond.count.within if cond.count else (cond.within or 0.0)
        retention[cond.event] = max(retention.get(cond.event, 0.0), window)
        return _compile_event(cond, path)
    raise TypeError(f"unknown condition {type(cond).__name__}")


def _compile_attribute(cond: AttributeCondition, path: str) -> tuple[Predicate, Explainer]:
    key = cond.attribute
    test = value_test(cond)
    text = _describe(cond)

    def pred(state: DeviceState, now: float) -> bool:
        return test(state.context.get(key))

    def explain(state: DeviceState, now: float, out: Explanation) -> bool:
        value = state.context.get(key)
        held = test(value)
        if held:
            out.conditions.append((path, f"{text} (is {value!r})"))
        return held

    return pred, explain


def _compile_event(cond: EventCondition, path: str) -> tuple[Predicate, Explainer]:
    name = cond.event
    where = _where_test(cond.where)
    text = _describe(cond)
    if cond.count is None:
        max_age = cond.within if cond.within is not None else math.inf

        def latest(state: DeviceState, now: float) -> bool:
            last = state.last(name)
            return last is not None and now - last.time <= max_age and where(last.props)

        def latest_explain(state: DeviceState, now: float, out: Explanation) -> bool:
            held = latest(state, now)
            if held:
                last = state.last(name)
                assert last is not None
                shown = ", ".join(f"{k}={v!r}" for k, v in last.props.items())
                out.conditions.append((path, f"{text} (observed {name}{f' {shown}' if shown else ''})"))
                out.signal_ids.append(last.signal_id)
            return held

        return latest, latest_explain

    within, at_least, at_most = cond.count.within, cond.count.at_least, cond.count.at_most

    def matching(state: DeviceState, now: float) -> list[Any]:
        return [o for o in state.occurrences(name, now - within) if where(o.props)]

    def counted(state: DeviceState, now: float) -> bool:
        n = len(matching(state, now))
        return n >= at_least and (at_most is None or n <= at_most)

    def counted_explain(state: DeviceState, now: float, out: Explanation) -> bool:
        found = matching(state, now)
        n = len(found)
        held = n >= at_least and (at_most is None or n <= at_most)
        if held:
            out.conditions.append((path, f"{text} (observed {n})"))
            out.signal_ids.extend(o.signal_id for o in found)
        return held

    return counted, counted_explain


def _where_test(where: Mapping[str, Comparison] | None) -> Callable[[Mapping[str, Scalar]], bool]:
    if not where:
        return lambda props: True
    tests = tuple((key, value_test(cmp)) for key, cmp in where.items())
    return lambda props: all(test(props.get(key)) for key, test in tests)


def _number(value: Scalar | None) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return None


def _version_cmp(value: Scalar | None, other: str) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return compare_versions(str(value), other)
    except ValueError:
        return None


def value_test(cmp: Comparison) -> ValueTest:
    """One predicate over a value for every operator given (all must hold).

    A missing value satisfies only `exists: false`, `not_equals` and `not_in`.
    """
    tests: list[ValueTest] = []
    ops = cmp.operators()
    for op, arg in ops.items():
        tests.append(_operator(op, arg))
    if len(tests) == 1:
        return tests[0]
    frozen = tuple(tests)
    return lambda value: all(t(value) for t in frozen)


def _operator(op: str, arg: Any) -> ValueTest:
    if op == "equals":
        return lambda v: v is not None and v == arg
    if op == "not_equals":
        return lambda v: v is None or v != arg
    if op == "in_":
        options = frozenset(arg)
        return lambda v: v is not None and v in options
    if op == "not_in":
        excluded = frozenset(arg)
        return lambda v: v is None or v not in excluded
    if op in ("gt", "gte", "lt", "lte"):
        bound = float(arg)
        compare: Callable[[float], bool] = {
            "gt": lambda n: n > bound,
            "gte": lambda n: n >= bound,
            "lt": lambda n: n < bound,
            "lte": lambda n: n <= bound,
        }[op]

        def numeric(v: Scalar | None) -> bool:
            n = _number(v)
            return n is not None and compare(n)

        return numeric
    if op.startswith("version_"):
        wanted = {
            "version_eq": (0,),
            "version_lt": (-1,),
            "version_lte": (-1, 0),
            "version_gt": (1,),
            "version_gte": (1, 0),
        }[op]

        def version(v: Scalar | None) -> bool:
            c = _version_cmp(v, arg)
            return c is not None and c in wanted

        return version
    if op == "matches":
        pattern = re.compile(arg)
        return lambda v: v is not None and pattern.search(str(v)) is not None
    if op == "exists":
        return lambda v: (v is not None) == arg
    raise ValueError(f"unknown operator {op}")


_OP_TEXT = {
    "equals": "=",
    "not_equals": "!=",
    "in_": "in",
    "not_in": "not in",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "version_eq": "version =",
    "version_lt": "version <",
    "version_lte": "version <=",
    "version_gt": "version >",
    "version_gte": "version >=",
    "matches": "matches",
    "exists": "exists",
}


def _shown(arg: Any) -> str:
    if isinstance(arg, float) and arg.is_integer():
        return str(int(arg))
    return repr(arg)


def _describe_ops(subject: str, cmp: Comparison) -> str:
    return " and ".join(f"{subject} {_OP_TEXT[op]} {_shown(arg)}" for op, arg in cmp.operators().items())


def _describe(cond: Any) -> str:
    if isinstance(cond, AttributeCondition):
        return _describe_ops(cond.attribute, cond)
    if isinstance(cond, EventCondition):
        where = ""
        if cond.where:
            where = " where " + " and ".join(_describe_ops(k, c) for k, c in cond.where.items())
        if cond.count is None:
            recent = f" within {format_duration(cond.within)}" if cond.within is not None else ""
            return f"last {cond.event}{where}{recent}"
        bound = f">= {cond.count.at_least}"
        if cond.count.at_most is not None:
            bound += f" and <= {cond.count.at_most}"
        return f"count({cond.event}{where}) {bound} within {format_duration(cond.count.within)}"
    if isinstance(cond, AllCondition):
        return " and ".join(f"({_describe(c)})" for c in cond.all)
    if isinstance(cond, AnyCondition):
        return " or ".join(f"({_describe(c)})" for c in cond.any)
    if isinstance(cond, NotCondition):
        return f"not ({_describe(cond.not_)})"
    return type(cond).__name__
