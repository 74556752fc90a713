"""A/B variant assignment: stable, matches its weights, and stopping a variant moves only its users.

Also the loader's checks of rich cue content (file, line, field) and the funnel's statistics.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuepoint_server.engine.holdout import holdout_draw
from cuepoint_server.engine.variants import assign_variant, variant_draw
from cuepoint_server.reporting.stats import two_proportion_test, wilson_interval
from cuepoint_server.scenarios.compiler import compile_scenario
from cuepoint_server.scenarios.content import locale_chain
from cuepoint_server.scenarios.loader import ScenarioError, load_text

ids = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True)
weights = st.lists(st.floats(min_value=0.05, max_value=100), min_size=2, max_size=5)


@given(subject=st.text(min_size=1, max_size=40), scenario=ids, w=weights)
def test_assignment_is_a_pure_function_of_subject_scenario_and_weights(
    subject: str, scenario: str, w: list[float]
) -> None:
    variants = [(f"v{i}", x) for i, x in enumerate(w)]
    first = assign_variant(subject, scenario, variants)
    # Same answer on every call, i.e. on every device, server and restart (nothing else goes in).
    assert all(assign_variant(subject, scenario, list(variants)) == first for _ in range(3))
    assert first in {v for v, _ in variants}
    assert 0 <= variant_draw(subject, scenario) < 1


@settings(max_examples=25, deadline=None)
@given(scenario=ids, w=weights)
def test_assignment_matches_the_weights_within_tolerance(scenario: str, w: list[float]) -> None:
    variants = [(f"v{i}", x) for i, x in enumerate(w)]
    n = 4000
    seen = Counter(assign_variant(f"user:{i}", scenario, variants) for i in range(n))
    total = sum(w)
    for variant, weight in variants:
        share = weight / total
        # Five standard deviations of a binomial share: fails by chance about once in 3.5 million.
        tolerance = 5 * math.sqrt(share * (1 - share) / n)
        assert abs(seen[variant] / n - share) <= tolerance, (variant, seen[variant] / n, share)


@given(subject=st.text(min_size=1, max_size=40), scenario=ids, w=weights, data=st.data())
def test_stopping_a_variant_moves_only_its_users_to_the_control(
    subject: str, scenario: str, w: list[float], data: st.DataObject
) -> None:
    variants = [(f"v{i}", x) for i, x in enumerate(w)]
    stopped = data.draw(st.sets(st.sampled_from([v for v, _ in variants[1:]])))
    before = assign_variant(subject, scenario, variants)
    after = assign_variant(subject, scenario, variants, stopped)
    assert after == ("v0" if before in stopped else before)


def test_variant_draw_is_independent_of_the_holdout_draw() -> None:
    pairs = [(variant_draw(f"user:{i}", "s"), holdout_draw(f"user:{i}", "s")) for i in range(2000)]
    both_low = sum(1 for v, h in pairs if v < 0.5 and h < 0.5) / len(pairs)
    assert abs(both_low - 0.25) < 0.05


def test_locale_chain_falls_back_to_the_language() -> None:
    assert list(locale_chain("pt_BR")) == ["pt-br", "pt"]
    assert list(locale_chain("zh-Hant-TW")) == ["zh-hant-tw", "zh-hant", "zh"]
    assert list(locale_chain("")) == []
    assert list(locale_chain(None)) == []


def test_wilson_interval_and_two_sided_test() -> None:
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    assert wilson_interval(0, 10)[0] == 0.0
    p, diff = two_proportion_test(60, 100, 40, 100)
    assert round(p, 4) == 0.0047 and diff == pytest.approx(0.2)
    assert two_proportion_test(0, 10, 0, 10) == (1.0, 0.0)
    assert two_proportion_test(1, 0, 1, 10) == (1.0, 0.0)


BROKEN = """\
id: rich
trigger: {event: sync_failed}
cue:
  message: "Hi {{ user.name }}, sync trouble?"
  channel: audio
  upgrades: [chat]
  buttons:
    - {id: call, label: Call, action: accept}
    - {id: vid, label: Video, action: accept, channel: video}
    - {id: faq, label: FAQ, action: open_url}
  locales:
    pt: {message: "Olá {{ user.nome }}?", buttons: {nope: x}}
    de: {message: "Hallo {{ user.name }"}
variants:
  - {id: control}
  - {id: short, message: "Sync?"}
