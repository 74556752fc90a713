"""`cuepoint device`: play a trace file against a running server, through the real SDK, and print what comes back.

The trace is the one `cuepoint simulate` reads (scenarios/traces/*.jsonl, parsed by simulate.parse_trace): each
`hello` connects a device with the SDK, `event` tracks, `context` sets or clears keys, `respond` answers that
device's latest cue (`"last"`) or its `cue#N`, `close` ends the session. Lines are played at their times
(`speed` 2 plays twice as fast; 0 as fast as the server answers). Every cue, withdrawal and engagement update
the server sends is printed as it arrives, stamped with the time since the trace started:

    +00:00:01.204 d1 CUE fitkit-sync-failure audio "Unable to sync? I can help you." (cue#1)

Unlike simulate, this drives a real server (its clock, its timers, its storage), so the output is what a
device would see, not a deterministic replay. Lines of kinds it cannot play (e.g. associate actions) are
skipped with a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import cuepoint

from .simulate import Step, Trace, offset

__all__ = ["play"]

# How long a respond line waits for the cue it answers to arrive.
_CUE_WAIT = 2.0
_CONSENT = {"none": cuepoint.Consent.NONE, "essential": cuepoint.Consent.ESSENTIAL, "full": cuepoint.Consent.FULL}
_CONTEXT = {
    "app.version": "app_version",
    "device.os": "os",
    "device.os_version": "os_version",
    "device.model": "device_model",
    "device.locale": "locale",
    "device.timezone": "timezone",
}


@dataclass
class _Device:
    client: cuepoint.Client
    cues: list[str] = field(default_factory=list)  # cue ids in arrival order: cue#1 is cues[0]
    reader: asyncio.Task[None] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def _context(flat: Mapping[str, Any]) -> tuple[dict[str, Any], cuepoint.Location | None, cuepoint.User | None]:
    """Flat scenario keys (app.version, user.tier, attributes.plan, ...) as the SDK's context fields."""
    fields: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    location: dict[str, str] = {}
    user: dict[str, Any] = {}
    user_attributes: dict[str, Any] = {}
    for key, value in flat.items():
        if key in _CONTEXT:
            fields[_CONTEXT[key]] = str(value)
        elif key.startswith("location."):
            location[key.removeprefix("location.")] = str(value)
        elif key == "user.id":
            user["user_id"] = str(value)
        elif key == "user.tier":
            user["tier"] = str(value)
        elif key.startswith("user."):
            user_attributes[key.removeprefix("user.")] = value
        elif key.startswith("attributes."):
            attributes[key.removeprefix("attributes.")] = value
    if attributes:
        fields["attributes"] = attributes
    return (
        fields,
        cuepoint.Location(**location) if location else None,
        cuepoint.User(**user, attributes=user_attributes) if user or user_attributes else None,
    )


