"""The associate desk and the admin console in a real browser (Debian's Chromium), on the real server.

The FitKit story end to end: a Python SDK phone fails to sync three times; Dana, in the browser, sees
the notice, accepts, reads the context, chats both ways, asks for screen share, the phone consents,
the call set-up is exchanged, and she wraps up; the console's funnel then shows the engagement resolved.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

import cuepoint
from cuepoint_server.app import CuepointServer
from cuepoint_server.clock import ManualClock

from .browser import chromium, need_browser, screenshot, skip_module_without_browser
from .conftest import SHIPPED, StartServer
from .desk_cast import ADMIN, AUTH, DANA, ELI, FAY, fail_to_sync, fitkit_phone

skip_module_without_browser()


@pytest.fixture(autouse=True)
def _browser_present() -> None:
    need_browser()  # before any server starts: a skip costs nothing


async def start(start_server: StartServer) -> CuepointServer:
    return await start_server(scenarios=SHIPPED, auth=AUTH, http_port=0)


async def open_desk(browser: Any, server: CuepointServer, token: str, *, width: int = 1280) -> Any:
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": width, "height": 1000})
    page = await context.new_page()
    await page.goto(f"{server.http_url}/desk/")
    await page.get_by_label("Associate token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#link-state")).to_have_text("connected")
    return page


async def open_console(browser: Any, server: CuepointServer, *, width: int = 1920) -> Any:
    from playwright.async_api import expect

    context = await browser.new_context(viewport={"width": width, "height": 1200})
    page = await context.new_page()
    await page.goto(f"{server.http_url}/console/")
    await page.get_by_label("Admin token").fill(ADMIN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#link-state")).to_have_text("live")
    return page


def answer_for(offer_sdp: str) -> str:
    """What a phone's WebRTC stack would answer, near enough for the page to accept it."""
    swap = {"a=recvonly": "a=sendonly", "a=sendonly": "a=recvonly", "a=setup:actpass": "a=setup:active"}
    return "\r\n".join(swap.get(line, line) for line in offer_sdp.split("\r\n"))


