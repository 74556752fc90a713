"""The console's A/B view in a real browser (Debian's Chromium), on the real server (issue 17, console item).

Phones answer a scenario with two variants: the users who see `short` come back to a successful sync, those
on the control do not. The console shows per variant the conversion, its interval, the p-value against the
control and the feedback given; its Stop button stops `short`, and that user's next cue is the control's.
"""

from __future__ import annotations

from typing import Any

import pytest

import cuepoint
from cuepoint_server.app import CuepointServer

from .browser import chromium, need_browser, screenshot, skip_module_without_browser
from .conftest import StartServer
from .desk_cast import ADMIN, AUTH, FITKIT_KEY

skip_module_without_browser()

SCENARIO = """
milestones:
  - {id: synced, when: {event: sync_succeeded}}
scenarios:
  - id: sync-help
    apps: [fitkit]
    trigger: {event: sync_failed}
    outcome: synced
    cue: {message: "Sync trouble? We can help.", channel: chat, queue: fitkit-support, feedback: {kind: csat}}
    variants:
      - {id: control, weight: 1}
      - {id: short, weight: 1, message: "Sync failing? Chat now."}
"""


@pytest.fixture(autouse=True)
def _browser_present() -> None:
    need_browser()


async def device(server: CuepointServer, device_id: str, user_id: str) -> cuepoint.Client:
    return await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id=device_id,
        user=cuepoint.User(user_id=user_id),
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(api_key=FITKIT_KEY),
    )


async def cue_for(client: cuepoint.Client) -> cuepoint.Cue:
    await client.track("sync_failed")
    await client.flush()
    return await client.next_cue(timeout=5)


async def open_console(browser: Any, server: CuepointServer) -> Any:
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": 1600, "height": 1200})
    page = await context.new_page()
    await page.goto(f"{server.http_url}/console/")
    await page.get_by_label("Admin token").fill(ADMIN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#link-state")).to_have_text("live")
    return page


async def test_console_shows_variants_with_their_statistics_and_stops_one(start_server: StartServer) -> None:
    from playwright.async_api import expect

    server = await start_server(SCENARIO, auth=AUTH, http_port=0)
    seen: dict[str, list[str]] = {"control": [], "short": []}
    clients = []
    for n in range(12):
        client = await device(server, f"phone-{n}", f"user-{n}")
        clients.append(client)
        cue = await cue_for(client)
        seen[cue.variant].append(f"user-{n}")
        if cue.variant == "short":
            # Converts: syncs fine afterwards (the scenario's outcome milestone).
            await client.dismiss(cue)
            await client.track("sync_succeeded")
            await client.flush()
        else:
            # Takes the chat, leaves before anyone answers, and rates it.
            engagement = await client.accept(cue)
            await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
            await engagement.end()
            request = await client.next_feedback_request(timeout=5)
            await client.give_feedback(request, 4)
    assert seen["control"] and seen["short"], seen  # twelve users land in both halves
    await server.core.drain()

    async with chromium() as browser:
        console = await open_console(browser, server)
        await console.get_by_label("Period").select_option("all")
        table = console.get_by_role("table", name="A/B variants of sync-help")
        control = table.locator("tr[data-variant='control']")
        short = table.locator("tr[data-variant='short']")
        n_control, n_short = len(seen["control"]), len(seen["short"])
        await expect(control).to_contain_text(f"control (control){n_control}")
        await expect(control.locator("td").nth(4)).to_have_text("0.0%")
        await expect(short.locator("td").nth(3)).to_have_text(str(n_short))  # converted, all of them
        await expect(short.locator("td").nth(4)).to_have_text("100.0%")
        await expect(short.locator("td").nth(6)).to_have_text("+100.0 pts")
        p_value = float(await short.locator("td").nth(7).inner_text())
        assert p_value < 0.05
        ci = await short.locator("td").nth(5).inner_text()
        assert ci.endswith("to 100.0%") and not ci.startswith("100.0%")  # an interval, not a point
        await expect(short).to_contain_text("running")
        await expect(console.locator("article[data-scenario='sync-help'] .feedback")).to_contain_text(
            f"CSAT: {n_control} response(s), average 4.00, satisfied 100.0%"
        )
        await expect(console.get_by_role("button", name="Stop variant control of sync-help")).to_have_count(0)
        await screenshot(console, "console-variants")

        await console.get_by_role("button", name="Stop variant short of sync-help").click()
        await expect(short).to_contain_text("stopped")
        await expect(console.get_by_role("button", name="Restart variant short of sync-help")).to_be_visible()
        await expect(console.locator("tr[data-scenario='sync-help']")).to_contain_text("short stopped")
        assert ("sync-help", "short") in server.core.stopped_variants

        # A user who saw `short` now gets the control, on a new device.
        again = await device(server, "phone-again", seen["short"][0])
        clients.append(again)
        cue = await cue_for(again)
        assert (cue.variant, cue.message) == ("control", "Sync trouble? We can help.")

        await console.get_by_role("button", name="Restart variant short of sync-help").click()
        await expect(short).to_contain_text("running")
        assert ("sync-help", "short") not in server.core.stopped_variants
    for client in clients:
        await client.close()
