"""Assemble storage, engine, core and the gRPC server into one runnable unit."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import socket
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cuepoint.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    associate_pb2,
    associate_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
)

from .api.admin import AdminServicer
from .api.associate import AssociateServicer
from .api.associate_links import AssociateLinks
from .api.auth import AuthConfig, Authenticator, AuthInterceptor
from .api.device import DeviceServicer
from .api.limits import RateLimiter, RateLimits
from .bus_nats import NatsBus
from .clock import Clock, SystemClock
from .core.audit import AuditTrail
from .core.delivery import Delivery, DeliveryFaults
from .core.replicas import SWEEP_EVERY
from .core.service import Core, CoreConfig
from .engine.engine import Engine
from .engine.scenario_set import ScenarioSet
from .http import HttpServer
from .metrics import Metrics
from .scenarios.reloader import ReloadResult, ScenarioReloader, ScenarioVersion
from .storage import PostgresStore, SqliteStore
from .storage.postgres import is_postgres_url
from .webhooks import WebhookConfig, WebhookDispatcher

__all__ = ["CuepointServer", "PortUnavailable", "ServerConfig"]

log = structlog.get_logger("cuepoint.server")

SERVICES = (
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    associate_pb2.DESCRIPTOR.services_by_name["AssociateService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    # 0 picks a free port; CuepointServer.port tells which.
    port: int = 50051
    db: str = "cuepoint.db"
    # A postgresql:// URL: state in PostgreSQL (several replicas may share it) instead of the SQLite file `db`.
    database: str = ""
    scenarios: str | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    # Seconds in-flight streams get to finish on shutdown.
    grace: float = 5.0
    # Seconds a new device stream may take to send its Hello, and an associate stream its sign-in, before
    # it ends with DEADLINE_EXCEEDED.
    hello_timeout: float = 10.0
    # Server keepalive pings on idle connections.
    keepalive_time: float = 30.0
    # Seconds a connection may live before the server sends GOAWAY, so long-lived streams rebalance onto
    # replicas added since (a load balancer only places new connections); None: forever. Streams then get
    # `max_connection_age_grace` seconds to finish before they are cut; the SDK reconnects and resumes.
    max_connection_age: float | None = None
    max_connection_age_grace: float = 30.0
    # A nats:// URL: several replicas reach each other's streams over NATS (bus_nats.py); "" runs alone.
    bus: str = ""
    # Subject prefix on the bus: replicas of one deployment share it, other deployments on the same NATS don't.
    bus_prefix: str = "cuepoint"
    # Tests only: wake-ups of the delivery outbox dropped and repeated (core/delivery.py).
    delivery_faults: DeliveryFaults | None = None
    # Tests only: seconds between two cluster sweeps (core/replicas.py SWEEP_EVERY); a long one leaves a gone
    # replica's timer rows to the timer claims alone (core/timer_claims.py), without the sweep adopting first.
    sweep_every: float = SWEEP_EVERY
    core: CoreConfig = field(default_factory=CoreConfig)
    # Watch the scenarios folder and apply edits live (scenarios/reloader.py).
    watch_scenarios: bool = True
    # Issued credentials (api/auth.py, `cuepoint serve --auth FILE`); None disables auth (a warning is logged).
    auth: AuthConfig | None = None
    # With auth, a Hello for a known device id must carry the device secret issued on its first connection
    # (core/device_credentials.py). Migration mode also admits devices that never presented theirs (SDKs
    # that predate device secrets); off by default (`--device-secret-migration`).
    device_secret_migration: bool = False
    # PEM files; both set: the port speaks TLS only (`--tls-cert/--tls-key`).
    tls_cert: str | None = None
    tls_key: str | None = None
    # Token buckets per device and per app (api/limits.py); None disables them.
    rate_limits: RateLimits | None = field(default_factory=RateLimits)
    # Prometheus metrics over HTTP (metrics.py): None off, 0 a free port (CuepointServer.metrics_port says which).
    metrics_port: int | None = None
    # Lifecycle events POSTed, signed, from the durable outbox to these URLs (webhooks.py).
    webhooks: tuple[WebhookConfig, ...] = ()
    metrics_host: str = "127.0.0.1"
    # The associate desk and admin console (http/): None off, 0 a free port (CuepointServer.http_port).
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    # A desk page that goes away (reload, network blip) keeps its associate and engagements this long.
    desk_resume_grace: float = 30.0


class CuepointServer:
    def __init__(
        self, config: ServerConfig, store: SqliteStore | PostgresStore, core: Core, server: grpc.aio.Server, port: int
    ):
        self.config = config
        self.store = store
        self.core = core
        self.port = port
        self._server = server
        self._health: health.aio.HealthServicer | None = None
        # Set when the server serves a scenarios folder; reload_now() works even unwatched.
        self.reloader: ScenarioReloader | None = None
        # Its own registry, so several servers in one process never collide.
        self.metrics = Metrics(core)
        self.http: HttpServer | None = None
        self._audit_tasks: set[asyncio.Task[object]] = set()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def http_url(self) -> str | None:
        port = self.http_port
        return None if port is None else f"http://{self.config.http_host}:{port}"

    @classmethod
    async def start(cls, config: ServerConfig, *, clock: Clock | None = None) -> CuepointServer:
        # Scenarios load first: a broken folder must stop start-up before we
        # open the database or bind the port.
        scenarios = ScenarioSet.load(config.scenarios) if config.scenarios else ScenarioSet.empty()
        tls = _tls_credentials(config)
        store: SqliteStore | PostgresStore
        if config.database:
            if not is_postgres_url(config.database):
                raise ValueError(f"--database must be a postgresql:// URL, not {config.database!r}")
            store = await PostgresStore.open(config.database)
        else:
            if config.db != ":memory:":
                Path(config.db).parent.mkdir(parents=True, exist_ok=True)
            store = await SqliteStore.open(config.db, decider=True)
        core_config = dataclasses.replace(
            config.core,
            enforce_device_secrets=config.auth is not None,
            device_secret_migration=config.device_secret_migration,
            enforce_user_tokens=config.auth is not None,
            user_token_keys=config.auth.user_tokens if config.auth is not None else {},
        )
        core = Core(store, Engine(scenarios), clock or SystemClock(), core_config)
        if config.bus:
            try:
                core.bus = await NatsBus.connect(config.bus, prefix=config.bus_prefix)
            except Exception as exc:
                await store.close()
                raise OSError(f"cannot reach the bus at {config.bus}: {exc!r}") from exc
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Keepalive: find dead mobile connections, and accept the SDK's pings.
            ("grpc.keepalive_time_ms", int(config.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
            # Without this a second server on a busy port binds beside the first and shares its traffic.
            ("grpc.so_reuseport", 0),
        ]
        if config.max_connection_age is not None:
            options += [
                ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
                ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace * 1000)),
            ]
        auth = Authenticator(config.auth) if config.auth is not None else None
        if auth is None:
            log.warning(
                "auth.disabled", hint="any client may connect as any app, device, associate or admin; use --auth FILE"
            )
        limiter = RateLimiter(config.rate_limits, core.clock.now) if config.rate_limits is not None else None
        # Every admin action is recorded with who, what, when and before/after (core/audit.py).
        trail = AuditTrail(store, core.clock)
        server = grpc.aio.server(options=options, interceptors=[AuthInterceptor(auth, trail)])
        device_pb2_grpc.add_DeviceServiceServicer_to_server(
            DeviceServicer(core, auth=auth, limiter=limiter, hello_timeout=config.hello_timeout), server
        )
        associate = AssociateServicer(core, auth=auth, sign_in_timeout=config.hello_timeout)
        if config.bus:
            # Traffic for streams on other replicas is stored before the bus wakes its holder.
            core.delivery = Delivery(store, core.bus, core.clock, config.delivery_faults)
            # The associate's stream reaches the other replicas' desks through stand-ins there.
            associate.links = AssociateLinks(core, AssociateServicer(core, sign_in_timeout=None))
        associate_pb2_grpc.add_AssociateServiceServicer_to_server(associate, server)
        admin = AdminServicer(core, audit=trail)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        bind = f"{config.host}:{config.port}"
        try:
            port = server.add_secure_port(bind, tls) if tls is not None else server.add_insecure_port(bind)
        except RuntimeError:  # grpc's way of saying the bind failed
            port = 0
        if port == 0:
            await store.close()
            raise PortUnavailable(_why_not_bound(config.host, config.port))
        webhooks = WebhookDispatcher(config.webhooks, store) if config.webhooks else None
        if webhooks is not None:
            # Listening before anything can happen, so no event misses the outbox.
            core.cue_listeners.append(webhooks.emit)
            core.webhook_rows = webhooks.rows
            core.desk.listeners.append(webhooks.emit)
            core.desk.webhook_rows = webhooks.rows
            core.desk.outbox_wakeups.append(webhooks.wake)
            core.privacy_listeners.append(webhooks.emit)
            core.outbox_wakeups.append(webhooks.wake)
            webhooks.start()
        await core.recover()
        # Switches another replica changes from now on reach this one, and this replica is in the replicas
        # registry (core/cluster.py).
        await core.join_cluster(address=f"{config.host}:{port}", sweep_every=config.sweep_every)
        if core.delivery is not None:
            await core.delivery.start()
        if associate.links is not None:
            await associate.links.start()
        # Models of declared outcomes come back from storage; this process trains while it holds the lease.
        await core.start_training()
        await server.start()
        for name in ("", *SERVICES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self = cls(config, store, core, server, port)
        self.associate_links = associate.links
        self.audit = trail
        self.metrics.limiter = limiter
        admin.status = self._scenario_status
        self._health = health_servicer
        if config.scenarios:
            self.reloader = ScenarioReloader(core.engine, config.scenarios, clock=core.clock)
            self.reloader.swap_listeners.append(core.scenarios_swapped)
            self.reloader.result_listeners.append(self._audit_reload)
            self.reloader.result_listeners.append(self._report_version)
            await self.reloader.start(watch=config.watch_scenarios)
            await core.report_scenarios_version(self.reloader.version.short)
        if config.core.retention_days is not None:
            self._purger = asyncio.create_task(self._purge_periodically(), name="cuepoint-retention")
        self.webhooks = webhooks
        if config.metrics_port is not None:
            try:
                await self.metrics.serve(config.metrics_host, config.metrics_port)
            except OSError:
                await self.stop(0)
                raise
        if config.http_port is not None:
            # Same loop, same core, same credentials as the gRPC services.
            self.http = HttpServer(core, auth, self.audit, resume_grace=config.desk_resume_grace)
            self.http.scenario_status.read = self._scenario_status
            try:
                await self.http.start(config.http_host, config.http_port)
            except OSError:
                await self.stop(0)
                raise
        log.info(
            "server.started",
            address=self.address,
            scenarios=len(scenarios.scenarios),
            db=config.db,
            auth=auth is not None,
            tls=tls is not None,
        )
        return self

    def _scenario_status(self) -> tuple[int, str]:
        if self.reloader is None:
            return 1, ""
        error = self.reloader.last_error
        return self.reloader.version.number, str(error) if error else ""

    def _audit_reload(self, result: ReloadResult, reason: str, before: ScenarioVersion) -> None:
        """A reload (file change, SIGHUP) is an admin action too: recorded as the server's own."""
        if result.status == "unchanged" or self.audit is None:
            return
        after: dict[str, object] = {"version": result.version.number, "digest": result.version.short}
        if result.status == "applied":
            after.update(added=list(result.added), removed=list(result.removed))
            after.update(enabled=list(result.enabled), disabled=list(result.disabled))
        else:
            after["problems"] = [str(issue) for issue in result.issues[:20]]
        record = self.audit.record(
            f"system:{reason}",
            "scenarios.reload",
            target=self.reloader.directory if self.reloader is not None else "",
            outcome="ok" if result.status == "applied" else "failed",
            before={"version": before.number, "digest": before.short},
            after=after,
        )
        task = asyncio.create_task(record, name="cuepoint-audit-reload")
        self._audit_tasks.add(task)
        task.add_done_callback(self._audit_tasks.discard)

    def _report_version(self, result: ReloadResult, _reason: str, _before: ScenarioVersion) -> None:
        """The replicas registry shows which scenario set each replica serves (operations views compare)."""
        if result.status != "applied":
            return
        task = asyncio.create_task(self.core.report_scenarios_version(result.version.short), name="cuepoint-version")
        self._audit_tasks.add(task)
        task.add_done_callback(self._audit_tasks.discard)

    webhooks: WebhookDispatcher | None = None
    audit: AuditTrail | None = None
    associate_links: AssociateLinks | None = None
    _purger: asyncio.Task[None] | None = None

    async def _purge_periodically(self) -> None:
        while True:
            try:
                await self.core.purge()
            except Exception:
                log.exception("journey.purge_failed")
            await asyncio.sleep(3600)

    async def stop(self, grace: float | None = None) -> None:
        # First, so the other replicas' views show this one draining while its streams finish.
        await self.core.start_draining()
        if self.http is not None:
            await self.http.stop()
        if self._purger is not None:
            self._purger.cancel()
        await self.metrics.close()
        if self.reloader is not None:
            await self.reloader.stop()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self._server.stop(self.config.grace if grace is None else grace)
        if self.associate_links is not None:
            await self.associate_links.stop()
        await self.core.drain()
        await self.core.leave_cluster()
        if self.core.delivery is not None:
            await self.core.delivery.stop()
        await self.core.bus.close()
        await self.core.stop_training()
        if self.webhooks is not None:
            # After the core's last writes: every event emitted reaches the outbox before the store closes.
            await self.webhooks.close()
        if self._audit_tasks:
            await asyncio.gather(*self._audit_tasks, return_exceptions=True)
        await self.store.close()
        log.info("server.stopped", address=self.address)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


class PortUnavailable(OSError):
    """The server could not listen on its address (`cuepoint serve` exits 2 with the message)."""


def _why_not_bound(host: str, port: int) -> str:
    # grpc only says "failed to bind"; ask the OS the same question for the reason.
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"{host}:{port} is already in use (another cuepoint serve?); pick another --port, or 0 for a free one"
            )
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return f"cannot listen on {host}:{port}"


def _tls_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None and config.tls_key is None:
        return None
    if not config.tls_cert or not config.tls_key:
        raise ValueError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])
