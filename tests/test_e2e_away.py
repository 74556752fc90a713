"""When the device is away (issue 17, item 6): a scenario's `when_away` fallback posts cue.pending_push through
the webhook outbox for a cue its device is not connected to see; the cue waits for the device (then shown once)
or its ttl (then expired, recorded, never shown). Real server, real SDK, a real HTTP receiver, a hand-driven clock."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cuepoint_server.app import CuepointServer
from cuepoint_server.cli import main
from cuepoint_server.clock import ManualClock
from cuepoint_server.webhooks import WebhookConfig

from .conftest import StartServer, no_cue, phone
from .test_e2e_webhooks import Receiver

SCENARIO = """
scenarios:
  - id: cart-reminder
    trigger: {event: cart_viewed, not_followed_by: {event: checkout_started, within: 5m}}
    cue:
      message: "Still thinking it over? An agent can answer your questions."
      channel: chat
      ttl: 1m
      when_away: {fallback: webhook, ttl: 1h}
"""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


async def gone(server: CuepointServer, device_id: str) -> None:
    """Wait until the server has ended the device's session (its stream closed)."""
    async with asyncio.timeout(5):
        while device_id in server.core._reg.sessions or device_id not in server.core._reg.away:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def left_cart(server: CuepointServer, clock: ManualClock, receiver: Receiver) -> dict[str, Any]:
    """The user views the cart, closes the app; five minutes later the scenario fires: the push is posted."""
    client = await phone(server, "phone-1", user_id="u1")
    await client.track("cart_viewed")
    await client.flush()
    assert await no_cue(client)
    await client.close()
    await gone(server, "phone-1")
    clock.advance(5 * 60 + 1)
    await receiver.wait_for("cue.pending_push")
    [push] = [e["data"] for e in receiver.events() if e["type"] == "cue.pending_push"]
    assert (push["scenario_id"], push["device_id"], push["app_id"], push["subject"], push["channel"]) == (
        "cart-reminder",
        "phone-1",
        "fitkit",
        "user:u1",
        "chat",
    )
    assert push["message"] == "Still thinking it over? An agent can answer your questions."
    assert push["expires_at"] == pytest.approx(clock.now() + 3600)  # when_away.ttl, not the cue's 1m
    stored = await server.store.get_cue(push["cue_id"])
    assert stored is not None and stored.status == "offered"
    return push


async def test_the_device_returns_within_the_ttl_and_sees_the_cue_once(
    start_server: StartServer, clock: ManualClock, receiver: Receiver
) -> None:
    hook = WebhookConfig(url=receiver.url, secret="s", backoff=0.01, events=("cue.pending_push", "cue.withdrawn"))
    server = await start_server(SCENARIO, webhooks=(hook,))
    push = await left_cart(server, clock, receiver)

    # Twenty minutes later the push brings the user back: the waiting cue is shown, once.
    clock.advance(20 * 60)
    back = await phone(server, "phone-1", user_id="u1")
    cue = await back.next_cue(timeout=5)
    assert (cue.cue_id, cue.scenario_id, cue.message) == (push["cue_id"], "cart-reminder", push["message"])
    assert await no_cue(back)
    await back.decline(cue)
    await back.flush()
    await back.close()
    # Answered: the next return shows nothing, and nothing more was pushed or withdrawn.
    again = await phone(server, "phone-1", user_id="u1")
    assert await no_cue(again)
    stored = await server.store.get_cue(push["cue_id"])
    assert stored is not None and stored.status == "declined"
    assert receiver.types() == ["cue.pending_push"]
    await again.close()


async def test_the_ttl_ends_first_and_the_cue_expires_unseen(
    start_server: StartServer, clock: ManualClock, receiver: Receiver
) -> None:
    hook = WebhookConfig(url=receiver.url, secret="s", backoff=0.01, events=("cue.pending_push", "cue.withdrawn"))
    server = await start_server(SCENARIO, webhooks=(hook,))
    push = await left_cart(server, clock, receiver)

    clock.advance(3600)  # the hour passes with the app closed
    await receiver.wait_for("cue.withdrawn")
    [withdrawn] = [e["data"] for e in receiver.events() if e["type"] == "cue.withdrawn"]
    assert (withdrawn["cue_id"], withdrawn["status"], withdrawn["reason"]) == (push["cue_id"], "expired", "expired")
    stored = await server.store.get_cue(push["cue_id"])
    assert stored is not None and stored.status == "expired"

    back = await phone(server, "phone-1", user_id="u1")
    assert await no_cue(back)
    await back.close()


async def test_a_connected_device_gets_its_cue_with_no_push(
    start_server: StartServer, clock: ManualClock, receiver: Receiver
) -> None:
    hook = WebhookConfig(url=receiver.url, secret="s", backoff=0.01, events=("cue.pending_push", "cue.offered"))
    server = await start_server(SCENARIO, webhooks=(hook,))
    client = await phone(server, "phone-2", user_id="u2")
    await client.track("cart_viewed")
    await client.flush()
    clock.advance(5 * 60 + 1)
    cue = await client.next_cue(timeout=5)
    assert cue.expires_at == pytest.approx(clock.now() + 60)  # the cue's own ttl
    await receiver.wait_for("cue.offered")
    assert receiver.types() == ["cue.offered"]
    await client.close()


def test_validate_names_file_line_and_field_of_a_bad_fallback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "away.yaml").write_text(
        textwrap.dedent(
            """\
            id: cart-reminder
            trigger: {idle: 5m}
            cue:
              message: "Hi"
              channel: chat
              when_away:
                fallback: sms
                ttl: 0s
            """
        )
    )
    assert main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'away.yaml'}:7: cue.when_away.fallback: Input should be 'webhook'" in out
