"""Evaluation cost as the loaded scenarios grow: 10 -> 100 -> 1,000 -> 10,000, in process.

    .venv/bin/python bench/bench_eval.py [--sizes 10,100,1000,10000] [--json]

Scenario ``sNNNNN`` (generated YAML, loaded through the real loader and ``ScenarioSet``) listens to
its own event ``ev_NNNNN`` and to the shared event ``popular``; its target holds (user.tier premium)
but no trigger matches the signals sent, so every evaluation walks its conditions and nothing fires:

* "one listener": a signal of ``ev_00007`` concerns one scenario whatever the size: its cost should
  stay flat as unrelated scenarios are added (the event index);
* "every scenario listens": a signal of ``popular`` concerns all of them: cost grows with the size
  (for contrast).

Two sweeps answer issue 13's evaluation targets (ratios printed):

* "unrelated, time-driven included" (``--timed-sizes``, 10 -> 10,000): a fifth of the scenarios are the
  one-listener kind above, the rest time-driven and unrelated to the device: idle scoped to another app,
  absence of a follow-up to their own event, dwell on their own screen, and an idle gated on their own
  event (so it arms for every device). ``Core.ingest`` per signal of ``ev_00005`` unbatched (one signal
  per batch, where timer scheduling after every batch showed) and in batches, and what a timer firing
  for the device (idle 10 minutes) evaluates (``Engine.qualified_timed``): flat means <= 1.5x;
* "one event" (``--shared-sizes``, 1 -> 1,000): every scenario listens to ``popular``, as variants of
  one another do (a few targets, thresholds and windows; their own messages, priorities, cooldowns);
  the distinct scenarios above (each with a condition of its own); and "values": each its own screen
  value and count threshold on ``popular`` itself. Engine and ``Core.ingest`` per signal, ratio to one
  scenario (target <= 20x for every kind: the guard index, engine/dispatch.py, evaluates only the
  scenarios whose conditions may hold).

Three levels: ``Engine.qualified`` alone (evaluations/s and us per signal); ``Core.ingest`` end to end
in process (validation, state, evaluation, a ``:memory:`` SQLite store, the ack), per signal, with
batches of ``--batch`` signals; and, as the page's baseline, the bare echo's per-message and per-signal
cost from a short run (server subprocess, 50 streams).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from _common import SHAPES, Metric, check_quiet, note, report
from _ingest_shape import ingest_like_bench_ingest
from echo_server import echo_throughput

from cuepoint_server.clock import SystemClock
from cuepoint_server.core.model import Hello, IncomingBatch, IncomingSignal
from cuepoint_server.core.service import Core
from cuepoint_server.engine.engine import Engine
from cuepoint_server.engine.scenario_set import ScenarioSet
from cuepoint_server.engine.state import DeviceState, EventOccurrence
from cuepoint_server.storage import SqliteStore

LONELY = "ev_00007"
POPULAR = "popular"

SCENARIO = """\
- id: s{i:05d}
  name: "Generated {i}"
  target: {{attribute: user.tier, equals: premium}}
  trigger:
    any:
      - event: ev_{i:05d}
        where: {{duration_ms: {{gt: 30000}}}}
        count: {{at_least: 3, within: 10m}}
      - all:
          - event: popular
            where: {{screen: {{equals: checkout}}}}
          - attribute: app.version
            version_lt: "4.0"
  cue:
    message: "Hi {{{{ user.first_name | default('there') }}}}, need a hand?"
    channel: audio
  cooldown: 1h
"""


# Unrelated time-driven scenarios (kinds 1-4; kind 0 is SCENARIO): none applies to the bench device's events.
TIMED = (
    "",
    """\
- id: t{i:05d}
  apps: [other-app]
  trigger: {{idle: 5m}}
  cue: {{message: "Still there? {i}", channel: chat}}
""",
    """\
- id: t{i:05d}
  trigger:
    event: ev_{i:05d}
    not_followed_by: {{event: ev_{i:05d}_done, within: 10m}}
  cue: {{message: "Stuck? {i}", channel: chat}}
""",
    """\
