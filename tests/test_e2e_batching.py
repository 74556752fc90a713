"""One meaning, however signals arrive: one at a time, in any split into batches, with resends, or in `simulate`.

The real server (port 0, hand-driven clock) takes the same generated trace from two raw-stub devices: one
sends each signal in its own batch, the other in a generated split into batches, resending earlier batches
now and then. `cuepoint simulate` replays the trace too. All three must give the same cues, withdrawals,
blocked decisions and milestones, attributed to the same burst of the trace.

A burst is a few signals at one instant (what the SDK's 20 ms linger puts into one batch); bursts are
separated by gaps during which timers (cue expiry, windows) fire.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.clock import ManualClock
from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.simulate import Simulation, parse_trace
from cuepoint_server.storage import DecisionRecord

from .conftest import StartServer
from .raw_device import Observed, RawDevice, Stamp

pytestmark = pytest.mark.timeout(120)

SCENARIOS = """\
milestones:
  - {id: details, when: {event: screen_viewed, where: {screen: {equals: driver_details}}}}
  - {id: paid, when: {event: screen_viewed, where: {screen: {equals: payment}}}}
scenarios:
  - id: stuck-after-details        # a milestone and a "last occurrence" condition
    priority: 40
    trigger: {all: [{milestone: details}, {not: {milestone: paid}}, {event: sync_failed}]}
    outcome: paid
    cue: {message: "Stuck?", channel: chat, ttl: 30s}
    cooldown: 20s
  - id: slow-sync                  # last occurrence with a where: cleared by the next, faster sync
    priority: 30
    trigger: {event: sync_completed, where: {duration_ms: {gt: 30000}}}
    cue: {message: "Slow?", channel: chat, ttl: 30s}
    cooldown: 20s
  - id: failing                    # a count window
    priority: 20
    trigger: {event: sync_failed, count: {at_least: 2, within: 60s}}
    cue: {message: "Failing?", channel: chat, ttl: 30s}
    cooldown: 10s
  - id: streaky                    # a streak, broken by a success
    priority: 10
    trigger: {event: sync_failed, streak: {at_least: 3, broken_by: sync_succeeded}}
    cue: {message: "Again?", channel: chat, ttl: 30s}
    cooldown: 0s
