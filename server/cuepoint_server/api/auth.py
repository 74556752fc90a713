"""Who may call what: per-app API keys, associate tokens and admin tokens.

Credentials travel as gRPC metadata ``authorization: Bearer <token>``. The
server keeps only SHA-256 digests of them (the auth file may hold either the
token or ``sha256:<hex digest>``, so it need not hold secrets at all) and looks
a presented token up by its digest: no token is ever compared byte by byte, so
lookup timing tells an attacker nothing about a real token's characters, and a
memory dump holds no usable token.

Enforcement has two layers, both at the API boundary:

- :class:`AuthInterceptor` runs before any handler of a ``cuepoint.*``
  service: no or unknown credentials end the call with UNAUTHENTICATED, a
  credential of the wrong kind for the service (an app key on AdminService)
  with PERMISSION_DENIED. Services it does not know need an admin token, so a
  new service is closed until someone decides otherwise. Health checking and
  reflection stay open for load balancers and tooling.
- the stream servicers check what only the first message tells: the Hello's
  ``app_id`` must be the key's app, and a SignIn must name the token's own
  associate and only queues the token allows (:meth:`Authenticator.check_hello`,
  :meth:`Authenticator.check_sign_in`); PERMISSION_DENIED otherwise.

Example auth file (YAML)::

    apps:
      fitkit:
        api_keys: ["fk_live_2b7c0e8f6d1a4e3b"]
        user_tokens:                      # optional: how FitKit's backend signs user tokens
          issuer: "https://api.fitkit.example"
          audience: "cuepoint"
          public_key_file: fitkit-users.pem   # or public_key: PEM, or hs256_secret: 32+ characters
    associates:
      dana:
        token: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        queues: [fitkit-support]          # "*" allows every queue
        supervises: [fitkit-support]      # optional: queues whose engagements dana may monitor, whisper to, barge into
        apps: [fitkit]                    # optional: only engagements of these apps (default: every app)
    admin_tokens:
      - "adm_5c1e9a7f3b2d4c6e"            # a bare token: every admin role (as before roles existed)
      - {name: vera, token: "sha256:...", roles: [viewer]}   # viewer, author, operator, privacy
      - {name: fay, token: "sha256:...", roles: [operator], apps: [fitkit]}   # an admin of one app only

Admin roles (what each AdminService method needs: api/admin_roles.py): ``viewer`` reads, ``author``
works on scenarios, ``operator`` runs the service, ``privacy`` exports and erases users' data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import structlog
import yaml
from google.protobuf.message import DecodeError

from ..core.audit import AuditTrail
from ..core.errors import CoreError, InvalidInput, PermissionDenied, Unauthenticated
from ..core.model import AssociateSignIn
from ..core.user_tokens import ASYMMETRIC, UserTokenKey
from .admin_roles import audited
from .errors import rich_status

__all__ = [
    "ADMIN_ROLES",
    "AUTHORIZATION",
    "AdminGrant",
    "AssociateGrant",
    "AuthConfig",
    "AuthConfigError",
    "AuthInterceptor",
    "Authenticator",
    "Principal",
]

log = structlog.get_logger("cuepoint.api.auth")

AUTHORIZATION = "authorization"
ANY_QUEUE = "*"
# Shortest token accepted in plain form: anything shorter is guessable.
MIN_TOKEN_LENGTH = 16
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
_APP_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_ADMIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# What an admin token may carry; a bare token (no roles listed) has all of them.
ADMIN_ROLES: frozenset[str] = frozenset({"viewer", "author", "operator", "privacy"})

Kind = Literal["app", "associate", "admin"]
ADMIN_SERVICE = "cuepoint.v1.AdminService"

# The credential each service needs; any other cuepoint service needs "admin".
SERVICE_KINDS: dict[str, Kind] = {
    "cuepoint.v1.DeviceService": "app",
    "cuepoint.v1.AssociateService": "associate",
    "cuepoint.v1.AdminService": "admin",
}


class AuthConfigError(ValueError):
    """The auth file is malformed; the message names the file and the entry."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _secret(value: object, where: str) -> bytes:
    """A token entry of the auth file as its digest."""
    if not isinstance(value, str) or not value:
        raise AuthConfigError(f"{where}: expected a token string or 'sha256:<64 hex digits>'")
    found = _DIGEST.match(value)
    if found:
        return bytes.fromhex(found.group(1))
    if len(value) < MIN_TOKEN_LENGTH or any(c.isspace() for c in value):
        raise AuthConfigError(f"{where}: tokens need at least {MIN_TOKEN_LENGTH} characters and no whitespace")
    return digest(value)


