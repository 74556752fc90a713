"""A cue's content: texts per locale, image, buttons and layout, per A/B variant.

Compiled once when files load: every text is parsed into a Template there, so a broken
placeholder is a load error with file and line, and the hot path only picks a locale and
fills in context values. The locale is chosen before templating (pt-BR, then pt, then
the default texts), so a translation's own placeholders are what gets filled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .model import VARIANT_FIELDS, CueSpec, ScenarioSpec
from .template import Template, TemplateError

__all__ = [
    "Button",
    "CueContent",
    "Image",
    "Rendered",
    "Texts",
    "check_content",
    "compile_contents",
    "locale_chain",
    "merged_cue",
]


@dataclass(frozen=True, slots=True)
class Button:
    id: str
    label: str
    action: str  # accept | decline | dismiss | open_url
    channel: str = ""  # accept: the channel to engage on ("" = the cue's)
    url: str = ""  # open_url: a deep link or web address


@dataclass(frozen=True, slots=True)
class Image:
    url: str
    alt: str


@dataclass(frozen=True, slots=True)
class Texts:
    """One locale's texts; None falls back to the default locale's."""

    title: Template | None
    message: Template | None
    buttons: Mapping[str, str]
    image_alt: str | None


@dataclass(frozen=True, slots=True)
class Rendered:
    locale: str  # the locale tag as written in the file, "" for the default texts
    title: str
    message: str
    buttons: tuple[Button, ...]
    image: Image | None


@dataclass(frozen=True, slots=True)
class CueContent:
    """What one variant (or a scenario without variants) shows."""

    variant: str  # "" when the scenario has no variants
    weight: float
    channel: str
    upgrades: tuple[str, ...]
    image: Image | None
    buttons: tuple[Button, ...]
    layout: str  # "" | banner | modal | bubble
    default: Texts
    # Lower-cased tag -> (tag as written, texts).
    locales: Mapping[str, tuple[str, Texts]]

    # The device locale -> what `render` picks for it before templating (`_Picked`), filled on first use: a
    # fleet has a few dozen locales, and the pick (locale chain, button labels, image alt) was most of a
    # render. Not part of the value (compare, hash, repr).
    picked: dict[object, _Picked] = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def chain(self, device_locale: object) -> list[tuple[str, Texts]]:
        """The device's locales that have texts, most specific first: pt-BR, then pt."""
        return [self.locales[tag] for tag in locale_chain(device_locale) if tag in self.locales]

    def render(self, context: Mapping[str, object]) -> Rendered:
        """Each text from the most specific locale that has it (pt-BR, pt, then the default), then filled in."""
        device_locale = context.get("device.locale")
        picked = self.picked.get(device_locale)
        if picked is None:
            picked = self._pick(device_locale)
            if len(self.picked) < _PICKED_LOCALES:  # bounded: the locale is the device's to choose
                self.picked[device_locale] = picked
        title = picked.title
        return Rendered(
            locale=picked.locale,
            title=title.render(context) if title is not None else "",
            message=picked.message.render(context),
            buttons=picked.buttons,
            image=picked.image,
        )

    def _pick(self, device_locale: object) -> _Picked:
        found = self.chain(device_locale)
        texts = [t for _, t in found] + [self.default]
        buttons = tuple(
            Button(
                b.id, next((t.buttons[b.id] for t in texts if b.id in t.buttons), b.label), b.action, b.channel, b.url
            )
            for b in self.buttons
        )
        image = self.image
        alt = next((t.image_alt for t in texts if t.image_alt), None)
        if image is not None and alt:
            image = Image(image.url, alt)
        return _Picked(
            locale=found[0][0] if found else "",
            title=next((t.title for t in texts if t.title is not None), None),
            message=next(t.message for t in texts if t.message is not None),
            buttons=buttons,
            image=image,
        )


# At most this many device locales remembered per content (a few dozen in a real fleet).
_PICKED_LOCALES = 256


@dataclass(frozen=True, slots=True)
class _Picked:
    """A content's texts for one device locale, chosen, not yet filled in."""

    locale: str
    title: Template | None
    message: Template
    buttons: tuple[Button, ...]
    image: Image | None


def locale_chain(device_locale: object) -> Iterator[str]:
    """pt_BR / pt-BR -> "pt-br", then "pt": ever shorter prefixes of the tag, lower-cased."""
    if not isinstance(device_locale, str) or not device_locale:
        return
    parts = device_locale.replace("_", "-").lower().split("-")
    for n in range(len(parts), 0, -1):
        yield "-".join(parts[:n])


def merged_cue(cue: CueSpec, variant: Mapping[str, Any]) -> dict[str, Any]:
    """The cue's fields as data, with a variant's replacements (the fields it sets) laid over them.

    Locales merge per locale and text, so a variant that rewords the message only translates the
    message and keeps the cue's translated title and button labels.
    """
    data = cue.model_dump(mode="json", by_alias=True, exclude_none=True)
    for name in VARIANT_FIELDS:
        if variant.get(name) is None:
            continue
        if name == "locales":
            merged: dict[str, Any] = {tag: dict(texts) for tag, texts in data.get("locales", {}).items()}
            for tag, texts in variant["locales"].items():
                base = merged.setdefault(tag, {})
                buttons = {**base.get("buttons", {}), **texts.get("buttons", {})}
                base.update(texts)
                if buttons:
                    base["buttons"] = buttons
            data["locales"] = merged
        else:
            data[name] = variant[name]
    return data


