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

An admin token may also be limited to some apps (one installation serving several apps or brands):
`admin_apps()` tells the handler, which shows and changes only what belongs to those apps. Methods that
act on every app at once (INSTALLATION_METHODS: the emergency pause, webhooks, a user's data across
apps) need an admin of every app. A limited admin's entries carry `app:<id>` among their roles, which is
also how such an admin's ListAuditEntries finds its own apps' entries.
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

__all__ = ["INSTALLATION_METHODS", "METHOD_ROLES", "AuditNote", "admin_apps", "audited", "needed_roles", "note"]

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
    "GetHandlingTimes": frozenset({"viewer", "operator"}),
}
_DEFAULT_ROLES = frozenset({"operator"})
# Methods that act on every app at once: refused to an admin limited to some apps.
INSTALLATION_METHODS: frozenset[str] = frozenset(
    {"SetOffersPaused", "ListDeadWebhooks", "RedeliverWebhook", "ExportUser", "EraseUser"}
)


@dataclass(slots=True)
class AuditNote:
    """What a handler tells the audit about its call."""

    target: str = ""
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


_current: contextvars.ContextVar[AuditNote | None] = contextvars.ContextVar("cuepoint_audit_note", default=None)
_apps: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("cuepoint_admin_apps", default=frozenset())


def admin_apps() -> frozenset[str]:
    """The apps the admin being served may see and change; empty: every app."""
    return _apps.get()


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
    handler: grpc.RpcMethodHandler,
    method: str,
    actor: str,
    who: str,
    roles: frozenset[str],
    trail: AuditTrail,
    apps: frozenset[str] = frozenset(),
) -> grpc.RpcMethodHandler:
    """`handler` behind the role check, each call recorded in `trail` before it is answered."""
    behavior = handler.unary_unary
    if behavior is None:  # AdminService is unary only; anything else is refused rather than unaudited
        return handler
    name = method.rpartition("/")[2]
    needed = needed_roles(method)
    shown_roles = (*sorted(roles), *sorted(f"app:{a}" for a in apps))

    async def run(request: Any, context: Any) -> Any:
        error: PermissionDenied | None = None
        if not roles & needed:
            wanted = " or ".join(repr(r) for r in sorted(needed))
            error = PermissionDenied(f"{who} lacks the role {wanted} needed for AdminService.{name}")
        elif apps and name in INSTALLATION_METHODS:
            error = PermissionDenied(
                f"{who} is limited to app(s) {', '.join(sorted(apps))}; AdminService.{name} acts on every app"
            )
        if error is not None:
            await trail.record(actor, name, outcome="denied", detail=str(error), roles=shown_roles)
            await context.abort_with_status(rich_status(error))
        current = AuditNote()
        token = _current.set(current)
        scope = _apps.set(apps)
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
                # Refused by the handler (another app's data): a denial like a missing role.
                outcome="denied" if code == grpc.StatusCode.PERMISSION_DENIED else "failed",
                detail=detail,
                roles=shown_roles,
                before=current.before,
                after=current.after,
            )
            raise
        finally:
            _current.reset(token)
            _apps.reset(scope)
        await trail.record(
            actor, name, target=current.target, roles=shown_roles, before=current.before, after=current.after
        )
        return response

    return grpc.unary_unary_rpc_method_handler(
        run, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