"""

# What a signal in a generated trace can be.
ACTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("screen_viewed", {"screen": "driver_details"}),
    ("screen_viewed", {"screen": "payment"}),
    ("screen_viewed", {"screen": "home"}),
    ("sync_failed", {}),
    ("sync_succeeded", {}),
    ("sync_completed", {"duration_ms": 40000}),
    ("sync_completed", {"duration_ms": 1000}),
)


@dataclass(frozen=True)
class Case:
    # Per burst: seconds since the previous burst, and the action indexes of its signals.
    bursts: list[tuple[int, list[int]]]
    # Per burst: sizes of the batches its signals are split into (they sum to the burst's length).
    splits: list[list[int]]
    # Per batch sent by the batching device (in order): whether an earlier batch is resent right after it.
    resends: list[int]


def _split(draw: st.DrawFn, n: int) -> list[int]:
    sizes = []
    while n:
        size = draw(st.integers(1, n))
        sizes.append(size)
        n -= size
    return sizes


@st.composite
def cases(draw: st.DrawFn) -> Case:
    bursts = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0, 1, 5, 15, 31, 61]),
                st.lists(st.integers(0, len(ACTIONS) - 1), min_size=1, max_size=5),
            ),
            min_size=1,
            max_size=7,
        )
    )
    splits = [_split(draw, len(actions)) for _, actions in bursts]
    batches = sum(len(s) for s in splits)
    resends = draw(st.lists(st.integers(-1, batches), min_size=batches, max_size=batches))
    return Case(bursts, splits, resends)


async def _settle(server: CuepointServer, devices: list[RawDevice], probe: Iterator[int]) -> None:
    # Background settlements (withdrawals after their status commits) then an empty batch per device:
    # its ack comes after everything the server sent the device before it.
    for _ in range(3):
        await server.core.drain()
        await asyncio.sleep(0)
    for device in devices:
        await device.send(f"probe-{next(probe)}", [])


async def _over_the_server(server: CuepointServer, clock: ManualClock, case: Case, n: int) -> tuple[Observed, Observed]:
    one = RawDevice(server.address, f"one-{n}", actions=ACTIONS, user_id=f"user-one-{n}", tier="premium")
    batched = RawDevice(server.address, f"batched-{n}", actions=ACTIONS, user_id=f"user-batched-{n}", tier="premium")
    devices = {one.device_id: one, batched.device_id: batched}

    def on_decision(record: DecisionRecord) -> None:
        device = devices.get(record.device_id)
        if device is not None and record.outcome == "blocked":
            device.observed.blocked.append((device.stamp, record.scenario_id, record.reason, record.detail))

    server.core.decision_listeners.append(on_decision)
    probe = itertools.count()
    ids = itertools.count()
    resends = iter(case.resends)
    sent: list[tuple[str, list[tuple[str, int]]]] = []
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(one.welcomed.wait(), batched.welcomed.wait())
        start = clock.now()
        t = 0
        for index, ((gap, actions), split) in enumerate(zip(case.bursts, case.splits, strict=True)):
            for device in devices.values():
                device.stamp = (index, "timer")
            t += gap
            clock.set(start + t)
            await _settle(server, list(devices.values()), probe)
            for device in devices.values():
                device.stamp = (index, "signal")
            signals = [(f"s{next(ids)}", action) for action in actions]
            for signal in signals:
                await one.send(f"one-{signal[0]}", [signal])
            position = 0
            for size in split:
                batch = (f"batch-{len(sent)}", signals[position : position + size])
                position += size
                await batched.send(*batch)
                sent.append(batch)
                again = next(resends)
                if 0 <= again < len(sent):
                    # A reconnect resends what it has not seen acked: already stored, counted once.
                    await batched.send(f"resend-{len(sent)}", sent[again][1])
            await _settle(server, list(devices.values()), probe)
            for device in devices.values():
                view = server.core.device_view(device.device_id)
                device.observed.milestones.append((index, tuple(view.milestones)))
        for device in devices.values():
            device.stamp = (len(case.bursts), "timer")
        clock.set(start + t + 100)
        await _settle(server, list(devices.values()), probe)
    finally:
        server.core.decision_listeners.remove(on_decision)
        await one.close()
        await batched.close()
    return one.observed, batched.observed


async def _in_simulate(scenarios: ScenarioSet, case: Case) -> Observed:
    lines = ['{"t": 0, "device": "d", "hello": {"app_id": "fitkit", "context": {"user.tier": "premium"}}}']
    burst_of_line: dict[int, int] = {}
    times = []
    t = 0
    for index, (gap, actions) in enumerate(case.bursts):
        t += gap
        times.append(t)
        for action in actions:
            name, props = ACTIONS[action]
            lines.append(json.dumps({"t": t, "device": "d", "event": name, "props": props}))
            burst_of_line[len(lines)] = index
    lines.append(json.dumps({"t": t + 100}))
    trace = parse_trace("\n".join(lines))
    simulation = Simulation(scenarios, start=trace.start)
    await simulation.open()
    observed = Observed()
    try:
        await simulation.run(trace.steps[:1])
        steps_of = {
            index: [s for s in trace.steps if burst_of_line.get(s.line) == index] for index in range(len(times))
        }
        for index in range(len(times)):
            await simulation.run(steps_of[index])
            observed.milestones.append((index, tuple(simulation.core.device_view("d").milestones)))
        await simulation.run(trace.steps[-1:])
    finally:
        await simulation.close()

    def stamp(t: float, line: int | None) -> Stamp:
        if line is not None and line in burst_of_line:
            return (burst_of_line[line], "signal")
        return (next((i for i, at in enumerate(times) if at >= t), len(times)), "timer")

    for o in simulation.outcomes:
        if o.kind == "cue":
            observed.cues.append((stamp(o.t, o.line), o.data["scenario"]))
        elif o.kind == "withdrawn":
            observed.withdrawn.append((stamp(o.t, o.line), o.data["reason"]))
        elif o.kind == "blocked":
            observed.blocked.append((stamp(o.t, o.line), o.data["scenario"], o.data["reason"], o.data["detail"]))
    return observed


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[tuple[asyncio.Runner, CuepointServer, ManualClock, ScenarioSet]]:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "batching.yaml").write_text(SCENARIOS)
    clock = ManualClock(start=1_800_000_000.0)
    runner = asyncio.Runner()
    config = ServerConfig(port=0, db=str(tmp_path / "batching.db"), scenarios=str(folder), watch_scenarios=False)
    server = runner.run(CuepointServer.start(config, clock=clock))
    try:
        yield runner, server, clock, ScenarioSet.load(str(folder))
    finally:
        runner.run(server.stop(0.5))
        runner.close()


# driver_details then payment in one batch: the milestone for driver_details is reached first.
DETAILS_THEN_PAYMENT = Case(bursts=[(0, [0, 3, 1])], splits=[[3]], resends=[-1])
# A slow sync fires slow-sync; a fast one in the same batch clears it again.
SLOW_THEN_FAST = Case(bursts=[(0, [5, 6]), (5, [5])], splits=[[2], [1]], resends=[-1, 0])


def test_one_meaning_however_signals_arrive(
    live_server: tuple[asyncio.Runner, CuepointServer, ManualClock, ScenarioSet],
) -> None:
    runner, server, clock, scenarios = live_server
    counter = itertools.count()

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases())
    @example(case=DETAILS_THEN_PAYMENT)
    @example(case=SLOW_THEN_FAST)
    def same_everywhere(case: Case) -> None:
        one, batched = runner.run(_over_the_server(server, clock, case, next(counter)))
        simulated = runner.run(_in_simulate(scenarios, case))
        assert batched.as_dict() == one.as_dict(), case
        assert simulated.as_dict() == one.as_dict(), case

    same_everywhere()


async def test_a_milestone_reached_mid_batch_counts(start_server: StartServer) -> None:
    server = await start_server(SCENARIOS)
    device = RawDevice(server.address, "phone-1", actions=ACTIONS, user_id="user-1", tier="premium")
    try:
        async with asyncio.timeout(10):
            await device.welcomed.wait()
        # driver_details then payment, in one SignalBatch.
        await device.send("b1", [("s1", 0), ("s2", 1)])
        assert server.core.device_view("phone-1").milestones == ["details", "paid"]
    finally:
        await device.close()
