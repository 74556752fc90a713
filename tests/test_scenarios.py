"""The scenario language on its own: loading, errors with file/line/field, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuepoint_server.engine.engine import Engine
from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.engine.state import DeviceState, EventOccurrence
from cuepoint_server.scenarios.durations import parse_duration
from cuepoint_server.scenarios.loader import ScenarioError, load_directory, load_text
from cuepoint_server.scenarios.schema import scenario_schema_text
from cuepoint_server.scenarios.template import Template, TemplateError
from cuepoint_server.scenarios.versions import compare_versions

ROOT = Path(__file__).resolve().parent.parent

BASE = """
id: s1
trigger:
  event: sync_failed
  count: {at_least: 3, within: 10m}
cue: {message: hi, channel: audio}
"""


def issues(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_text(text, "f.yaml")
    return [str(i) for i in info.value.issues]


def test_shipped_scenarios_are_valid() -> None:
    loaded = load_directory(ROOT / "scenarios")
    assert {s.spec.id for s in loaded.scenarios} >= {"fitkit-sync-failure", "fitkit-slow-sync"}


def test_committed_json_schema_is_current() -> None:
    committed = (ROOT / "scenarios" / "scenario.schema.json").read_text()
    assert committed == scenario_schema_text(), "run: cuepoint schema -o scenarios/scenario.schema.json"
    assert json.loads(committed)["title"] == "Cuepoint scenario file"


def test_errors_name_file_line_and_field() -> None:
    found = issues(
        """id: s1
priority: high
trigger:
  all:
    - event: sync_failed
      count: {at_least: 3, within: 10 minutes}
    - any: []
cue:
  message: hi
  channel: pigeon
  colour: red