@dataclass(frozen=True, slots=True)
class AssociateGrant:
    associate_id: str
    token: bytes = field(repr=False)
    # Queue names the associate may sign in to; "*" allows every queue.
    queues: frozenset[str] = frozenset()

    # Queues whose engagements the associate may supervise (monitor, whisper, barge in); "*" allows every queue.
    supervises: frozenset[str] = frozenset()
    # Apps whose engagements the associate may handle; empty: every app.
    apps: frozenset[str] = frozenset()

    def allows(self, queue: str) -> bool:
        return ANY_QUEUE in self.queues or queue in self.queues

    def may_supervise(self, queue: str) -> bool:
        return ANY_QUEUE in self.supervises or queue in self.supervises


@dataclass(frozen=True, slots=True)
class AdminGrant:
    name: str
    token: bytes = field(repr=False)
    roles: frozenset[str] = frozenset()
    # The apps this admin sees and changes (api/admin_scope.py); empty: every app (the installation).
    apps: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Issued credentials, as SHA-256 digests. ``ServerConfig.auth = None`` turns auth off."""

    # app id -> digests of its API keys
    apps: Mapping[str, frozenset[bytes]] = field(default_factory=dict, repr=False)
    associates: Mapping[str, AssociateGrant] = field(default_factory=dict, repr=False)
    # Admin tokens listed bare: every role, named "admin".
    admin_tokens: frozenset[bytes] = field(default_factory=frozenset, repr=False)
    # Admin tokens listed as {name, token, roles}.
    admin_grants: tuple[AdminGrant, ...] = field(default=(), repr=False)
    # app id -> how its backend signs user tokens (apps.<id>.user_tokens; core/user_tokens.py)
    user_tokens: Mapping[str, UserTokenKey] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> AuthConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = yaml.safe_load(text)
        except (OSError, yaml.YAMLError) as exc:
            raise AuthConfigError(f"{path}: cannot read auth file: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, *, source: str = "auth") -> AuthConfig:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise AuthConfigError(f"{source}: expected a mapping with apps, associates, admin_tokens")
        unknown = set(data) - {"apps", "associates", "admin_tokens"}
        if unknown:
            raise AuthConfigError(f"{source}: unknown key(s) {sorted(unknown)}")
        apps: dict[str, frozenset[bytes]] = {}
        user_tokens: dict[str, UserTokenKey] = {}
        for app_id, entry in _mapping(data.get("apps"), f"{source}: apps").items():
            where = f"{source}: apps.{app_id}"
            if not isinstance(app_id, str) or not _APP_ID.match(app_id):
                raise AuthConfigError(f"{where}: not a valid app id")
            keys = _mapping(entry, where).get("api_keys")
            apps[app_id] = frozenset(_secret(k, f"{where}.api_keys[{i}]") for i, k in enumerate(_list(keys, where)))
            signing = _mapping(entry, where).get("user_tokens")
            if signing is not None:
                user_tokens[app_id] = _user_token_key(signing, f"{where}.user_tokens", Path(source).parent)
        associates: dict[str, AssociateGrant] = {}
        for associate_id, entry in _mapping(data.get("associates"), f"{source}: associates").items():
            where = f"{source}: associates.{associate_id}"
            if not isinstance(associate_id, str) or not associate_id:
                raise AuthConfigError(f"{where}: not a valid associate id")
            grant = _mapping(entry, where)
            queues = _list(grant.get("queues"), f"{where}.queues")
            if not queues or not all(isinstance(q, str) and q for q in queues):
                raise AuthConfigError(f"{where}.queues: list the queues this associate may serve (or '*')")
            supervises = _list(grant.get("supervises"), f"{where}.supervises")
            if not all(isinstance(q, str) and q for q in supervises):
                raise AuthConfigError(f"{where}.supervises: list the queues this associate may supervise (or '*')")
            associates[associate_id] = AssociateGrant(
                associate_id,
                _secret(grant.get("token"), f"{where}.token"),
                frozenset(queues),
                frozenset(supervises),
                _app_scope(grant.get("apps"), f"{where}.apps", apps),
            )
        admins, grants = _admin_tokens(_list(data.get("admin_tokens"), source), source, apps)
        config = cls(
            apps=apps, associates=associates, admin_tokens=admins, admin_grants=grants, user_tokens=user_tokens
        )
        config.principals()  # rejects a token issued twice
        return config

    def principals(self) -> dict[bytes, Principal]:
        """Digest -> who presents it. A token may belong to one principal only."""
        table: dict[bytes, Principal] = {}

        def add(token: bytes, principal: Principal) -> None:
            other = table.setdefault(token, principal)
            if other is not principal:
                raise AuthConfigError(f"one token is issued to both {other} and {principal}")

        for app_id, keys in self.apps.items():
            app = Principal("app", app_id)
            for key in keys:
                add(key, app)
        for grant in self.associates.values():
            add(grant.token, Principal("associate", grant.associate_id, grant))
        admin = Principal("admin", "admin", roles=ADMIN_ROLES)
        for token in self.admin_tokens:
            add(token, admin)
        for admin_grant in self.admin_grants:
            add(admin_grant.token, Principal("admin", admin_grant.name, roles=admin_grant.roles, apps=admin_grant.apps))
        return table


def _app_scope(value: object, where: str, apps: Mapping[str, object]) -> frozenset[str]:
    """An `apps:` list limiting a credential to some apps, each listed under the file's `apps:`."""
    names = _list(value, where)
    if value is not None and not names:
        raise AuthConfigError(f"{where}: list at least one app, or leave it out for every app")
    unknown = [a for a in names if not isinstance(a, str) or a not in apps]
    if unknown:
        raise AuthConfigError(f"{where}: unknown app(s) {unknown}; list them under apps: first")
    return frozenset(names)