def _texts(title: str | None, message: str | None, buttons: Mapping[str, str], alt: str | None) -> Texts:
    return Texts(
        title=Template(title) if title else None,
        message=Template(message) if message else None,
        buttons=dict(buttons),
        image_alt=alt,
    )


def _content(variant: str, weight: float, cue: CueSpec) -> CueContent:
    return CueContent(
        variant=variant,
        weight=weight,
        channel=cue.channel.value,
        upgrades=tuple(u.value for u in cue.upgrades),
        image=Image(cue.image.url, cue.image.alt) if cue.image else None,
        buttons=tuple(
            Button(b.id, b.label, b.action.value, b.channel.value if b.channel else "", b.url or "")
            for b in cue.buttons
        ),
        layout=cue.layout.value if cue.layout else "",
        default=_texts(cue.title, cue.message, {}, None),
        locales={
            tag.lower(): (tag, _texts(spec.title, spec.message, spec.buttons, spec.image_alt))
            for tag, spec in cue.locales.items()
        },
    )


def compile_contents(spec: ScenarioSpec) -> tuple[CueContent, ...]:
    """One content per variant, in file order (the first is the control); one unnamed without variants.

    Assumes the loader checked the files (merged variants validate, templates parse).
    """
    if not spec.variants:
        return (_content("", 1.0, spec.cue),)
    return tuple(
        _content(v.id, v.weight, CueSpec.model_validate(merged_cue(spec.cue, v.model_dump(exclude_none=True))))
        for v in spec.variants
    )


Path = tuple[str | int, ...]


def check_content(spec: ScenarioSpec) -> list[tuple[Path, str]]:
    """Problems with a scenario's cue content the models cannot see, each with its path in the file.

    Variants are laid over the cue and checked as whole cues; every text must parse as a template;
    a translation must use the same placeholders as the default text it translates.
    """
    problems: list[tuple[Path, str]] = []
    problems.extend(_check_cue(spec.cue, ("cue",), lambda _field: ("cue",)))
    for i, variant in enumerate(spec.variants):
        given = variant.model_dump(mode="json", exclude_none=True)
        here: Path = ("variants", i)
        try:
            merged = CueSpec.model_validate(merged_cue(spec.cue, given))
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                loc = tuple(error["loc"])
                path = (*here, *loc) if loc and loc[0] in given else here
                problems.append((path, error["msg"].removeprefix("Value error, ")))
            continue
        untranslated = [
            f"{tag}.{text}"
            for tag, texts in spec.cue.locales.items()
            for text in ("message", "title")
            if text in given
            and getattr(texts, text) is not None
            and (given.get("locales", {}).get(tag) or {}).get(text) is None
        ]
        if untranslated:
            problems.append(
                (
                    (*here, "locales") if "locales" in given else here,
                    f"this variant rewords the cue but does not translate {', '.join(untranslated)}: those users "
                    "would see the control's translation",
                )
            )
            continue
        problems.extend(_check_cue(merged, here, lambda field, g=given, h=here: h if field in g else ("cue",)))
    # A variant that keeps the cue's buttons or locales would report their problems a second time.
    return list(dict.fromkeys(problems))


def _check_cue(cue: CueSpec, prefix: Path, origin: Any) -> list[tuple[Path, str]]:
    """`origin(field)`: where a field of this (possibly merged) cue was written."""
    problems: list[tuple[Path, str]] = []
    defaults: dict[str, frozenset[str]] = {}
    for field_name in ("message", "title"):
        text = getattr(cue, field_name)
        try:
            defaults[field_name] = Template(text).keys
        except TemplateError as exc:
            if not (field_name == "message" and prefix == ("cue",)):  # the loader reports the cue's own message
                problems.append(((*origin(field_name), field_name), str(exc)))
    button_ids = {b.id for b in cue.buttons}
    allowed = {cue.channel, *cue.upgrades}
    for i, button in enumerate(cue.buttons):
        if button.channel is not None and button.channel not in allowed:
            problems.append(
                (
                    (*origin("buttons"), "buttons", i, "channel"),
                    f"{button.channel.value!r} is neither the cue's channel nor one of its upgrades",
                )
            )
    for tag, texts in cue.locales.items():
        at: Path = (*origin("locales"), "locales", tag)
        for field_name in ("message", "title"):
            text = getattr(texts, field_name)
            if text is None:
                continue
            try:
                keys = Template(text).keys
            except TemplateError as exc:
                problems.append(((*at, field_name), str(exc)))
                continue
            default = defaults.get(field_name)
            if default is not None and keys != default:
                problems.append(
                    (
                        (*at, field_name),
                        f"locale {tag!r} uses placeholders {_shown(keys)} but the default {field_name} uses "
                        f"{_shown(default)}",
                    )
                )
        for button_id in texts.buttons:
            if button_id not in button_ids:
                problems.append(((*at, "buttons", button_id), f"no button {button_id!r} in this cue"))
        if texts.image_alt is not None and cue.image is None:
            problems.append(((*at, "image_alt"), "the cue has no image"))
    return problems


def _shown(keys: frozenset[str]) -> str:
    return ", ".join(f"{{{{ {k} }}}}" for k in sorted(keys)) if keys else "none"