- id: t{i:05d}
  trigger: {{dwell: {{screen: screen_{i:05d}, at_least: 30s}}}}
  cue: {{message: "Need help on this page? {i}", channel: chat}}
""",
    """\
- id: t{i:05d}
  trigger:
    all:
      - event: ev_{i:05d}
        within: 1h
      - idle: 5m
  cue: {{message: "Come back? {i}", channel: chat}}
""",
)
# The timed sweep's one-listener event: scenario 5 is a SCENARIO (kind 0) at every size.
TIMED_LONELY = "ev_00005"

# Variants of one another on one event: 3 targets, 4 thresholds, 2 windows, combined by i: 12 distinct conditions.
VARIANT = """\
- id: v{i:05d}
  priority: {priority}
  target: {{attribute: user.tier, equals: {tier}}}
  trigger:
    event: popular
    where: {{screen: {{equals: checkout}}}}
    count: {{at_least: {at_least}, within: {within}}}
  cue:
    message: "Offer {i}: need a hand?"
    channel: audio
  cooldown: {cooldown}
"""


# Conditions of their own on one event: each scenario its own screen value and its own count threshold (beyond
# what the bench sends, so nothing fires), as "distinct" but on the event itself (the guard index's case).
VALUE = """\
- id: x{i:05d}
  priority: {priority}
  target: {{attribute: user.tier, equals: premium}}
  trigger:
    any:
      - event: popular
        where: {{screen: {{equals: page_{i:05d}}}}}
      - event: popular
        where: {{screen: {{equals: home}}}}
        count: {{at_least: {at_least}, within: 10m}}
  cue:
    message: "Offer {i}"
    channel: audio
"""


def value_text(n: int) -> str:
    return "".join(VALUE.format(i=i, priority=i % 7, at_least=100_000 + i) for i in range(n))


def scenario_text(n: int) -> str:
    return "".join(SCENARIO.format(i=i) for i in range(n))


def timed_text(n: int) -> str:
    return "".join(SCENARIO.format(i=i) if i % 5 == 0 else TIMED[i % 5].format(i=i) for i in range(n))


def variant_text(n: int) -> str:
    return "".join(
        VARIANT.format(
            i=i,
            priority=i % 7,
            tier=("premium", "gold", "basic")[i % 3],
            at_least=3 + i % 4,
            within=("5m", "10m")[i % 2],
            cooldown=f"{1 + i % 5}h",
        )
        for i in range(n)
    )


def load_set(n: int, folder: Path, text: Callable[[int], str] = scenario_text) -> tuple[ScenarioSet, float]:
    """Through the server's own loading path (``ScenarioSet.load`` of a folder); returns (set, seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generated.yaml").write_text(text(n))
    started = time.perf_counter()
    scenarios = ScenarioSet.load(str(folder))
    return scenarios, time.perf_counter() - started


def device_state(now: float) -> DeviceState:
    state = DeviceState("bench-device", "bench")
    state.context.update(
        {
            "app.id": "bench",
            "app.version": "4.2.0",
            "device.os": "iOS",
            "user.tier": "premium",
            "user.first_name": "Sam",
            "consent": "full",
        }
    )
    # A little history for both events, inside the windows.
    for k in range(5):
        state.record_event(LONELY, EventOccurrence(now - 60 + k, f"l{k}", {"duration_ms": 100}), 600.0)
        state.record_event(POPULAR, EventOccurrence(now - 60 + k, f"p{k}", {"screen": "home"}), 600.0)
    return state


def timed(fn: Callable[[], object], budget: float, min_calls: int = 20) -> tuple[int, float]:
    """Call ``fn`` repeatedly for about ``budget`` seconds (in rounds of growing size); (calls, seconds)."""
    calls, elapsed, chunk = 0, 0.0, 1
    while elapsed < budget or calls < min_calls:
        started = time.perf_counter()
        for _ in range(chunk):
            fn()
        elapsed += time.perf_counter() - started
        calls += chunk
        chunk = min(chunk * 2, 10_000)
    return calls, elapsed