def _admin_tokens(
    entries: list[Any], source: str, apps: Mapping[str, object]
) -> tuple[frozenset[bytes], tuple[AdminGrant, ...]]:
    """Bare tokens (every role) and {name, token, roles} grants, checked."""
    bare: set[bytes] = set()
    grants: list[AdminGrant] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{source}: admin_tokens[{i}]"
        if not isinstance(entry, Mapping):
            bare.add(_secret(entry, where))
            continue
        unknown = set(entry) - {"name", "token", "roles", "apps"}
        if unknown:
            raise AuthConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not _ADMIN_NAME.match(name):
            raise AuthConfigError(f"{where}.name: letters, digits, '_', '-' or '.', up to 64")
        # "admin" names the bare tokens in the audit trail; a grant may not pass for them.
        if name in names or name == "admin":
            raise AuthConfigError(f"{where}.name: {name!r} is already used")
        names.add(name)
        roles = _list(entry.get("roles"), f"{where}.roles")
        if not roles:
            raise AuthConfigError(f"{where}.roles: list at least one of {', '.join(sorted(ADMIN_ROLES))}")
        for role in roles:
            if role not in ADMIN_ROLES:
                raise AuthConfigError(
                    f"{where}.roles: unknown role {role!r}; roles are {', '.join(sorted(ADMIN_ROLES))}"
                )
        scope = _app_scope(entry.get("apps"), f"{where}.apps", apps)
        grants.append(AdminGrant(name, _secret(entry.get("token"), f"{where}.token"), frozenset(roles), scope))
    return frozenset(bare), tuple(grants)


# Shortest HS256 secret accepted: RFC 7518 wants a key at least as long as the hash (32 bytes).
MIN_HS256_SECRET = 32


