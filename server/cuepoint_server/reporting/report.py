"""`cuepoint report`: the funnel per scenario, read straight from a server's SQLite file.

Uses the same queries as the admin API's GetFunnel (reporting/funnel.py), on a read-only
connection, so it is safe next to a running server (WAL mode).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..scenarios.durations import parse_duration
from ..storage.base import FunnelSlice
from ..storage.postgres import PostgresStore, is_postgres_url
from ..storage.sqlite import read_funnel_counts
from .funnel import DIMENSIONS, Cohort, DeskFeedback, FeedbackSummary, FunnelQuery, FunnelRow, funnel_report
from .handling import HandlingFigures, HandlingQuery, HandlingReport, handling_report

__all__ = [
    "parse_group_by",
    "read_funnel",
    "read_handling",
    "render_handling",
    "render_json",
    "render_table",
    "run_handling",
    "since_to_start",
]

_COUNTS = (
    "qualified", "blocked", "offered", "accepted", "declined", "dismissed", "ignored", "withdrawn", "pending",
    "engaged", "resolved", "outcome",
)  # fmt: skip


def parse_group_by(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in DIMENSIONS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; use {', '.join(DIMENSIONS)}")
    return names


def since_to_start(since: str, now: float) -> float | None:
    """'7d', '12h', '90m' back from `now`; 'all' for everything."""
    if since.strip().lower() == "all":
        return None
    return now - parse_duration(since)


def read_funnel(db: str | Path, query: FunnelQuery) -> list[FunnelRow]:
    return read_funnel_report(db, query)[0]


def read_funnel_report(db: str | Path, query: FunnelQuery) -> tuple[list[FunnelRow], list[DeskFeedback]]:
    """The funnel rows and the ratings per queue and associate, from a database file or a postgresql:// URL."""
    if is_postgres_url(str(db)):
        return asyncio.run(_read_postgres(str(db), query))
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"no database at {path}")

    async def fetch(cut: FunnelSlice) -> list[tuple[str, list[tuple[Any, ...]]]]:
        return read_funnel_counts(path, cut)

    return asyncio.run(funnel_report(fetch, query))


async def _read_postgres(url: str, query: FunnelQuery) -> tuple[list[FunnelRow], list[DeskFeedback]]:
    store = await PostgresStore.open(url)
    try:
        return await funnel_report(store.funnel_counts, query)
    finally:
        await store.close()


def _rating(f: FeedbackSummary) -> str:
    if f.kind == "nps":
        return f"nps {f.responses} response(s), average {f.average:.1f}, NPS {f.net_promoter_score:+.0f}"
    return f"csat {f.responses} response(s), average {f.average:.2f}, satisfied {f.satisfied_share:.0%}"