"""
    )
    assert found == [
        "f.yaml:2: priority: Input should be a valid integer, unable to parse string as an integer",
        "f.yaml:6: trigger.all[0].count.within: '10 minutes' is not a duration; write e.g. 30s, 10m, 1h30m or 2d",
        "f.yaml:7: trigger.all[1].any: List should have at least 1 item after validation, not 0",
        "f.yaml:10: cue.channel: Input should be 'audio', 'screen_share', 'chat' or 'video'",
        "f.yaml:11: cue.colour: unknown field 'colour'",
    ]


def test_empty_group_is_rejected_not_matched() -> None:
    assert any(
        "trigger.all" in i and "at least 1 item" in i
        for i in issues(
            BASE.replace("trigger:\n  event: sync_failed\n  count: {at_least: 3, within: 10m}", "trigger:\n  all: []")
        )
    )


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "trigger:\n  attribute: user.tier\n  equals: x",
            "trigger: a trigger must mention an event, idle, dwell, milestone, segment or score",
        ),
        ("trigger:\n  evnt: x", "trigger: a condition needs one of the keys"),
        (
            "trigger:\n  event: x\n  where: {d: {gt: 1}}\n  count: {within: 1m}\n  within: 1m",
            "give `within` inside",
        ),
        ("trigger:\n  event: x\n  where: {d: {}}", "trigger.where.d: needs at least one operator"),
        ("trigger:\n  event: x\n  where: {d: {matches: '('}}", "invalid regular expression"),
        ("trigger:\n  event: x\ntarget:\n  attribute: app.version\n  version_lt: banana", "is not a version"),
        ("trigger:\n  event: X Y", "trigger.event: 'X Y' is not a valid event name"),
    ],
)
def test_condition_errors(snippet: str, expected: str) -> None:
    text = f"id: s1\ncue: {{message: hi, channel: audio}}\n{snippet}\n"
    assert any(expected in i for i in issues(text)), issues(text)


def test_yaml_syntax_and_duplicate_keys() -> None:
    assert (
        issues("id: [unclosed\n")[0].startswith("f.yaml:2:  invalid YAML")
        or "invalid YAML" in issues("id: [unclosed\n")[0]
    )
    assert issues("id: a\nid: b\n") == ["f.yaml:2: invalid YAML: duplicate key 'id'"]


def test_bad_template_is_caught_at_load() -> None:
    text = BASE.replace("message: hi", "message: 'Hi {{ user.name | upper }}'")
    assert issues(text)[0].startswith("f.yaml:6: cue.message: cannot read placeholder")


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text(BASE)
    with pytest.raises(ScenarioError) as info:
        load_directory(tmp_path)
    assert "already used at" in str(info.value) and "b.yaml:2: id:" in str(info.value)


def test_file_may_hold_a_list() -> None:
    two = (
        "- "
        + BASE.strip().replace("\n", "\n  ")
        + "\n- "
        + BASE.strip().replace("\n", "\n  ").replace("id: s1", "id: s2")
    )
    assert [s.spec.id for s in load_text(two, "f.yaml").scenarios] == ["s1", "s2"]


def test_versions_durations_template() -> None:
    assert compare_versions("4.10", "4.9") == 1
    assert compare_versions("4.3", "4.3.0") == 0
    assert compare_versions("4.3.0-beta.2", "4.3.0") == -1
    assert compare_versions("v4.2.9+b7", "4.3") == -1
    assert parse_duration("1h30m") == 5400 and parse_duration(45) == 45
    with pytest.raises(ValueError):
        parse_duration("ten minutes")
    t = Template('Hi {{ user.first_name | default("there") }}, on {{ app.version }}')
    assert t.render({"app.version": "4.2"}) == "Hi there, on 4.2"
    assert t.render({"user.first_name": "Dana", "app.version": "4.2"}) == "Hi Dana, on 4.2"
    with pytest.raises(TemplateError):
        Template("{{ oops")


def _state(context: dict[str, object]) -> DeviceState:
    state = DeviceState("d1", "fitkit")
    state.context.update(context)  # type: ignore[arg-type]
    return state


def _set(text: str) -> ScenarioSet:
    return ScenarioSet.build(load_text(text, "f.yaml"))


def test_count_window_and_target() -> None:
    scenarios = _set(BASE.replace("id: s1", "id: s1\ntarget: {attribute: user.tier, equals: premium}"))
    engine = Engine(scenarios)
    state = _state({"user.tier": "premium"})
    for i, t in enumerate((0.0, 330.0, 660.0)):  # spread over 11 minutes
        state.record_event("sync_failed", EventOccurrence(t, f"s{i}", {}), scenarios.keep_seconds("sync_failed"))
    assert engine.qualified(state, {"sync_failed"}, 660.0) == []
    state.record_event("sync_failed", EventOccurrence(661.0, "s3", {}), 600.0)
    assert [s.id for s in engine.qualified(state, {"sync_failed"}, 661.0)] == ["s1"]
    state.context["user.tier"] = "free"
    assert engine.qualified(state, {"sync_failed"}, 661.0) == []


def test_value_threshold_and_explanation() -> None:
    scenarios = _set(
        "id: slow\ntrigger: {event: sync_completed, where: {duration_ms: {gt: 30000}}}\n"
        "cue: {message: hi, channel: chat}\n"
    )
    state = _state({})
    state.record_event("sync_completed", EventOccurrence(1.0, "a", {"duration_ms": 41000}), 0.0)
    (slow,) = Engine(scenarios).qualified(state, {"sync_completed"}, 2.0)
    why = slow.explain(state, 2.0)
    assert why.signal_ids == ["a"]
    assert why.conditions == [
        (
            "trigger",
            "last sync_completed where duration_ms > 30000 (observed sync_completed duration_ms=41000)",
        )
    ]
    state.record_event("sync_completed", EventOccurrence(3.0, "b", {"duration_ms": 900}), 0.0)
    assert Engine(scenarios).qualified(state, {"sync_completed"}, 3.0) == []


@pytest.mark.parametrize(
    ("cond", "context", "expected"),
    [
        ("{attribute: app.version, version_lt: '4.3'}", {"app.version": "4.2.9"}, True),
        ("{attribute: app.version, version_lt: '4.3'}", {"app.version": "4.10"}, False),
        ("{attribute: device.os, matches: '(?i)^android'}", {"device.os": "Android"}, True),
        ("{attribute: location.country, in: [FR, DE]}", {"location.country": "US"}, False),
        ("{attribute: attributes.cart, gte: 100, lt: 200}", {"attributes.cart": 150}, True),
        ("{attribute: attributes.cart, gte: 100, lt: 200}", {"attributes.cart": 250}, False),
        ("{attribute: user.tier, not_equals: premium}", {}, True),
        ("{attribute: user.tier, exists: false}", {}, True),
        ("{not: {attribute: user.tier, equals: premium}}", {"user.tier": "premium"}, False),
        (
            "{any: [{attribute: user.tier, equals: gold}, {attribute: user.tier, equals: premium}]}",
            {"user.tier": "premium"},
            True,
        ),
    ],
)
def test_attribute_operators(cond: str, context: dict[str, object], expected: bool) -> None:
    scenarios = _set(f"id: s\ntarget: {cond}\ntrigger: {{event: e}}\ncue: {{message: hi, channel: chat}}\n")
    state = _state(context)
    state.record_event("e", EventOccurrence(1.0, "x", {}), 0.0)
    assert bool(Engine(scenarios).qualified(state, {"e"}, 1.0)) is expected


def test_evaluation_is_indexed_by_event() -> None:
    unrelated = "\n".join(
        f"- id: other-{i}\n  trigger: {{event: other_{i}}}\n  cue: {{message: hi, channel: chat}}" for i in range(500)
    )
    scenarios = _set(unrelated + "\n- id: mine\n  trigger: {event: mine}\n  cue: {message: hi, channel: chat}\n")
    engine = Engine(scenarios)
    state = _state({})
    state.record_event("mine", EventOccurrence(1.0, "x", {}), 0.0)
    assert [s.id for s in engine.qualified(state, {"mine"}, 1.0)] == ["mine"]
    assert engine.evaluations == 1