def _user_token_key(value: object, where: str, folder: Path) -> UserTokenKey:
    """``{issuer, audience, hs256_secret | public_key | public_key_file, algorithms?, max_lifetime?}``."""
    entry = _mapping(value, where)
    unknown = set(entry) - {
        "issuer",
        "audience",
        "hs256_secret",
        "public_key",
        "public_key_file",
        "algorithms",
        "max_lifetime",
    }
    if unknown:
        raise AuthConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    issuer, audience = entry.get("issuer"), entry.get("audience")
    if not isinstance(issuer, str) or not issuer or not isinstance(audience, str) or not audience:
        raise AuthConfigError(f"{where}: issuer and audience are required (the token's iss and aud)")
    given = [k for k in ("hs256_secret", "public_key", "public_key_file") if entry.get(k)]
    if len(given) != 1:
        raise AuthConfigError(f"{where}: give exactly one of hs256_secret, public_key, public_key_file")
    algorithms = entry.get("algorithms")
    if given[0] == "hs256_secret":
        key = entry["hs256_secret"]
        if not isinstance(key, str) or len(key) < MIN_HS256_SECRET:
            raise AuthConfigError(f"{where}.hs256_secret: at least {MIN_HS256_SECRET} characters")
        allowed: tuple[str, ...] = ("HS256",)
        if algorithms not in (None, ["HS256"]):
            raise AuthConfigError(f"{where}.algorithms: an hs256_secret verifies HS256 only")
    else:
        try:
            key = (
                str(entry["public_key"])
                if given[0] == "public_key"
                else (folder / str(entry["public_key_file"])).read_text(encoding="utf-8")
            )
        except OSError as exc:
            raise AuthConfigError(f"{where}.public_key_file: {exc}") from exc
        if "PUBLIC KEY" not in key:
            raise AuthConfigError(f"{where}: expected a PEM public key")
        names = _list(algorithms, f"{where}.algorithms") or ["RS256", "ES256", "EdDSA"]
        bad = [a for a in names if a not in ASYMMETRIC]
        if bad:
            raise AuthConfigError(f"{where}.algorithms: {bad} not allowed with a public key; use {list(ASYMMETRIC)}")
        allowed = tuple(names)
    lifetime = entry.get("max_lifetime", 86400)
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        raise AuthConfigError(f"{where}.max_lifetime: seconds, > 0")
    return UserTokenKey(issuer, audience, key, allowed, float(lifetime))


def _mapping(value: object, where: str) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AuthConfigError(f"{where}: expected a mapping")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise AuthConfigError(f"{where}: expected a list")
    return value


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Kind
    name: str
    grant: AssociateGrant | None = None
    # Admin roles (api/admin_roles.py); empty for apps and associates.
    roles: frozenset[str] = frozenset()
    # For an admin: the apps it may see and change; empty: every app.
    apps: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r}"


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self._principals = config.principals()

    def identify(self, metadata: Iterable[Any] | None) -> Principal:
        """Who presents the bearer token in `metadata`; UNAUTHENTICATED if nobody."""
        values = [_value(item) for item in metadata or () if _key(item) == AUTHORIZATION]
        if not values:
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        if len(values) > 1:
            raise Unauthenticated("more than one authorization header")
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed authorization header: expected 'Bearer <token>'")
        principal = self._principals.get(digest(token))
        if principal is None:
            raise Unauthenticated("unknown credentials")
        return principal

    def check_service(self, principal: Principal, service: str) -> None:
        needed = SERVICE_KINDS.get(service, "admin")
        if principal.kind != needed:
            raise PermissionDenied(f"{principal} may not call {service}; it needs {_article(needed)}")

    def check_hello(self, principal: Principal, app_id: str) -> None:
        if principal.kind != "app" or principal.name != app_id:
            message = f"{principal} may not connect devices of app {app_id!r}"
            raise _denied(message, "/cuepoint.v1.DeviceService/Connect")

    def check_sign_in(self, principal: Principal, request: AssociateSignIn) -> AssociateSignIn:
        """The sign-in to perform: own id only, allowed queues only (all of them when none asked)."""
        grant = principal.grant
        method = "/cuepoint.v1.AssociateService/Connect"
        if principal.kind != "associate" or grant is None:
            raise _denied(f"{principal} may not sign in as an associate", method)
        if request.associate_id != grant.associate_id:
            raise _denied(f"{principal} may not sign in as associate {request.associate_id!r}", method)
        unsupervised = [q for q in request.supervised_queues if not grant.may_supervise(q)]
        if unsupervised:
            raise _denied(f"{principal} may not supervise queue(s) {unsupervised}", method)
        # The credential's apps bound what the associate may take (the core checks queues and routing).
        request = dataclasses.replace(request, apps=tuple(sorted(grant.apps)))
        if not request.queues:
            if ANY_QUEUE in grant.queues:
                return request
            return dataclasses.replace(request, queues=tuple(sorted(grant.queues)))
        denied = [q for q in request.queues if not grant.allows(q)]
        if denied:
            raise _denied(f"{principal} may not serve queue(s) {denied}", method)
        return request


