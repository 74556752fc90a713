"""Webhooks: engagement start and end reach a CRM endpoint, signed, retried with backoff."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import cuepoint
from cuepoint_server.app import CuepointServer, ServerConfig
from cuepoint_server.clock import ManualClock
from cuepoint_server.webhooks import WebhookConfig, verify

from .conftest import phone

SECRET = "whsec-test"


class Receiver:
    def __init__(self, failures: int) -> None:
        self.failures = failures
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
                else:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/cuepoint"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(failures=2)
    yield r
    r.server.shutdown()


async def test_engagement_start_and_end_are_posted_signed_and_retried(tmp_path: Path, receiver: Receiver) -> None:
    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text("id: help\ntrigger: {event: help}\ncue: {message: hi, channel: audio}\n")
    hook = WebhookConfig(url=receiver.url, secret=SECRET, backoff=0.01)
    config = ServerConfig(port=0, db=str(tmp_path / "db.sqlite"), scenarios=str(folder), webhooks=(hook,))
    server = await CuepointServer.start(config, clock=ManualClock())
    try:
        associate = await cuepoint.connect_associate(server.address, associate_id="dana", display_name="Dana")
        client = await phone(server)
        await client.track("help")
        await client.flush()
        engagement = await client.accept(await client.next_cue(timeout=5))
        assigned = await associate.next_engagement(timeout=5)
        await associate.end(assigned, disposition="resolved", notes="crm test")
        await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
        async with asyncio.timeout(10):
            while len(receiver.received) < 2:  # noqa: ASYNC110 - filled by the HTTP server's thread
                await asyncio.sleep(0.02)
        await client.close()
        await associate.close()
    finally:
        await server.stop(0.5)

    assert receiver.attempts == 4  # two 503s were retried
    events = {}
    for headers, body in receiver.received:
        assert verify(SECRET, headers["x-cuepoint-signature"], body)
        assert not verify("wrong-secret", headers["x-cuepoint-signature"], body)
        payload = json.loads(body)
        events[payload["type"]] = payload["data"]
    assert set(events) == {"engagement.started", "engagement.ended"}
    started, ended = events["engagement.started"], events["engagement.ended"]
    assert started["associate_id"] == "dana" and started["context"]["context"]["device.model"] == "iPhone15,2"
    assert started["context"]["trigger"]["scenario_id"] == "help"
    assert (ended["disposition"], ended["notes"], ended["state"]) == ("resolved", "crm test", "ended")
