"""A device on the generated stubs, for tests that decide exactly what goes into each batch.

Shared by the differential tests (test_e2e_batching.py, test_e2e_batch_filter.py): each sends one generated
trace two ways and compares what came back, stamped with the burst of the trace it belongs to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cuepoint.v1 import common_pb2, device_pb2, device_pb2_grpc

Stamp = tuple[int, str]  # (burst index, "timer" before its signals | "signal")
# What a signal of a trace can be: (event, properties).
Action = tuple[str, dict[str, Any]]


@dataclass
class Observed:
    """Everything one way of sending produced, stamped with the burst it belongs to."""

    cues: list[tuple[Stamp, str]] = field(default_factory=list)
    withdrawn: list[tuple[Stamp, str]] = field(default_factory=list)
    blocked: list[tuple[Stamp, str, str, str]] = field(default_factory=list)
    milestones: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("cues", "withdrawn", "blocked", "milestones")}


def attribute_value(value: object) -> common_pb2.AttributeValue:
    if isinstance(value, bool):
        return common_pb2.AttributeValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AttributeValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AttributeValue(double_value=value)
    return common_pb2.AttributeValue(string_value=str(value))


class RawDevice:
    """Signs in as `device_id` of app fitkit (user `user_id`, `tier`); `send` takes action indexes into `actions`."""

    def __init__(self, address: str, device_id: str, *, actions: Sequence[Action], user_id: str, tier: str) -> None:
        self.device_id = device_id
        self.actions = actions
        self.channel = grpc.aio.insecure_channel(address)
        self.outgoing: asyncio.Queue[device_pb2.DeviceMessage | None] = asyncio.Queue()
        user = common_pb2.UserIdentity(user_id=user_id, tier=tier)
        self.outgoing.put_nowait(
            device_pb2.DeviceMessage(hello=device_pb2.Hello(app_id="fitkit", device_id=device_id, user=user))
        )
        self.call = device_pb2_grpc.DeviceServiceStub(self.channel).Connect(self._requests())
        self.acks: dict[str, asyncio.Event] = {}
        self.stamp: Stamp = (0, "timer")
        self.observed = Observed()
        self.welcomed = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[device_pb2.DeviceMessage]:
        while (message := await self.outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        while (message := await self.call.read()) is not grpc.aio.EOF:
            kind = message.WhichOneof("kind")
            if kind == "welcome":
                self.welcomed.set()
            elif kind == "ack":
                self.acks.setdefault(message.ack.batch_id, asyncio.Event()).set()
            elif kind == "cue":
                self.observed.cues.append((self.stamp, message.cue.scenario_id))
            elif kind == "withdrawal":
                self.observed.withdrawn.append((self.stamp, message.withdrawal.reason))

    async def send(self, batch_id: str, signals: list[tuple[str, int]]) -> None:
        """One batch of (signal id, action index); returns once it is acked."""
        batch = device_pb2.SignalBatch(batch_id=batch_id)
        for signal_id, action in signals:
            name, props = self.actions[action]
            event = common_pb2.Event(name=name, properties={k: attribute_value(v) for k, v in props.items()})
            batch.signals.append(common_pb2.Signal(id=signal_id, event=event))
        done = self.acks.setdefault(batch_id, asyncio.Event())
        done.clear()
        self.outgoing.put_nowait(device_pb2.DeviceMessage(signals=batch))
        async with asyncio.timeout(10):
            await done.wait()

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.reader.cancel()
        await self.channel.close()
