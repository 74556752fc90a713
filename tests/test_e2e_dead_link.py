"""A dead link is detected: traffic silently vanishes but no socket closes.

A TCP proxy between the SDK and the server stops forwarding (a mobile link gone
dark). Nothing errors, so without a probe the client would wait forever (gRPC's
keepalive pings did not notice here); the SDK's heartbeat does, the client goes
STALE, and reconnects once the link is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import pytest

import cuepoint
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock

from .conftest import StartServer

SCENARIO = "id: help\ntrigger: {event: help}\ncue: {message: hi, channel: chat}\n"
# Chat that may move to audio, routed to the desk queue, whose engagements end with a rating question.
DESK = SCENARIO.replace("channel: chat}", "channel: chat, upgrades: [audio], queue: desk, feedback: {kind: csat}}")


class DarkableProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.dark = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if not self.dark:  # dark: bytes vanish, sockets stay open
                    dst.write(data)
                    await dst.drain()
        dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()


async def test_heartbeat_detects_a_link_gone_dark(start_server: StartServer) -> None:
    server = await start_server(SCENARIO)
    proxy = DarkableProxy(server.port)
    await proxy.start()
    config = cuepoint.ClientConfig(
        heartbeat_interval=0.3, heartbeat_timeout=0.5, reconnect_initial_backoff=0.05, reconnect_max_backoff=0.2
    )
    client = await cuepoint.connect(f"127.0.0.1:{proxy.port}", app_id="fitkit", device_id="tunnel", config=config)
    states: asyncio.Queue[cuepoint.ConnectionState] = asyncio.Queue()
    client.on_state(states.put_nowait)
    proxy.dark = True
    async with asyncio.timeout(10):
        while await states.get() is not cuepoint.ConnectionState.STALE:
            pass
    proxy.dark = False
    await client.track("help")
    await client.flush(timeout=10)
    assert client.state is cuepoint.ConnectionState.CONNECTED
    assert (await client.next_cue(timeout=5)).scenario_id == "help"
    await client.close()
    await proxy.close()


async def test_a_quiet_but_healthy_link_is_not_mistaken_for_dead(start_server: StartServer) -> None:
    server = await start_server(SCENARIO)
    config = cuepoint.ClientConfig(heartbeat_interval=0.2, heartbeat_timeout=1.0)
    client = await cuepoint.connect(server.address, app_id="fitkit", device_id="quiet", config=config)
    seen: list[cuepoint.ConnectionState] = []
    client.on_state(seen.append)
    await asyncio.sleep(1.5)  # several heartbeats, each answered
    assert client.state is cuepoint.ConnectionState.CONNECTED and cuepoint.ConnectionState.STALE not in seen
    assert await server.store.count_signals("quiet") == 0  # heartbeats are not signals
    await client.close()


async def test_an_offer_settled_while_the_link_was_dark_is_withdrawn_after_it(
    start_server: StartServer, clock: ManualClock
) -> None:
    server = await start_server(SCENARIO.replace("channel: chat}", "channel: chat, ttl: 30s}"))
    proxy = DarkableProxy(server.port)
    await proxy.start()
    config = cuepoint.ClientConfig(
        heartbeat_interval=0.3, heartbeat_timeout=0.5, reconnect_initial_backoff=0.05, reconnect_max_backoff=0.2
    )
    client = await cuepoint.connect(f"127.0.0.1:{proxy.port}", app_id="fitkit", device_id="away", config=config)
    events = client.events()
    await client.track("help")
    await client.flush()
    cue = await client.next_cue(timeout=5)
    states: asyncio.Queue[cuepoint.ConnectionState] = asyncio.Queue()
    client.on_state(states.put_nowait)
    proxy.dark = True
    clock.advance(31)  # the offer expires while its withdrawal cannot get through
    async with asyncio.timeout(10):
        while await states.get() is not cuepoint.ConnectionState.STALE:
            pass
    proxy.dark = False
    async with asyncio.timeout(10):
        async for event in events:
            if isinstance(event, cuepoint.CueWithdrawal):
                assert (event.cue_id, event.reason) == (cue.cue_id, "expired")
                break
    await client.close()
    await proxy.close()


async def _accepted_through_proxy(
    server: CuepointServer, device_id: str
) -> tuple[DarkableProxy, cuepoint.Client, cuepoint.Engagement]:
    """A device behind a darkable proxy that accepted the help cue (queue desk)."""
    proxy = DarkableProxy(server.port)
    await proxy.start()
    config = cuepoint.ClientConfig(
        heartbeat_interval=0.3, heartbeat_timeout=0.5, reconnect_initial_backoff=0.05, reconnect_max_backoff=0.2
    )
    client = await cuepoint.connect(f"127.0.0.1:{proxy.port}", app_id="fitkit", device_id=device_id, config=config)
    await client.track("help")
    await client.flush()
    return proxy, client, await client.accept(await client.next_cue(timeout=5))


async def _engaged_through_proxy(
    start_server: StartServer, device_id: str
) -> tuple[DarkableProxy, cuepoint.Client, cuepoint.AssociateClient, cuepoint.Engagement, cuepoint.AssignedEngagement]:
    """A device behind a darkable proxy, its engagement assigned to associate dana (connected directly)."""
    server = await start_server(DESK)
    desk = await cuepoint.connect_associate(server.address, associate_id="dana", display_name="Dana", queues=["desk"])
    proxy, client, engagement = await _accepted_through_proxy(server, device_id)
    assigned = await desk.next_engagement(timeout=5)
    await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
    return proxy, client, desk, engagement, assigned


async def _dark_until_stale(proxy: DarkableProxy, client: cuepoint.Client, meanwhile: Awaitable[object]) -> None:
    """The link goes dark, `meanwhile` runs (its messages to the device vanish), and the client notices."""
    states: asyncio.Queue[cuepoint.ConnectionState] = asyncio.Queue()
    client.on_state(states.put_nowait)
    proxy.dark = True
    await meanwhile
    async with asyncio.timeout(10):
        while await states.get() is not cuepoint.ConnectionState.STALE:
            pass


async def test_an_engagement_ended_while_the_link_was_dark_is_reported_after_it(start_server: StartServer) -> None:
    """The associate ends the engagement while the device's link is dark: the ENDED update and the rating
    question are written into a stream nobody reads. The device's reconnect names the engagement it still
    holds (Hello.engaged_cue_ids), and hears that it ended, and the question, once."""
    proxy, client, desk, engagement, assigned = await _engaged_through_proxy(start_server, "ended-away")
    await _dark_until_stale(proxy, client, desk.end(assigned, disposition="resolved"))
    assert engagement.state is cuepoint.EngagementState.ASSIGNED  # the ENDED went into the dark
    proxy.dark = False
    ended = await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=10)
    assert (ended.engagement_id, ended.disposition) == (assigned.engagement_id, "resolved")
    asked = await client.next_feedback_request(timeout=5)
    assert asked.engagement_id == assigned.engagement_id
    await client.give_feedback(asked, 5)
    await client.track("help")  # a round trip: whatever else the reconnect sent has arrived by its ack
    await client.flush(timeout=5)
    with pytest.raises(cuepoint.TimedOut):
        await client.next_feedback_request(timeout=0.2)  # asked once
    await desk.close()
    await client.close()
    await proxy.close()


async def test_chat_said_while_the_link_was_dark_is_heard_after_it_once(start_server: StartServer) -> None:
    """The associate writes while the device's link is dark: the line reaches no one. After the reconnect the
    device hears it, and every line before it exactly once (the server sends the recent chat again)."""
    proxy, client, desk, engagement, assigned = await _engaged_through_proxy(start_server, "chat-away")
    heard: list[tuple[str, str]] = []

    async def listen() -> None:
        async for message in engagement.messages():
            heard.append((message.message_id, message.text))

    listener = asyncio.create_task(listen())
    await engagement.send_chat("my sync fails", timeout=5)
    await desk.send_chat(assigned, "let me look")
    async with asyncio.timeout(5):
        while len(heard) < 2:  # noqa: ASYNC110 - the listener task appends
            await asyncio.sleep(0.01)
    await _dark_until_stale(proxy, client, desk.send_chat(assigned, "are you still there?"))
    assert [text for _, text in heard] == ["my sync fails", "let me look"]  # the third went into the dark
    proxy.dark = False
    async with asyncio.timeout(10):
        while len(heard) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await client.track("help")  # a round trip after the reconnect: anything sent again has arrived by its ack
    await client.flush(timeout=5)
    assert [text for _, text in heard] == ["my sync fails", "let me look", "are you still there?"]
    assert len({message_id for message_id, _ in heard}) == 3
    listener.cancel()
    await desk.close()
    await client.close()
    await proxy.close()


async def test_a_fallback_offered_while_the_link_was_dark_is_offered_after_it(
    start_server: StartServer, clock: ManualClock
) -> None:
    """Nobody takes the engagement, and its fallback falls due while the device's link is dark: the offer
    reaches no one. After the reconnect the device is offered it, and its choice is taken."""
    server = await start_server(DESK, "routing: {queues: [{id: desk, fallback_after: 2m}]}\n")
    proxy, client, engagement = await _accepted_through_proxy(server, "fallback-away")
    await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)

    async def fall_due() -> None:
        clock.advance(121)

    await _dark_until_stale(proxy, client, fall_due())
    assert engagement.fallback_offer is None  # the offer went into the dark
    proxy.dark = False
    offer = await engagement.wait_fallback(timeout=10)
    assert cuepoint.FallbackOption.CHAT in offer.options
    await engagement.choose_fallback(cuepoint.FallbackOption.CHAT)
    late = await cuepoint.connect_associate(server.address, associate_id="late", queues=["desk"])
    assigned = await late.next_engagement(timeout=5)
    assert (assigned.engagement_id, assigned.channel) == (engagement.engagement_id, cuepoint.Channel.CHAT)
    await late.close()
    await client.close()
    await proxy.close()


async def test_an_upgrade_asked_while_the_link_was_dark_is_asked_after_it(start_server: StartServer) -> None:
    """The associate asks to move to audio while the device's link is dark: after the reconnect the device
    is asked (once), and its answer reaches the associate."""
    proxy, client, desk, engagement, assigned = await _engaged_through_proxy(start_server, "upgrade-away")
    requested = asyncio.ensure_future(desk.request_upgrade(assigned, cuepoint.Channel.AUDIO, timeout=20))
    await _dark_until_stale(proxy, client, asyncio.sleep(0.1))  # the ask is written into the dark
    proxy.dark = False
    asks = engagement.upgrade_requests()
    async with asyncio.timeout(10):
        request = await anext(aiter(asks))
    assert request.channel is cuepoint.Channel.AUDIO
    await engagement.respond_upgrade(request, True)
    change = await requested
    assert change.accepted and change.channel is cuepoint.Channel.AUDIO
    assert engagement.pending_upgrade_requests == ()
    await desk.close()
    await client.close()
    await proxy.close()