def engine_cost(scenarios: ScenarioSet, event: str, budget: float, repeat: int) -> dict[str, float]:
    """Engine.qualified for one signal of ``event``; the best of ``repeat`` timings (this machine is noisy)."""
    engine = Engine(scenarios)
    now = time.time()
    state = device_state(now)
    events = {event}
    fired = engine.qualified(state, events, now)
    if fired:
        raise RuntimeError(f"expected no scenario to qualify, got {[s.id for s in fired]}")
    best = float("inf")
    evaluations = 0.0
    for _ in range(repeat):
        before = engine.evaluations
        calls, seconds = timed(lambda: engine.qualified(state, events, now), budget / repeat)
        evaluations = (engine.evaluations - before) / calls
        best = min(best, seconds / calls)
    return {
        "us_per_signal": 1e6 * best,
        "signals_per_s": 1 / best,
        "evaluations_per_signal": evaluations,
        "evaluations_per_s": evaluations / best,
    }


def timer_cost(scenarios: ScenarioSet, budget: float, repeat: int) -> dict[str, float]:
    """Engine.qualified_timed for the bench device, idle for 10 minutes (what a timer firing evaluates)."""
    engine = Engine(scenarios)
    now = time.time()
    state = device_state(now)
    state.last_signal_at = now - 600
    best, evaluations = float("inf"), 0.0
    for _ in range(repeat):
        before = engine.evaluations
        calls, seconds = timed(lambda: engine.qualified_timed(state, now), budget / repeat)
        evaluations = (engine.evaluations - before) / calls
        best = min(best, seconds / calls)
    return {"us_per_fire": 1e6 * best, "evaluations_per_fire": evaluations}


async def ingest_cost(scenarios: ScenarioSet, event: str, batch: int, total: int, repeat: int) -> dict[str, float]:
    """Per-signal cost of Core.ingest plus the store/ack it schedules (:memory: SQLite).

    Every run ingests the same ``total`` signals into a fresh core, so the device's history (which
    count-window conditions scan) grows the same way at every size; the best of ``repeat`` runs counts.
    """
    best: dict[str, float] = {}
    for _ in range(repeat):
        run = await _ingest_once(scenarios, event, batch, total)
        if not best or run["us_per_signal"] < best["us_per_signal"]:
            best = run
    return best


async def _ingest_once(scenarios: ScenarioSet, event: str, batch: int, total: int) -> dict[str, float]:
    store = await SqliteStore.open(":memory:")
    core = Core(store, Engine(scenarios), SystemClock())
    try:
        session = await core.open_session(
            Hello(
                app_id="bench",
                device_id="bench-device",
                context={
                    "app.version": "4.2.0",
                    "device.os": "iOS",
                    "user.tier": "premium",
                    "user.first_name": "Sam",
                },
                consent="full",
            )
        )
        props = {"screen": "home"} if event == POPULAR else {"duration_ms": 100}
        # Stamped as the SDK stamps them (device time, the batch's sent_at): 1 us apart, so every signal is
        # newer than the last, as on a real device (equal times would make state.record_event look for a
        # resend among every kept occurrence, which no SDK batch does).
        base = time.time()
        batches = [
            IncomingBatch(
                f"b-{start}",
                base + 1e-6 * (start + batch - 1),
                tuple(
                    IncomingSignal(f"sig-{start + k}", base + 1e-6 * (start + k), "event", event, dict(props))
                    for k in range(batch)
                ),
            )
            for start in range(0, max(total, batch), batch)
        ]
        evaluations_before = core.engine.evaluations
        started = time.perf_counter()
        # Rounds of 20 batches, each followed by waiting for their acks, so the store keeps up.
        for first in range(0, len(batches), 20):
            for incoming in batches[first : first + 20]:
                core.ingest(session, incoming)
            await core.settle(session)
        elapsed = time.perf_counter() - started
        signals = len(batches) * batch
        acked = 0
        while not session.outbox.empty():
            item = session.outbox.get_nowait()
            acked += len(getattr(item, "signal_ids", ()))
        if acked != signals:
            raise RuntimeError(f"acked {acked} of {signals} signals")
        evaluations = core.engine.evaluations - evaluations_before
        return {
            "us_per_signal": 1e6 * elapsed / signals,
            "signals_per_s": signals / elapsed,
            "evaluations_per_signal": evaluations / signals,
            "signals": signals,
        }
    finally:
        await core.drain()
        await store.close()


