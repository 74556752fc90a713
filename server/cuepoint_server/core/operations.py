"""Operations switches: the runtime pause and per-scenario enable/disable (AdminService, the HTTP console).

Each switch is stored before it takes effect (so it outlasts a restart, restored by `restore_switches`),
and switching offers off withdraws what is already on screen: a paused or disabled scenario must not keep
a cue in front of users until it expires.
"""

from __future__ import annotations

import structlog

from ..storage import SwitchRecord, WebhookRecord
from .bus import OPS
from .errors import InvalidInput, NotFound
from .evaluation import Evaluation

__all__ = ["Operations"]

log = structlog.get_logger("cuepoint.core")


class Operations(Evaluation):
    async def device_app(self, device_id: str) -> str | None:
        """The app a device id belongs to, as far as this server knows (None: never seen), so an admin of
        one app can be refused another app's devices."""
        state = self._reg.states.get(device_id)
        if state is not None:
            return state.app_id
        for decision in await self.store.decisions_for_device(device_id, limit=1):
            return decision.app_id
        for engagement in await self.store.engagements_for_device(device_id):
            return engagement.app_id
        return None

    async def set_offers_paused(self, paused: bool, reason: str = "") -> bool:
        """The emergency switch; returns whether offers are now paused (by this switch or the policy file)."""
        await self.store.save_switch(SwitchRecord("offers", "", not paused, reason, self.clock.now()))
        self._apply_pause(paused, reason)
        await self._announce_switches()
        return self.offers_paused

    def _apply_pause(self, paused: bool, reason: str) -> None:
        changed = paused != self.paused_by_admin
        self.paused_by_admin = paused
        if changed:
            log.warning("offers.paused" if paused else "offers.resumed", reason=reason)
        if paused:
            for device_id in list(self._reg.pending):
                self._withdraw(device_id, "paused")

    def scenario_enabled(self, scenario_id: str) -> bool:
        """Offered at all: loaded, enabled in its file, and not switched off."""
        scenario = self.engine.scenarios.by_id.get(scenario_id)
        return scenario is not None and scenario.enabled and scenario_id not in self.engine.disabled

    async def set_scenario_enabled(self, scenario_id: str, enabled: bool, reason: str = "") -> bool:
        """Switch one loaded scenario off or back on; returns whether it is now offered.

        Off, the engine skips it (Engine.disabled) and its cues on screen are withdrawn; a file with
        `enabled: false` stays off whatever the switch says.
        """
        if scenario_id not in self.engine.scenarios.by_id:
            raise NotFound(f"scenario_id: no scenario {scenario_id!r} is being served")
        await self.store.save_switch(SwitchRecord("scenario", scenario_id, enabled, reason, self.clock.now()))
        self._apply_scenario_switch(scenario_id, enabled, reason)
        await self._announce_switches()
        return self.scenario_enabled(scenario_id)

    def _apply_scenario_switch(self, scenario_id: str, enabled: bool, reason: str) -> None:
        if enabled:
            if scenario_id in self.engine.disabled:
                log.warning("scenario.enabled", scenario_id=scenario_id, reason=reason)
            self.engine.enable(scenario_id)
            self.disabled_reasons.pop(scenario_id, None)
            return
        if scenario_id not in self.engine.disabled:
            log.warning("scenario.disabled", scenario_id=scenario_id, reason=reason)
        self.engine.disable(scenario_id)
        self.disabled_reasons[scenario_id] = reason
        for device_id, pending in list(self._reg.pending.items()):
            if pending.scenario_id == scenario_id:
                self._withdraw(device_id, "scenario_disabled")

    async def sync_switches(self) -> None:
        """Take the stored switches as they are now (at start, and when another replica changed one)."""
        stored = {(s.scope, s.scope_id): s for s in await self.store.switches()}
        offers = stored.get(("offers", ""))
        self._apply_pause(offers is not None and not offers.on, offers.reason if offers else "")
        for (scope, scope_id), switch in stored.items():
            if scope == "scenario":
                self._apply_scenario_switch(scope_id, switch.on, switch.reason)

    async def _announce_switches(self) -> None:
        """Other replicas re-read the switches; if this is lost, their periodic sweep finds the change."""
        if self.bus.shared:
            try:
                await self.bus.publish(OPS, "", {"kind": "switches"})
            except Exception:
                log.warning("bus.publish_failed", topic=OPS, exc_info=True)

    async def dead_webhooks(self, limit: int = 100) -> list[WebhookRecord]:
        """The webhook outbox's dead-letter list, newest first."""
        return await self.store.dead_webhooks(limit=limit)

    async def redeliver_webhook(self, delivery_id: str) -> None:
        """Send a delivery again now, with fresh attempts (webhooks.py picks it up once woken)."""
        if not delivery_id:
            raise InvalidInput("delivery_id", "required")
        if not await self.store.redeliver_webhook(delivery_id, self.clock.now()):
            raise NotFound(f"delivery_id: no webhook delivery {delivery_id!r} in the outbox")
        log.info("webhook.redeliver", delivery_id=delivery_id)
        for wake in self.outbox_wakeups:
            wake()