class _Player:
    def __init__(self, address: str, out: TextIO, config: cuepoint.ClientConfig) -> None:
        self.address = address
        self.out = out
        self.config = config
        self.devices: dict[str, _Device] = {}
        self.start = time.monotonic()

    def say(self, device: str, text: str) -> None:
        self.out.write(f"{offset(time.monotonic() - self.start)} {device} {text}\n")
        self.out.flush()

    async def step(self, step: Step) -> None:
        data = step.data
        if step.associate:
            self.say(step.associate, f"SKIPPED line {step.line}: associates are replayed by `cuepoint simulate` only")
            return
        if step.action == "hello":
            await self._hello(step.device, data["hello"])
            return
        device = self.devices.get(step.device)
        if device is None:
            self.say(step.device, f"SKIPPED line {step.line}: the device is not connected")
            return
        client = device.client
        if step.action == "event":
            await client.track(data["event"], **data.get("props", {}))
        elif step.action == "context":
            change = data["context"]
            fields, location, user = _context(change.get("set", {}))
            await client.set_context(**fields, location=location, user=user, clear_keys=change.get("clear", []))
        elif step.action == "respond":
            await self._respond(step, device, data["respond"])
        elif step.action == "close":
            await self._close(step.device)
        else:
            self.say(step.device, f"SKIPPED line {step.line}: {step.action!r} cannot be played against a server")

    async def _hello(self, name: str, hello: Mapping[str, Any]) -> None:
        if name in self.devices:
            await self._close(name)
        fields, location, user = _context(hello.get("context", {}))
        client = await cuepoint.connect(
            self.address,
            app_id=hello["app_id"],
            device_id=name,
            context=cuepoint.Context(**fields, location=location),
            user=user,
            consent=_CONSENT[hello.get("consent", "essential")],
            config=self.config,
        )
        device = _Device(client)
        self.devices[name] = device
        device.reader = asyncio.create_task(self._read(name, device))
        self.say(name, f"CONNECTED session {client.session_id}")

    async def _read(self, name: str, device: _Device) -> None:
        async for event in device.client.events():
            if isinstance(event, cuepoint.Cue):
                device.cues.append(event.cue_id)
                device.arrived.set()
                channel = event.channel.value if event.channel else ""
                label = f"cue#{len(device.cues)}"
                self.say(name, f"CUE {event.scenario_id} {channel} {json.dumps(event.message)} ({label})")
            elif isinstance(event, cuepoint.CueWithdrawal):
                self.say(name, f"WITHDRAWN {self._label(device, event.cue_id)} {event.reason}")
            elif isinstance(event, cuepoint.EngagementUpdate):
                state = event.state.value if event.state else ""
                who = f" associate={event.associate_name}" if event.associate_name else ""
                line = f" position={event.queue_position}" if event.queue_position else ""
                wait = f" wait={event.estimated_wait:g}s" if event.estimated_wait is not None else ""
                label = self._label(device, event.cue_id)
                self.say(name, f"ENGAGEMENT {label} {state} queue={event.queue}{who}{line}{wait}")

    @staticmethod
    def _label(device: _Device, cue_id: str) -> str:
        return f"cue#{device.cues.index(cue_id) + 1}" if cue_id in device.cues else cue_id

    async def _respond(self, step: Step, device: _Device, answer: Mapping[str, str]) -> None:
        wanted = answer["cue"]
        # A cue the signals before this line fire arrives before their ack: once flushed, it is on its way.
        await device.client.flush()
        number = None if wanted == "last" else int(wanted.removeprefix("cue#"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CUE_WAIT):
                while not device.cues or (number is not None and len(device.cues) < number):
                    device.arrived.clear()
                    await device.arrived.wait()
        index = len(device.cues) - 1 if number is None else number - 1
        if not 0 <= index < len(device.cues):
            self.say(step.device, f"SKIPPED line {step.line}: no {wanted} has arrived")
            return
        cue_id, client = device.cues[index], device.client
        kind = answer["kind"]
        if kind == "accepted":
            await client.accept(cue_id)
        elif kind == "declined":
            await client.decline(cue_id)
        elif kind == "dismissed":
            await client.dismiss(cue_id)
        else:
            await client.expire(cue_id)
        self.say(step.device, f"ANSWERED cue#{index + 1} {kind}")

    async def _close(self, name: str) -> None:
        device = self.devices.pop(name, None)
        if device is None:
            return
        await device.client.flush()
        await device.client.close()
        if device.reader is not None:
            device.reader.cancel()
        self.say(name, "CLOSED")

    async def finish(self) -> None:
        for name in list(self.devices):
            await self._close(name)


async def play(
    address: str,
    trace: Trace,
    out: TextIO,
    *,
    speed: float = 1.0,
    linger: float = 1.0,
    config: cuepoint.ClientConfig | None = None,
) -> None:
    """Play `trace` against the server at `address`; print what comes back to `out`.

    `linger`: seconds to keep listening after the last line (for cues a timer or a late batch sends).
    """
    player = _Player(address, out, config or cuepoint.ClientConfig())
    try:
        for step in trace.steps:
            if speed > 0:
                delay = player.start + step.t / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if step.action:
                await player.step(step)
        for device in player.devices.values():
            await device.client.flush()
        await asyncio.sleep(linger)
    finally:
        await player.finish()
