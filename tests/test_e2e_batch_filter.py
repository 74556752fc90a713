"""A batch evaluates only the signals that may make a scenario qualify, and decides exactly as every signal would.

Ingest skips evaluating a listened-to event where no scenario on it can hold (engine/batch_filter.py:
`where` tests on the signal's own properties, context facts, a device's app). Differential: the real server
(port 0, hand-driven clock) takes one generated trace from two raw-stub devices; the reference sends each
signal in its own batch with the filter and the guard index off (`Engine.dispatching`: every listened-to
signal evaluated, every scenario on it), the other sends the trace in a generated split into batches with
them on. Cues, withdrawals, blocked decisions and milestones must be the same, burst by burst, and the
batched device must have been spared evaluations.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock
from cuepoint_server.storage import DecisionRecord

from .conftest import StartServer
from .raw_device import Observed, RawDevice

pytestmark = pytest.mark.timeout(180)

SCENARIOS = """\
milestones:
  - {id: big-spender, when: {event: buy, where: {price: {gt: 100}}}}
scenarios:
  - id: checkout                   # equality on the signal's own property
    priority: 50
    trigger: {event: view, where: {screen: {equals: checkout}}}
    cue: {message: "Checkout?", channel: chat, ttl: 30s}
    cooldown: 0s
  - id: cart-or-payment            # in
    priority: 45
    trigger: {event: view, where: {screen: {in: [cart, payment]}}}
    cue: {message: "Cart?", channel: chat, ttl: 30s}
    cooldown: 20s
  - id: slow                       # a threshold, on ints and doubles
    priority: 40
    trigger: {event: sync, where: {ms: {gt: 30000}}}
    cue: {message: "Slow?", channel: chat, ttl: 30s}
    cooldown: 0s
  - id: cheap                      # another threshold, and a bool, on one event with a milestone
    priority: 30
    trigger: {event: buy, where: {price: {lte: 9.5}}}
    cue: {message: "Cheap?", channel: chat, ttl: 30s}
    cooldown: 0s
  - id: gift
    priority: 35
    trigger: {all: [{event: buy, where: {gift: {equals: true}}}, {milestone: big-spender}]}
    cue: {message: "Gift?", channel: chat, ttl: 30s}
    cooldown: 0s
  - id: premium-rating             # a context fact (the target): all or none of a batch
    priority: 20
    target: {attribute: user.tier, equals: premium}
    trigger: {event: rate}
    cue: {message: "Thanks?", channel: chat, ttl: 30s}
    cooldown: 0s
  - id: errors                     # a count window: its event is evaluated at every signal
    priority: 10
    trigger: {event: err, count: {at_least: 2, within: 60s}}
    cue: {message: "Errors?", channel: chat, ttl: 30s}
    cooldown: 0s