def _when(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _conversion(c: Cohort) -> str:
    rate = c.conversion_rate
    return "-" if rate is None else f"{c.converted}/{c.sessions} {rate:.1%}"


def render_table(rows: Sequence[FunnelRow], query: FunnelQuery, out: TextIO, desk: Sequence[DeskFeedback] = ()) -> None:
    span = [f"since {_when(query.start)} UTC"] if query.start is not None else []
    span += [f"until {_when(query.end)} UTC"] if query.end is not None else []
    scope = f"scenario {query.scenario_id}" if query.scenario_id else "per scenario"
    out.write(f"funnel {scope}: decisions and cues {' '.join(span) or 'of all time'}\n\n")
    if not rows:
        out.write("no scenario qualified in this range\n")
        return
    header = ["scenario", *query.group_by, *_COUNTS, "sessions", "conv. treated", "conv. holdout"]
    table = [header]
    for row in rows:
        counts = [row.blocked_total if name == "blocked" else getattr(row, name) for name in _COUNTS]
        table.append(
            [
                row.scenario_id,
                *(value or '""' for value in row.group),
                *(str(c) for c in counts),
                str(row.qualified_sessions),
                _conversion(row.treated),
                _conversion(row.holdout),
            ]
        )
    keys = 1 + len(query.group_by)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = [
            cell.ljust(widths[i]) if i < keys or i >= len(header) - 2 else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.write("  ".join(cells).rstrip() + "\n")
    blocked = [row for row in rows if row.blocked]
    if blocked:
        out.write("\nblocked by reason:\n")
        for row in blocked:
            key = "  ".join([row.scenario_id, *(value or '""' for value in row.group)])
            reasons = ", ".join(f"{reason} {count}" for reason, count in row.blocked_by_count())
            out.write(f"  {key}: {reasons}\n")
    recorded = [row for row in rows if row.wrap_up_outcomes]
    if recorded:
        out.write("\noutcomes recorded at wrap-up:\n")
        for row in recorded:
            key = "  ".join([row.scenario_id, *(value or '""' for value in row.group)])
            outcomes = ", ".join(f"{name} {count}" for name, count in sorted(row.wrap_up_outcomes.items()))
            out.write(f"  {key}: {outcomes}\n")
    tested = [row for row in rows if row.variants]
    if tested:
        out.write("\nA/B variants (sessions offered the variant; test: two-sided, against the control):\n")
        for row in tested:
            key = "  ".join([row.scenario_id, *(value or '""' for value in row.group)])
            for v in row.variants:
                rate = v.cohort.conversion_rate
                conv = "-" if rate is None else f"{v.cohort.converted}/{v.cohort.sessions} {rate:.1%}"
                ci = f"95% CI {v.ci_low:.1%}-{v.ci_high:.1%}"
                test = "control" if v.control else f"{v.difference:+.1%} p={v.p_value:.3f}"
                out.write(
                    f"  {key}: {v.variant_id}  offered {v.offered}  accepted {v.accepted}  conv. {conv}  {ci}  {test}\n"
                )
    rated = [row for row in rows if row.feedback]
    if rated or desk:
        out.write("\nfeedback after engagements:\n")
        for row in rated:
            key = "  ".join([row.scenario_id, *(value or '""' for value in row.group)])
            for f in row.feedback:
                out.write(f"  {key}: {_rating(f)}\n")
        for d in desk:
            out.write(f"  queue {d.queue}  associate {d.associate_id or '-'}: {_rating(d.summary)}\n")
    out.write(
        "\noutcome: engaged cues whose engagement achieved its outcome (a success outcome recorded at wrap-up,"
        " the engagement_outcome check, or the outcome milestone)\n"
        "sessions: qualified sessions; conv.: of those, sessions that reached the scenario's outcome"
        " milestone or had an engagement resolved (treated vs holdout group)\n"
    )


def render_json(rows: Sequence[FunnelRow], query: FunnelQuery, out: TextIO, desk: Sequence[DeskFeedback] = ()) -> None:
    document = {
        "start": query.start,
        "end": query.end,
        "scenario_id": query.scenario_id,
        "group_by": list(query.group_by),
        "rows": [row.as_dict(query.group_by) for row in rows],
        "feedback_by_desk": [{"queue": d.queue, "associate_id": d.associate_id, **d.summary.as_dict()} for d in desk],
    }
    json.dump(document, out, indent=2)
    out.write("\n")


def run(
    db: str, since: str, until: str | None, scenario: str | None, by: str, as_json: bool, out: TextIO, err: TextIO
) -> int:
    now = time.time()
    try:
        start = since_to_start(since, now)
        end = None if until is None else now - parse_duration(until)
        query = FunnelQuery(start=start, end=end, scenario_id=scenario or None, group_by=parse_group_by(by))
    except ValueError as exc:
        print(f"cuepoint report: {exc}", file=err)
        return 2
    try:
        rows, desk = read_funnel_report(db, query)
    except (OSError, sqlite3.Error) as exc:
        print(f"cuepoint report: cannot read {db}: {exc}", file=err)
        return 2
    (render_json if as_json else render_table)(rows, query, out, desk)
    return 0


# -- handling times (`cuepoint report --handling`) ----------------------------------------------------


async def _read_handling_postgres(url: str, query: HandlingQuery) -> HandlingReport:
    store = await PostgresStore.open(url)
    try:
        return await handling_report(store.funnel_counts, query)
    finally:
        await store.close()


def read_handling(db: str | Path, query: HandlingQuery) -> HandlingReport:
    """Handling times per queue and associate, from a database file (read-only) or a postgresql:// URL."""
    if is_postgres_url(str(db)):
        return asyncio.run(_read_handling_postgres(str(db), query))
    path = Path(db)
    if not path.is_file():
        raise FileNotFoundError(f"no database at {path}")

    async def fetch(cut: FunnelSlice) -> list[tuple[str, list[tuple[Any, ...]]]]:
        return read_funnel_counts(path, cut)

    return asyncio.run(handling_report(fetch, query))


def _figures_json(f: HandlingFigures) -> dict[str, Any]:
    return {
        "queue": f.queue,
        "associate_id": f.associate_id,
        "engagements": f.engagements,
        "average_handle": round(f.average_handle, 3),
        "median_handle": round(f.median_handle, 3),
        "average_wrap_up": round(f.average_wrap_up, 3),
        "median_wrap_up": round(f.median_wrap_up, 3),
        "awaiting_wrap_up": f.awaiting_wrap_up,
        "average_wait": round(f.average_wait, 3),
    }


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def render_handling(report: HandlingReport, as_json: bool, out: TextIO) -> None:
    if as_json:
        doc = {
            "queues": [_figures_json(f) for f in report.queues],
            "associates": [_figures_json(f) for f in report.associates],
        }
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return
    header = ("engagements", "handle avg", "handle median", "wrap-up avg", "wrap-up median", "awaiting", "wait avg")
    for title, rows, key in (("queue", report.queues, "queue"), ("associate", report.associates, "associate_id")):
        table = [(title, *header)] + [
            (
                getattr(f, key),
                str(f.engagements),
                _clock(f.average_handle),
                _clock(f.median_handle),
                _clock(f.average_wrap_up),
                _clock(f.median_wrap_up),
                str(f.awaiting_wrap_up),
                _clock(f.average_wait),
            )
            for f in rows
        ]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            out.write(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
                + "\n"
            )
        out.write("\n")
    out.write("times in minutes:seconds; handle: assignment to the end of the conversation; wrap-up: end to wrap-up\n")


def run_handling(
    db: str, since: str, until: str | None, scenario: str | None, as_json: bool, out: TextIO, err: TextIO
) -> int:
    now = time.time()
    try:
        start = since_to_start(since, now)
        end = None if until is None else now - parse_duration(until)
    except ValueError as exc:
        print(f"cuepoint report: {exc}", file=err)
        return 2
    try:
        report = read_handling(db, HandlingQuery(start=start, end=end, scenario_id=scenario or ""))
    except (OSError, sqlite3.Error) as exc:
        print(f"cuepoint report: cannot read {db}: {exc}", file=err)
        return 2
    render_handling(report, as_json, out)
    return 0