"""


def test_rich_content_problems_are_reported_with_file_line_and_field() -> None:
    with pytest.raises(ScenarioError) as info:
        load_text(BROKEN, "f.yaml")
    assert [str(i) for i in info.value.issues] == [
        "f.yaml:10: cue.buttons[2]: an open_url button needs `url`, and only it may have one",
    ]
    fixed = BROKEN.replace("action: open_url}", "action: open_url, url: 'fitkit://faq'}")
    with pytest.raises(ScenarioError) as info:
        load_text(fixed, "f.yaml")
    assert [str(i) for i in info.value.issues] == [
        "f.yaml:9: cue.buttons[1].channel: 'video' is neither the cue's channel nor one of its upgrades",
        "f.yaml:12: cue.locales.pt.message: locale 'pt' uses placeholders {{ user.nome }} but the default "
        "message uses {{ user.name }}",
        "f.yaml:12: cue.locales.pt.buttons.nope: no button 'nope' in this cue",
        "f.yaml:13: cue.locales.de.message: unbalanced {{ or }} in message",
        "f.yaml:16: variants[1]: this variant rewords the cue but does not translate pt.message, de.message: "
        "those users would see the control's translation",
    ]


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ("[{id: only}]", "variants: give at least two variants (the first is the control), or none"),
        ("[{id: a}, {id: a}]", "variants: variant ids must be unique"),
        ("[{id: a}, {id: b, weight: 0}]", "variants[1].weight: Input should be greater than 0"),
        ("[{id: a}, {id: b, channel: chat, upgrades: [chat]}]", "variants[1]: upgrades must not repeat"),
    ],
)
def test_variant_problems_are_reported(variants: str, message: str) -> None:
    text = f"id: s\ntrigger: {{event: e}}\ncue: {{message: hi, channel: audio}}\nvariants: {variants}\n"
    with pytest.raises(ScenarioError) as info:
        load_text(text, "f.yaml")
    assert any(message in str(i) for i in info.value.issues), [str(i) for i in info.value.issues]


def test_variants_compile_to_whole_cues_over_the_scenario_cue() -> None:
    text = (
        "id: s\ntrigger: {event: e}\ncue: {message: hi, title: T, channel: audio, upgrades: [chat], layout: banner}\n"
        "variants: [{id: a, weight: 3}, {id: b, channel: chat, upgrades: [audio], layout: bubble}]\n"
    )
    (loaded,) = load_text(text, "f.yaml").scenarios
    scenario = compile_scenario(loaded)
    assert scenario.variant_weights == (("a", 3.0), ("b", 1.0))
    a, b = scenario.contents
    assert (a.channel, a.upgrades, a.layout) == ("audio", ("chat",), "banner")
    assert (b.channel, b.upgrades, b.layout) == ("chat", ("audio",), "bubble")
    assert b.render({}).title == "T"


def test_a_variant_merges_its_translations_over_the_cue_s() -> None:
    text = (
        "id: s\ntrigger: {event: e}\n"
        "cue:\n  message: hi\n  title: T\n  channel: audio\n  buttons: [{id: b, label: Go, action: accept}]\n"
        "  locales: {pt: {message: olá, title: Título, buttons: {b: Ir}}}\n"
        "variants: [{id: a}, {id: short, message: yo, locales: {pt: {message: oi}}}]\n"
    )
    (loaded,) = load_text(text, "f.yaml").scenarios
    short = compile_scenario(loaded).contents[1].render({"device.locale": "pt-PT"})
    assert (short.locale, short.message, short.title, short.buttons[0].label) == ("pt", "oi", "Título", "Ir")


def test_a_render_remembers_its_locale_pick_and_still_fills_each_context() -> None:
    text = (
        "id: s\ntrigger: {event: e}\n"
        "cue:\n  message: 'hi {{ app.version }}'\n  channel: audio\n  buttons: [{id: b, label: Go, action: accept}]\n"
        "  locales: {pt: {message: 'olá {{ app.version }}', buttons: {b: Ir}}}\n"
    )
    (loaded,) = load_text(text, "f.yaml").scenarios
    content = compile_scenario(loaded).contents[0]
    first = content.render({"device.locale": "pt-BR", "app.version": "1.0"})
    again = content.render({"device.locale": "pt-BR", "app.version": "2.0"})
    other = content.render({"device.locale": "en", "app.version": "2.0"})
    assert (first.locale, first.message, first.buttons[0].label) == ("pt", "olá 1.0", "Ir")
    assert (again.message, other.locale, other.message, other.buttons[0].label) == ("olá 2.0", "", "hi 2.0", "Go")
    # The pick is remembered per device locale, and only for so many: a device chooses its locale.
    for i in range(1000):
        content.render({"device.locale": f"x{i}", "app.version": "1"})
    assert len(content.picked) == 256
    assert content.render({"device.locale": "x999", "app.version": "3"}).message == "hi 3"