async def profile_ingest(scenarios: ScenarioSet, batch: int, total: int, top: int) -> list[list[str]]:
    """cProfile (event-loop thread) of the one-listener Core.ingest run: the costliest functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    result = await _ingest_once(scenarios, LONELY, batch, total)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    count = result["signals"]
    rows = []
    for (file, line, func), (_cc, calls, own, cumulative, _callers) in sorted(
        stats.items(), key=lambda kv: kv[1][2], reverse=True
    )[:top]:
        where = f"{Path(file).name}:{line}" if line else file
        rows.append(
            [
                f"{func} ({where})",
                f"{calls / count:.2f}",
                f"{100 * own / total:.1f}%",
                f"{1e6 * own / count:.2f}",
                f"{1e6 * cumulative / count:.2f}",
            ]
        )
    return rows


async def sweeps(args: argparse.Namespace, tmp: Path) -> tuple[list[Any], list[Metric], dict[str, Any]]:
    """Issue 13's two evaluation sweeps: their tables, metrics and raw figures."""
    sections: list[Any] = []
    metrics: list[Metric] = []
    details: dict[str, Any] = {"timed": {}, "shared": {}, "distinct": {}, "values": {}}
    timed_sizes = [int(s) for s in args.timed_sizes.split(",") if s]
    rows = []
    for n in timed_sizes:
        note(f"eval: {n:,} unrelated scenarios, time-driven included ...")
        scenarios, _ = load_set(n, tmp / f"timed-{n}", timed_text)
        engine = engine_cost(scenarios, TIMED_LONELY, args.budget, args.repeat)
        timer = timer_cost(scenarios, args.budget, args.repeat)
        single = await ingest_cost(scenarios, TIMED_LONELY, 1, args.unbatched_signals, args.repeat)
        batched = await ingest_cost(scenarios, TIMED_LONELY, args.batch, args.signals, args.repeat)
        details["timed"][n] = {"engine": engine, "timer": timer, "ingest_unbatched": single, "ingest_batched": batched}
        rows.append(
            [
                f"{n:,}",
                f"{len(scenarios.timed):,}",
                f"{engine['us_per_signal']:.2f}",
                f"{timer['evaluations_per_fire']:,.0f}",
                f"{timer['us_per_fire']:,.1f}",
                f"{single['us_per_signal']:.1f}",
                f"{batched['us_per_signal']:.1f}",
            ]
        )
    if timed_sizes:
        first, last = details["timed"][timed_sizes[0]], details["timed"][timed_sizes[-1]]
        ratios = {
            key: last[key]["us_per_signal"] / first[key]["us_per_signal"]
            for key in ("engine", "ingest_unbatched", "ingest_batched")
        }
        ratios["timer"] = last["timer"]["us_per_fire"] / first["timer"]["us_per_fire"]
        rows.append(
            ["ratio", "", f"{ratios['engine']:.2f}x", "", f"{ratios['timer']:.2f}x"]
            + [f"{ratios[k]:.2f}x" for k in ("ingest_unbatched", "ingest_batched")]
        )
        details["timed"]["ratios"] = ratios
        span = f"{timed_sizes[0]:,} -> {timed_sizes[-1]:,}"
        for key, label in (
            ("ingest_unbatched", "Core.ingest, 1 signal/batch"),
            ("ingest_batched", f"Core.ingest, {args.batch}/batch"),
            ("timer", "a timer firing (Engine.qualified_timed)"),
        ):
            metrics.append(
                Metric(
                    f"{label}, unrelated scenarios incl. time-driven, {span}",
                    ratios[key],
                    "x",
                    target="<= 1.5x",
                    met=ratios[key] <= 1.5,
                )
            )
        sections.append(
            (
                f"Unrelated scenarios, 4 in 5 time-driven (idle, absence, dwell), signal of {TIMED_LONELY} "
                f"(best of {args.repeat}; ratio = largest / smallest)",
                [
                    "scenarios",
                    "time-driven",
                    "engine us/signal",
                    "timer fire: evals",
                    "timer fire us",
                    "ingest us/signal (1/batch)",
                    f"ingest us/signal ({args.batch}/batch)",
                ],
                rows,
            )
        )
    shared_sizes = [int(s) for s in args.shared_sizes.split(",") if s]
    for kind, text in (("shared", variant_text), ("distinct", scenario_text), ("values", value_text)):
        rows = []
        for n in shared_sizes:
            note(f"eval: {n:,} scenarios on one event ({kind}) ...")
            scenarios, _ = load_set(n, tmp / f"{kind}-{n}", text)
            engine = engine_cost(scenarios, POPULAR, args.budget, args.repeat)
            many = max(args.batch * 5, min(args.signals, args.signals * 10 // max(n, 1)))
            ingest = await ingest_cost(scenarios, POPULAR, args.batch, many, args.repeat)
            details[kind][n] = {"engine": engine, "ingest": ingest}
            rows.append(
                [
                    f"{n:,}",
                    f"{engine['evaluations_per_signal']:,.0f}",
                    f"{engine['us_per_signal']:,.2f}",
                    f"{ingest['us_per_signal']:,.1f}",
                ]
            )
        if shared_sizes:
            first, last = details[kind][shared_sizes[0]], details[kind][shared_sizes[-1]]
            ratios = {key: last[key]["us_per_signal"] / first[key]["us_per_signal"] for key in ("engine", "ingest")}
            details[kind]["ratios"] = ratios
            rows.append(["ratio", "", f"{ratios['engine']:.1f}x", f"{ratios['ingest']:.1f}x"])
            span = f"{shared_sizes[-1]:,} vs {shared_sizes[0]:,}"
            what = {
                "shared": "variants (12 distinct conditions)",
                "distinct": "each its own condition",
                "values": "each its own value and threshold",
            }[kind]
            for key, label in (("engine", "Engine.qualified"), ("ingest", "Core.ingest")):
                metrics.append(
                    Metric(
                        f"{label}, scenarios on one event, {what}, {span}",
                        ratios[key],
                        "x",
                        target="<= 20x",
                        met=ratios[key] <= 20,
                    )
                )
            sections.append(
                (
                    f"Scenarios all listening to {POPULAR}, {what}; nothing qualifies (best of {args.repeat}; "
                    f"ingest in {args.batch}-signal batches; ratio = largest / smallest)",
                    ["scenarios", "evaluations", "engine us/signal", "ingest us/signal"],
                    rows,
                )
            )
    return sections, metrics, details


async def run(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows_engine: list[list[str]] = []
    rows_ingest: list[list[str]] = []
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cuepoint-bench-eval-") as tmp:
        for n in sizes:
            note(f"eval: loading {n:,} scenarios ...")
            scenarios, load_s = load_set(n, Path(tmp) / f"set-{n}")
            lonely = engine_cost(scenarios, LONELY, args.budget, args.repeat)
            popular = engine_cost(scenarios, POPULAR, args.budget if n <= 1000 else args.budget / 2, args.repeat)
            note(f"eval: Core.ingest with {n:,} scenarios ...")
            ingest_lonely = await ingest_cost(scenarios, LONELY, args.batch, args.signals, args.repeat)
            # Every scenario evaluates once per batch here: fewer signals at the large sizes.
            many = max(args.batch * 5, min(args.signals, args.signals * 100 // max(n, 1)))
            ingest_popular = await ingest_cost(scenarios, POPULAR, args.batch, many, args.repeat)
            results[n] = {
                "load_seconds": load_s,
                "engine_one_listener": lonely,
                "engine_all_listen": popular,
                "ingest_one_listener": ingest_lonely,
                "ingest_all_listen": ingest_popular,
            }
            rows_engine.append(
                [
                    f"{n:,}",
                    f"{load_s:.2f}",
                    f"{lonely['evaluations_per_signal']:.0f}",
                    f"{lonely['us_per_signal']:.2f}",
                    f"{lonely['signals_per_s']:,.0f}",
                    f"{popular['evaluations_per_signal']:,.0f}",
                    f"{popular['us_per_signal']:,.1f}",
                    f"{popular['evaluations_per_s']:,.0f}",
                ]
            )
            rows_ingest.append(
                [
                    f"{n:,}",
                    f"{ingest_lonely['us_per_signal']:.2f}",
                    f"{ingest_lonely['signals_per_s']:,.0f}",
                    f"{ingest_popular['us_per_signal']:,.1f}",
                    f"{ingest_popular['evaluations_per_signal']:,.2f}",
                ]
            )
        profile_rows: list[list[str]] = []
        if args.profile:
            note(f"eval: cProfile of Core.ingest, one listener, {sizes[0]:,} scenarios ...")
            scenarios, _ = load_set(sizes[0], Path(tmp) / "profiled")
            profile_rows = await profile_ingest(scenarios, args.batch, args.signals, args.top)
        sweep_sections, sweep_metrics, sweep_details = await sweeps(args, Path(tmp))
        note(f"eval: bare echo baseline, 50 streams, {args.batch}/msg, {args.echo_seconds:g} s ...")
        echo = await echo_throughput(
            streams=50,
            batch=args.batch,
            window=4,
            seconds=args.echo_seconds,
            warmup=0.5,
            log_dir=Path(tmp),
        )
        # Comparable with bench_ingest.py: its load, its scenario, CPU us per signal, echo of the same shape.
        shape_rows: list[list[str]] = []
        shape_results: list[dict[str, Any]] = []
        for shape in SHAPES:
            note(f"eval: Core.ingest with bench_ingest's load, {shape} x{args.batch} ...")
            done = await ingest_like_bench_ingest(Path(tmp), shape, args.batch, args.signals * 4)
            shape_echo = echo if shape == "rows" else await echo_throughput(
                streams=50, batch=args.batch, window=4, seconds=args.echo_seconds, warmup=0.5, log_dir=Path(tmp),
                shape=shape,
            )  # fmt: skip
            done["echo_server_us_per_signal"] = shape_echo.server_us_per_signal
            shape_results.append(done)
            shape_rows.append(
                [
                    f"{shape} x{args.batch}",
                    f"{done['cpu_us_per_signal']:.2f}",
                    f"{done['wall_us_per_signal']:.2f}",
                    f"{shape_echo.server_us_per_signal:.2f}",
                    f"{shape_echo.server_us_per_signal / done['cpu_us_per_signal']:.2f}x",
                ]
            )
    echo_us_signal = 1e6 / echo.signals_per_s
    echo_us_message = 1e6 / echo.messages_per_s

    smallest, largest = sizes[0], sizes[-1]
    lone_small = results[smallest]["engine_one_listener"]["us_per_signal"]
    lone_large = results[largest]["engine_one_listener"]["us_per_signal"]
    ing_small = results[smallest]["ingest_one_listener"]["us_per_signal"]
    ing_large = results[largest]["ingest_one_listener"]["us_per_signal"]
    pop_small = results[smallest]["engine_all_listen"]["us_per_signal"]
    pop_large = results[largest]["engine_all_listen"]["us_per_signal"]
    flat_engine = lone_large <= 1.5 * lone_small
    flat_ingest = ing_large <= 1.5 * ing_small
    metrics = [
        Metric(f"eval, one listener, {smallest:,} scenarios", lone_small, "us/signal"),
        Metric(
            f"eval, one listener, {largest:,} scenarios",
            lone_large,
            "us/signal",
            target=f"flat (<= 1.5x of {smallest:,})",
            met=flat_engine,
        ),
        Metric(f"eval, all {largest:,} listen", pop_large, "us/signal"),
        Metric(
            f"Core.ingest, one listener, {largest:,} scenarios",
            ing_large,
            "us/signal",
            baseline=echo_us_signal,
            target=f"flat (<= 1.5x of {smallest:,})",
            met=flat_ingest,
        ),
        *sweep_metrics,
    ]
    summary = (
        f"eval: one-listener signal {lone_small:.2f} -> {lone_large:.2f} us from {smallest:,} to "
        f"{largest:,} scenarios ({'flat' if flat_engine else 'NOT flat'}); Core.ingest {ing_small:.1f} -> "
        f"{ing_large:.1f} us/signal ({'flat' if flat_ingest else 'NOT flat'}); all-listen signal "
        f"{pop_small:.1f} -> {pop_large:,.0f} us; bare echo {echo_us_signal:.2f} us/signal, "
        f"{echo_us_message:.0f} us/message"
    )
    report(
        "bench_eval",
        as_json=args.json,
        sections=[
            (
                f"Engine.qualified per signal (in process, nothing qualifies; best of {args.repeat})",
                [
                    "scenarios",
                    "load s",
                    "evals",
                    "us/signal",
                    "signals/s",
                    "evals (all)",
                    "us/signal (all)",
                    "evals/s (all)",
                ],
                rows_engine,
            ),
            (
                f"Core.ingest end to end per signal ({args.signals:,} signals in {args.batch}-signal batches per "
                f"run, best of {args.repeat}; :memory: store, acks awaited)",
                ["scenarios", "us/signal (one)", "signals/s (one)", "us/signal (all)", "evals/signal (all)"],
                rows_ingest,
            ),
            *(
                [
                    (
                        f"cProfile of Core.ingest, one listener, {sizes[0]:,} scenarios, {args.batch}-signal "
                        "batches (event-loop thread; times inflated by the profiler, shares are what count)",
                        ["function", "calls/signal", "self share", "self us/signal", "cum us/signal"],
                        profile_rows,
                    )
                ]
                if profile_rows
                else []
            ),
            *sweep_sections,
            (
                "Core.ingest with bench_ingest.py's load (same bytes, listening scenario, 50 devices x 4 batches in "
                "flight, file SQLite, decode + convert included; no gRPC): CPU us per signal, this process, all "
                "threads; the echo's server CPU per signal of the same shape; ceiling = echo / Core.ingest",
                ["batch shape", "Core.ingest cpu us/sig", "wall us/sig", "echo server us/sig", "ceiling vs echo"],
                shape_rows,
            ),
            (
                f"baseline: bare grpc.aio echo, 50 streams, {args.batch} signals/message (server subprocess)",
                ["run", "signals/s", "msgs/s", "us/signal", "us/message"],
                [
                    [
                        echo.label,
                        f"{echo.signals_per_s:,.0f}",
                        f"{echo.messages_per_s:,.0f}",
                        f"{echo_us_signal:.2f}",
                        f"{echo_us_message:.1f}",
                    ]
                ],
            ),
        ],
        metrics=metrics,
        summary=summary,
        details={
            "sizes": results,
            "echo": vars(echo),
            "batch": args.batch,
            "ingest_shape": shape_results,
            "sweeps": sweep_details,
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000,10000", help="scenario counts (default 10,100,1000,10000)")
    parser.add_argument(
        "--timed-sizes", default="10,100,1000,10000", help="unrelated scenarios incl. time-driven (default 10..10000)"
    )
    parser.add_argument("--shared-sizes", default="1,10,100,1000", help="scenarios on one event (default 1..1000)")
    parser.add_argument(
        "--unbatched-signals", type=int, default=3_000, help="signals per unbatched Core.ingest run (default 3000)"
    )
    parser.add_argument("--batch", type=int, default=100, help="signals per batch for Core.ingest (default 100)")
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per engine measurement (default 0.6)")
    parser.add_argument("--signals", type=int, default=10_000, help="signals per Core.ingest run (default 10000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, the best counts (default 3)")
    parser.add_argument("--echo-seconds", type=float, default=2.0, help="echo baseline seconds (default 2)")
    parser.add_argument("--quick", action="store_true", help="sizes up to 1,000 and shorter measurements")
    parser.add_argument("--profile", action="store_true", help="also cProfile the Core.ingest path")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile (default 25)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = ",".join(s for s in args.sizes.split(",") if s and int(s) <= 1000)
        args.timed_sizes = ",".join(s for s in args.timed_sizes.split(",") if s and int(s) <= 1000)
        args.budget, args.echo_seconds = min(args.budget, 0.3), min(args.echo_seconds, 1.0)
        args.signals = min(args.signals, 5_000)
    # The core logs sessions at info level; keep the tables readable (nothing is logged per signal).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    check_quiet()
    started = time.perf_counter()
    asyncio.run(run(args))
    note(f"bench_eval: done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
