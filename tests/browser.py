"""Helpers for the browser tests: Debian's Chromium driven by Playwright, or one clear line why not.

Never `playwright install`: its browser download cannot be fetched here. `.ci/run` installs Debian's
chromium, and with CI set a missing browser fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("CUEPOINT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]


def missing() -> str | None:
    """What the browser tests lack, as one line saying how to install it; None when all is there."""
    lacking = []
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        lacking.append("the playwright package (pip install playwright)")
    if not CHROMIUM.exists():
        lacking.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if not lacking:
        return None
    return "browser tests need " + " and ".join(lacking) + "; never run `playwright install`"


def skip_module_without_browser() -> None:
    """At import of a browser test module: one skip line for the whole module, except under CI."""
    reason = missing()
    if reason is not None and not os.environ.get("CI"):
        pytest.skip(reason, allow_module_level=True)


def need_browser() -> None:
    """In each test (under CI the module was not skipped): fail with the same line."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    need_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def screenshot(page: Any, name: str) -> Path:
    """Saved under test-artifacts/ (gitignored) for a person to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