async def test_fitkit_story_in_the_browser(start_server: StartServer) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        desk = await open_desk(browser, server, DANA)
        await expect(desk.locator("[data-queue=fitkit-support]")).to_be_visible()
        phone = await fitkit_phone(server)
        cue = await fail_to_sync(phone)
        assert cue.scenario_id == "fitkit-sync-failure"
        engagement = await phone.accept(cue)

        notice = desk.get_by_role("alertdialog", name="Incoming engagement")
        await expect(notice).to_be_visible()
        await expect(notice).to_contain_text("Unable to sync? I can help you.")
        await expect(desk.locator("#countdown")).to_have_text(re.compile(r"^\d+$"))
        await screenshot(desk, "desk-1-incoming-notice")
        # Keyboard first: the notice moves focus to Accept, so Enter takes the engagement.
        await expect(notice.get_by_role("button", name="Accept")).to_be_focused()
        await desk.keyboard.press("Enter")
        assigned = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        assert assigned.associate_name == "dana"

        context = desk.locator("#context")
        await expect(context.locator("[data-field='app.version']")).to_contain_text("4.2.0")
        await expect(context.locator("[data-field='device.model']")).to_have_text("iPhone15,2")
        await expect(context).to_contain_text("premium")
        await expect(context.locator("[data-field='user.id']")).to_contain_text("claimed")
        await expect(desk.locator("#why")).to_contain_text("FitKit: sync keeps failing (premium)")
        # The routing rule that sent it to this queue, by name and where it is written, and its conditions.
        rule = desk.locator("#why [data-field=routing-rule]")
        await expect(rule).to_contain_text("premium sync help (fitkit-support-queue.yaml:")
        await expect(rule).to_contain_text("→ fitkit-support")
        await expect(desk.locator("#conditions")).to_contain_text("sync_failed")
        await expect(desk.locator("#conditions")).to_contain_text("user.tier")
        await expect(desk.locator("#conditions")).to_contain_text("routing.rules[0].when")
        await expect(desk.locator("#journey")).to_contain_text("sync_failed")
        await expect(desk.locator("#journey")).to_contain_text("dashboard")

        # The journey keeps growing while the engagement runs.
        await phone.track("screen_viewed", screen="settings")
        await phone.flush()
        await expect(desk.locator("#journey li.fresh")).to_contain_text("settings")
        # A milestone reached while it runs (insurance-checkout's, which listen to every app) joins the timeline.
        await phone.track("quote_started")
        await phone.flush()
        await expect(desk.locator("#journey li.kind-milestone")).to_contain_text("milestone quote-started")

        # Chat both ways.
        await engagement.send_chat("It keeps saying 'sync failed'.")
        await expect(desk.locator("#transcript")).to_contain_text("It keeps saying 'sync failed'.")
        await desk.get_by_label("Canned reply").select_option(index=1)
        await desk.get_by_role("button", name="Send").click()
        async with asyncio.timeout(5):
            async for line in engagement.messages():
                if line.sender is cuepoint.Party.ASSOCIATE:
                    assert line.text.startswith("Hi, I'm here to help")
                    break

        # Screen share: asked in the page, consented on the phone, call set-up relayed both ways.
        await desk.get_by_role("button", name="Ask for screen share").click()
        request = await anext(aiter(engagement.upgrade_requests()))
        assert request.channel is cuepoint.Channel.SCREEN_SHARE
        await engagement.respond_upgrade(request, True)
        await expect(desk.locator("#channel")).to_have_text("Screen share")
        offer = await anext(aiter(engagement.call_signals()))
        assert offer.kind is cuepoint.CallSignalKind.OFFER
        sdp = offer.payload.decode()
        assert sdp.startswith("v=0") and "m=audio" in sdp
        await engagement.send_call_signal(cuepoint.CallSignalKind.ANSWER, answer_for(sdp).encode())
        await expect(desk.locator("#calllog")).to_contain_text("call answer received")
        await expect(desk.locator("#calllog")).to_contain_text("call set up: stable")
        await screenshot(desk, "desk-2-engagement")

        # Wrap-up with one of the queue's disposition codes and outcomes: the outcome is required.
        await desk.get_by_label("Disposition").select_option("resolved")
        await desk.get_by_label("Notes").fill("Cleared a stale auth token.")
        await desk.get_by_role("button", name="Complete").click()
        # The browser holds the form back (a required field) and takes the associate to it.
        await expect(desk.get_by_label("Outcome")).to_be_focused()
        assert await desk.get_by_label("Outcome").evaluate("(e) => e.validity.valueMissing")
        await expect(desk.locator("#work")).to_be_visible()
        await desk.get_by_label("Outcome").select_option(label="Kept the subscription")
        await desk.get_by_role("button", name="Complete").click()
        ended = await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
        assert ended.disposition == "resolved"
        await expect(desk.locator("#last-wrap")).to_contain_text("resolved")
        await server.core.drain()
        stored = await server.core.store.get_engagement(ended.engagement_id)
        assert stored is not None and (stored.wrap_up_outcome, stored.wrap_up_success) == ("kept_subscription", True)

        console = await open_console(browser, server)
        funnel = console.locator("article[data-scenario='fitkit-sync-failure']")
        await expect(funnel.locator("[data-step=resolved] .n")).to_have_text("1")
        await expect(funnel.locator("[data-step=accepted] .n")).to_have_text("1")
        # The chart's steps, in order, end with the outcome the associate recorded.
        steps = funnel.locator(".funnel .step")
        await expect(steps).to_have_count(7)
        assert [await s.get_attribute("data-step") for s in await steps.all()] == [
            "qualified", "blocked_total", "offered", "accepted", "engaged", "resolved", "outcome",
        ]  # fmt: skip
        await expect(funnel.locator("[data-step=outcome] .n")).to_have_text("1")
        await expect(funnel.locator("[data-role=wrap-up-outcomes]")).to_contain_text("kept subscription 1")
        await expect(console.locator("#sessions")).to_contain_text("fitkit-iphone-7f3a")
        # Handling times: Dana's engagement, in its queue, wrapped up as it ended.
        handled = console.locator("#handling-associates tr[data-key=dana]")
        await expect(handled.locator("td").nth(0)).to_have_text("1")
        await expect(handled.locator("td").nth(5)).to_have_text("0")
        await expect(console.locator("#handling-queues tr[data-key=fitkit-support] td").nth(0)).to_have_text("1")
        await screenshot(console, "console-1920")
        await console.set_viewport_size({"width": 1280, "height": 1000})
        await screenshot(console, "console-1280")
        await phone.close()


