"""The acks of several batches stored by one commit, in one ServerMessage (issue 13), for clients that ask.

Hello.accepts_ack_groups: the server sends ServerMessage.acks (SignalAcks) when one commit round acks several
batches of a stream; without it (an older client, or another-language SDK generated from an older proto)
every ack is a SignalAck message of its own, as before. Each test holds the server's group commit until it
has read every batch, so one round stores them all; what is checked is what reaches the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import cuepoint
from cuepoint.v1 import device_pb2
from cuepoint_server.api.device import ACK_GROUP_IDS
from cuepoint_server.app import CuepointServer
from cuepoint_server.core.sessions import DeviceSession

from .conftest import StartServer
from .test_e2e_cue_ack import HELP, raw_device
from .test_e2e_foundation import RawDevice, _raw_signal


class _HeldCommits:
    """The server's group commit, made to wait before each round until `release` (a round starts with a batch)."""

    def __init__(self, server: CuepointServer) -> None:
        self._server = server
        group = server.core._group
        commit: Callable[[list[DeviceSession]], Awaitable[None]] = group._commit
        self._gate = asyncio.Event()

        async def held(sessions: list[DeviceSession]) -> None:
            await self._gate.wait()
            await commit(sessions)

        group._commit = held

    async def release(self, device_id: str, batches: int) -> None:
        """Once the server has applied ``batches`` batches of the device (all waiting), let the commits go."""
        async with asyncio.timeout(5):
            while True:
                session = self._server.core._reg.sessions.get(device_id)
                if session is not None and len(session.acks or ()) >= batches:
                    break
                await asyncio.sleep(0.005)
        self._gate.set()


async def _raw_client(
    start_server: StartServer, device_id: str, *, accepts_ack_groups: bool
) -> tuple[RawDevice, _HeldCommits]:
    """A server with its commits held and a raw device past its Welcome."""
    server = await start_server(HELP)
    held = _HeldCommits(server)
    device = raw_device(server.address, device_id, accepts_ack_groups=accepts_ack_groups)
    assert (await device.read()).HasField("welcome")
    return device, held


async def _acks_of(device: RawDevice, batches: int) -> list[device_pb2.ServerMessage]:
    """Read until ``batches`` batches are acked; every message read."""
    messages: list[device_pb2.ServerMessage] = []
    acked = 0
    while acked < batches:
        message = await device.read()
        messages.append(message)
        kind = message.WhichOneof("kind")
        assert kind in ("ack", "acks"), message
        acked += len(message.acks.acks) if kind == "acks" else 1
    return messages


def _batches(messages: list[device_pb2.ServerMessage]) -> list[tuple[str, list[str]]]:
    acks = [a for m in messages for a in (m.acks.acks if m.WhichOneof("kind") == "acks" else [m.ack])]
    return [(a.batch_id, list(a.signal_ids)) for a in acks]


async def test_a_client_that_accepts_ack_groups_gets_one_commits_acks_in_one_message_in_order(
    start_server: StartServer,
) -> None:
    device, held = await _raw_client(start_server, "new-client", accepts_ack_groups=True)
    for n in range(1, 5):
        device.send(_raw_signal(f"s-{n}", "tap"), _raw_signal(f"t-{n}", "tap"), batch_id=f"b{n}")
    await held.release("new-client", 4)
    messages = await _acks_of(device, 4)
    assert [m.WhichOneof("kind") for m in messages] == ["acks"]
    assert _batches(messages) == [(f"b{n}", [f"s-{n}", f"t-{n}"]) for n in range(1, 5)]
    # Each batch was acked once: a resend of one is a duplicate, acked on its own (no other batch to group).
    device.send(_raw_signal("s-2", "tap"), batch_id="again")
    message = await device.read()
    assert message.WhichOneof("kind") == "ack"
    assert (message.ack.batch_id, list(message.ack.duplicate_ids)) == ("again", ["s-2"])
    await device.close()


