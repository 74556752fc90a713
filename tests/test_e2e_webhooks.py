"""Webhooks: the whole lifecycle reaches a CRM endpoint from a durable outbox, signed, retried with backoff;
dead letters are listed and redelivered through AdminService. A real local HTTP receiver, a real server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

import cuepoint
from cuepoint.v1 import admin_pb2, admin_pb2_grpc
from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.clock import ManualClock
from cuepoint_server.webhooks import WebhookConfig, verify

from .conftest import phone

SECRET = "whsec-test"
SCENARIO = (
    "id: help\ntrigger: {event: help}\ncue: {message: hi, channel: audio}\n"
    "engagement_outcome: {event: sync_succeeded, within: 10m}\n"
)


class Receiver:
    """A CRM endpoint: answers `status` (204 unless told otherwise) and keeps what it accepted."""

    def __init__(self, failures: int = 0, status: int = 204) -> None:
        self.failures = failures
        self.status = status
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.attempts += 1
                if receiver.failures > 0:
                    receiver.failures -= 1
                    self.send_response(503)
                elif receiver.status >= 300:
                    self.send_response(receiver.status)
                else:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/cuepoint"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events()]

    async def wait_for(self, *types: str) -> None:
        async with asyncio.timeout(10):
            while not set(types) <= set(self.types()):  # noqa: ASYNC110 - filled by the HTTP server's thread
                await asyncio.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=2)
    yield r
    r.server.shutdown()


async def start(tmp_path: Path, *hooks: WebhookConfig) -> CuepointServer:
    folder = tmp_path / "scenarios"
    folder.mkdir(exist_ok=True)
    (folder / "s.yaml").write_text(SCENARIO)
    config = ServerConfig(port=0, db=str(tmp_path / "db.sqlite"), scenarios=str(folder), webhooks=hooks)
    return await CuepointServer.start(config, clock=ManualClock())


async def test_the_whole_lifecycle_is_posted_signed_and_retried(tmp_path: Path, receiver: Receiver) -> None:
    server = await start(tmp_path, WebhookConfig(url=receiver.url, secret=SECRET, backoff=0.01))
    try:
        client = await phone(server)
        await client.track("help")
        declined = await client.next_cue(timeout=5)
        await client.decline(declined)
        await receiver.wait_for("cue.offered", "cue.answered")
        # A second device: accepted, queued, assigned, ended by the user, wrapped up after, outcome achieved.
        other = await phone(server, "phone-2", user_id="user-2")
        await other.track("help")
        engagement = await other.accept(await other.next_cue(timeout=5))
        associate = await cuepoint.connect_associate(server.address, associate_id="dana", display_name="Dana")
        assigned = await associate.next_engagement(timeout=5)
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        await engagement.end()
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
        await receiver.wait_for("engagement.ended")
        await associate.end(assigned, disposition="resolved", notes="crm test")
        await other.track("sync_succeeded")
        await other.flush()
        await receiver.wait_for(
            "engagement.queued", "engagement.assigned", "engagement.wrapped_up", "engagement.outcome"
        )
        for c in (client, other):
            await c.close()
        await associate.close()
    finally:
        await server.stop(0.5)

    assert receiver.attempts == len(receiver.received) + 2  # the two 503s were retried
    by_type: dict[str, list[dict[str, Any]]] = {}
    for headers, body in receiver.received:
        assert verify(SECRET, headers["x-cuepoint-signature"], body)
        assert not verify("wrong-secret", headers["x-cuepoint-signature"], body)
        event = json.loads(body)
        assert headers["x-cuepoint-event"] == event["type"]
        by_type.setdefault(event["type"], []).append(event["data"])
    ids = [e["id"] for e in receiver.events()]
    assert len(ids) == len(set(ids))
    offered = by_type["cue.offered"]
    assert {o["device_id"] for o in offered} == {"phone-1", "phone-2"} and offered[0]["scenario_id"] == "help"
    answers = {a["device_id"]: a["response"] for a in by_type["cue.answered"]}
    assert answers == {"phone-1": "declined", "phone-2": "accepted"}
    assigned_event = by_type["engagement.assigned"][0]
    assert assigned_event["associate_id"] == "dana"
    assert assigned_event["context"]["context"]["device.model"] == "iPhone15,2"
    assert by_type["engagement.queued"][0]["state"] == "queued"
    assert by_type["engagement.ended"][0]["ended_by"] == "user"
    # The wrap-up after the user left is its own event, with the associate's disposition and notes.
    (wrapped,) = by_type["engagement.wrapped_up"]
    assert (wrapped["disposition"], wrapped["notes"]) == ("resolved", "crm test")
    assert by_type["engagement.outcome"][0]["outcome"] == "achieved"


async def test_withdrawn_cues_and_erasure_are_posted(tmp_path: Path) -> None:
    receiver = Receiver()
    server = await start(tmp_path, WebhookConfig(url=receiver.url, secret=SECRET, backoff=0.01))
    try:
        client = await phone(server, user_id="u-gone")
        await client.track("help")
        cue = await client.next_cue(timeout=5)
        await server.core.set_offers_paused(True, "incident")
        await receiver.wait_for("cue.withdrawn")
        async with grpc.aio.insecure_channel(server.address) as channel:
            await admin_pb2_grpc.AdminServiceStub(channel).EraseUser(admin_pb2.EraseUserRequest(user_id="u-gone"))
        await receiver.wait_for("user.erased")
        await client.close()
    finally:
        await server.stop(0.5)
        receiver.server.shutdown()
    withdrawn = next(e["data"] for e in receiver.events() if e["type"] == "cue.withdrawn")
    assert (withdrawn["cue_id"], withdrawn["reason"]) == (cue.cue_id, "paused")
    erased = next(e["data"] for e in receiver.events() if e["type"] == "user.erased")
    assert erased["user_id"] == "u-gone"


async def test_deliveries_wait_in_the_outbox_across_a_restart(tmp_path: Path) -> None:
    down = Receiver(failures=10_000)  # answering 503 to everything while the server runs
    hook = WebhookConfig(url=down.url, secret=SECRET, backoff=0.01, max_backoff=0.05, max_attempts=1000)
    server = await start(tmp_path, hook)
    try:
        client = await phone(server)
        await client.track("help")
        cue = await client.next_cue(timeout=5)
        await client.decline(cue)
        await client.close()
        async with asyncio.timeout(10):
            while down.attempts < 3:  # noqa: ASYNC110 - filled by the HTTP server's thread
                await asyncio.sleep(0.02)
    finally:
        await server.stop(0.5)
    assert down.received == []
    # The receiver recovers while the server is down; the restarted server delivers what was enqueued.
    down.failures = 0
    again = await start(tmp_path, hook)
    try:
        await down.wait_for("cue.offered", "cue.answered")
        async with asyncio.timeout(10):
            while await again.store.due_webhooks(float("inf")):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        await again.stop(0.5)
        down.server.shutdown()
    # At least once: an attempt cut off by the first shutdown may still have reached the receiver, but as
    # the same event (same id), which is what receivers de-duplicate by.
    offered = [e for e in down.events() if e["type"] == "cue.offered"]
    assert {(e["id"], e["data"]["cue_id"]) for e in offered} == {(offered[0]["id"], cue.cue_id)}


async def test_dead_letters_are_listed_and_redelivered_by_id(tmp_path: Path) -> None:
    gone = Receiver(status=410)  # a client error: never retried
    server = await start(tmp_path, WebhookConfig(url=gone.url, secret=SECRET, events=("cue.offered",)))
    try:
        client = await phone(server)
        await client.track("help")
        cue = await client.next_cue(timeout=5)
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            async with asyncio.timeout(10):
                while not (dead := (await admin.ListDeadWebhooks(admin_pb2.ListDeadWebhooksRequest())).deliveries):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            (letter,) = dead
            assert (letter.kind, letter.url, letter.attempts, letter.last_error) == (
                "cue.offered",
                gone.url,
                1,
                "HTTP 410",
            )
            assert json.loads(letter.body)["data"]["cue_id"] == cue.cue_id
            assert gone.attempts == 1
            gone.status = 204
            await admin.RedeliverWebhook(admin_pb2.RedeliverWebhookRequest(delivery_id=letter.delivery_id))
            await gone.wait_for("cue.offered")
            assert (await admin.ListDeadWebhooks(admin_pb2.ListDeadWebhooksRequest())).deliveries == []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.RedeliverWebhook(admin_pb2.RedeliverWebhookRequest(delivery_id="no-such-delivery"))
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert gone.received[0][0]["x-cuepoint-delivery"] == letter.delivery_id
        await client.close()
    finally:
        await server.stop(0.5)
        gone.server.shutdown()
