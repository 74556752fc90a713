"""Hostile input from devices and from scenario files (issue 11, items 4 and 5).

Real server on port 0, real SDK over gRPC, the real `cuepoint validate` and reload path.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cuepoint_server.scenarios.reloader import ScenarioReloader

from .conftest import StartServer, phone

# Catastrophic for a backtracking engine: 29 characters stalled Python's `re` for 17.6 s, and every two
# more characters cost about four times as long.
EVIL = r"^([a-zA-Z0-9]+\s?)*$"
HANDLE = f"""
id: nice-handle
trigger:
  event: profile_saved
  where: {{handle: {{matches: '{EVIL}'}}}}
cue: {{message: "Nice handle", channel: chat}}
"""
PING = """
id: ping
trigger: {event: ping}
cue: {message: "pong", channel: chat}
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cuepoint_server.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def write(folder: Path, name: str, text: str) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, folder / name)


async def test_a_hostile_value_cannot_stall_the_server(start_server: StartServer) -> None:
    server = await start_server(HANDLE, PING)
    hostile = await phone(server, "hostile", user_id="user-h")
    other = await phone(server, "bystander", user_id="user-b")

    async def attack() -> None:
        # The longest string a device may send (Limits.max_string), one character short of matching.
        await hostile.track("profile_saved", handle="a" * 1023 + "!")
        await hostile.flush(timeout=30)

    async def round_trip() -> str:
        await other.track("ping")
        await other.flush(timeout=30)
        cue = await other.next_cue(timeout=30)
        return cue.message

    attacking = asyncio.create_task(attack())
    await asyncio.sleep(0)  # the attack is on the wire first
    assert await round_trip() == "pong"
    await attacking  # the hostile batch was evaluated and acked, not stuck
    # The pattern still works: a long value that matches fires the scenario for the same device.
    await hostile.track("profile_saved", handle=" ".join(["a1"] * 341))
    await hostile.flush(timeout=10)
    assert (await hostile.next_cue(timeout=10)).message == "Nice handle"
    await hostile.close()
    await other.close()


def test_validate_rejects_patterns_without_a_linear_time_engine(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "id: twice\n"
        "trigger:\n"
        "  event: profile_saved\n"
        "  where:\n"
        "    handle: {matches: '(a+)\\1'}\n"
        "cue: {message: hi, channel: chat}\n"
        "target: {attribute: user.tier, matches: '(?=pre)premium'}\n"
    )
    done = cli("validate", str(tmp_path))
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"{tmp_path}/s.yaml:5: trigger.where.handle.matches: ") for line in lines), lines
    assert any(line.startswith(f"{tmp_path}/s.yaml:7: target.matches: ") for line in lines), lines
    assert "RE2" in done.stdout


async def test_live_reload_rejects_a_backreference_and_keeps_serving(
    start_server: StartServer, tmp_path: Path
) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    write(folder, "ping.yaml", PING)
    server = await start_server(scenarios=folder)
    reloader = server.reloader
    assert isinstance(reloader, ScenarioReloader)
    write(folder, "ping.yaml", PING.replace("trigger: {event: ping}", "trigger: {attribute: user.tier, matches: '(a)\\1'}"))
    async with asyncio.timeout(5):
        await reloader.wait_until(lambda r: r.last_error is not None)
    assert reloader.last_error is not None
    (issue,) = reloader.last_error.issues
    assert (issue.file, issue.line, issue.field) == (str(folder / "ping.yaml"), 3, "trigger.matches")
    assert reloader.version.number == 1
    client = await phone(server)
    await client.track("ping")
    assert (await client.next_cue(timeout=5)).message == "pong"
    await client.close()


# The classic "billion laughs": 433 bytes that expand to 10^9 strings. Before the limits, `validate` ran
# for over 60 s and 1.6 GB and `serve` never started listening.
LAUGHS = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{name}: &{name} [{','.join(['*' + prev] * 9)}]\n"
        for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
)


def test_validate_rejects_alias_bombs_deep_nesting_and_huge_files(tmp_path: Path) -> None:
    assert len(LAUGHS.encode()) <= 433
    (tmp_path / "laughs.yaml").write_text(LAUGHS)
    # 800 levels of nesting crashed validate and serve with a RecursionError.
    (tmp_path / "deep.yaml").write_text("id: deep\ntrigger:\n  " + "[" * 800 + "]" * 800 + "\n")
    # Over the size limit: the report names the line where the file crosses it.
    filler = "# " + "x" * 98 + "\n"
    (tmp_path / "huge.yaml").write_text(PING.lstrip() + filler * (9 * 1024 * 1024 // len(filler)))
    done = cli("validate", str(tmp_path), timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stdout + done.stderr
    report = {line.split(":", 1)[0].rsplit("/", 1)[-1]: line for line in done.stdout.splitlines() if ".yaml:" in line}
    assert set(report) == {"laughs.yaml", "deep.yaml", "huge.yaml"}, done.stdout
    # The alias that pushes the expansion over the limit is on a line of its own file.
    assert report["laughs.yaml"].startswith(f"{tmp_path}/laughs.yaml:") and "alias" in report["laughs.yaml"]
    assert int(report["laughs.yaml"].split(":")[1]) > 1
    assert report["deep.yaml"].startswith(f"{tmp_path}/deep.yaml:3:") and "deep" in report["deep.yaml"]
    huge_line = int(report["huge.yaml"].split(":")[1])
    assert huge_line > 80_000 and "MiB" in report["huge.yaml"]


async def test_a_bomb_dropped_into_the_live_folder_leaves_the_old_set_serving(
    start_server: StartServer, tmp_path: Path
) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    write(folder, "ping.yaml", PING)
    server = await start_server(scenarios=folder)
    reloader = server.reloader
    assert isinstance(reloader, ScenarioReloader)
    write(folder, "laughs.yaml", LAUGHS)
    async with asyncio.timeout(20):
        await reloader.wait_until(lambda r: r.last_error is not None)
    assert reloader.last_error is not None
    (issue,) = reloader.last_error.issues
    assert issue.file == str(folder / "laughs.yaml") and issue.line > 1 and "alias" in issue.message
    write(folder, "deep.yaml", "id: deep\ntrigger:\n  " + "{all: [" * 400 + "]}" * 400 + "\n")
    (folder / "laughs.yaml").unlink()
    async with asyncio.timeout(20):
        await reloader.wait_until(lambda r: r.last_error is not None and r.last_error.issues[0].file.endswith("deep.yaml"))
    assert reloader.last_error is not None
    (issue,) = reloader.last_error.issues
    assert issue.line == 3 and "deep" in issue.message
    assert reloader.version.number == 1
    client = await phone(server)
    await client.track("ping")
    assert (await client.next_cue(timeout=5)).message == "pong"
    await client.close()
