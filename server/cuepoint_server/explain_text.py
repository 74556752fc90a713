"""`cuepoint explain DEVICE`: ask a running server's AdminService.ExplainDevice and print why (not), per scenario."""

from __future__ import annotations

import grpc

from cuepoint.v1 import admin_pb2, admin_pb2_grpc

__all__ = ["fetch", "render"]

_STATUS = {
    admin_pb2.SCENARIO_CHECK_STATUS_OFFERED: "WOULD OFFER",
    admin_pb2.SCENARIO_CHECK_STATUS_BLOCKED: "BLOCKED",
    admin_pb2.SCENARIO_CHECK_STATUS_NOT_QUALIFIED: "NOT QUALIFIED",
    admin_pb2.SCENARIO_CHECK_STATUS_OTHER_APP: "OTHER APP",
    admin_pb2.SCENARIO_CHECK_STATUS_DISABLED: "DISABLED",
}


async def fetch(address: str, device_id: str, token: str = "", limit: int = 20) -> admin_pb2.ExplainDeviceResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        request = admin_pb2.ExplainDeviceRequest(device_id=device_id, limit=limit)
        answer: admin_pb2.ExplainDeviceResponse = await admin.ExplainDevice(request, metadata=metadata, timeout=10)
        return answer


def render(answer: admin_pb2.ExplainDeviceResponse) -> str:
    lines = [
        f"device {answer.device_id}: {'connected' if answer.connected else 'not connected'}; "
        f"segments: {', '.join(answer.segments) or '-'}; milestones: {', '.join(answer.milestones) or '-'}"
    ]
    if not answer.scenarios:
        lines.append("no evaluation state for this device on this server (never seen since it started)")
    for scenario in answer.scenarios:
        head = f"{scenario.scenario_id}: {_STATUS.get(scenario.status, 'UNKNOWN')}"
        if scenario.reason or scenario.detail:
            head += f" {scenario.reason} {scenario.detail}".rstrip()
        lines.append(head)
        for c in scenario.conditions:
            mark = "yes" if c.holds else "NO "
            lines.append(f"  {mark} {c.path}: {c.expected} (observed: {c.observed})")
    if answer.decisions:
        lines.append("recent decisions (oldest first):")
        for d in answer.decisions:
            outcome = "offered" if d.outcome == admin_pb2.DECISION_OUTCOME_OFFERED else "blocked"
            when = d.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            lines.append(f"  {when} {d.scenario_id} {outcome} {d.reason} {d.detail}".rstrip())
    return "\n".join(lines) + "\n"
