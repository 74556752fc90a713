"""`cuepoint simulate` with associates: traces sign them in and out, claim, chat and wrap up, and the timeline
shows queue, priority, assignment and fallback, deterministically (the same bytes every run)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.simulate import Outcome, TraceError, parse_trace, render_text, simulate, simulate_files

DATA = Path(__file__).resolve().parent / "data" / "simulate_desk"

QUEUE = """
routing:
  queues:
    - {id: support, fallback_after: 2m, offer_timeout: 20s}
  rules:
    - when: {attribute: user.tier, equals: premium}
      priority: 50
scenarios:
  - id: sync-help
    trigger: {event: sync_failed}
    cue: {message: "Unable to sync?", channel: chat, queue: support, ttl: 10m}
    cooldown: 0s
"""


def user(t: float, device: str, tier: str = "free") -> list[str]:
    """A device says hello, fails a sync (the cue) and accepts it at once."""
    hello = f'{{"app_id": "fitkit", "context": {{"user.id": "u-{device}", "user.tier": "{tier}"}}}}'
    return [
        f'{{"t": {t}, "device": "{device}", "hello": {hello}}}',
        f'{{"t": {t}, "device": "{device}", "event": "sync_failed"}}',
        f'{{"t": {t}, "device": "{device}", "respond": {{"cue": "last", "kind": "accepted"}}}}',
    ]


async def run(tmp_path: Path, *lines: str, scenario: str = QUEUE) -> list[Outcome]:
    (tmp_path / "s.yaml").write_text(textwrap.dedent(scenario))
    return await simulate(ScenarioSet.load(str(tmp_path)), parse_trace("\n".join(lines)))


def assigned(outcomes: list[Outcome]) -> list[tuple[str, str, int]]:
    """(associate, cue label, priority) of each assignment, in order."""
    return [(o.device, o.data["cue"], o.data["priority"]) for o in outcomes if o.kind == "assigned"]


def test_require_capacity_is_no_longer_always_blocked_and_the_timeline_matches() -> None:
    outcomes = simulate_files(DATA, DATA / "desk.jsonl")
    text = render_text(outcomes)
    assert text == (DATA / "desk.expected").read_text()
    # Before anyone signed in: blocked; once Ann serves vip (where routing sends premium users): offered.
    blocked = [o for o in outcomes if o.kind == "blocked"]
    assert [(o.t, o.device, o.data["reason"]) for o in blocked] == [
        (10, "d1", "no_capacity"),
        (71, "d3", "no_capacity"),
    ]
    assert [(o.t, o.device) for o in outcomes if o.kind == "cue"] == [(30, "d1"), (61, "d2")]
    # Routed: premium to vip with priority 50, to Ann (free longest); free-tier to support, to Bob.
    assert assigned(outcomes) == [("ann", "cue#1", 50), ("bob", "cue#2", 0)]
    chat = [(o.device, o.data["sender"], o.data["text"]) for o in outcomes if o.kind == "chat"]
    assert chat == [("ann", "associate", "Hi, I'm Ann. Let me look at your sync."), ("d1", "user", "Thanks!")]
    ended = [(o.device, o.data["cue"], o.data["disposition"]) for o in outcomes if o.kind == "ended"]
    assert ended == [("ann", "cue#1", "resolved")]
    # Bob signs out holding d2's engagement: it goes back to support, where nobody is left.
    back = [o for o in outcomes if o.kind == "engagement" and o.device == "d2"][-1]
    assert (back.t, back.data["state"], back.data["queue"]) == (95, "queued", "support")
    # Deterministic: the same bytes again.
    assert render_text(simulate_files(DATA, DATA / "desk.jsonl")) == text


async def test_assignment_follows_priority_then_longest_idle(tmp_path: Path) -> None:
    outcomes = await run(
        tmp_path,
        '{"t": 0, "associate": "ann", "sign_in": {"queues": ["support"]}}',
        '{"t": 5, "associate": "bob", "sign_in": {"queues": ["support"]}}',
        *user(10, "d1"),  # both free: Ann, free since 0, the longest
        *user(20, "d2"),  # Bob
        *user(30, "d3"),  # nobody free: waits (priority 0)
        *user(40, "d4", "premium"),  # waits too, priority 50
        '{"t": 50, "associate": "bob", "wrap_up": {"disposition": "resolved"}}',  # Bob: d4 before the older d3
        '{"t": 60, "associate": "ann", "wrap_up": {"disposition": "resolved"}}',  # Ann: d3
        '{"t": 70, "associate": "bob", "wrap_up": {"disposition": "resolved"}}',
        '{"t": 71, "associate": "ann", "wrap_up": {"disposition": "resolved"}}',
        *user(80, "d5"),  # Bob has been free since 70, Ann since 71: Bob
    )
    assert assigned(outcomes) == [
        ("ann", "cue#1", 0),
        ("bob", "cue#2", 0),
        ("bob", "cue#4", 50),
        ("ann", "cue#3", 0),
        ("bob", "cue#5", 0),
    ]
    waiting = [(o.device, o.data["state"]) for o in outcomes if o.kind == "engagement" and o.t in (30, 40)]
    assert ("d3", "queued") in waiting and ("d4", "queued") in waiting


async def test_fallback_callback_and_manual_claims_are_replayed(tmp_path: Path) -> None:
    outcomes = await run(
        tmp_path,
        *user(0, "d1"),
        # Nobody signed in: after fallback_after (2m) the user is offered a fallback, and picks a callback
        # in an hour.
        '{"t": 130, "device": "d1", "fallback": {"option": "callback", "phone": "+1 555 0100", "at": 3600}}',
        '{"t": 3000, "associate": "cy", "sign_in": {"queues": ["support"], "manual_claim": true}}',
        '{"t": 3600}',
        '{"t": 3610, "associate": "cy", "reject": "last"}',
        '{"t": 3620, "associate": "dee", "sign_in": {"queues": ["support"], "manual_claim": true}}',
        '{"t": 3630, "associate": "dee", "claim": "cue#1"}',
        '{"t": 3700, "associate": "dee", "wrap_up": {"disposition": "called_back"}}',
    )
    kinds = [(o.t, o.device, o.kind) for o in outcomes if o.kind not in ("cue", "answered")]
    fallback = next(o for o in outcomes if o.kind == "fallback")
    assert (fallback.t, fallback.data["options"]) == (120, ["callback", "chat", "cancel"])
    scheduled = next(o for o in outcomes if o.kind == "engagement" and o.data["state"] == "callback_requested")
    assert (scheduled.t, scheduled.data["callback_at"]) == (130, "+01:00:00.000")
    offers = [(o.t, o.device, o.data["cue"], o.data["kind"]) for o in outcomes if o.kind == "offered"]
    assert offers == [(3600, "cy", "cue#1", "callback"), (3620, "dee", "cue#1", "callback")]
    assert assigned(outcomes) == [("dee", "cue#1", 0)]
    assert (3700, "dee", "ended") in kinds
    text = render_text(outcomes)
    assert "cy OFFERED cue#1 queue=support priority=0 callback" in text
    assert "d1 FALLBACK cue#1 callback,chat,cancel" in text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"t": 0, "associate": "ann"}', "a line with an associate needs one of: sign_in, presence, sign_out"),
        ('{"t": 0, "associate": "ann", "sign_in": {"queues": "vip"}}', "sign_in.queues: expected a list"),
        ('{"t": 0, "associate": "ann", "chat": "hi"}', "associate 'ann' has not signed in yet"),
        ('{"t": 0, "associate": "ann", "device": "d1", "sign_in": {}}', "a line has a device or an associate"),
        ('{"t": 0, "associate": "ann", "sign_in": {"capacity": "two"}}', "sign_in.capacity: expected a number"),
    ],
)
def test_bad_associate_lines_are_named(line: str, message: str) -> None:
    with pytest.raises(TraceError) as info:
        parse_trace(line, "t.jsonl")
    assert message in str(info.value)
