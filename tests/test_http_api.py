"""The desk and console JSON API over real HTTP (aiohttp client), on the real server with real SDK devices.

Security: token sign-in for an HttpOnly SameSite cookie, CSRF header on state changes, cross-origin refused,
strict CSP; an associate's socket carries only engagements of its own queues, as over gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest

import cuepoint
from cuepoint_server.app import CuepointServer

from .conftest import SHIPPED, StartServer
from .desk_cast import ADMIN, AUTH, DANA, ELI, FAY, fail_to_sync, fitkit_phone


async def start(start_server: StartServer, **options: Any) -> CuepointServer:
    options.setdefault("auth", AUTH)
    return await start_server(scenarios=SHIPPED, http_port=0, **options)


def client() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies of an IP address (the server listens on 127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(http: aiohttp.ClientSession, server: CuepointServer, path: str, **body: Any) -> str:
    async with http.post(f"{server.http_url}{path}", json=body) as response:
        assert response.status == 200, await response.text()
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        return str((await response.json())["csrf"])


async def next_event(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            message: dict[str, Any] = await ws.receive_json()
            if message["type"] == kind:
                return message


async def test_bad_tokens_and_wrong_kinds_cannot_sign_in(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as http:
        for path, body, status in [
            ("/api/desk/session", {"token": "not-a-real-token-at-all"}, 401),
            ("/api/desk/session", {}, 401),
            ("/api/desk/session", {"token": ADMIN}, 403),
            ("/api/console/session", {"token": DANA}, 403),
            ("/api/desk/session", {"token": DANA, "queues": ["shop-support"]}, 403),
        ]:
            async with http.post(f"{server.http_url}{path}", json=body) as response:
                assert response.status == status, (path, body, await response.text())
                assert "Set-Cookie" not in response.headers
        async with http.get(f"{server.http_url}/api/console/scenarios") as response:
            assert response.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # no cookie: refused before the upgrade
            await http.ws_connect(f"{server.http_url}/api/desk/ws")
        assert refused.value.status == 401


async def test_state_changes_need_the_csrf_header_and_this_origin(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as http:
        csrf = await sign_in(http, server, "/api/console/session", token=ADMIN)
        url = f"{server.http_url}/api/console/pause"
        async with http.post(url, json={"paused": True}) as response:
            assert response.status == 403
            assert "X-CSRF-Token" in (await response.json())["error"]
        async with http.post(url, json={"paused": True}, headers={"X-CSRF-Token": "forged"}) as response:
            assert response.status == 403
        evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        async with http.post(url, json={"paused": True}, headers=evil) as response:
            assert response.status == 403
        assert not server.core.offers_paused
        async with http.post(url, json={"paused": "yes"}, headers={"X-CSRF-Token": csrf}) as response:
            assert response.status == 400
            assert (await response.json())["field"] == "paused"
        async with http.post(url, json={"paused": True}, headers={"X-CSRF-Token": csrf}) as response:
            assert response.status == 200
            assert (await response.json()) == {"offers_paused": True}
        assert server.core.offers_paused
        async with http.get(f"{server.http_url}/console/") as response:
            csp = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        async with http.post(url, data="paused=true", headers={"X-CSRF-Token": csrf}) as response:
            assert response.status == 400  # a form post is not JSON


async def test_an_associate_socket_carries_only_its_own_queues(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as dana_http, client() as eli_http:
        await sign_in(dana_http, server, "/api/desk/session", token=DANA)
        eli_csrf = await sign_in(eli_http, server, "/api/desk/session", token=ELI)
        async with (
            dana_http.ws_connect(f"{server.http_url}/api/desk/ws") as dana,
            eli_http.ws_connect(f"{server.http_url}/api/desk/ws") as eli,
        ):
            assert (await next_event(dana, "signed_in"))["queues"] == ["fitkit-support"]
            assert (await next_event(eli, "signed_in"))["queues"] == ["shop-support"]
            phone = await fitkit_phone(server)
            await phone.accept(await fail_to_sync(phone))
            offered = await next_event(dana, "offered")
            engagement_id = offered["engagement"]["engagement_id"]
            assert offered["engagement"]["context"]["context"]["device.model"] == "iPhone15,2"
            # Eli cannot act on it either: not offered to him, not assigned to him.
            headers = {"X-CSRF-Token": eli_csrf}
            async with eli_http.post(
                f"{server.http_url}/api/desk/engagements/{engagement_id}/chat", json={"text": "hi"}, headers=headers
            ) as response:
                assert response.status == 404 or response.status == 403
            async with asyncio.timeout(1):
                while True:
                    message = await eli.receive_json()
                    assert engagement_id not in str(message), message
                    if message["type"] == "queues":
                        break
            await phone.close()


async def test_replay_prints_what_cuepoint_simulate_prints(start_server: StartServer) -> None:
    from cuepoint_server.simulate import render_text, simulate_files

    server = await start(start_server)
    trace = SHIPPED / "traces" / "fitkit-sync-failure.jsonl"
    async with client() as http:
        csrf = await sign_in(http, server, "/api/console/session", token=ADMIN)
        async with http.post(
            f"{server.http_url}/api/console/replay",
            json={"trace": trace.read_text(), "name": str(trace)},
            headers={"X-CSRF-Token": csrf},
        ) as response:
            result = await response.json()
    expected = await asyncio.to_thread(lambda: render_text(simulate_files(SHIPPED, trace)))
    assert result == {"ok": True, "output": expected, "error": ""}
    assert expected == (SHIPPED / "traces" / "fitkit-sync-failure.expected").read_text()


async def test_validate_names_file_line_and_field(start_server: StartServer) -> None:
    server = await start(start_server)
    broken = "id: broken\ntrigger: {event: x}\ncue: {message: hi, channel: carrier_pigeon}\n"
    async with client() as http:
        csrf = await sign_in(http, server, "/api/console/session", token=ADMIN)
        async with http.post(
            f"{server.http_url}/api/console/validate",
            json={"text": broken, "name": "mine.yaml"},
            headers={"X-CSRF-Token": csrf},
        ) as response:
            result = await response.json()
    assert result["ok"] is False
    issue = result["issues"][0]
    assert (issue["file"], issue["line"], issue["field"]) == ("mine.yaml", 3, "cue.channel")


async def test_each_scenario_shows_the_content_hash_of_its_file(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as http:
        await sign_in(http, server, "/api/console/session", token=ADMIN)
        async with http.get(f"{server.http_url}/api/console/scenarios") as response:
            listed = {s["id"]: s for s in (await response.json())["scenarios"]}
    text = (SHIPPED / "fitkit-sync-failure.yaml").read_text(encoding="utf-8")
    assert listed["fitkit-sync-failure"]["version"] == hashlib.sha256(text.encode()).hexdigest()[:12]
    # Another file, another text: another version.
    assert listed["fitkit-slow-sync"]["version"] != listed["fitkit-sync-failure"]["version"]


async def test_scenario_switch_and_pause_change_what_devices_get(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as http:
        csrf = await sign_in(http, server, "/api/console/session", token=ADMIN)
        headers = {"X-CSRF-Token": csrf}
        url = f"{server.http_url}/api/console/scenarios/fitkit-sync-failure/enabled"
        async with http.post(url, json={"enabled": False}, headers=headers) as response:
            assert (await response.json()) == {"scenario_id": "fitkit-sync-failure", "enabled": False}
        phone = await fitkit_phone(server, "phone-off")
        try:
            await fail_to_sync(phone, wait=0.3)
            raise AssertionError("a disabled scenario offered a cue")
        except cuepoint.TimedOut:
            pass
        async with http.post(url, json={"enabled": True}, headers=headers) as response:
            assert (await response.json())["enabled"] is True
        async with http.post(f"{server.http_url}/api/console/scenarios/nope/enabled", json={"enabled": True}, headers=headers) as response:
            assert response.status == 404
        cue = await fail_to_sync(await fitkit_phone(server, "phone-on"))
        assert cue.scenario_id == "fitkit-sync-failure"


async def test_decline_with_a_reason_then_wrap_up_with_a_queue_code(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as dana_http, client() as fay_http:
        dana_csrf = await sign_in(dana_http, server, "/api/desk/session", token=DANA)
        fay_csrf = await sign_in(fay_http, server, "/api/desk/session", token=FAY)
        async with (
            dana_http.ws_connect(f"{server.http_url}/api/desk/ws") as dana,
            fay_http.ws_connect(f"{server.http_url}/api/desk/ws") as fay,
        ):
            await next_event(dana, "signed_in")
            await next_event(fay, "signed_in")
            phone = await fitkit_phone(server)
            engagement = await phone.accept(await fail_to_sync(phone))
            # Both are equally idle: the id decides, so Dana is offered it first.
            offered = await next_event(dana, "offered")
            engagement_id = offered["engagement"]["engagement_id"]
            base = f"{server.http_url}/api/desk/engagements/{engagement_id}"
            async with dana_http.post(
                f"{base}/decline", json={"reason": "not my skill"}, headers={"X-CSRF-Token": dana_csrf}
            ) as response:
                assert response.status == 200
            assert (await next_event(fay, "offered"))["engagement"]["engagement_id"] == engagement_id
            headers = {"X-CSRF-Token": fay_csrf}
            async with fay_http.post(f"{base}/accept", json={}, headers=headers) as response:
                assert response.status == 200
            assigned = await next_event(fay, "assigned")
            assert assigned["engagement"]["queue_config"]["dispositions"][0] == "resolved"
            await engagement.wait_for(cuepoint.EngagementState.ASSIGNED, timeout=5)

            # The live journey: the phone's new event once stored; not its context change (consent-filtered).
            await phone.track("screen_viewed", screen="settings")
            await phone.set_context(attributes={"cart": 3}, user=cuepoint.User(tier="premium", attributes={"secret": "x"}))
            await phone.flush()
            journey = await next_event(fay, "journey")
            assert [(i["kind"], i["name"], i["payload"]) for i in journey["items"]] == [
                ("event", "screen_viewed", {"screen": "settings"})
            ]

            async with fay_http.post(f"{base}/wrap-up", json={"disposition": "done"}, headers=headers) as response:
                assert response.status == 400
                body = await response.json()
                assert body["field"] == "end.disposition" and "resolved" in body["error"]
            async with fay_http.post(
                f"{base}/wrap-up", json={"disposition": "escalated", "notes": "to tier 2"}, headers=headers
            ) as response:
                assert response.status == 200
            ended = await engagement.wait_for(cuepoint.EngagementState.ENDED, timeout=5)
            assert ended.disposition == "escalated"
            assert (await next_event(fay, "ended"))["disposition"] == "escalated"
            await phone.close()

    # The console's handling times count it: Fay's, in its queue, wrapped up with its end.
    await server.core.drain()
    async with client() as admin_http:
        await sign_in(admin_http, server, "/api/console/session", token=ADMIN)
        async with admin_http.get(f"{server.http_url}/api/console/handling?since=all") as response:
            assert response.status == 200
            handling = await response.json()
    assert [(q["queue"], q["engagements"], q["awaiting_wrap_up"]) for q in handling["queues"]] == [
        ("fitkit-support", 1, 0)
    ]
    assert [(a["associate_id"], a["engagements"], a["average_wrap_up"]) for a in handling["associates"]] == [
        ("fay", 1, 0.0)
    ]


async def test_bad_input_gets_a_clear_error_and_the_server_stays_up(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as http:
        csrf = await sign_in(http, server, "/api/console/session", token=ADMIN)
        headers = {"X-CSRF-Token": csrf, "Content-Type": "application/json"}
        for body, status in [
            (b"{not json", 400),
            (b"[1, 2]", 400),
            (b'{"text": 5}', 400),
            (b"\xff\xfe", 400),
            (b'{"text": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413),
        ]:
            async with http.post(f"{server.http_url}/api/console/validate", data=body, headers=headers) as response:
                assert response.status == status, (body[:20], await response.text())
        async with http.get(f"{server.http_url}/api/console/funnel?since=forever") as response:
            assert response.status == 400 and (await response.json())["field"] == "since"
        async with http.get(f"{server.http_url}/api/console/funnel?by=shoe_size") as response:
            assert response.status == 400 and (await response.json())["field"] == "by"
        async with http.get(f"{server.http_url}/api/console/live") as response:
            assert response.status == 200


async def test_variant_switch_checks_its_input_and_answers_the_states(start_server: StartServer) -> None:
    server = await start(start_server)
    async with client() as http:
        csrf = await sign_in(http, server, "/api/console/session", token=ADMIN)
        headers = {"X-CSRF-Token": csrf}
        base = f"{server.http_url}/api/console/scenarios/travel-payment-help/variants"
        for path, body, field in (
            ("short/stopped", {"stopped": "yes"}, "stopped"),
            ("nope/stopped", {"stopped": True}, "variant_id"),
            ("control/stopped", {"stopped": True}, "variant_id"),
        ):
            async with http.post(f"{base}/{path}", json=body, headers=headers) as response:
                assert response.status == 400
                assert (await response.json())["field"] == field
        async with http.post(f"{base}/short/stopped", json={"stopped": True}, headers=headers) as response:
            assert (await response.json())["variants"] == [
                {"id": "control", "weight": 1.0, "control": True, "stopped": False},
                {"id": "short", "weight": 1.0, "control": False, "stopped": True},
            ]
        async with http.get(f"{server.http_url}/api/console/scenarios") as response:
            listed = {s["id"]: s["variants"] for s in (await response.json())["scenarios"]}
        assert [v["stopped"] for v in listed["travel-payment-help"]] == [False, True]
        assert ("travel-payment-help", "short") in server.core.stopped_variants
