"""Call set-up: WebRTC-style signalling (offer, answer, candidates, hangup) relayed between the two sides."""

from __future__ import annotations

import structlog

from .desk_base import DeskBase
from .engagement_model import Engagement
from .errors import InvalidInput
from .model import (
    CALL_SIGNAL_KINDS,
    CallSignalRelay,
)

__all__ = ["MAX_CALL_PAYLOAD", "Calls"]

log = structlog.get_logger("cuepoint.core.engagements")

MAX_CALL_PAYLOAD = 64 * 1024


class Calls(DeskBase):
    def call_signal(self, party: str, engagement: Engagement, kind: str, payload: bytes) -> None:
        if kind not in CALL_SIGNAL_KINDS:
            raise InvalidInput("call_signal.kind", "must be offer, answer, candidate or hangup")
        if len(payload) > MAX_CALL_PAYLOAD:
            raise InvalidInput("call_signal.payload", f"larger than {MAX_CALL_PAYLOAD} bytes")
        if engagement.state != "assigned":
            log.info("call_signal.dropped", engagement_id=engagement.engagement_id, reason="no counterpart")
            return
        self._to_other(engagement, party, CallSignalRelay(engagement.engagement_id, kind, payload, party))
