"""Admin roles and the audit of every AdminService call.

An admin token carries roles (api/auth.py): `viewer` reads (explain, scenarios, funnels, live sessions,
model reports), `author` also works on scenarios (their status, stopping a variant), `operator` runs the
service (the emergency pause, variants, lost device secrets, the audit trail), `privacy` answers data
subjects (export, erase) and reads the audit trail. A call without a role its method accepts ends with
PERMISSION_DENIED naming the role(s) it needs; a method missing from the table needs `operator`, so an
RPC added later is closed until someone decides who may call it.

Every call, allowed or denied, becomes one audit entry (core/audit.py) written before the caller gets
its answer: who (the admin's name and roles), what (the method), the outcome, and what the handler
noted about it (`note`: the target and the state before and after).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from ..core.audit import AuditTrail
from ..core.errors import PermissionDenied
from .errors import rich_status

__all__ = ["METHOD_ROLES", "AuditNote", "audited", "needed_roles", "note"]

# The roles that may call each AdminService method (any one of them suffices).
METHOD_ROLES: Mapping[str, frozenset[str]] = {
    "ExplainDevice": frozenset({"viewer", "author", "operator"}),
    "GetScenarios": frozenset({"viewer", "author", "operator"}),
    "GetFunnel": frozenset({"viewer", "author", "operator"}),
    "ListLiveSessions": frozenset({"viewer", "operator"}),
    "GetModelReport": frozenset({"viewer", "author", "operator"}),
    "SetOffersPaused": frozenset({"operator"}),
    "SetVariantStopped": frozenset({"author", "operator"}),
    "SetScenarioEnabled": frozenset({"author", "operator"}),
    "ListDeadWebhooks": frozenset({"operator"}),
    "RedeliverWebhook": frozenset({"operator"}),
    "ForgetDeviceCredential": frozenset({"operator"}),
    "ExportUser": frozenset({"privacy"}),
    "EraseUser": frozenset({"privacy"}),
    "ListAuditEntries": frozenset({"operator", "privacy"}),
}
_DEFAULT_ROLES = frozenset({"operator"})


@dataclass(slots=True)
class AuditNote:
    """What a handler tells the audit about its call."""

    target: str = ""
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


_current: contextvars.ContextVar[AuditNote | None] = contextvars.ContextVar("cuepoint_audit_note", default=None)


def note(target: str = "", *, before: Mapping[str, Any] | None = None, after: Mapping[str, Any] | None = None) -> None:
    """Called by an AdminService handler: the target and before/after of the call being served."""
    current = _current.get()
    if current is None:  # called outside an audited call (e.g. a unit test of the servicer)
        return
    if target:
        current.target = target
    current.before.update(before or {})
    current.after.update(after or {})


def needed_roles(method: str) -> frozenset[str]:
    return METHOD_ROLES.get(method.rpartition("/")[2], _DEFAULT_ROLES)


Behavior = Callable[[Any, Any], Awaitable[Any]]


def audited(
    handler: grpc.RpcMethodHandler, method: str, actor: str, who: str, roles: frozenset[str], trail: AuditTrail
) -> grpc.RpcMethodHandler:
    """`handler` behind the role check, each call recorded in `trail` before it is answered."""
    behavior = handler.unary_unary
    if behavior is None:  # AdminService is unary only; anything else is refused rather than unaudited
        return handler
    name = method.rpartition("/")[2]
    needed = needed_roles(method)
    shown_roles = tuple(sorted(roles))

    async def run(request: Any, context: Any) -> Any:
        if not roles & needed:
            wanted = " or ".join(repr(r) for r in sorted(needed))
            error = PermissionDenied(f"{who} lacks the role {wanted} needed for AdminService.{name}")
            await trail.record(actor, name, outcome="denied", detail=str(error), roles=shown_roles)
            await context.abort_with_status(rich_status(error))
        current = AuditNote()
        token = _current.set(current)
        try:
            response = await behavior(request, context)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            code = context.code() if hasattr(context, "code") else None
            detail = f"{getattr(code, 'name', '')} {context.details() or ''}".strip() if code else type(exc).__name__
            await trail.record(
                actor,
                name,
                target=current.target,
                outcome="failed",
                detail=detail,
                roles=shown_roles,
                before=current.before,
                after=current.after,
            )
            raise
        finally:
            _current.reset(token)
        await trail.record(
            actor, name, target=current.target, roles=shown_roles, before=current.before, after=current.after
        )
        return response

    return grpc.unary_unary_rpc_method_handler(
        run, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