async def test_the_journey_shows_earlier_cues_and_engagements(
    start_server: StartServer, clock: ManualClock, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        desk = await open_desk(browser, server, DANA)
        phone = await fitkit_phone(server, outbox=tmp_path / "app.db")
        first = await fail_to_sync(phone)
        await phone.decline(first)
        await phone.close()
        clock.advance(2 * 3600)  # a new session, past the scenario's 1 h cooldown
        again = await fitkit_phone(server, outbox=tmp_path / "app.db")
        engagement = await again.accept(await fail_to_sync(again))
        await desk.get_by_role("button", name="Accept").click()
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        earlier = desk.locator("#journey li.kind-cue")
        await expect(earlier).to_contain_text("cue fitkit-sync-failure")
        await expect(earlier).to_contain_text("answer=declined")
        await again.close()


async def test_a_second_associate_never_sees_the_first_ones_engagement(start_server: StartServer) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        dana = await open_desk(browser, server, DANA)
        eli = await open_desk(browser, server, ELI, width=1920)
        await expect(eli.locator("[data-queue=shop-support]")).to_be_visible()
        await expect(eli.locator("[data-queue=fitkit-support]")).to_have_count(0)
        phone = await fitkit_phone(server)
        engagement = await phone.accept(await fail_to_sync(phone))
        await expect(dana.get_by_role("alertdialog", name="Incoming engagement")).to_be_visible()
        await dana.get_by_role("button", name="Accept").click()
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        await engagement.send_chat("only Dana may read this")
        await expect(dana.locator("#transcript")).to_contain_text("only Dana may read this")
        # Everything Eli's page received by now: nothing of Dana's engagement, no notice, no context.
        await expect(eli.locator("#notice")).to_be_hidden()
        await expect(eli.locator("#work")).to_be_hidden()
        body = await eli.locator("body").inner_text()
        assert "iPhone15,2" not in body and "only Dana may read this" not in body
        await screenshot(eli, "desk-second-associate-1920")
        await phone.close()


async def test_a_bad_token_cannot_open_the_desk(start_server: StartServer) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        page = await (await browser.new_context(viewport={"width": 1280, "height": 800})).new_page()
        await page.goto(f"{server.http_url}/desk/")
        for token in ("wrong-token-0123456789", ADMIN):
            await page.get_by_label("Associate token").fill(token)
            await page.get_by_role("button", name="Sign in").click()
            await expect(page.get_by_role("alert")).to_contain_text("Sign-in refused")
        await expect(page.locator("#desk")).to_be_hidden()
        await screenshot(page, "desk-sign-in-refused")
        # No cookie was set, so a reload still shows only the sign-in form.
        assert not [c for c in await page.context.cookies() if c["name"] == "cuepoint_desk"]
        await page.reload()
        await expect(page.get_by_role("heading", name="Sign in to the desk")).to_be_visible()


async def test_console_switches_change_what_devices_get(start_server: StartServer) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        console = await open_console(browser, server)
        toggle = console.get_by_role("button", name="Disable fitkit-sync-failure")
        await toggle.click()
        row = console.locator("tr[data-scenario='fitkit-sync-failure']")
        await expect(row).to_contain_text("disabled")
        # The Version column: a short content hash of the scenario's file.
        await expect(row.locator("td.version")).to_have_text(re.compile(r"^[0-9a-f]{12}$"))
        phone = await fitkit_phone(server, "phone-disabled")
        with pytest.raises(cuepoint.TimedOut):
            await fail_to_sync(phone, wait=0.3)

        await console.get_by_role("button", name="Enable fitkit-sync-failure").click()
        await expect(row).to_contain_text("enabled")
        await console.get_by_role("button", name="Pause all offers").click()
        await expect(console.locator("#paused-banner")).to_contain_text("Offers are paused")
        await screenshot(console, "console-paused")
        phone2 = await fitkit_phone(server, "phone-paused")
        with pytest.raises(cuepoint.TimedOut):
            await fail_to_sync(phone2, wait=0.3)

        await console.get_by_role("button", name="Resume offers").click()
        await expect(console.locator("#paused-banner")).to_be_hidden()
        phone3 = await fitkit_phone(server, "phone-resumed")
        assert (await fail_to_sync(phone3)).scenario_id == "fitkit-sync-failure"
        # Explain tells why the earlier devices got nothing.
        await console.get_by_label("Device id").fill("phone-paused")
        await console.get_by_role("button", name="Explain", exact=True).click()
        await expect(console.locator("#explain")).to_contain_text("paused")
        for client in (phone, phone2, phone3):
            await client.close()


# Every control a person operates must have a name a screen reader can read out.
UNLABELLED = """() => [...document.querySelectorAll('button, input, select, textarea')]
  .filter((e) => e.offsetParent !== null || e.closest('[hidden], .hidden') === null)
  .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
  .map((e) => e.outerHTML)"""


async def test_every_control_has_an_accessible_name(start_server: StartServer) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        desk = await open_desk(browser, server, DANA, width=1920)
        phone = await fitkit_phone(server)
        engagement = await phone.accept(await fail_to_sync(phone))
        await desk.get_by_role("button", name="Accept").click()
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        await expect(desk.locator("#work")).to_be_visible()
        await screenshot(desk, "desk-engagement-1920")
        assert await desk.evaluate(UNLABELLED) == []
        console = await open_console(browser, server)
        await expect(console.locator("#sessions")).to_contain_text("fitkit-iphone-7f3a")
        assert await console.evaluate(UNLABELLED) == []
        # The whole desk works from the keyboard: Tab reaches the chat box from the canned replies.
        await desk.get_by_label("Canned reply").focus()
        await desk.keyboard.press("Tab")
        await expect(desk.get_by_label("Message")).to_be_focused()
        await phone.close()


async def until(check: Any, what: str) -> None:
    """Wait (on the real event loop) until the server's state says `check()`; fail naming `what`."""
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 - the server notices the closed socket on its own
            await asyncio.sleep(0.02)
    assert check(), what


async def test_a_reload_mid_engagement_resumes_the_same_engagement(start_server: StartServer) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        desk = await open_desk(browser, server, DANA)
        phone = await fitkit_phone(server)
        engagement = await phone.accept(await fail_to_sync(phone))
        await desk.get_by_role("button", name="Accept").click()
        assigned = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        await engagement.send_chat("My watch stopped syncing yesterday.")
        await expect(desk.locator("#transcript")).to_contain_text("My watch stopped syncing yesterday.")
        await desk.get_by_label("Message").fill("Let me look at your account.")
        await desk.get_by_role("button", name="Send").click()
        await expect(desk.locator("#transcript")).to_contain_text("Let me look at your account.")
        await phone.track("screen_viewed", screen="watch_pairing")
        await phone.flush()
        await expect(desk.locator("#journey li.fresh")).to_contain_text("watch_pairing")

        await desk.reload()
        await expect(desk.locator("#link-state")).to_have_text("connected")
        # The same engagement, shown again with its context, chat and live journey, still Dana's.
        await expect(desk.locator("#work")).to_be_visible()
        await expect(desk.locator("#context [data-field='device.model']")).to_have_text("iPhone15,2")
        transcript = desk.locator("#transcript li")
        await expect(transcript).to_have_count(2)
        await expect(transcript.nth(0)).to_contain_text("My watch stopped syncing yesterday.")
        await expect(transcript.nth(1)).to_contain_text("Let me look at your account.")
        await expect(desk.locator("#journey")).to_contain_text("watch_pairing")
        await expect(desk.get_by_role("alertdialog", name="Incoming engagement")).to_be_hidden()
        await screenshot(desk, "desk-after-reload")

        # The conversation carries on both ways; the phone never saw its engagement go back to a queue.
        await engagement.send_chat("Still there?")
        await expect(desk.locator("#transcript")).to_contain_text("Still there?")
        await expect(desk.locator("#transcript li")).to_have_count(3)
        await desk.get_by_label("Message").fill("Yes, still here.")
        await desk.get_by_role("button", name="Send").click()
        async with asyncio.timeout(5):
            async for line in engagement.messages():
                if line.text == "Yes, still here.":
                    break
        states = [u.state for u in engagement.history]
        assert cuepoint.EngagementState.QUEUED not in states[states.index(cuepoint.EngagementState.ASSIGNED) :]
        held = server.core.desk.get(assigned.engagement_id)
        assert held is not None and held.state == "assigned" and held.associate is not None
        assert held.associate.associate_id == "dana" and not held.associate.detached

        # And it wraps up from the reloaded page.
        await desk.get_by_label("Disposition").select_option("resolved")
        await desk.get_by_label("Outcome").select_option("resolved")
        await desk.get_by_role("button", name="Complete").click()
        assert (await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)).disposition == "resolved"
        await phone.close()


