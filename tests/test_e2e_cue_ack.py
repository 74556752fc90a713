"""A cue and the ack of the batch that fired it in one ServerMessage (issue 13), for clients that ask for it.

Hello.accepts_cue_ack: the server sends ServerMessage.cue_ack beside the cue; without it (an older client, or
another-language SDK generated from an older proto) every ack is a SignalAck message of its own, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cuepoint.v1 import device_pb2

from .conftest import StartServer, phone
from .test_e2e_foundation import RawDevice, _raw_signal

HELP = """
id: help
trigger: {event: help_me}
cue: {message: "Need a hand?", channel: chat, ttl: 2m}
cooldown: 0s
after_decline: 0s
"""


def raw_device(address: str, device_id: str, **flags: bool) -> RawDevice:
    """A raw device whose Hello sets ``flags`` (accepts_cue_ack, accepts_ack_groups)."""
    device = RawDevice(address, device_id)
    hello = device.outgoing.get_nowait()
    assert hello is not None
    for name, value in flags.items():
        setattr(hello.hello, name, value)
    device.outgoing.put_nowait(hello)
    return device


async def test_a_client_that_accepts_cue_acks_gets_the_cue_and_its_batchs_ack_in_one_message(
    start_server: StartServer,
) -> None:
    server = await start_server(HELP)
    device = raw_device(server.address, "new-client", accepts_cue_ack=True)
    assert (await device.read()).HasField("welcome")
    device.send(_raw_signal("s-1", "help_me"), batch_id="b1")
    message = await device.read()
    assert message.WhichOneof("kind") == "cue"
    assert message.cue.scenario_id == "help"
    assert message.HasField("cue_ack")
    assert (message.cue_ack.batch_id, list(message.cue_ack.signal_ids)) == ("b1", ["s-1"])
    # The ack went once: the next message is the next batch's own ack (no cue: one is pending).
    device.send(_raw_signal("s-2", "tap"), batch_id="b2")
    message = await device.read()
    assert message.WhichOneof("kind") == "ack"
    assert not message.HasField("cue_ack")
    assert (message.ack.batch_id, list(message.ack.signal_ids)) == ("b2", ["s-2"])
    await device.close()


async def test_a_client_without_the_hello_flag_gets_the_cue_and_the_ack_as_two_messages(
    start_server: StartServer,
) -> None:
    server = await start_server(HELP)
    device = raw_device(server.address, "old-client", accepts_cue_ack=False)
    assert (await device.read()).HasField("welcome")
    device.send(_raw_signal("s-1", "help_me"), batch_id="b1")
    messages = [await device.read(), await device.read()]
    assert [m.WhichOneof("kind") for m in messages] == ["cue", "ack"]
    assert not any(m.HasField("cue_ack") for m in messages)
    assert (messages[1].ack.batch_id, list(messages[1].ack.signal_ids)) == ("b1", ["s-1"])
    await device.close()


async def test_the_sdk_announces_cue_acks_and_takes_the_ack_from_the_cue_message(start_server: StartServer) -> None:
    server = await start_server(HELP)
    client = await phone(server, "sdk-phone")
    received: list[device_pb2.ServerMessage] = []
    dispatch = client._dispatch

    def recording(message: device_pb2.ServerMessage) -> Any:
        received.append(message)
        return dispatch(message)

    client._dispatch = recording  # type: ignore[method-assign]
    signal_id = await client.track("help_me")
    # flush() returns once the batch is acked: here by the cue_ack the cue carried.
    await asyncio.wait_for(client.flush(), 10)
    cue = await client.next_cue(timeout=5)
    assert cue.scenario_id == "help"
    combined = [m for m in received if m.HasField("cue_ack")]
    assert len(combined) == 1 and combined[0].cue.cue_id == cue.cue_id
    assert signal_id in combined[0].cue_ack.signal_ids
    assert not any(m.WhichOneof("kind") == "ack" and signal_id in m.ack.signal_ids for m in received)
    # Acked signals leave the SDK's queue: a second flush has nothing to wait for.
    await asyncio.wait_for(client.flush(), 5)
    await client.close()
