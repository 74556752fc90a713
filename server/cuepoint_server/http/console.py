"""The admin console's handlers: live now, funnels, scenarios and their switches, validate, replay, explain.

Each handler calls what AdminService calls (core, reporting, the scenario loader, simulate); the
console adds no rule of its own. Live now is pushed over a WebSocket once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from ..core.audit import AuditTrail
from ..core.errors import InvalidInput, PermissionDenied
from ..core.replicas import versions_differ
from ..core.service import Core, VariantState
from ..reporting.funnel import FunnelQuery, funnel, lift_interval
from ..reporting.handling import HandlingFigures, HandlingQuery, handling_report
from ..reporting.report import parse_group_by, since_to_start
from ..scenarios.loader import ScenarioError, load_text
from ..simulate import TraceError, parse_trace, render_text, simulate
from . import views
from .common import Guard, json_body, text_field
from .sessions import WebSession

__all__ = ["Console", "ScenarioStatus"]

log = structlog.get_logger("cuepoint.http.console")

LIVE_EVERY = 1.0
MAX_PASTE = 512 * 1024


def _variants(states: list[VariantState]) -> list[dict[str, Any]]:
    return [{"id": v.variant_id, "weight": v.weight, "control": v.control, "stopped": v.stopped} for v in states]


def _unknown_status() -> tuple[int, str]:
    return 1, ""


class ScenarioStatus:
    """(version, last reload error) of the served scenarios; the server sets `read` once it knows."""

    def __init__(self) -> None:
        self.read: Callable[[], tuple[int, str]] = _unknown_status


class Console:
    def __init__(self, core: Core, guard: Guard, status: ScenarioStatus, audit: AuditTrail | None = None) -> None:
        self.core = core
        self.guard = guard
        self.status = status
        # The console's switches are admin actions: role-checked and recorded like AdminService calls.
        self.audit = audit
        self._sockets: set[web.WebSocketResponse] = set()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/console/ws", self.socket),
            web.get("/api/console/live", self.live),
            web.get("/api/console/funnel", self.funnel),
            web.get("/api/console/handling", self.handling),
            web.get("/api/console/scenarios", self.scenarios),
            web.post("/api/console/scenarios/{scenario_id}/enabled", self.set_enabled),
            web.post("/api/console/scenarios/{scenario_id}/variants/{variant_id}/stopped", self.set_variant_stopped),
            web.post("/api/console/pause", self.pause),
            web.post("/api/console/validate", self.validate),
            web.post("/api/console/replay", self.replay),
            web.get("/api/console/explain/{device_id}", self.explain),
        ]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()

    async def _live(self) -> dict[str, Any]:
        """Every replica's sessions (core/live_cluster.py), not only those this process holds."""
        return views.live_now(await self.core.cluster_live_now(), offers_paused=self.core.offers_paused)

    async def socket(self, request: web.Request) -> web.StreamResponse:
        self.guard.session(request, "admin")
        self.guard.same_origin(request)
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
        await ws.prepare(request)
        self._sockets.add(ws)

        async def push() -> None:
            with contextlib.suppress(ConnectionResetError):
                while not ws.closed:
                    await ws.send_json({"type": "live", "live": await self._live()})
                    await asyncio.sleep(LIVE_EVERY)

        task = asyncio.create_task(push())
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT and message.data == "ping":
                    await ws.send_str("pong")
        finally:
            task.cancel()
            self._sockets.discard(ws)
        return ws

    async def live(self, request: web.Request) -> web.Response:
        self.guard.session(request, "admin")
        return web.json_response(await self._live())

    async def funnel(self, request: web.Request) -> web.Response:
        self.guard.session(request, "admin")
        q = request.query
        try:
            start = since_to_start(q.get("since", "all"), self.core.clock.now())
        except ValueError as exc:
            raise InvalidInput("since", f"a duration such as 24h or 7d, or 'all' ({exc})") from None
        try:
            group_by = parse_group_by(q.get("by", ""))
            query = FunnelQuery(start=start, scenario_id=q.get("scenario") or None, group_by=group_by)
        except ValueError as exc:
            raise InvalidInput("by", str(exc)) from None
        rows = await funnel(self.core.store.funnel_counts, query)
        out = []
        for row in rows:
            item = row.as_dict(query.group_by)
            # The A/B switch beside each variant's numbers: stopped variants show their users the control.
            for variant in item["variants"]:
                variant["stopped"] = (row.scenario_id, variant["variant_id"]) in self.core.stopped_variants
            lift = lift_interval(row.treated, row.holdout)
            item["lift"] = None if lift is None else {"difference": lift[0], "low": lift[1], "high": lift[2]}
            out.append(item)
        return web.json_response({"group_by": list(query.group_by), "start": start, "rows": out})

    async def handling(self, request: web.Request) -> web.Response:
        """Handling times per queue and associate over the period (AdminService.GetHandlingTimes' figures)."""
        session = self.guard.session(request, "admin")
        await self._require(session, "console.handling", frozenset({"viewer", "operator"}))
        try:
            start = since_to_start(request.query.get("since", "all"), self.core.clock.now())
        except ValueError as exc:
            raise InvalidInput("since", f"a duration such as 24h or 7d, or 'all' ({exc})") from None
        report = await handling_report(self.core.store.funnel_counts, HandlingQuery(start=start))

        def figures(f: HandlingFigures) -> dict[str, Any]:
            return {
                "queue": f.queue,
                "associate_id": f.associate_id,
                "engagements": f.engagements,
                "average_handle": f.average_handle,
                "median_handle": f.median_handle,
                "average_wrap_up": f.average_wrap_up,
                "median_wrap_up": f.median_wrap_up,
                "awaiting_wrap_up": f.awaiting_wrap_up,
                "average_wait": f.average_wait,
            }

        return web.json_response(
            {
                "start": start,
                "queues": [figures(f) for f in report.queues],
                "associates": [figures(f) for f in report.associates],
            }
        )

    async def scenarios(self, request: web.Request) -> web.Response:
        self.guard.session(request, "admin")
        version, error = self.status.read()
        replicas = await self.core.replicas_status()
        return web.json_response(
            {
                "version": version,
                "last_error": error,
                "offers_paused": self.core.offers_paused,
                # Each replica loads the folder on its own: which version each serves, and whether they agree.
                "replicas": [views.replica(r) for r in replicas],
                "versions_differ": versions_differ(replicas),
                "scenarios": [
                    {
                        "id": s.id,
                        "name": s.name,
                        "file": s.file,
                        "version": s.version,
                        "priority": s.priority,
                        "enabled": self.core.scenario_enabled(s.id),
                        "enabled_in_file": s.enabled,
                        "events": sorted(s.events),
                        "time_driven": s.timed,
                        "holdout": s.holdout,
                        "queue": s.queue,
                        "variants": _variants(self.core.variant_states(s.id)),
                    }
                    for s in self.core.engine.scenarios.scenarios
                ],
            }
        )

    async def _require(self, session: WebSession, action: str, needed: frozenset[str]) -> None:
        """PERMISSION_DENIED (recorded) unless the signed-in admin holds one of `needed`."""
        if session.roles & needed:
            return
        wanted = " or ".join(repr(r) for r in sorted(needed))
        error = PermissionDenied(f"{session.actor} lacks the role {wanted} needed for {action}")
        if self.audit is not None:
            await self.audit.record(
                session.actor, action, outcome="denied", detail=str(error), roles=tuple(sorted(session.roles))
            )
        raise error

    async def _audit(self, session: WebSession, action: str, target: str, before: Any, after: Any) -> None:
        if self.audit is not None:
            roles = tuple(sorted(session.roles))
            await self.audit.record(session.actor, action, target=target, roles=roles, before=before, after=after)

    async def set_enabled(self, request: web.Request) -> web.Response:
        session = self.guard.session(request, "admin", csrf=True)
        await self._require(session, "console.set_enabled", frozenset({"author", "operator"}))
        body = await json_body(request)
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise InvalidInput("enabled", "true or false")
        scenario_id = request.match_info["scenario_id"]
        was = self.core.scenario_enabled(scenario_id) if scenario_id in self.core.engine.scenarios.by_id else None
        now = await self.core.set_scenario_enabled(scenario_id, enabled, "console")
        await self._audit(session, "console.set_enabled", scenario_id, {"enabled": was}, {"enabled": now})
        log.warning("scenario.switched", scenario_id=scenario_id, enabled=now)
        return web.json_response({"scenario_id": scenario_id, "enabled": now})

    async def set_variant_stopped(self, request: web.Request) -> web.Response:
        """AdminService.SetVariantStopped from the console: the same roles, recorded the same way."""
        session = self.guard.session(request, "admin", csrf=True)
        await self._require(session, "console.set_variant_stopped", frozenset({"author", "operator"}))
        body = await json_body(request)
        stopped = body.get("stopped")
        if not isinstance(stopped, bool):
            raise InvalidInput("stopped", "true or false")
        reason = text_field(body, "reason", 500)
        scenario_id, variant_id = request.match_info["scenario_id"], request.match_info["variant_id"]
        was = {v.variant_id: v.stopped for v in self.core.variant_states(scenario_id)}.get(variant_id)
        states = await self.core.set_variant_stopped(scenario_id, variant_id, stopped, reason or "console")
        target = f"{scenario_id}/{variant_id}"
        await self._audit(
            session, "console.set_variant_stopped", target, {"stopped": was}, {"stopped": stopped, "reason": reason}
        )
        event = "variant.stopped" if stopped else "variant.restarted"
        log.warning(event, scenario_id=scenario_id, variant_id=variant_id)
        return web.json_response({"scenario_id": scenario_id, "variants": _variants(states)})

    async def pause(self, request: web.Request) -> web.Response:
        session = self.guard.session(request, "admin", csrf=True)
        await self._require(session, "console.pause", frozenset({"operator"}))
        body = await json_body(request)
        paused = body.get("paused")
        if not isinstance(paused, bool):
            raise InvalidInput("paused", "true or false")
        reason = text_field(body, "reason", 500)
        was = self.core.offers_paused
        now = await self.core.set_offers_paused(paused, reason)
        await self._audit(session, "console.pause", "offers", {"paused": was}, {"paused": now, "reason": reason})
        log.warning("offers.paused" if paused else "offers.resumed", reason=reason)
        return web.json_response({"offers_paused": now})

    async def validate(self, request: web.Request) -> web.Response:
        self.guard.session(request, "admin", csrf=True)
        body = await json_body(request)
        text = text_field(body, "text", MAX_PASTE, strip=False)
        name = text_field(body, "name", 200) or "pasted.yaml"
        try:
            loaded = load_text(text, name)
        except ScenarioError as exc:
            issues = [{"file": i.file, "line": i.line, "field": i.field, "message": i.message} for i in exc.issues]
            return web.json_response({"ok": False, "issues": issues, "text": str(exc)})
        return web.json_response(
            {"ok": True, "issues": [], "scenarios": [s.spec.id for s in loaded.scenarios], "text": "ok"}
        )

    async def replay(self, request: web.Request) -> web.Response:
        """A pasted trace against the served scenarios: the same text `cuepoint simulate` prints."""
        self.guard.session(request, "admin", csrf=True)
        body = await json_body(request)
        text = text_field(body, "trace", MAX_PASTE, strip=False)
        name = text_field(body, "name", 200) or "trace"
        try:
            outcomes = await simulate(self.core.engine.scenarios, parse_trace(text, name), name=name)
        except TraceError as exc:
            return web.json_response(
                {"ok": False, "output": render_text(exc.outcomes) if exc.outcomes else "", "error": str(exc)}
            )
        return web.json_response({"ok": True, "output": render_text(outcomes), "error": ""})

    async def explain(self, request: web.Request) -> web.Response:
        self.guard.session(request, "admin")
        device_id = request.match_info["device_id"]
        if not device_id or len(device_id) > 128:
            raise InvalidInput("device_id", "required; at most 128 characters")
        records = await self.core.store.decisions_for_device(device_id, limit=100)
        view = self.core.device_view(device_id)
        return web.json_response(
            {
                "device_id": device_id,
                "connected": view.connected,
                "segments": view.segments,
                "milestones": view.milestones,
                "decisions": [
                    {
                        "time": r.time,
                        "scenario_id": r.scenario_id,
                        "outcome": r.outcome,
                        "reason": r.reason,
                        "detail": r.detail,
                        "cue_id": r.cue_id,
                        "session_id": r.session_id,
                    }
                    for r in records
                ],
            }
        )