async def test_a_desk_gone_past_the_grace_period_gives_the_engagement_back(
    start_server: StartServer, clock: ManualClock
) -> None:
    from playwright.async_api import expect

    server = await start(start_server)
    async with chromium() as browser:
        desk = await open_desk(browser, server, DANA)
        phone = await fitkit_phone(server)
        engagement = await phone.accept(await fail_to_sync(phone))
        await desk.get_by_role("button", name="Accept").click()
        assigned = await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        dana = server.core.router.find("dana")
        assert dana is not None

        await desk.context.close()  # the laptop's lid shuts
        await until(lambda: dana.detached, "the desk's associate is detached when its page goes away")
        held = server.core.desk.get(assigned.engagement_id)
        assert held is not None and held.state == "assigned" and held.associate is dana
        clock.advance(29)
        assert held.state == "assigned"
        clock.advance(2)  # past the 30 s grace period: signed out, the engagement goes back to its queue
        requeued = await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
        assert requeued.engagement_id == assigned.engagement_id
        assert server.core.router.find("dana") is None

        # Fay, on the same queue, is offered it.
        fay = await open_desk(browser, server, FAY)
        await expect(fay.get_by_role("alertdialog", name="Incoming engagement")).to_be_visible()
        await phone.close()


async def test_signing_out_gives_the_engagement_back_at_once(start_server: StartServer) -> None:
    server = await start(start_server)
    async with chromium() as browser:
        desk = await open_desk(browser, server, DANA)
        phone = await fitkit_phone(server)
        engagement = await phone.accept(await fail_to_sync(phone))
        await desk.get_by_role("button", name="Accept").click()
        await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)
        await desk.get_by_role("button", name="Sign out").click()
        # No grace period when the associate leaves on purpose (the manual clock never moves here).
        await engagement.wait_for(cuepoint.EngagementState.QUEUED, timeout=5)
        await phone.close()