"""

# What a signal in a generated trace can be: (event, properties).
ACTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("view", {"screen": "home"}),
    ("view", {"screen": "checkout"}),
    ("view", {"screen": "cart"}),
    ("view", {"screen": "payment"}),
    ("view", {}),
    ("sync", {"ms": 1000}),
    ("sync", {"ms": 40000}),
    ("sync", {"ms": 30000.5}),
    ("sync", {"ms": "slow"}),
    ("buy", {"price": 5}),
    ("buy", {"price": 9.5, "gift": True}),
    ("buy", {"price": 200}),
    ("buy", {"price": 20, "gift": True}),
    ("buy", {"price": 20, "gift": 1}),
    ("rate", {}),
    ("err", {}),
)


@dataclass(frozen=True)
class Case:
    tier: str
    # Per burst: seconds since the previous one, and its signals' action indexes (one instant, as a linger).
    bursts: list[tuple[int, list[int]]]
    # Per burst: the sizes of the batches the batched device splits it into.
    splits: list[list[int]]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    bursts = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0, 1, 15, 31]),
                st.lists(st.integers(0, len(ACTIONS) - 1), min_size=1, max_size=8),
            ),
            min_size=1,
            max_size=6,
        )
    )
    splits = []
    for _, actions in bursts:
        sizes, n = [], len(actions)
        while n:
            sizes.append(draw(st.integers(1, n)))
            n -= sizes[-1]
        splits.append(sizes)
    return Case(draw(st.sampled_from(["premium", "free"])), bursts, splits)


async def _settle(server: CuepointServer, devices: list[RawDevice], probe: itertools.count[int]) -> None:
    # Background work (withdrawals after their commits), then an empty batch each: its ack follows all else.
    for _ in range(3):
        await server.core.drain()
        await asyncio.sleep(0)
    for device in devices:
        await device.send(f"probe-{next(probe)}", [])


async def _run(server: CuepointServer, clock: ManualClock, case: Case, n: int) -> tuple[Observed, Observed, int, int]:
    engine = server.core.engine
    reference = RawDevice(server.address, f"ref-{n}", actions=ACTIONS, user_id=f"user-ref-{n}", tier=case.tier)
    batched = RawDevice(server.address, f"batched-{n}", actions=ACTIONS, user_id=f"user-batched-{n}", tier=case.tier)
    devices = {reference.device_id: reference, batched.device_id: batched}
    spent = {reference.device_id: 0, batched.device_id: 0}

    def on_decision(record: DecisionRecord) -> None:
        device = devices.get(record.device_id)
        if device is not None and record.outcome == "blocked":
            device.observed.blocked.append((device.stamp, record.scenario_id, record.reason, record.detail))

    async def send(device: RawDevice, batch_id: str, signals: list[tuple[str, int]]) -> None:
        engine.dispatching = device is batched  # ingest reads it synchronously, before the ack comes
        before = engine.evaluations
        try:
            await device.send(batch_id, signals)
        finally:
            spent[device.device_id] += engine.evaluations - before
            engine.dispatching = True

    server.core.decision_listeners.append(on_decision)
    probe = itertools.count()
    ids = itertools.count()
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(reference.welcomed.wait(), batched.welcomed.wait())
        start, t = clock.now(), 0
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
                await send(reference, f"r-{signal[0]}", [signal])
            at = 0
            for size in split:
                await send(batched, f"b-{signals[at][0]}", signals[at : at + size])
                at += size
            await _settle(server, list(devices.values()), probe)
            for device in devices.values():
                device.observed.milestones.append((index, tuple(server.core.device_view(device.device_id).milestones)))
        for device in devices.values():
            device.stamp = (len(case.bursts), "timer")
        clock.set(start + t + 100)
        await _settle(server, list(devices.values()), probe)
    finally:
        engine.dispatching = True
        server.core.decision_listeners.remove(on_decision)
        await reference.close()
        await batched.close()
    return reference.observed, batched.observed, spent[reference.device_id], spent[batched.device_id]


# Home, checkout, home in one batch: only the middle one is evaluated; its cue is withdrawn by the next.
CHECKOUT_BETWEEN = Case("free", [(0, [0, 1, 0])], [[3]])
# A gift before and after the milestone, in one batch.
GIFT_AROUND_MILESTONE = Case("premium", [(0, [12, 11, 13, 10])], [[4]])


async def test_a_batch_decides_as_every_signal_evaluated(start_server: StartServer, clock: ManualClock) -> None:
    server = await start_server(SCENARIOS)
    counter = itertools.count()
    loop = asyncio.get_running_loop()
    totals = {"reference": 0, "batched": 0, "cues": 0}

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(case=cases())
    @example(case=CHECKOUT_BETWEEN)
    @example(case=GIFT_AROUND_MILESTONE)
    def same(case: Case) -> None:
        future = asyncio.run_coroutine_threadsafe(_run(server, clock, case, next(counter)), loop)
        reference, batched, spent_reference, spent_batched = future.result(timeout=120)
        assert batched == reference, case
        totals["reference"] += spent_reference
        totals["batched"] += spent_batched
        totals["cues"] += len(reference.cues)

    await asyncio.to_thread(same)
    # The comparison saw cues, and the batched device was spared evaluations (not all: a pending cue, a
    # milestone to reach or a count window make every signal of its event count).
    assert totals["cues"] > 20 and totals["reference"] - totals["batched"] > 50, totals
