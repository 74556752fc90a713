"""Device credentials: a device id belongs to the install that first used it.

The app key ships inside every app, so it proves only "some copy of this app". On a device's first
connection the server issues a secret bound to its device id (256 random bits); the SDK keeps it and
presents it in every Hello. Only its SHA-256 is stored, and a presented secret is compared by digest in
constant time. With enforcement on (the server runs with auth), a Hello for a known device id without its
secret is refused before it touches the device's state, session or pending cue.

Migration mode (``CoreConfig.device_secret_migration``, off by default) admits Hellos without a secret from
devices that have never presented theirs: SDKs that predate credentials ignore the issued secret, and keep
working, while every install that has presented its secret once is held to it from then on.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import structlog

from ..storage import DeviceCredentialRecord
from .core_base import CoreBase
from .errors import Unauthenticated
from .model import Hello

__all__ = ["DeviceCredentials", "secret_digest"]

log = structlog.get_logger("cuepoint.core")

# 32 bytes = 256 bits of entropy, URL-safe text (43 characters).
SECRET_BYTES = 32


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class DeviceCredentials(CoreBase):
    async def _admit_device(self, hello: Hello, now: float) -> str:
        """Check the Hello's device secret; the secret to issue in the Welcome, or "".

        Raises Unauthenticated (when enforcing) for a known device id without its secret.
        """
        enforce = self.config.enforce_device_secrets
        record = await self.store.device_credential(hello.device_id)
        if record is not None:
            presented = hello.device_secret
            if presented and hmac.compare_digest(secret_digest(presented), record.secret_sha256):
                if record.confirmed_at is None:
                    await self.store.confirm_device_credential(hello.device_id, now)
                return ""
            if not enforce:
                return ""
            if not presented and self.config.device_secret_migration and record.confirmed_at is None:
                log.info("device.admitted_without_secret", device_id=hello.device_id, reason="migration")
                return ""
            log.info("device.refused", device_id=hello.device_id, reason="wrong_secret" if presented else "no_secret")
            raise Unauthenticated("hello.device_secret: this device id belongs to another install")
        # First connection (or the operator forgot the credential): a new install.
        secret = secrets.token_urlsafe(SECRET_BYTES)
        issued = DeviceCredentialRecord(hello.device_id, hello.app_id, secret_digest(secret), now)
        if await self.store.issue_device_credential(issued):
            log.info("device.credential_issued", device_id=hello.device_id)
            return secret
        # Another first connection for this id won the race.
        if enforce:
            raise Unauthenticated("hello.device_secret: this device id belongs to another install")
        return ""

    async def forget_device_credential(self, device_id: str) -> bool:
        """Operator path for a lost secret: the device's next Hello is a new install's."""
        forgotten = await self.store.forget_device_credential(device_id)
        log.warning("device.credential_forgotten", device_id=device_id, existed=forgotten)
        return forgotten
