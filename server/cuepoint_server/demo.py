"""`make demo`: the whole story on the embedded default, narrated.

A real server (SQLite, the shipped scenarios) on a free port, a simulated
FitKit phone and a simulated associate, both through the real SDK over gRPC.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import tempfile
from pathlib import Path

import cuepoint

from .api.auth import AuthConfig
from .app import CuepointServer, ServerConfig
from .logs import configure_logging

__all__ = ["run_demo"]


async def _conversation(
    *, phone_engagement: cuepoint.Engagement, associate: cuepoint.AssociateClient, assigned: cuepoint.AssignedEngagement
) -> None:
    """Chat both ways, then the associate asks for screen share and the user consents."""
    await phone_engagement.send_chat("It keeps saying 'sync failed'. I'm on 4.2.0.")
    line = await anext(aiter(associate.messages(assigned)))
    _say("associate", f'chat from user: "{line.text}"')
    await associate.send_chat(assigned, "I can see three timeouts in the last minute. May I look at your screen?")
    async for message in phone_engagement.messages():
        if message.sender is cuepoint.Party.ASSOCIATE:
            _say("phone", f'chat from Dana: "{message.text}"')
            break
    asked = asyncio.ensure_future(associate.request_upgrade(assigned, cuepoint.Channel.SCREEN_SHARE, timeout=5))
    request = await anext(aiter(phone_engagement.upgrade_requests()))
    _say("phone", "Dana asks to switch to screen share - the user agrees")
    await phone_engagement.respond_upgrade(request, True)
    change = await asked
    channel = change.channel.name.lower() if change.channel else "?"
    _say("associate", f"channel is now {channel}; the call setup is relayed through the server")
    await phone_engagement.send_call_signal(cuepoint.CallSignalKind.OFFER, b"v=0 (SDP offer from the phone)")
    offer = await anext(aiter(associate.call_signals(assigned)))
    _say("associate", f"received the phone's WebRTC offer ({len(offer.payload)} bytes), answers it")
    await associate.send_call_signal(assigned, cuepoint.CallSignalKind.ANSWER, b"v=0 (SDP answer)")


def _say(who: str, text: str) -> None:
    print(f"[{who:<9}] {text}", flush=True)


class _Tokens:
    """Fresh credentials for this run: the demo shows auth on, as a real deployment runs."""

    def __init__(self) -> None:
        self.fitkit = f"fk_demo_{secrets.token_hex(12)}"
        self.dana = f"dana_{secrets.token_hex(12)}"
        self.sam = f"sam_{secrets.token_hex(12)}"
        self.admin = f"adm_{secrets.token_hex(12)}"

    def config(self) -> AuthConfig:
        return AuthConfig.from_dict(
            {
                "apps": {"fitkit": {"api_keys": [self.fitkit]}},
                "associates": {
                    "assoc-dana": {"token": self.dana, "queues": ["fitkit-support"]},
                    # For a person at the browser desk while the scripted Dana works.
                    "assoc-sam": {"token": self.sam, "queues": ["*"]},
                },
                "admin_tokens": [self.admin],
            }
        )


async def run_demo(
    scenarios: str, db: str | None = None, *, http_port: int = 0, keep_running: bool = False, database: str = ""
) -> int:
    configure_logging("warning", json=False)
    tokens = _Tokens()
    with tempfile.TemporaryDirectory() as tmp:
        path = db or str(Path(tmp) / "cuepoint-demo.db")
        config = ServerConfig(
            port=0, db=path, database=database, scenarios=scenarios, auth=tokens.config(), http_port=http_port
        )
        server = await CuepointServer.start(config)
        try:
            _addresses(server, tokens)
            result = await _story(server, tokens)
            if keep_running:
                _addresses(server, tokens)
                _say("server", "still running (--keep-running); Ctrl-C stops it")
                await _until_stopped()
            return result
        finally:
            await server.stop(1.0)


def _addresses(server: CuepointServer, tokens: _Tokens) -> None:
    _say("server", f"associate desk: {server.http_url}/desk/  (token for assoc-sam: {tokens.sam})")
    _say("server", f"admin console:  {server.http_url}/console/  (admin token: {tokens.admin})")


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _story(server: CuepointServer, tokens: _Tokens) -> int:
    loaded = server.core.engine.scenarios.scenarios
    where = "PostgreSQL" if server.config.database else f"SQLite at {server.config.db}"
    _say("server", f"listening on {server.address}, {where}, {len(loaded)} scenarios:")
    for s in loaded:
        _say("server", f"  - {s.id} (priority {s.priority}) from {s.file}")

    associate = await cuepoint.connect_associate(
        server.address,
        associate_id="assoc-dana",
        display_name="Dana (FitKit support)",
        queues=["fitkit-support"],
        config=cuepoint.AssociateConfig(token=tokens.dana),
    )
    _say("associate", f"Dana signed in to {', '.join(associate.queues)}")

    phone = await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id="fitkit-iphone-7f3a",
        context=cuepoint.Context(
            app_version="4.2.0",
            os="iOS",
            os_version="17.4",
            device_model="iPhone15,2",
            locale="en_US",
            timezone="America/Chicago",
            location=cuepoint.Location(country="US", region="IL", city="Chicago"),
        ),
        user=cuepoint.User(user_id="user-1042", tier="premium", attributes={"first_name": "Sam"}),
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(api_key=tokens.fitkit),
    )
    _say(
        "phone",
        f"FitKit 4.2.0 on iPhone15,2 / iOS 17.4 connected (session {(phone.session_id or '')[:8]}), premium user",
    )

    await phone.track("screen_viewed", screen="dashboard")
    await phone.track("sync_completed", duration_ms=12_400, records=311)
    _say("phone", "dashboard viewed; sync completed in 12.4 s")
    for attempt in (1, 2, 3):
        await phone.track("sync_failed", reason="timeout", attempt=attempt, duration_ms=41_000)
        if attempt < 3:
            await phone.track("sync_retry", attempt=attempt + 1)
        await phone.flush()
        await asyncio.sleep(0.3)  # paced so the journey shows real gaps
        _say("phone", f"sync failed (attempt {attempt}, timed out after 41 s) - acked by server")

    cue = await phone.next_cue(timeout=5)
    channel = cue.channel.name.lower() if cue.channel else "?"
    upgrades = ", ".join(c.name.lower() for c in cue.allowed_upgrades) or "none"
    _say(
        "phone",
        f'CUE from scenario {cue.scenario_id}: "{cue.message}" (channel {channel}; upgrades: {upgrades})',
    )

    engagement = await phone.accept(cue)
    _say("phone", "user tapped Accept")
    update = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    _say("phone", f"engagement {update.engagement_id[:8]} assigned to {update.associate_name}")

    assigned = await associate.next_engagement(timeout=5)
    _say("associate", "new engagement, with the full context:")
    for line in assigned.describe().splitlines():
        print(f"{'':12}{line}")

    await _conversation(phone_engagement=engagement, associate=associate, assigned=assigned)

    notes = "Cleared a stale auth token; sync works again."
    await associate.end(assigned, disposition="resolved", notes=notes, outcome="resolved")
    ended = await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
    _say("associate", f'wrapped up: disposition "resolved", outcome "resolved", notes "{notes}"')
    _say("phone", f"engagement {ended.engagement_id[:8]} ended")
    await phone.track("sync_succeeded", duration_ms=9_800)
    await phone.flush()
    _say("phone", "sync succeeded in 9.8 s - the scenario's outcome check is watching for exactly this")

    await server.core.drain()
    stored = await server.store.get_engagement(assigned.engagement_id)
    journey = await server.store.count_signals("fitkit-iphone-7f3a")
    transcript = await server.store.chat_transcript(assigned.engagement_id)
    await phone.close()
    await associate.close()
    if stored is None or stored.state != "ended":
        _say("server", "ERROR: the engagement was not stored as ended")
        return 1
    _say(
        "server",
        f"stored: {journey} signals in the journey, {len(transcript)} chat messages, engagement {stored.state} "
        f"({stored.disposition}, recorded {stored.wrap_up_outcome}), channel {stored.channel}, "
        f"outcome {stored.outcome}",
    )
    print("\nDemo complete.")
    return 0
