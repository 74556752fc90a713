"""`cuepoint model report`: per outcome, how its model is doing, from a server's database or a live core."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import TextIO

from ..storage.opening import open_store
from .model import OutcomeModel, OutcomeReport

__all__ = ["format_reports", "run", "stored_reports"]


async def stored_reports(db: str, top: int = 10) -> list[OutcomeReport]:
    """The saved model states in a database, as reports (what the trainer saved last)."""
    store = await open_store(db)  # a SQLite path or a postgresql:// URL
    try:
        records = await store.models()
    finally:
        await store.close()
    return [OutcomeModel.from_state(r.state).report(top=top, version=r.version) for r in records]


def format_reports(reports: Sequence[OutcomeReport]) -> str:
    if not reports:
        return "no outcome model saved yet (declare outcomes: in the scenario files and let sessions end)\n"
    lines: list[str] = []
    for r in reports:
        auc = f"{r.auc:.3f}" if r.auc is not None else "-"
        lines.append(
            f"outcome {r.outcome} (version {r.version}, {r.status}): {r.labelled_sessions} labelled sessions, "
            f"{r.positive_sessions} reached, base rate {r.base_rate:.3f}, AUC {auc} over {r.validated} predictions"
        )
        lines.append("  calibration (predicted decile: count, mean predicted, observed)")
        for c in r.calibration:
            lines.append(
                f"    {c.low:.1f}-{c.high:.1f}: {c.count:6d}  {c.mean_predicted:.3f}  {c.observed:.3f}"
                f"  ({c.observed - c.mean_predicted:+.3f})"
            )
        lines.append("  top features (weight on the standardised feature)")
        lines.extend(f"    {name:<40} {weight:+.3f}" for name, weight in r.top_features)
    return "\n".join(lines) + "\n"


def run(db: str, top: int, as_json: bool, out: TextIO) -> int:
    reports = asyncio.run(stored_reports(db, top))
    if as_json:
        out.write(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
    else:
        out.write(format_reports(reports))
    return 0