async def test_a_group_stops_once_it_names_enough_signal_ids(start_server: StartServer) -> None:
    device, held = await _raw_client(start_server, "big-client", accepts_ack_groups=True)
    per = 500  # the server's most signals per batch
    for n in range(6):
        device.send(*(_raw_signal(f"s-{n}-{i}", "tap") for i in range(per)), batch_id=f"b{n}")
    await held.release("big-client", 6)
    messages = await _acks_of(device, 6)
    # Acks are taken while the message names fewer than ACK_GROUP_IDS ids: five batches (2,500 ids), then one.
    assert ACK_GROUP_IDS == 2048
    assert [len(m.acks.acks) if m.WhichOneof("kind") == "acks" else 1 for m in messages] == [5, 1]
    assert [batch for batch, _ in _batches(messages)] == [f"b{n}" for n in range(6)]
    assert all(len(ids) == per for _, ids in _batches(messages))
    await device.close()


async def test_a_cue_between_acks_keeps_its_place_and_the_acks_around_it_stay_apart(
    start_server: StartServer,
) -> None:
    device, held = await _raw_client(start_server, "cue-client", accepts_ack_groups=True)
    device.send(_raw_signal("s-1", "tap"), batch_id="b1")
    device.send(_raw_signal("s-2", "help_me"), batch_id="b2")  # fires the cue
    device.send(_raw_signal("s-3", "tap"), batch_id="b3")
    device.send(_raw_signal("s-4", "tap"), batch_id="b4")
    await held.release("cue-client", 4)
    kinds: list[str] = []
    acked: list[str] = []
    while len(acked) < 4:
        message = await device.read()
        kind = message.WhichOneof("kind")
        assert kind is not None
        kinds.append(kind)
        if kind == "cue":
            assert message.cue.scenario_id == "help"
            continue
        assert kind in ("ack", "acks")
        acked += [a.batch_id for a in (message.acks.acks if kind == "acks" else [message.ack])]
    # The cue shows after what fired it is stored and before that batch's ack; nothing is acked twice.
    assert acked == ["b1", "b2", "b3", "b4"]
    assert kinds.index("cue") == 1 and kinds[0] == "ack"
    await device.close()


async def test_a_client_without_the_hello_flag_gets_an_ack_message_per_batch(start_server: StartServer) -> None:
    device, held = await _raw_client(start_server, "old-client", accepts_ack_groups=False)
    for n in range(1, 5):
        device.send(_raw_signal(f"s-{n}", "tap"), batch_id=f"b{n}")
    await held.release("old-client", 4)
    messages = await _acks_of(device, 4)
    assert [m.WhichOneof("kind") for m in messages] == ["ack"] * 4
    assert _batches(messages) == [(f"b{n}", [f"s-{n}"]) for n in range(1, 5)]
    await device.close()


async def test_the_sdk_announces_ack_groups_and_counts_every_ack_of_a_group(start_server: StartServer) -> None:
    server = await start_server(HELP)
    held = _HeldCommits(server)
    client = await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id="sdk-phone",
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(max_batch=1, linger=0.0),  # each signal a batch of its own
    )
    received: list[device_pb2.ServerMessage] = []
    dispatch = client._dispatch

    def recording(message: device_pb2.ServerMessage) -> None:
        received.append(message)
        dispatch(message)

    client._dispatch = recording  # type: ignore[method-assign]
    ids = [await client.track("tap", n=n) for n in range(4)]
    await held.release("sdk-phone", 4)
    # flush() returns once every signal is acked: here by one grouped message.
    await asyncio.wait_for(client.flush(), 10)
    groups = [m for m in received if m.WhichOneof("kind") == "acks"]
    assert len(groups) == 1
    assert [i for a in groups[0].acks.acks for i in a.signal_ids] == ids
    assert client._batcher.in_flight_count == 0
    await client.close()
