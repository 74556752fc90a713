"""AdminService: explain decisions, the emergency switch, scenario status, funnels, live sessions.

An admin limited to some apps (api/admin_roles.py: `admin_apps()`) sees and changes only what belongs to
them: scenarios scoped to those apps alone (`apps:` a subset, e.g. every scenario under apps/<app>/),
their funnels, their queues, their devices' sessions and explanations, outcomes declared in their
folders, and audit entries of admins limited to them. Asking for anything else is PERMISSION_DENIED and
changes nothing; what belongs to every app (installation-wide scenarios and queues) is not theirs either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeAlias

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from cuepoint.v1 import admin_pb2, admin_pb2_grpc, common_pb2

from ..core.audit import AuditTrail, user_ref
from ..core.errors import CoreError, PermissionDenied
from ..core.live import LiveSession
from ..core.replicas import ReplicaStatus, versions_differ
from ..core.service import Core, VariantState
from ..predict.model import OutcomeReport
from ..reporting.funnel import Cohort, FeedbackSummary, FunnelQuery, FunnelRow, VariantRow, funnel_report
from ..reporting.handling import HandlingFigures, HandlingQuery, handling_report
from ..scenarios.compiler import CompiledScenario
from .admin_roles import admin_apps, note
from .convert import SCORE_STATUS, duration, scores_to_proto, timestamp
from .errors import abort

__all__ = ["AdminServicer", "ScenarioStatus"]

log = structlog.get_logger("cuepoint.api.admin")

# (version, last reload error or "") of the scenarios being served.
ScenarioStatus = Callable[[], tuple[int, str]]

_CHECK_STATUS = {
    "offered": admin_pb2.SCENARIO_CHECK_STATUS_OFFERED,
    "blocked": admin_pb2.SCENARIO_CHECK_STATUS_BLOCKED,
    "not_qualified": admin_pb2.SCENARIO_CHECK_STATUS_NOT_QUALIFIED,
    "other_app": admin_pb2.SCENARIO_CHECK_STATUS_OTHER_APP,
    "disabled": admin_pb2.SCENARIO_CHECK_STATUS_DISABLED,
}
_AUDIT_OUTCOMES = {
    "ok": admin_pb2.AUDIT_OUTCOME_OK,
    "denied": admin_pb2.AUDIT_OUTCOME_DENIED,
    "failed": admin_pb2.AUDIT_OUTCOME_FAILED,
}
_OUTCOMES = {"offered": admin_pb2.DECISION_OUTCOME_OFFERED, "blocked": admin_pb2.DECISION_OUTCOME_BLOCKED}
_LIVE = {
    "live": admin_pb2.LIVE_STATUS_LIVE,
    "idle": admin_pb2.LIVE_STATUS_IDLE,
    "inactive": admin_pb2.LIVE_STATUS_INACTIVE,
}
Context: TypeAlias = grpc.aio.ServicerContext[object, object]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Core, status: ScenarioStatus | None = None, audit: AuditTrail | None = None) -> None:
        self.core = core
        self.status = status or (lambda: (1, ""))
        # The admin audit trail (ListAuditEntries); calls are recorded by the interceptor (api/admin_roles.py).
        self.audit = audit

    async def ExplainDevice(
        self, request: admin_pb2.ExplainDeviceRequest, context: Context
    ) -> admin_pb2.ExplainDeviceResponse:
        note(f"device:{request.device_id}")
        if not request.device_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "device_id: required")
        await self._own_device(request.device_id, context)
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
            scores=scores_to_proto(view.scores),
            scenarios=[
                admin_pb2.ScenarioCheck(
                    scenario_id=check.scenario_id,
                    status=_CHECK_STATUS[check.status],
                    conditions=[
                        admin_pb2.ConditionCheck(path=c.path, expected=c.expected, observed=c.observed, holds=c.holds)
                        for c in check.conditions
                    ],
                    reason=check.reason,
                    detail=check.detail,
                )
                for check in self.core.explain_scenarios(request.device_id)
                if _owned_id(self.core, check.scenario_id)
            ],
        )

    async def _own_device(self, device_id: str, context: Context) -> None:
        apps = admin_apps()
        if apps and await self.core.device_app(device_id) not in apps:
            await abort(context, PermissionDenied(f"device {device_id!r} is not a device of your app(s)"))

    async def _own_scenario(self, scenario_id: str, context: Context) -> None:
        scenario = self.core.engine.scenarios.by_id.get(scenario_id)
        if scenario is not None and not _owned(scenario):
            await abort(context, PermissionDenied(f"scenario {scenario_id!r} does not belong to your app(s) alone"))

    async def SetOffersPaused(
        self, request: admin_pb2.SetOffersPausedRequest, context: Context
    ) -> admin_pb2.SetOffersPausedResponse:
        before = self.core.offers_paused
        paused = await self.core.set_offers_paused(request.paused, request.reason)
        note("offers", before={"paused": before}, after={"paused": paused, "reason": request.reason})
        return admin_pb2.SetOffersPausedResponse(paused=paused)

    async def SetScenarioEnabled(
        self, request: admin_pb2.SetScenarioEnabledRequest, context: Context
    ) -> admin_pb2.SetScenarioEnabledResponse:
        note(request.scenario_id)
        await self._own_scenario(request.scenario_id, context)
        known = request.scenario_id in self.core.engine.scenarios.by_id
        was = self.core.scenario_enabled(request.scenario_id) if known else None
        note(request.scenario_id, before={"enabled": was})
        try:
            enabled = await self.core.set_scenario_enabled(request.scenario_id, request.enabled, request.reason)
        except CoreError as exc:
            await abort(context, exc)
        note(after={"enabled": enabled, "reason": request.reason})
        return admin_pb2.SetScenarioEnabledResponse(enabled=enabled)

    async def ListDeadWebhooks(
        self, request: admin_pb2.ListDeadWebhooksRequest, context: Context
    ) -> admin_pb2.ListDeadWebhooksResponse:
        limit = request.limit if 0 < request.limit <= 1000 else 100
        return admin_pb2.ListDeadWebhooksResponse(
            deliveries=[
                admin_pb2.WebhookDelivery(
                    delivery_id=d.delivery_id,
                    url=d.url,
                    kind=d.kind,
                    body=d.body,
                    created_at=timestamp(d.created_at),
                    attempts=d.attempts,
                    last_error=d.last_error,
                )
                for d in await self.core.dead_webhooks(limit)
            ]
        )

    async def RedeliverWebhook(
        self, request: admin_pb2.RedeliverWebhookRequest, context: Context
    ) -> admin_pb2.RedeliverWebhookResponse:
        note(f"webhook:{request.delivery_id}")
        try:
            await self.core.redeliver_webhook(request.delivery_id)
        except CoreError as exc:
            await abort(context, exc)
        return admin_pb2.RedeliverWebhookResponse()

    async def GetScenarios(
        self, request: admin_pb2.GetScenariosRequest, context: Context
    ) -> admin_pb2.GetScenariosResponse:
        version, error = self.status()
        disabled = self.core.disabled_reasons
        replicas = await self.core.replicas_status()
        return admin_pb2.GetScenariosResponse(
            scenarios=[
                admin_pb2.ScenarioInfo(
                    id=s.id,
                    name=s.name,
                    file=s.file,
                    priority=s.priority,
                    enabled=self.core.scenario_enabled(s.id),
                    events=sorted(s.events),
                    time_driven=s.timed,
                    holdout=s.holdout,
                    variants=_variants(self.core.variant_states(s.id)),
                    disabled_by_admin=s.id in disabled,
                    disabled_reason=disabled.get(s.id, ""),
                )
                for s in self.core.engine.scenarios.scenarios
                if _owned(s)
            ],
            version=version,
            last_error=error,
            offers_paused=self.core.offers_paused,
            replicas=[_replica(r) for r in replicas],
            versions_differ=versions_differ(replicas),
        )

    async def SetVariantStopped(
        self, request: admin_pb2.SetVariantStoppedRequest, context: Context
    ) -> admin_pb2.SetVariantStoppedResponse:
        target = f"{request.scenario_id}/{request.variant_id}"
        note(target)
        await self._own_scenario(request.scenario_id, context)
        note(target, after={"stopped": request.stopped, "reason": request.reason})
        try:
            states = await self.core.set_variant_stopped(
                request.scenario_id, request.variant_id, request.stopped, request.reason
            )
        except CoreError as exc:
            await abort(context, exc)
        log.warning(
            "variant.stopped" if request.stopped else "variant.restarted",
            scenario_id=request.scenario_id,
            variant_id=request.variant_id,
            reason=request.reason,
        )
        return admin_pb2.SetVariantStoppedResponse(variants=_variants(states))

    async def GetFunnel(self, request: admin_pb2.GetFunnelRequest, context: Context) -> admin_pb2.GetFunnelResponse:
        try:
            query = FunnelQuery(
                start=_seconds(request.start) if request.HasField("start") else None,
                end=_seconds(request.end) if request.HasField("end") else None,
                scenario_id=request.scenario_id or None,
                group_by=tuple(request.group_by),
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"group_by: {exc}")
        if query.start is not None and query.end is not None and query.end < query.start:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "end: must not be before start")
        apps = admin_apps()
        if apps and request.scenario_id:
            scenario = self.core.engine.scenarios.by_id.get(request.scenario_id)
            if scenario is None or not _owned(scenario):
                await abort(context, PermissionDenied(f"scenario {request.scenario_id!r} is not one of your app(s)"))
        rows, desk = await funnel_report(self.core.store.funnel_counts, query)
        if apps:
            # Only scenarios of these apps alone: their rows hold only these apps' sessions.
            by_id = self.core.engine.scenarios.by_id
            rows = [r for r in rows if r.scenario_id in by_id and _owned(by_id[r.scenario_id])]
            desk = [d for d in desk if self.core.engine.scenarios.routing.owner(d.queue) in apps]
        return admin_pb2.GetFunnelResponse(
            rows=[_funnel_row(r, query.group_by) for r in rows],
            feedback_by_desk=[
                admin_pb2.DeskFeedback(queue=d.queue, associate_id=d.associate_id, summary=_feedback(d.summary))
                for d in desk
            ],
        )

    async def ListLiveSessions(
        self, request: admin_pb2.ListLiveSessionsRequest, context: Context
    ) -> admin_pb2.ListLiveSessionsResponse:
        apps = admin_apps()
        if apps and request.app_id and request.app_id not in apps:
            await abort(context, PermissionDenied(f"app_id: {request.app_id!r} is not one of your app(s)"))
        live = await self.core.cluster_live_now()
        sessions = [
            s
            for s in live.sessions
            if (not request.app_id or s.app_id == request.app_id) and (not apps or s.app_id in apps)
        ]
        sessions.sort(key=lambda s: (s.started_at, s.device_id))
        routing = self.core.engine.scenarios.routing
        queues = [q for q in live.queues if not apps or routing.owner(q.queue) in apps]
        return admin_pb2.ListLiveSessionsResponse(
            now=timestamp(live.now),
            sessions=[_live_session(s) for s in sessions],
            queues=[
                admin_pb2.QueueLoad(
                    queue=q.queue,
                    waiting=q.waiting,
                    associates=q.associates,
                    available=q.available,
                    longest_wait=duration(q.longest_wait),
                )
                for q in queues
            ],
            pending_cues=sum(1 for s in sessions if s.pending_cue is not None),
            unanswered_replicas=live.unanswered,
        )

    async def ExportUser(self, request: admin_pb2.ExportUserRequest, context: Context) -> admin_pb2.ExportUserResponse:
        note(user_ref(request.user_id))
        try:
            data = await self.core.export_user(request.user_id)
        except CoreError as exc:
            await abort(context, exc)
        note(after={"exported": {table: len(rows) for table, rows in data.items()}})
        return admin_pb2.ExportUserResponse(json=json.dumps(data, sort_keys=True, default=str))

    async def EraseUser(self, request: admin_pb2.EraseUserRequest, context: Context) -> admin_pb2.EraseUserResponse:
        note(user_ref(request.user_id))
        try:
            deleted = await self.core.erase_user(request.user_id)
        except CoreError as exc:
            await abort(context, exc)
        note(after={"deleted": dict(deleted)})
        return admin_pb2.EraseUserResponse(deleted=deleted)

    async def ForgetDeviceCredential(
        self, request: admin_pb2.ForgetDeviceCredentialRequest, context: Context
    ) -> admin_pb2.ForgetDeviceCredentialResponse:
        if not request.device_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "device_id: required")
        note(f"device:{request.device_id}")
        await self._own_device(request.device_id, context)
        forgotten = await self.core.forget_device_credential(request.device_id)
        note(before={"credential": forgotten}, after={"credential": False})
        return admin_pb2.ForgetDeviceCredentialResponse(forgotten=forgotten)

    async def ListAuditEntries(
        self, request: admin_pb2.ListAuditEntriesRequest, context: Context
    ) -> admin_pb2.ListAuditEntriesResponse:
        if self.audit is None:
            return admin_pb2.ListAuditEntriesResponse()
        limit = request.limit if 0 < request.limit <= 1000 else 100
        since = _seconds(request.since) if request.HasField("since") else None
        apps = admin_apps()
        wanted = 10 * limit if apps else limit
        records = await self.audit.entries(since=since, actor=request.actor, action=request.action, limit=wanted)
        if apps:
            # An admin of some apps reads what admins limited to those apps did, nothing of the others.
            mine = {f"app:{a}" for a in apps}
            records = [r for r in records if mine.intersection(r.roles)][:limit]
        return admin_pb2.ListAuditEntriesResponse(
            entries=[
                admin_pb2.AuditEntry(
                    id=r.id,
                    time=timestamp(r.time),
                    actor=r.actor,
                    roles=list(r.roles),
                    action=r.action,
                    target=r.target,
                    outcome=_AUDIT_OUTCOMES.get(r.outcome, admin_pb2.AUDIT_OUTCOME_UNSPECIFIED),
                    detail=r.detail,
                    before_json=json.dumps(dict(r.before), sort_keys=True),
                    after_json=json.dumps(dict(r.after), sort_keys=True),
                )
                for r in records
            ]
        )

    async def GetHandlingTimes(
        self, request: admin_pb2.GetHandlingTimesRequest, context: Context
    ) -> admin_pb2.GetHandlingTimesResponse:
        query = HandlingQuery(
            start=_seconds(request.start) if request.HasField("start") else None,
            end=_seconds(request.end) if request.HasField("end") else None,
            scenario_id=request.scenario_id,
        )
        if query.start is not None and query.end is not None and query.end < query.start:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "end: must not be before start")
        apps = admin_apps()
        routing = self.core.engine.scenarios.routing
        # An admin of some apps: their queues only, and each associate's figures over those queues only.
        keep = (lambda queue: routing.owner(queue) in apps) if apps else None
        report = await handling_report(self.core.store.funnel_counts, query, keep)
        return admin_pb2.GetHandlingTimesResponse(
            queues=[_handling(f) for f in report.queues], associates=[_handling(f) for f in report.associates]
        )

    async def GetModelReport(
        self, request: admin_pb2.GetModelReportRequest, context: Context
    ) -> admin_pb2.GetModelReportResponse:
        top = request.top_features if 0 < request.top_features <= 100 else 10
        apps = admin_apps()
        owners = self.core.engine.scenarios.outcome_owners
        return admin_pb2.GetModelReportResponse(
            outcomes=[
                model_report_to_proto(r, top)
                for r in self.core.model_reports()
                if not apps or owners.get(r.outcome) in apps
            ],
            training=self.core.trainer is not None and self.core.trainer.training,
        )


def _handling(f: HandlingFigures) -> admin_pb2.HandlingFigures:
    return admin_pb2.HandlingFigures(
        queue=f.queue,
        associate_id=f.associate_id,
        engagements=f.engagements,
        average_handle=duration(f.average_handle),
        median_handle=duration(f.median_handle),
        average_wrap_up=duration(f.average_wrap_up),
        median_wrap_up=duration(f.median_wrap_up),
        awaiting_wrap_up=f.awaiting_wrap_up,
        average_wait=duration(f.average_wait),
    )


def _owned(scenario: CompiledScenario) -> bool:
    """Whether the admin being served may see and change this scenario: every admin may, one limited to
    some apps only if the scenario applies to those apps alone."""
    apps = admin_apps()
    return not apps or (bool(scenario.apps) and scenario.apps <= apps)


def _owned_id(core: Core, scenario_id: str) -> bool:
    scenario = core.engine.scenarios.by_id.get(scenario_id)
    return not admin_apps() or (scenario is not None and _owned(scenario))


def _seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _conversion(cohort: Cohort) -> admin_pb2.ConversionGroup:
    return admin_pb2.ConversionGroup(
        sessions=cohort.sessions,
        outcome_reached=cohort.outcome_reached,
        converted=cohort.converted,
        conversion_rate=cohort.conversion_rate or 0.0,
    )


def _feedback(f: FeedbackSummary) -> admin_pb2.FeedbackSummary:
    return admin_pb2.FeedbackSummary(
        kind=f.kind,
        responses=f.responses,
        average_score=f.average,
        satisfied_share=f.satisfied_share,
        net_promoter_score=f.net_promoter_score,
    )


def _variants(states: list[VariantState]) -> list[admin_pb2.VariantInfo]:
    return [
        admin_pb2.VariantInfo(variant_id=v.variant_id, weight=v.weight, control=v.control, stopped=v.stopped)
        for v in states
    ]


def _variant_result(v: VariantRow) -> admin_pb2.VariantResult:
    return admin_pb2.VariantResult(
        variant_id=v.variant_id,
        control=v.control,
        offered=v.offered,
        accepted=v.accepted,
        conversion=_conversion(v.cohort),
        ci_low=v.ci_low,
        ci_high=v.ci_high,
        p_value=v.p_value,
        difference=v.difference,
    )


def _funnel_row(row: FunnelRow, group_by: tuple[str, ...]) -> admin_pb2.FunnelRow:
    return admin_pb2.FunnelRow(
        scenario_id=row.scenario_id,
        group=dict(zip(group_by, row.group, strict=True)),
        qualified=row.qualified,
        blocked=[admin_pb2.BlockedCount(reason=r, count=n) for r, n in row.blocked_by_count()],
        blocked_total=row.blocked_total,
        offered=row.offered,
        accepted=row.accepted,
        declined=row.declined,
        dismissed=row.dismissed,
        ignored=row.ignored,
        withdrawn=row.withdrawn,
        pending=row.pending,
        engaged=row.engaged,
        resolved=row.resolved,
        outcome=row.outcome,
        wrap_up_outcomes=row.wrap_up_outcomes,
        qualified_sessions=row.qualified_sessions,
        treated=_conversion(row.treated),
        holdout=_conversion(row.holdout),
        opened=row.opened,
        variants=[_variant_result(v) for v in row.variants],
        feedback=[_feedback(f) for f in row.feedback],
    )


def _replica(r: ReplicaStatus) -> admin_pb2.ReplicaInfo:
    return admin_pb2.ReplicaInfo(
        replica_id=r.replica_id,
        address=r.address,
        host=r.host,
        started_at=timestamp(r.started_at),
        last_seen=timestamp(r.last_seen),
        scenarios_version=r.scenarios_version,
        draining=r.draining,
        alive=r.alive,
        this_replica=r.this,
    )


def _live_session(s: LiveSession) -> admin_pb2.LiveSession:
    out = admin_pb2.LiveSession(
        session_id=s.session_id,
        device_id=s.device_id,
        app_id=s.app_id,
        status=_LIVE.get(s.status, admin_pb2.LIVE_STATUS_UNSPECIFIED),
        started_at=timestamp(s.started_at),
        context={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in s.context.items()},
        segments=s.segments,
        milestones=s.milestones,
        engagement_id=s.engagement_id,
        engagement_state=s.engagement_state,
        replica_id=s.replica_id,
    )
    if s.last_signal_at is not None:
        out.last_signal_at.CopyFrom(timestamp(s.last_signal_at))
    if s.pending_cue is not None:
        cue = s.pending_cue
        out.pending_cue.CopyFrom(
            admin_pb2.LivePendingCue(
                cue_id=cue.cue_id,
                scenario_id=cue.scenario_id,
                created_at=timestamp(cue.created_at),
                expires_at=timestamp(cue.expires_at),
            )
        )
    return out


def model_report_to_proto(report: OutcomeReport, top: int = 10) -> admin_pb2.OutcomeModelReport:
    return admin_pb2.OutcomeModelReport(
        outcome=report.outcome,
        status=SCORE_STATUS[report.status],
        labelled_sessions=report.labelled_sessions,
        positive_sessions=report.positive_sessions,
        base_rate=report.base_rate,
        auc=report.auc or 0.0,
        has_auc=report.auc is not None,
        validated=report.validated,
        calibration=[
            admin_pb2.CalibrationBin(
                low=c.low, high=c.high, count=c.count, mean_predicted=c.mean_predicted, observed_rate=c.observed
            )
            for c in report.calibration
        ],
        top_features=[common_pb2.FeatureContribution(feature=n, contribution=w) for n, w in report.top_features[:top]],
        version=report.version,
    )
