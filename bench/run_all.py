"""Run every benchmark and print one summary table (metric, value, baseline, ratio, target, met?).

    .venv/bin/python bench/run_all.py [--quick] [--only ingest,latency] [--json]

Each benchmark runs as its own process (``--json``, plus ``--quick`` when given; their progress goes to
stderr), one after the other, so they never share the machine's two cores. ``bench_storage.py`` has no
JSON mode: its table is parsed. Default sizes take about 5 minutes in all, ``--quick`` about 2.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from typing import Any

from _common import BENCH_DIR, PYTHON, machine_busy, machine_info, met_text, note, table

# name, script, extra arguments (default run), extra arguments (--quick)
BENCHES: list[tuple[str, str, list[str], list[str]]] = [
    ("echo", "echo_server.py", [], ["--streams", "50"]),
    ("ingest", "bench_ingest.py", [], []),
    # Issue 13's prototype shape beside the echo and Cuepoint: what the columnar design reaches here.
    ("prototype", "prototype_server.py", [], []),
    ("latency", "bench_latency.py", [], []),
    ("eval", "bench_eval.py", [], []),
    ("memory", "bench_memory.py", [], []),
    ("storage", "bench_storage.py", [], []),
    ("predict", "bench_predict.py", [], []),
    # Needs the local PostgreSQL and NATS; without them it reports itself skipped (no metrics).
    ("replicas", "bench_replicas.py", [], []),
]
STORAGE_ROW = re.compile(r"^(?P<name>.+?)\s{2,}(?P<rows>\d+)\s+(?P<sec>[\d.]+)\s+(?P<rate>[\d,]+)\s+\d+\s+[\d.]+$")


def wait_quiet(limit: float, threshold: float = 15.0) -> float:
    """Wait (at most ``limit`` s) until the machine is under ``threshold``% busy; returns the last reading."""
    deadline = time.monotonic() + limit
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        note(f"   machine {busy:.0f}% busy (other processes); waiting for it to calm down ...")
        time.sleep(5)
        busy = machine_busy()
    return busy


def run_bench(name: str, script: str, extra: list[str], quick: bool, limit: float) -> dict[str, Any]:
    argv = [PYTHON, str(BENCH_DIR / script)]
    if name != "storage":
        argv += ["--json", *(["--quick"] if quick else [])]
    argv += extra
    note(f"== {name}: {' '.join(argv[1:])}")
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {"bench": name, "error": f"timed out after {limit:.0f} s", "metrics": []}
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        return {"bench": name, "error": f"exit {done.returncode}", "metrics": [], "seconds": elapsed}
    if name == "storage":
        return {"bench": name, "metrics": _storage_metrics(done.stdout), "seconds": elapsed}
    doc: dict[str, Any] = json.loads(done.stdout)
    doc["seconds"] = elapsed
    return doc


def _storage_metrics(text: str) -> list[dict[str, Any]]:
    metrics = []
    for line in text.splitlines():
        found = STORAGE_ROW.match(line.strip())
        if found:
            metrics.append(
                {
                    "name": f"SQLite journal writes, {found['name'].strip()}",
                    "value": float(found["rate"].replace(",", "")),
                    "unit": "rows/s",
                    "baseline": None,
                    "ratio": None,
                    "target": "",
                    "met": None,
                }
            )
    return metrics


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.2f} {unit}" if abs(value) < 10 else f"{value:.1f} {unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs")
    parser.add_argument("--only", default="", help="comma-separated subset: " + ",".join(b[0] for b in BENCHES))
    parser.add_argument("--limit", type=float, default=600.0, help="seconds allowed per benchmark (default 600)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        help="before each benchmark wait up to this many seconds for other processes to go idle (default 120)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    wanted = {w for w in args.only.split(",") if w}
    unknown = wanted - {b[0] for b in BENCHES}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    docs = []
    for name, script, extra, quick_extra in BENCHES:
        if wanted and name not in wanted:
            continue
        if args.wait_quiet > 0:
            wait_quiet(args.wait_quiet)
        docs.append(run_bench(name, script, quick_extra if args.quick else extra, args.quick, args.limit))
    rows = []
    met = total = 0
    for doc in docs:
        if "error" in doc:
            rows.append([doc["bench"], "FAILED: " + doc["error"], "-", "-", "-", "-"])
            continue
        for m in doc["metrics"]:
            ratio = f"{m['ratio']:.2f}x" if m.get("ratio") is not None else "-"
            rows.append(
                [
                    f"{doc['bench'].removeprefix('bench_')}: {m['name']}",
                    _fmt(m["value"], m["unit"]),
                    _fmt(m["baseline"], m["unit"]),
                    ratio,
                    m["target"] or "-",
                    met_text(m["met"]),
                ]
            )
            if m["met"] is not None:
                total += 1
                met += bool(m["met"])
    info = machine_info()
    failed = [d["bench"] for d in docs if "error" in d]
    summary = (
        f"run_all: {met} of {total} targets met; {len(docs) - len(failed)} of {len(docs)} benchmarks ran"
        + (f" (failed: {', '.join(failed)})" if failed else "")
        + f"; {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        print(json.dumps({"machine": info, "benches": docs, "summary": summary}, indent=2))
        return 1 if failed else 0
    print(
        f"Cuepoint benchmarks{' (--quick)' if args.quick else ''}: {info['cores']} cores, Python "
        f"{info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, {info['event_loop']}, "
        f"{info['date']}, tree {info['commit']}"
    )
    print()
    print(table(["metric", "value", "baseline (bare echo)", "ratio", "target", "met?"], rows))
    print()
    for doc in docs:
        if doc.get("summary"):
            print(f"- {doc['summary']}")
    print()
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
