"""The funnel's aggregate queries (decisions, cues, sessions, A/B variants); reporting/funnel.py sums them up.

Kept here so no SQL lives above the storage package; a second backend writes its own versions of these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import FunnelSlice

__all__ = ["funnel_queries"]


def _dims(alias: str, group_by: Sequence[str], pg: bool) -> list[str]:
    # Names come from reporting.funnel.DIMENSIONS only (checked in FunnelQuery), so quoting them inline is safe.
    if pg:
        return [f"COALESCE({alias}.context::jsonb ->> '{d}', '')" for d in group_by]
    return [f"COALESCE(CAST(json_extract({alias}.context, '$.\"{d}\"') AS TEXT), '')" for d in group_by]


def _range(column: str, query: FunnelSlice, scenario_column: str) -> tuple[str, list[object]]:
    where, params = ["1 = 1"], list[object]()
    if query.start is not None and not math.isinf(query.start):
        where.append(f"{column} >= ?")
        params.append(query.start)
    if query.end is not None and not math.isinf(query.end):
        where.append(f"{column} < ?")
        params.append(query.end)
    if query.scenario_id:
        where.append(f"{scenario_column} = ?")
        params.append(query.scenario_id)
    return " AND ".join(where), params


def funnel_queries(query: FunnelSlice, dialect: str = "sqlite") -> list[tuple[str, str, list[object]]]:
    """(kind, SQL, parameters) of each aggregate; ``dialect`` "postgres" gives PostgreSQL's spelling ($n
    placeholders, booleans counted as integers, jsonb instead of json_extract)."""
    pg = dialect == "postgres"

    def n(expr: str) -> str:
        # SQLite sums and maxes booleans as 0/1; PostgreSQL needs them cast.
        return f"(({expr})::int)" if pg else expr

    control = (
        "(c.explanation::jsonb -> 'variant_control')::boolean::int"
        if pg
        else "json_extract(c.explanation, '$.variant_control')"
    )
    dims = _dims("s", query.group_by, pg)
    select_dims = "".join(f", {d}" for d in dims)
    group_dims = "".join(f", {i + 2}" for i in range(len(dims)))
    k = len(dims)

    d_where, d_params = _range("d.time", query, "d.scenario_id")
    decisions = f"""
        SELECT d.scenario_id{select_dims}, d.outcome, d.reason, COUNT(*)
        FROM decisions AS d LEFT JOIN sessions AS s ON s.session_id = d.session_id
        WHERE {d_where}
        GROUP BY 1{group_dims}, {k + 2}, {k + 3}"""

    c_where, c_params = _range("c.created_at", query, "c.scenario_id")
    cues = f"""
        WITH x AS (
            SELECT c.scenario_id, c.session_id, c.status,
                EXISTS (SELECT 1 FROM engagements AS e
                        WHERE e.cue_id = c.cue_id AND e.assigned_at IS NOT NULL) AS engaged,
                EXISTS (SELECT 1 FROM engagements AS e
                        WHERE e.cue_id = c.cue_id AND e.assigned_at IS NOT NULL
                          AND e.disposition = 'resolved') AS resolved_by_associate,
                EXISTS (SELECT 1 FROM decisions AS o JOIN milestones AS m
                          ON m.session_id = c.session_id AND m.milestone_id = o.outcome_milestone
                        WHERE o.cue_id = c.cue_id AND o.outcome_milestone != ''
                          AND m.time >= c.created_at) AS outcome_reached,
                EXISTS (SELECT 1 FROM engagements AS e
                        WHERE e.cue_id = c.cue_id AND e.assigned_at IS NOT NULL
                          AND (e.wrap_up_success = 1 OR e.outcome = 'achieved')) AS outcome_achieved
            FROM cues AS c
            WHERE {c_where}
        )
        SELECT x.scenario_id{select_dims}, x.status, COUNT(*), SUM({n("x.engaged")}),
            SUM({n("x.engaged AND (x.resolved_by_associate OR x.outcome_reached)")}),
            SUM({n("x.engaged AND (x.outcome_achieved OR x.outcome_reached)")})
        FROM x LEFT JOIN sessions AS s ON s.session_id = x.session_id
        GROUP BY 1{group_dims}, {k + 2}"""
    # What associates recorded at wrap-up for the cohort's engaged cues, per outcome id.
    wrap_ups = f"""
        SELECT c.scenario_id{select_dims}, e.wrap_up_outcome, COUNT(*)
        FROM cues AS c JOIN engagements AS e ON e.cue_id = c.cue_id
            LEFT JOIN sessions AS s ON s.session_id = c.session_id
        WHERE {c_where} AND e.assigned_at IS NOT NULL AND e.wrap_up_outcome != ''
        GROUP BY 1{group_dims}, {k + 2}"""

    q_where, q_params = _range("time", query, "scenario_id")
    sessions = f"""
        WITH q AS (
            SELECT scenario_id, session_id, MIN(time) AS first_at, MAX({n("reason = 'holdout'")}) AS held_out,
                MAX(outcome_milestone) AS goal
            FROM decisions
            WHERE {q_where}
            GROUP BY scenario_id, session_id
        ), r AS (
            SELECT q.scenario_id, q.session_id, q.held_out,
                EXISTS (SELECT 1 FROM milestones AS m
                        WHERE m.session_id = q.session_id AND m.milestone_id = q.goal
                          AND m.time >= q.first_at) AS reached,
                EXISTS (SELECT 1 FROM cues AS c JOIN engagements AS e ON e.cue_id = c.cue_id
                        WHERE c.session_id = q.session_id AND c.scenario_id = q.scenario_id
                          AND e.assigned_at IS NOT NULL AND e.disposition = 'resolved') AS resolved
            FROM q
        )
        SELECT r.scenario_id{select_dims}, r.held_out, COUNT(*), SUM({n("r.reached")}),
            SUM({n("r.reached OR r.resolved")})
        FROM r LEFT JOIN sessions AS s ON s.session_id = r.session_id
        GROUP BY 1{group_dims}, {k + 2}"""
    variants = f"""
        WITH v AS (
            SELECT c.scenario_id, c.variant, c.session_id, MIN(c.created_at) AS first_at, COUNT(*) AS offered,
                SUM({n("c.status = 'accepted'")}) AS accepted,
                MAX(COALESCE({control}, 0)) AS control,
                MAX(COALESCE((SELECT o.outcome_milestone FROM decisions AS o WHERE o.cue_id = c.cue_id LIMIT 1), ''))
                    AS goal
            FROM cues AS c
            WHERE {c_where} AND c.variant != ''
            GROUP BY c.scenario_id, c.variant, c.session_id
        ), r AS (
            SELECT v.*,
                EXISTS (SELECT 1 FROM milestones AS m
                        WHERE m.session_id = v.session_id AND v.goal != '' AND m.milestone_id = v.goal
                          AND m.time >= v.first_at) AS reached,
                EXISTS (SELECT 1 FROM cues AS c2 JOIN engagements AS e ON e.cue_id = c2.cue_id
                        WHERE c2.session_id = v.session_id AND c2.scenario_id = v.scenario_id
                          AND c2.variant = v.variant AND e.assigned_at IS NOT NULL
                          AND e.disposition = 'resolved') AS resolved
            FROM v
        )
        SELECT r.scenario_id{select_dims}, r.variant, MAX(r.control), SUM(r.offered), SUM(r.accepted), COUNT(*),
            SUM({n("r.reached")}), SUM({n("r.reached OR r.resolved")})
        FROM r LEFT JOIN sessions AS s ON s.session_id = r.session_id
        GROUP BY 1{group_dims}, {k + 2}"""
    # Ratings of the cohort's engagements: count, sum of scores, satisfied (CSAT 4-5) or promoters (NPS 9-10),
    # and NPS detractors (0-6).
    satisfied = n("(f.kind = 'csat' AND f.score >= 4) OR (f.kind = 'nps' AND f.score >= 9)")
    rated = f"""COUNT(*), SUM(f.score),
            SUM({satisfied}),
            SUM({n("f.kind = 'nps' AND f.score <= 6")})"""
    feedback = f"""
        SELECT c.scenario_id{select_dims}, f.kind, {rated}
        FROM feedback AS f JOIN cues AS c ON c.cue_id = f.cue_id LEFT JOIN sessions AS s ON s.session_id = c.session_id
        WHERE {c_where}
        GROUP BY 1{group_dims}, {k + 2}"""
    desk = f"""
        SELECT f.queue, f.associate_id, f.kind, {rated}
        FROM feedback AS f JOIN cues AS c ON c.cue_id = f.cue_id
        WHERE {c_where}
        GROUP BY 1, 2, 3"""
    # Engagements a person took that ended in the range, one row each (medians are taken in Python; bots'
    # engagements are not anyone's handling time).
    h_where, h_params = _range("e.ended_at", query, "e.scenario_id")
    handling = f"""
        SELECT e.queue, e.associate_id, e.channel, e.created_at, e.assigned_at, e.ended_at, e.wrapped_up_at
        FROM engagements AS e
        WHERE {h_where} AND e.assigned_at IS NOT NULL AND e.associate_id != '' AND e.associate_id NOT LIKE 'bot:%'
        ORDER BY e.ended_at"""
    queries = [
        ("decisions", decisions, d_params),
        ("cues", cues, c_params),
        ("wrap_up_outcomes", wrap_ups, c_params),
        ("sessions", sessions, q_params),
        ("variants", variants, c_params),
        ("feedback", feedback, c_params),
        ("desk_feedback", desk, c_params),
        ("desk_handling", handling, h_params),
    ]
    queries = [q for q in queries if not query.kinds or q[0] in query.kinds]
    if pg:
        queries = [(kind, _numbered(sql), params) for kind, sql, params in queries]
    return queries


def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (these queries hold no ``?`` inside a literal)."""
    parts = sql.split("?")
    return "".join(f"{part}${i}" if i < len(parts) else part for i, part in enumerate(parts, 1))
