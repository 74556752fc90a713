"""AdminService: explain decisions, the emergency switch, scenario status."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import grpc
import structlog
from cuepoint.v1 import admin_pb2, admin_pb2_grpc

from ..core.service import Core
from .convert import timestamp

__all__ = ["AdminServicer", "ScenarioStatus"]

log = structlog.get_logger("cuepoint.api.admin")

# (version, last reload error or "") of the scenarios being served.
ScenarioStatus = Callable[[], tuple[int, str]]

_OUTCOMES = {"offered": admin_pb2.DECISION_OUTCOME_OFFERED, "blocked": admin_pb2.DECISION_OUTCOME_BLOCKED}
Context: TypeAlias = grpc.aio.ServicerContext[object, object]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Core, status: ScenarioStatus | None = None) -> None:
        self.core = core
        self.status = status or (lambda: (1, ""))

    async def ExplainDevice(
        self, request: admin_pb2.ExplainDeviceRequest, context: Context
    ) -> admin_pb2.ExplainDeviceResponse:
        if not request.device_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "device_id: required")
        limit = request.limit if 0 < request.limit <= 1000 else 50
        records = await self.core.store.decisions_for_device(request.device_id, limit=limit)
        view = self.core.device_view(request.device_id)
        return admin_pb2.ExplainDeviceResponse(
            device_id=request.device_id,
            decisions=[
                admin_pb2.Decision(
                    time=timestamp(r.time),
                    scenario_id=r.scenario_id,
                    outcome=_OUTCOMES.get(r.outcome, admin_pb2.DECISION_OUTCOME_UNSPECIFIED),
                    reason=r.reason,
                    detail=r.detail,
                    cue_id=r.cue_id,
                    session_id=r.session_id,
                )
                for r in records
            ],
            segments=view.segments,
            milestones=view.milestones,
            connected=view.connected,
        )

    async def SetOffersPaused(
        self, request: admin_pb2.SetOffersPausedRequest, context: Context
    ) -> admin_pb2.SetOffersPausedResponse:
        self.core.paused_by_admin = request.paused
        log.warning("offers.paused" if request.paused else "offers.resumed", reason=request.reason)
        return admin_pb2.SetOffersPausedResponse(paused=self.core.offers_paused)

    async def GetScenarios(
        self, request: admin_pb2.GetScenariosRequest, context: Context
    ) -> admin_pb2.GetScenariosResponse:
        version, error = self.status()
        return admin_pb2.GetScenariosResponse(
            scenarios=[
                admin_pb2.ScenarioInfo(
                    id=s.id,
                    name=s.name,
                    file=s.file,
                    priority=s.priority,
                    enabled=s.enabled,
                    events=sorted(s.events),
                    time_driven=s.timed,
                )
                for s in self.core.engine.scenarios.scenarios
            ],
            version=version,
            last_error=error,
            offers_paused=self.core.offers_paused,
        )
