"""The FitKit story's cast for the desk tests (browser and JSON API): credentials, the phone, its failures."""

from __future__ import annotations

from pathlib import Path

import cuepoint
from cuepoint_server.api.auth import AuthConfig
from cuepoint_server.app import CuepointServer

FITKIT_KEY = "fk_live_browser_test_key_1"
DANA = "dana-desk-token-0123456789"
ELI = "eli-desk-token-0123456789ab"
FAY = "fay-desk-token-0123456789ab"
ADMIN = "adm-console-token-0123456789"
AUTH = AuthConfig.from_dict(
    {
        "apps": {"fitkit": {"api_keys": [FITKIT_KEY]}},
        "associates": {
            "dana": {"token": DANA, "queues": ["fitkit-support"]},
            "eli": {"token": ELI, "queues": ["shop-support"]},
            "fay": {"token": FAY, "queues": ["fitkit-support"]},
        },
        "admin_tokens": [ADMIN],
    }
)


async def fitkit_phone(
    server: CuepointServer, device_id: str = "fitkit-iphone-7f3a", outbox: Path | None = None
) -> cuepoint.Client:
    """`outbox`: the app's local journal, which also keeps the device's secret across restarts."""
    return await cuepoint.connect(
        server.address,
        app_id="fitkit",
        device_id=device_id,
        context=cuepoint.Context(
            app_version="4.2.0",
            os="iOS",
            os_version="17.4",
            device_model="iPhone15,2",
            locale="en_US",
            timezone="America/Chicago",
            location=cuepoint.Location(country="US", region="IL", city="Chicago"),
        ),
        user=cuepoint.User(user_id=f"user-{device_id}", tier="premium", attributes={"first_name": "Sam"}),
        consent=cuepoint.Consent.FULL,
        config=cuepoint.ClientConfig(api_key=FITKIT_KEY, outbox_path=str(outbox) if outbox else None),
    )


async def fail_to_sync(phone: cuepoint.Client, wait: float = 5.0) -> cuepoint.Cue:
    """Three failed syncs; the cue they fired. Once flush() returned the server has evaluated the
    batch (it acks after evaluating), so a short timeout is enough to show that no cue came."""
    await phone.track("screen_viewed", screen="dashboard")
    for attempt in (1, 2, 3):
        await phone.track("sync_failed", reason="timeout", attempt=attempt, duration_ms=41_000)
    await phone.flush()
    return await phone.next_cue(timeout=wait)