def _denied(message: str, method: str) -> PermissionDenied:
    log.info("auth.rejected", method=method, error=message)
    return PermissionDenied(message)


def _article(kind: Kind) -> str:
    return {"app": "an app API key", "associate": "an associate token", "admin": "an admin token"}[kind]


def _key(item: Any) -> str:
    key = item.key if hasattr(item, "key") else item[0]
    return str(key).lower()


def _value(item: Any) -> str:
    value = item.value if hasattr(item, "value") else item[1]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- the interceptor ----------------------------------------------------------------

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call to a ``cuepoint.*`` service before its handler runs.

    With ``auth=None`` (auth disabled) it only guards unary handlers against
    undecodable requests (INVALID_ARGUMENT instead of grpc's INTERNAL); stream
    servicers catch those themselves.
    """

    def __init__(self, auth: Authenticator | None, audit: AuditTrail | None = None) -> None:
        self.auth = auth
        # With a trail, every AdminService call is checked against the caller's roles and recorded.
        self.audit = audit

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method or ""
        service = method.lstrip("/").partition("/")[0]
        if handler is None or not service.startswith("cuepoint."):
            return handler
        handler = _guard_unary_decoding(handler, method)
        audit = self.audit if service == ADMIN_SERVICE else None
        if self.auth is None:
            # Auth off: anyone is every admin, and the trail says so.
            return audited(handler, method, "anonymous", "anonymous", ADMIN_ROLES, audit) if audit else handler
        try:
            principal = self.auth.identify(handler_call_details.invocation_metadata)
            self.auth.check_service(principal, service)
        except CoreError as exc:
            log.info("auth.rejected", method=method, error=str(exc))
            return _rejecting(handler, exc)
        if audit is not None:
            return audited(
                handler, method, f"admin:{principal.name}", str(principal), principal.roles, audit, principal.apps
            )
        return handler


def _rejecting(handler: grpc.RpcMethodHandler, error: CoreError) -> grpc.RpcMethodHandler:
    """A handler of the same shape that ends the call with `error` without reading it."""
    status = rich_status(error)

    async def reject(request: object, context: Any) -> None:
        await context.abort_with_status(status)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _guard_unary_decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """Undecodable unary requests (bad UTF-8, truncated fields) get INVALID_ARGUMENT."""
    deserialize = handler.request_deserializer
    if handler.request_streaming or deserialize is None:
        return handler
    behavior = handler.unary_unary or handler.unary_stream
    if behavior is None:
        return handler

    def safe_deserialize(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    async def guarded(request: object, context: Any) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort_with_status(rich_status(undecodable(method, request.error)))
        return await behavior(request, context)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=safe_deserialize, response_serializer=handler.response_serializer
        )
    return handler  # unary-stream: none in the contract; left as grpc handles it


def undecodable(what: str, error: Exception) -> InvalidInput:
    """The error for a message protobuf cannot parse (invalid UTF-8, truncated or mistyped fields)."""
    return InvalidInput("", f"cannot decode {what}: {error}")
