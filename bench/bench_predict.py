"""What predictive scores cost: per signal and per decision, beside the ingest figure of the same run.

    .venv/bin/python bench/bench_predict.py [--streams 50] [--batch 100] [--seconds 5] [--repeat 1] [--json]

Two measurements:

* in this process, the scorer alone: `Predictor.observe` per batch (features of the journey so far, one
  prediction per outcome, a reservoir-sampled training example), and per decision the explanation
  (`describe_scores`: the top features, weight x standardised value). The model is trained on 3,000
  synthetic sessions first (predict/synthetic.py), so it has a realistic number of features;
* end to end, batched ingest through raw stubs (the same load as bench_ingest.py), against the same server
  without and with a declared outcome, beside the bare echo measured in the same run. Scored ingest must
  keep at least 80% of unscored ingest.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from pathlib import Path

from _common import (
    CUEPOINT_METHOD,
    THROUGHPUT_HEADERS,
    Metric,
    Throughput,
    cuepoint_server,
    note,
    raw_throughput,
    report,
    temp_dir,
)
from bench_ingest import write_scenarios
from echo_server import echo_throughput

from cuepoint_server.engine.state import DeviceState
from cuepoint_server.predict.model import Example
from cuepoint_server.predict.registry import Predictor, describe_scores
from cuepoint_server.predict.synthetic import sessions
from cuepoint_server.scenarios.model import OutcomeSpec
from cuepoint_server.storage import SignalRecord

TARGET = 0.8

OUTCOMES = """\
milestones:
  - {id: purchased, when: {event: purchase_completed}}
outcomes:
  - {id: purchased, milestone: purchased, within: session, score: true}
"""


def scorer_cost(batch: int, seconds: float = 1.0) -> dict[str, float]:
    """Microseconds per signal (observe, per batch) and per decision (explain), in this process."""
    predictor = Predictor()
    predictor.configure([OutcomeSpec(id="purchased", milestone="purchased", min_sessions=100)])
    model = predictor.models["purchased"]
    for s in sessions(3000):
        model.learn([Example(s.x, 0.0)], s.converted)
    state = DeviceState("d1", "shop", context={"device.os": "iOS", "app.version": "4.2.0"})
    now = time.time()
    predictor.session_opened(state, "s1", now)
    names = ("screen_viewed", "add_to_cart", "search", "product_viewed")
    rows = [
        SignalRecord("d1", f"id{i}", "s1", "event", names[i % 4], now, now, {"screen": "home"}) for i in range(batch)
    ]
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.observe(state, rows, now)
        count += batch
    per_signal = 1e6 * (time.perf_counter() - started) / count
    decisions = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds / 2:
        predictor.refresh(state, now)
        describe_scores(state)
        decisions += 1
    per_decision = 1e6 * (time.perf_counter() - started) / decisions
    return {"per_signal_us": per_signal, "per_batch_us": per_signal * batch, "per_decision_us": per_decision}


async def ingest(args: argparse.Namespace, tmp: Path, scored: bool, attempt: int) -> Throughput:
    folder = write_scenarios(tmp / f"scenarios-{scored}-{attempt}")
    if scored:
        (folder / "outcomes.yaml").write_text(OUTCOMES)
    server = await cuepoint_server(folder, tmp / f"predict-{scored}-{attempt}.db", log_dir=tmp).start()
    try:
        return await raw_throughput(
            server.address,
            CUEPOINT_METHOD,
            label=f"Cuepoint, raw stubs, {args.batch}/msg, {'with' if scored else 'without'} a scored outcome",
            streams=args.streams,
            batch=args.batch,
            window=args.window,
            seconds=args.seconds,
            warmup=args.warmup,
            server_pid=server.pid,
            prefix=f"p{int(scored)}{attempt}",
        )
    finally:
        await server.stop()


async def run(args: argparse.Namespace) -> None:
    runs: dict[str, list[Throughput]] = defaultdict(list)
    with temp_dir("predict") as tmp_text:
        tmp = Path(tmp_text)
        for attempt in range(args.repeat):
            note(f"predict: bare echo, {args.streams} streams, {args.batch}/msg ...")
            runs["echo"].append(
                await echo_throughput(
                    streams=args.streams,
                    batch=args.batch,
                    window=args.window,
                    seconds=args.seconds,
                    warmup=args.warmup,
                    log_dir=tmp,
                    label=f"bare echo, {args.batch}/msg",
                )
            )
            for scored in (False, True):
                note(f"predict: Cuepoint {'with' if scored else 'without'} a scored outcome ...")
                runs["scored" if scored else "plain"].append(await ingest(args, tmp, scored, attempt))
    results = {k: sorted(v, key=lambda r: r.signals_per_s)[len(v) // 2] for k, v in runs.items()}
    echo, plain, scored = results["echo"], results["plain"], results["scored"]
    cost = scorer_cost(args.batch)
    kept = scored.signals_per_s / plain.signals_per_s
    rows = [[*r.row(), f"{r.signals_per_s / echo.signals_per_s:.2f}x"] for r in (echo, plain, scored)]
    sections = [
        (
            f"batched ingest, {args.streams} streams, {args.window} in flight, {args.seconds:g} s"
            + (f", median of {args.repeat}" if args.repeat > 1 else ""),
            [*THROUGHPUT_HEADERS, "vs echo"],
            rows,
        ),
        (
            "scorer alone, in this process (model trained on 3,000 synthetic sessions)",
            ["item", "us"],
            [
                [f"per signal (observe, {args.batch}-signal batches)", f"{cost['per_signal_us']:.2f}"],
                [f"per batch of {args.batch}", f"{cost['per_batch_us']:.1f}"],
                ["per decision (rescore + top features)", f"{cost['per_decision_us']:.1f}"],
                [
                    "Cuepoint server per signal without scores (all threads)",
                    f"{1e6 * plain.server_cpu_pct / 100 / plain.signals_per_s:.2f}",
                ],
            ],
        ),
    ]
    metrics = [
        Metric(
            "ingest batched with a scored outcome",
            scored.signals_per_s,
            "signals/s",
            baseline=plain.signals_per_s,
            baseline_name="same without",
            target=f">= {TARGET:.0%} of unscored",
            met=kept >= TARGET,
        ),
        Metric("scoring per signal (batched)", cost["per_signal_us"], "us"),
        Metric("scoring per decision", cost["per_decision_us"], "us"),
    ]
    summary = (
        f"predict: batched ingest {scored.signals_per_s:,.0f} signals/s with a scored outcome vs "
        f"{plain.signals_per_s:,.0f} without ({kept:.0%}; echo {echo.signals_per_s:,.0f}); scorer "
        f"{cost['per_signal_us']:.2f} us/signal, {cost['per_decision_us']:.0f} us/decision; "
        f"target >= {TARGET:.0%}: {'MET' if kept >= TARGET else 'NOT MET'}"
    )
    report("bench_predict", as_json=args.json, sections=sections, metrics=metrics, summary=summary, details=cost)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 s runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 2.0, 0.5
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
