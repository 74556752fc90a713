"""A callback in the browser: the console counts it while scheduled; when it falls due the desk's notice and
the engagement say it is a callback, with the time the user asked for and the number to call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cuepoint
from cuepoint_server.clock import ManualClock

from .browser import chromium, need_browser, skip_module_without_browser
from .conftest import StartServer
from .desk_cast import AUTH, DANA, fitkit_phone
from .test_browser_desk import open_console, open_desk
from .test_e2e_callbacks import SCENARIO, wants_a_callback

skip_module_without_browser()


@pytest.fixture(autouse=True)
def _browser_present() -> None:
    need_browser()


async def test_the_console_counts_callbacks_and_the_desk_shows_one_as_such(
    start_server: StartServer, clock: ManualClock, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    folder = tmp_path / "scenarios"
    folder.mkdir()
    (folder / "s.yaml").write_text(SCENARIO)
    server = await start_server(scenarios=folder, auth=AUTH, http_port=0)
    phone = await fitkit_phone(server)
    at = clock.now() + 600
    engagement = await wants_a_callback(phone, clock, at)
    await engagement.wait_for(cuepoint.EngagementState.CALLBACK_REQUESTED, timeout=5)
    async with chromium() as browser:
        console: Any = await open_console(browser, server)
        await expect(console.locator("#count-callbacks .n")).to_have_text("1")
        desk: Any = await open_desk(browser, server, DANA)
        clock.set(at)  # due: offered to Dana, whose offer runs on from here
        notice = desk.get_by_role("alertdialog", name="Incoming engagement")
        await expect(notice.locator("[data-field=callback]")).to_contain_text("call +1 555 0100")
        await notice.get_by_role("button", name="Accept").click()
        await expect(desk.locator("#why [data-field=callback]")).to_contain_text("Callback, asked for")
        await expect(console.locator("#count-callbacks .n")).to_have_text("0")
    await phone.close()
