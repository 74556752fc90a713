"""What a cue shows a given device: its A/B variant, then its locale, then the context filled in.

The variant depends only on the subject (user, else device) and the scenario, so a user sees the
same variant on every device and after restarts; a variant stopped by an admin shows the control.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ..engine.variants import assign_variant
from ..scenarios.compiler import CompiledScenario
from ..scenarios.content import Button, Image
from .model import CueOffer

__all__ = ["offer_content", "restored_offer"]


def offer_content(
    scenario: CompiledScenario, subject: str, context: Mapping[str, object], stopped: Collection[tuple[str, str]]
) -> dict[str, Any]:
    """CueOffer fields (message, title, channel, upgrades, image, buttons, layout, variant, locale)."""
    off = {v for s, v in stopped if s == scenario.id}
    variant = assign_variant(subject, scenario.id, scenario.variant_weights, off)
    content = scenario.content(variant)
    shown = content.render(context)
    return {
        "message": shown.message,
        "title": shown.title,
        "channel": content.channel,
        "upgrades": content.upgrades,
        "image": shown.image,
        "buttons": shown.buttons,
        "layout": content.layout,
        "variant": content.variant,
        "locale": shown.locale,
    }


def restored_offer(base: CueOffer, stored: Mapping[str, Any] | None) -> CueOffer:
    """A re-offered cue with the presentation it was first shown with (CueOffer.content)."""
    if not isinstance(stored, Mapping):
        return base
    image = stored.get("image")
    return CueOffer(
        cue_id=base.cue_id,
        scenario_id=base.scenario_id,
        message=base.message,
        channel=base.channel,
        upgrades=tuple(stored.get("upgrades") or base.upgrades),
        created_at=base.created_at,
        expires_at=base.expires_at,
        title=str(stored.get("title", base.title)),
        image=Image(str(image["url"]), str(image["alt"])) if isinstance(image, Mapping) else None,
        buttons=tuple(Button(*(str(part) for part in b)) for b in stored.get("buttons") or ()),
        layout=str(stored.get("layout") or ""),
        variant=base.variant,
        locale=base.locale,
    )
