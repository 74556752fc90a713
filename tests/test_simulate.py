"""`cuepoint simulate`: recorded traces through the real core, deterministic timelines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.simulate import (
    Outcome,
    TraceError,
    parse_trace,
    render_json,
    render_text,
    simulate,
    simulate_files,
)

from .conftest import ROOT, SHIPPED

TRACES = SHIPPED / "traces"

PREMIUM = (
    '{"app_id": "fitkit", "consent": "full", '
    '"context": {"app.version": "4.2.0", "user.id": "%s", "user.tier": "premium"}}'
)


def hello(t: float, device: str, user: str) -> str:
    return f'{{"t": {t}, "device": "{device}", "hello": {PREMIUM % user}}}'


def event(t: float, device: str, name: str = "sync_failed") -> str:
    return f'{{"t": {t}, "device": "{device}", "event": "{name}"}}'


async def run(folder: Path, *lines: str) -> list[Outcome]:
    return await simulate(ScenarioSet.load(str(folder)), parse_trace("\n".join(lines)))


def cues(outcomes: list[Outcome], device: str | None = None) -> list[str]:
    return [o.data["scenario"] for o in outcomes if o.kind == "cue" and device in (None, o.device)]


async def test_fitkit_three_failures_within_ten_minutes_fire_once() -> None:
    outcomes = await run(
        SHIPPED,
        hello(0, "d1", "user-1"),
        event(60, "d1"),
        event(200, "d1"),
        event(599, "d1"),  # 3 within 10 minutes
        hello(600, "d2", "user-2"),
        event(600, "d2"),
        event(930, "d2"),
        event(1260, "d2"),  # 3 spread over 11 minutes
    )
    assert cues(outcomes, "d1") == ["fitkit-sync-failure"]
    assert cues(outcomes, "d2") == []
    (cue,) = [o for o in outcomes if o.kind == "cue"]
    assert (cue.t, cue.line, cue.data["cue"], cue.data["channel"]) == (599.0, 4, "cue#1", "audio")
    assert cue.text().startswith('+00:09:59.000 d1 CUE fitkit-sync-failure audio "Unable to sync? I can help you."')
    assert any("count(sync_failed) >= 3 within 10m (observed 3)" in text for _, text in cue.data["because"])
    # The failure at 60 s leaves the 10m window at 660 s, before the 2m ttl runs out: a timer at the window's
    # edge withdraws the cue then, stamped at its deadline though no line is there.
    (withdrawn,) = [o for o in outcomes if o.kind == "withdrawn"]
    assert (withdrawn.t, withdrawn.line, withdrawn.data["reason"]) == (660.0, None, "condition_cleared")


async def test_priority_collision_prints_blocked(tmp_path: Path) -> None:
    for name, priority in (("high", 100), ("low", 10)):
        (tmp_path / f"{name}.yaml").write_text(
            textwrap.dedent(f"""
            id: {name}
            priority: {priority}
            trigger: {{event: sync_failed}}
            cue: {{message: "{name} says hi", channel: chat}}
            """)
        )
    outcomes = await run(tmp_path, hello(0, "d1", "u"), event(1, "d1"))
    assert render_text(outcomes).splitlines()[:1] == ['+00:00:01.000 d1 CUE high chat "high says hi" (cue#1)']
    blocked = [o.text() for o in outcomes if o.kind == "blocked"]
    assert len(blocked) == 1 and blocked[0].startswith("+00:00:01.000 d1 BLOCKED low priority lost to high")
    # The next one is blocked because a cue is on screen, and nothing else.
    again = await run(tmp_path, hello(0, "d1", "u"), event(1, "d1"), event(2, "d1"))
    reasons = [(o.t, o.data["scenario"], o.data["reason"]) for o in again if o.kind == "blocked"]
    assert (2.0, "high", "cue_pending") in reasons


async def test_timers_fire_between_lines_at_their_own_time(tmp_path: Path) -> None:
    (tmp_path / "idle.yaml").write_text(
        textwrap.dedent("""
        id: idle-checkout
        trigger: {all: [{event: screen_viewed, where: {screen: {equals: checkout}}}, {idle: 45s}]}
        cue: {message: "Need a hand?", channel: chat, ttl: 1m}
        """)
    )
    checkout = '{"t": 10, "device": "d1", "event": "screen_viewed", "props": {"screen": "checkout"}}'
    outcomes = await run(tmp_path, hello(0, "d1", "u"), checkout, '{"t": 200}')
    assert [(o.text().splitlines()[0], o.line) for o in outcomes] == [
        ('+00:00:55.000 d1 CUE idle-checkout chat "Need a hand?" (cue#1)', None),
        ("+00:01:55.000 d1 WITHDRAWN cue#1 expired", None),
    ]


async def test_runs_are_deterministic() -> None:
    trace = parse_trace((TRACES / "fitkit-sync-failure.jsonl").read_text())
    scenarios = ScenarioSet.load(str(SHIPPED))
    first = render_text(await simulate(scenarios, trace))
    second = render_text(await simulate(scenarios, trace))
    assert first == second
    assert "cue#1" in first
    assert not re.search(r"[0-9a-f]{32}", first)  # no uuids
    assert render_json(await simulate(scenarios, trace)) == render_json(await simulate(scenarios, trace))


def test_iso_times_and_json_output() -> None:
    trace = parse_trace(
        "\n".join(
            [
                '{"t": "2025-03-01T09:00:00Z", "device": "d1", "hello": {"app_id": "fitkit"}}',
                '{"t": "2025-03-01T09:00:30+00:00", "device": "d1", "event": "sync_failed"}',
                '{"t": 45}',
            ]
        )
    )
    assert [s.t for s in trace.steps] == [0.0, 30.0, 45.0]
    assert trace.start == 1740819600.0


def test_invalid_trace_lines_are_reported_with_line_numbers() -> None:
    text = "\n".join(
        [
            '{"t": 0, "device": "d1", "hello": {"app_id": "fitkit"}}',
            "# a comment",
            '{"t": 1, "device": "d1", "event": "sync_failed"',
            '{"t": 2, "device": "d1", "evnt": "sync_failed"}',
            '{"t": 1, "device": "d1", "event": "sync_failed"}',
            '{"t": 3, "device": "d9", "event": "sync_failed"}',
            '{"t": 4, "device": "d1", "respond": {"cue": "first", "kind": "accepted"}}',
            '{"t": 5, "device": "d1", "hello": {"app_id": "fitkit", "context": {"tier": "gold"}}}',
        ]
    )
    with pytest.raises(TraceError) as info:
        parse_trace(text, "t.jsonl")
    assert [str(i) for i in info.value.issues] == [
        "t.jsonl:3: invalid JSON: Expecting ',' delimiter (column 48)",
        "t.jsonl:4: unknown field 'evnt'; a line has t, device and one of: hello, event, context, respond, close, chat, fallback, end",
        "t.jsonl:5: t: goes back in time (+00:00:01.000 after +00:00:02.000)",
        "t.jsonl:6: device 'd9' has not said hello yet; start it with a hello line",
        't.jsonl:7: respond.cue: expected "last" or "cue#N", got \'first\'',
        "t.jsonl:8: hello.context['tier']: unknown context key (use app.version, user.tier, ...)",
    ]


async def test_a_line_the_core_rejects_stops_the_replay_with_its_number() -> None:
    trace = parse_trace("\n".join([hello(0, "d1", "u"), event(1, "d1"), event(2, "d1", "Sync Failed")]), "t.jsonl")
    with pytest.raises(TraceError) as info:
        await simulate(ScenarioSet.load(str(SHIPPED)), trace, name="t.jsonl")
    (issue,) = info.value.issues
    assert issue.line == 3 and str(issue).startswith("t.jsonl:3: rejected by the server: ")
    assert "event.name" in issue.message


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", "simulate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_cli_expect_passes_and_fails_with_a_diff(tmp_path: Path) -> None:
    trace = TRACES / "fitkit-sync-failure.jsonl"
    expected = TRACES / "fitkit-sync-failure.expected"
    ok = cli("scenarios", str(trace), "--expect", str(expected))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok: ")

    plain = cli("scenarios", str(trace))
    assert plain.returncode == 0 and plain.stdout == expected.read_text()

    wrong = tmp_path / "wrong.expected"
    wrong.write_text(expected.read_text().replace("cue_pending", "priority"))
    bad = cli("scenarios", str(trace), "--expect", str(wrong))
    assert bad.returncode == 1
    assert "-+00:02:30.000 d1 BLOCKED fitkit-slow-sync priority" in bad.stdout
    assert "++00:02:30.000 d1 BLOCKED fitkit-slow-sync cue_pending" in bad.stdout
    assert "differs from" in bad.stderr

    as_json = cli("scenarios", str(trace), "--json")
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert rows[0]["outcome"] == "cue" and rows[0]["cue"] == "cue#1" and rows[0]["line"] > 0


def test_cli_reports_an_invalid_trace(tmp_path: Path) -> None:
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"t": 0, "device": "d1", "hello": {"app_id": "fitkit"}}\n{"t": "soon"}\n')
    done = cli("scenarios", str(trace))
    assert done.returncode == 2
    assert f"{trace}:2: t: 'soon' is not an ISO-8601 time" in done.stderr


@pytest.mark.parametrize("trace", sorted(TRACES.glob("*.jsonl")), ids=lambda p: p.stem)
def test_shipped_traces_match_their_expected_output(trace: Path) -> None:
    expected = trace.with_suffix(".expected")
    assert expected.exists(), f"write it with: cuepoint simulate scenarios {trace.name} > {expected.name}"
    assert render_text(simulate_files(SHIPPED, trace)) == expected.read_text()
