"""Read scenario files from a folder and report every problem precisely.

Every issue names file, line and field, and all of them are collected in one
pass so an admin fixes a folder in one round. Loading is all-or-nothing: a
caller keeps serving its previous good set when this raises.

Several apps (brands) can share one installation: everything under
``apps/<app id>/`` belongs to that app. Its scenarios and routing rules apply
to that app only (``apps:`` may only repeat it), its queues are its own (an
engagement of another app never enters them), and it may have its own
``policy`` and ``routing`` sections beside the installation-wide ones at the
top level. Ids (scenarios, segments, milestones, outcomes, queues) stay unique
across the whole installation, so a report or an audit entry names one thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from pydantic import ValidationError

from .content import check_content
from .model import (
    _ATTRIBUTE_RE,
    PATTERN_WORDS,
    AllCondition,
    AnyCondition,
    MilestoneCondition,
    MilestoneSpec,
    NotCondition,
    OutcomeSpec,
    PolicySpec,
    RoutingSpec,
    ScenarioSpec,
    ScoreCondition,
    SegmentCondition,
    SegmentSpec,
    _condition_kind,
)
from .template import Template, TemplateError
from .yaml_lines import MAX_FILE_BYTES, Located, YamlProblem, load_yaml

__all__ = [
    "LoadedDefinition",
    "LoadedOutcome",
    "LoadedScenario",
    "LoadedSet",
    "RoutingPart",
    "ScenarioError",
    "ScenarioIssue",
    "app_of",
    "load_directory",
    "load_file",
    "load_text",
    "scenario_files",
    "walk_paths",
]

# A path into the YAML data, e.g. ("trigger", "all", 0).
Path = tuple[str | int, ...]

SUFFIXES = (".yaml", ".yml")
# The folder whose subfolders each hold one app's files: scenarios/apps/<app id>/...
APPS_FOLDER = "apps"
_APP_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True)
class ScenarioIssue:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f" {self.field}:" if self.field else ""
        return f"{self.file}:{self.line}:{where} {self.message}"


class ScenarioError(Exception):
    """The scenario files have problems; `issues` lists every one."""

    def __init__(self, issues: Sequence[ScenarioIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass(frozen=True, slots=True)
class LoadedScenario:
    spec: ScenarioSpec
    file: str
    line: int
    template: Template
    located: Located | None = None
    prefix: Path = ()
    # A short content hash of the file text it was loaded from: the version the console shows.
    version: str = ""

    def line_of(self, path: Path) -> int:
        return self.located.line_of((*self.prefix, *path)) if self.located else self.line


@dataclass(frozen=True, slots=True)
class LoadedDefinition:
    spec: SegmentSpec | MilestoneSpec
    file: str
    line: int
    located: Located | None = None
    prefix: Path = ()

    def line_of(self, path: Path) -> int:
        return self.located.line_of((*self.prefix, *path)) if self.located else self.line


@dataclass(frozen=True, slots=True)
class LoadedOutcome:
    spec: OutcomeSpec
    file: str
    line: int
    located: Located | None = None
    prefix: Path = ()

    def line_of(self, path: Path) -> int:
        return self.located.line_of((*self.prefix, *path)) if self.located else self.line


@dataclass(frozen=True, slots=True)
class RoutingPart:
    """A `routing:` section: the installation's (app "") or one app's."""

    spec: RoutingSpec
    at: tuple[str, int]
    line_of: Callable[[Path], int]
    app: str = ""


@dataclass(slots=True)
class LoadedSet:
    """Everything a folder of files defines, checked across files."""

    scenarios: list[LoadedScenario] = field(default_factory=list)
    segments: list[LoadedDefinition] = field(default_factory=list)
    milestones: list[LoadedDefinition] = field(default_factory=list)
    outcomes: list[LoadedOutcome] = field(default_factory=list)
    policy: PolicySpec = field(default_factory=PolicySpec)
    policy_at: tuple[str, int] | None = None
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    routing_at: tuple[str, int] | None = None
    routing_line_of: Callable[[Path], int] | None = None
    # Apps with a folder under apps/, and what each of them defines for itself.
    apps: set[str] = field(default_factory=set)
    app_policies: dict[str, tuple[PolicySpec, tuple[str, int]]] = field(default_factory=dict)
    app_routing: dict[str, RoutingPart] = field(default_factory=dict)
    # outcome id -> the app whose folder declares it
    outcome_owners: dict[str, str] = field(default_factory=dict)

    def merge(self, other: LoadedSet, issues: list[ScenarioIssue], app: str = "") -> None:
        self.scenarios.extend(other.scenarios)
        self.segments.extend(other.segments)
        self.milestones.extend(other.milestones)
        self.outcomes.extend(other.outcomes)
        if app:
            self._merge_app(other, issues, app)
            return
        if other.routing_at is not None:
            if self.routing_at is not None:
                file, line = other.routing_at
                at = f"{self.routing_at[0]}:{self.routing_at[1]}"
                issues.append(ScenarioIssue(file, line, "routing", f"routing is already defined at {at}"))
            else:
                self.routing, self.routing_at = other.routing, other.routing_at
                self.routing_line_of = other.routing_line_of
        if other.policy_at is not None:
            if self.policy_at is not None:
                file, line = other.policy_at
                issues.append(
                    ScenarioIssue(
                        file,
                        line,
                        "policy",
                        f"a policy is already defined at {self.policy_at[0]}:{self.policy_at[1]}",
                    )
                )
            else:
                self.policy, self.policy_at = other.policy, other.policy_at

    def _merge_app(self, other: LoadedSet, issues: list[ScenarioIssue], app: str) -> None:
        self.apps.add(app)
        self.outcome_owners.update((o.spec.id, app) for o in other.outcomes)
        if other.routing_at is not None:
            known = self.app_routing.get(app)
            file, line = other.routing_at
            if known is not None:
                at = f"{known.at[0]}:{known.at[1]}"
                issues.append(ScenarioIssue(file, line, "routing", f"app {app!r} already has routing at {at}"))
            else:
                line_of = other.routing_line_of or (lambda path: line)
                self.app_routing[app] = RoutingPart(other.routing, other.routing_at, line_of, app)
        if other.policy_at is not None:
            had = self.app_policies.get(app)
            file, line = other.policy_at
            if had is not None:
                at = f"{had[1][0]}:{had[1][1]}"
                issues.append(ScenarioIssue(file, line, "policy", f"app {app!r} already has a policy at {at}"))
            else:
                self.app_policies[app] = (other.policy, other.policy_at)

    def routing_parts(self) -> list[RoutingPart]:
        """Every routing section: each app's (by app id), then the installation's."""
        parts = [self.app_routing[app] for app in sorted(self.app_routing)]
        if self.routing_at is not None:
            line = self.routing_at[1]
            parts.append(RoutingPart(self.routing, self.routing_at, self.routing_line_of or (lambda path: line)))
        return parts

    def combined_routing(self) -> RoutingSpec:
        """One routing table: all queues; each app's rules (scoped to it) before the installation's."""
        parts = self.routing_parts()
        return RoutingSpec(
            queues=[q for part in parts for q in part.spec.queues],
            rules=[r for part in parts for r in part.spec.rules],
        )

    def queue_owners(self) -> dict[str, str]:
        """queue id -> the app whose folder defines it (installation-wide queues are absent)."""
        return {q.id: app for app, part in self.app_routing.items() for q in part.spec.queues}


def app_of(root: FsPath, path: FsPath) -> str:
    """The app a file belongs to: `<root>/apps/<app id>/...`; "" for the installation's own files."""
    parts = path.relative_to(root).parts
    return parts[1] if len(parts) > 2 and parts[0] == APPS_FOLDER else ""


def _scope_to_app(part: LoadedSet, app: str, name: str) -> list[ScenarioIssue]:
    """Everything of a file under apps/<app>/ applies to that app only; `apps:` may only repeat it."""
    issues: list[ScenarioIssue] = []
    if not _APP_ID.match(app):
        return [ScenarioIssue(name, 1, "", f"{APPS_FOLDER}/{app}/: not a valid app id (lowercase, digits, _ - .)")]
    only = f"a file under {APPS_FOLDER}/{app}/ applies to app {app!r} only"
    for i, item in enumerate(part.scenarios):
        if item.spec.apps and set(item.spec.apps) != {app}:
            issues.append(ScenarioIssue(item.file, item.line_of(("apps",)), "apps", only))
        part.scenarios[i] = dataclasses.replace(item, spec=item.spec.model_copy(update={"apps": [app]}))
    if part.routing_at is not None:
        rules = []
        for i, rule in enumerate(part.routing.rules):
            if rule.apps and set(rule.apps) != {app}:
                line = part.routing_line_of(("rules", i, "apps")) if part.routing_line_of else part.routing_at[1]
                issues.append(ScenarioIssue(part.routing_at[0], line, f"routing.rules[{i}].apps", only))
            rules.append(rule.model_copy(update={"apps": [app]}))
        part.routing = part.routing.model_copy(update={"rules": rules})
    return issues


def scenario_files(directory: FsPath) -> list[FsPath]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def load_directory(directory: str | FsPath) -> LoadedSet:
    root = FsPath(directory)
    if not root.is_dir():
        raise ScenarioError([ScenarioIssue(str(root), 1, "", "not a folder of scenario files")])
    issues: list[ScenarioIssue] = []
    result = LoadedSet()
    for path in scenario_files(root):
        try:
            text = _read(path)
        except ScenarioError as exc:
            issues.extend(exc.issues)
            continue
        part, found = _parse(text, str(path))
        issues.extend(found)
        app = app_of(root, path)
        if app:
            issues.extend(_scope_to_app(part, app, str(path)))
        result.merge(part, issues, app)
    issues.extend(_cross_check(result))
    if issues:
        raise ScenarioError(issues)
    return result


def load_file(path: str | FsPath) -> LoadedSet:
    return load_text(_read(FsPath(path)), str(path))


def _read(path: FsPath) -> str:
    """The file's text; a file over MAX_FILE_BYTES is refused at the line that crosses the limit, unread beyond."""
    name = str(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise _too_large(name, data.count(b"\n", 0, MAX_FILE_BYTES) + 1)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([ScenarioIssue(name, 1, "", f"cannot read file: {exc}")]) from None


def load_text(text: str, name: str) -> LoadedSet:
    if len(text) > MAX_FILE_BYTES:
        raise _too_large(name, text.count("\n", 0, MAX_FILE_BYTES) + 1)
    result, issues = _parse(text, name)
    issues.extend(_cross_check(result))
    if issues:
        raise ScenarioError(issues)
    return result


def _too_large(name: str, line: int) -> ScenarioError:
    limit = MAX_FILE_BYTES / (1024 * 1024)
    message = f"file too large: scenario files may be at most {limit:g} MiB; this line is past the limit"
    return ScenarioError([ScenarioIssue(name, line, "", message)])


def source_version(text: str) -> str:
    """A scenario's version: the first 12 hex digits of its file text's SHA-256, so any edit changes it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


SECTIONS = ("scenarios", "segments", "milestones", "outcomes", "policy", "routing")


def _parse(text: str, name: str) -> tuple[LoadedSet, list[ScenarioIssue]]:
    result = LoadedSet()
    try:
        located = load_yaml(text)
    except YamlProblem as exc:
        return result, [ScenarioIssue(name, exc.line, "", f"invalid YAML: {exc.message}")]
    data = located.data
    issues: list[ScenarioIssue] = []
    entries: list[tuple[str, Path, Any]] = []
    if isinstance(data, dict) and "id" not in data and any(k in SECTIONS for k in data):
        for key, value in data.items():
            if key not in SECTIONS:
                issues.append(
                    ScenarioIssue(
                        name,
                        located.line_of((key,)),
                        str(key),
                        "unknown section; expected " + ", ".join(SECTIONS),
                    )
                )
            elif key in ("policy", "routing"):
                entries.append((key, (key,), value))
            elif not isinstance(value, list):
                issues.append(ScenarioIssue(name, located.line_of((key,)), str(key), "expected a list"))
            else:
                entries.extend((key, (key, i), item) for i, item in enumerate(value))
    elif isinstance(data, dict):
        entries.append(("scenarios", (), data))
    elif isinstance(data, list) and data:
        entries.extend(("scenarios", (i,), item) for i, item in enumerate(data))
    else:
        what = "empty" if data in (None, []) else f"a {type(data).__name__}"
        issues.append(
            ScenarioIssue(
                name,
                1,
                "",
                f"expected a scenario, a list of scenarios or sections {', '.join(SECTIONS)}; the file is {what}",
            )
        )
    for kind, prefix, raw in entries:
        model = _MODELS[kind]
        try:
            spec = model.model_validate(raw)
        except ValidationError as exc:
            issues.extend(_issues_from(exc, located, prefix, raw, name))
            continue
        line = located.line_of(prefix)
        if isinstance(spec, ScenarioSpec):
            try:
                template = Template(spec.cue.message)
            except TemplateError as exc:
                issues.append(
                    ScenarioIssue(name, located.line_of((*prefix, "cue", "message")), "cue.message", str(exc))
                )
                continue
            # A key outside the context vocabulary can never have a value: it would always render as "".
            unknown = sorted(k for k in template.keys if not _ATTRIBUTE_RE.match(k))
            if unknown:
                keys = ", ".join(repr(k) for k in unknown)
                issues.append(
                    ScenarioIssue(
                        name,
                        located.line_of((*prefix, "cue", "message")),
                        "cue.message",
                        f"unknown template key {keys}; use a context key such as app.version, device.model, "
                        "location.city, user.<name> or attributes.<name>",
                    )
                )
                continue
            problems = check_content(spec)
            for path, message in problems:
                issues.append(ScenarioIssue(name, located.line_of((*prefix, *path)), _dotted(path), message))
            if problems:
                continue
            result.scenarios.append(LoadedScenario(spec, name, line, template, located, prefix, source_version(text)))
        elif isinstance(spec, SegmentSpec):
            result.segments.append(LoadedDefinition(spec, name, line, located, prefix))
        elif isinstance(spec, MilestoneSpec):
            result.milestones.append(LoadedDefinition(spec, name, line, located, prefix))
        elif isinstance(spec, OutcomeSpec):
            result.outcomes.append(LoadedOutcome(spec, name, line, located, prefix))
        elif isinstance(spec, PolicySpec):
            result.policy, result.policy_at = spec, (name, line)
        elif isinstance(spec, RoutingSpec):
            result.routing, result.routing_at = spec, (name, line)
            result.routing_line_of = lambda path, prefix=prefix: located.line_of((*prefix, *path))
    return result, issues


_MODELS: dict[str, type[ScenarioSpec | SegmentSpec | MilestoneSpec | OutcomeSpec | PolicySpec | RoutingSpec]] = {
    "scenarios": ScenarioSpec,
    "segments": SegmentSpec,
    "milestones": MilestoneSpec,
    "outcomes": OutcomeSpec,
    "policy": PolicySpec,
    "routing": RoutingSpec,
}


def walk_paths(cond: Any, path: Path) -> Iterator[tuple[Any, Path]]:
    """Each condition node with its path in the YAML data."""
    yield cond, path
    if isinstance(cond, AllCondition):
        for i, child in enumerate(cond.all):
            yield from walk_paths(child, (*path, "all", i))
    elif isinstance(cond, AnyCondition):
        for i, child in enumerate(cond.any):
            yield from walk_paths(child, (*path, "any", i))
    elif isinstance(cond, NotCondition):
        yield from walk_paths(cond.not_, (*path, "not"))


def _conditions(item: LoadedScenario | LoadedDefinition) -> Iterator[tuple[Any, Path]]:
    spec = item.spec
    if isinstance(spec, ScenarioSpec):
        if spec.target is not None:
            yield from walk_paths(spec.target, ("target",))
        yield from walk_paths(spec.trigger, ("trigger",))
    else:
        yield from walk_paths(spec.when, ("when",))


def _cross_check(loaded: LoadedSet) -> list[ScenarioIssue]:
    issues: list[ScenarioIssue] = []
    for kind, items in (
        ("scenario", loaded.scenarios),
        ("segment", loaded.segments),
        ("milestone", loaded.milestones),
        ("outcome", loaded.outcomes),
    ):
        seen: dict[str, LoadedScenario | LoadedDefinition | LoadedOutcome] = {}
        for item in items:
            first = seen.setdefault(item.spec.id, item)
            if first is not item:
                issues.append(
                    ScenarioIssue(
                        item.file,
                        item.line,
                        "id",
                        f"{kind} id {item.spec.id!r} is already used at {first.file}:{first.line}",
                    )
                )
    segments = {s.spec.id: s for s in loaded.segments}
    milestones = {m.spec.id for m in loaded.milestones}
    scored = {o.spec.id: o.spec.score for o in loaded.outcomes}
    defined: list[LoadedScenario | LoadedDefinition] = [*loaded.scenarios, *loaded.segments, *loaded.milestones]
    located: list[tuple[str, Callable[[Path], int], Iterator[tuple[Any, Path]], Path]] = [
        (item.file, item.line_of, _conditions(item), ()) for item in defined
    ]
    for part in loaded.routing_parts():
        rules = (
            pair for i, rule in enumerate(part.spec.rules) for pair in walk_paths(rule.when, ("rules", i, "when"))
        )
        located.append((part.at[0], part.line_of, rules, ("routing",)))
    for file, line_of, conditions, shown in located:
        for cond, path in conditions:
            if isinstance(cond, SegmentCondition) and cond.segment not in segments:
                field_name = _dotted((*shown, *path, "segment"))
                issues.append(ScenarioIssue(file, line_of(path), field_name, f"unknown segment {cond.segment!r}"))
            if isinstance(cond, MilestoneCondition) and cond.milestone not in milestones:
                field_name = _dotted((*shown, *path, "milestone"))
                issues.append(ScenarioIssue(file, line_of(path), field_name, f"unknown milestone {cond.milestone!r}"))
            if isinstance(cond, ScoreCondition) and not scored.get(cond.score):
                field_name = _dotted((*shown, *path, "score"))
                problem = "is not scored (score: false)" if cond.score in scored else "is not declared under outcomes:"
                issues.append(ScenarioIssue(file, line_of(path), field_name, f"outcome {cond.score!r} {problem}"))
    for outcome in loaded.outcomes:
        if outcome.spec.milestone not in milestones:
            line = outcome.line_of(("milestone",))
            issues.append(
                ScenarioIssue(outcome.file, line, "milestone", f"unknown milestone {outcome.spec.milestone!r}")
            )
    known = {s.spec.id for s in loaded.scenarios}
    for part in loaded.routing_parts():
        for i, rule in enumerate(part.spec.rules):
            for j, scenario_id in enumerate(rule.scenarios):
                if scenario_id not in known:
                    issues.append(
                        ScenarioIssue(
                            part.at[0],
                            part.line_of(("rules", i, "scenarios", j)),
                            f"routing.rules[{i}].scenarios[{j}]",
                            f"unknown scenario {scenario_id!r}",
                        )
                    )
    issues.extend(_app_boundaries(loaded))
    for scenario in loaded.scenarios:
        spec = scenario.spec
        if spec.outcome is not None and spec.outcome not in milestones:
            line = scenario.line_of(("outcome",))
            issues.append(ScenarioIssue(scenario.file, line, "outcome", f"unknown milestone {spec.outcome!r}"))
    issues.extend(_segment_cycles(segments))
    return issues


def _app_boundaries(loaded: LoadedSet) -> list[ScenarioIssue]:
    """Queues are unique and an app's queue takes only that app's engagements: whatever can send an
    engagement to it (a scenario's cue, a routing rule, a bot's hand-over) must be scoped to that app."""
    issues: list[ScenarioIssue] = []
    owners = loaded.queue_owners()
    where: dict[str, str] = {}
    for part in loaded.routing_parts():
        for i, queue in enumerate(part.spec.queues):
            line = part.line_of(("queues", i, "id"))
            if queue.id in where:
                message = f"queue {queue.id!r} is already defined at {where[queue.id]}"
                issues.append(ScenarioIssue(part.at[0], line, f"routing.queues[{i}].id", message))
            where.setdefault(queue.id, f"{part.at[0]}:{line}")
            handover = queue.bot.handover_queue if queue.bot is not None else ""
            if handover and owners.get(handover, part.app) != part.app:
                issues.append(
                    ScenarioIssue(
                        part.at[0],
                        part.line_of(("queues", i, "bot", "handover_queue")),
                        f"routing.queues[{i}].bot.handover_queue",
                        f"queue {handover!r} belongs to app {owners[handover]!r}",
                    )
                )
        for i, rule in enumerate(part.spec.rules):
            problem = _crosses(owners, rule.queue, rule.apps)
            if problem:
                issues.append(
                    ScenarioIssue(part.at[0], part.line_of(("rules", i, "queue")), f"routing.rules[{i}].queue", problem)
                )
    for scenario in loaded.scenarios:
        problem = _crosses(owners, scenario.spec.cue.queue, scenario.spec.apps)
        if problem:
            issues.append(ScenarioIssue(scenario.file, scenario.line_of(("cue", "queue")), "cue.queue", problem))
    return issues


def _crosses(owners: dict[str, str], queue: str | None, apps: list[str]) -> str:
    """Why sending engagements of `apps` (empty: every app) to `queue` would cross an app boundary; "" if not."""
    owner = owners.get(queue or "")
    if owner is None or set(apps) == {owner}:
        return ""
    return f"queue {queue!r} belongs to app {owner!r}; only what applies to that app alone (apps: [{owner}]) may use it"


def _segment_cycles(segments: dict[str, LoadedDefinition]) -> list[ScenarioIssue]:
    refs = {
        sid: [(c.segment, p) for c, p in _conditions(item) if isinstance(c, SegmentCondition)]
        for sid, item in segments.items()
    }
    issues: list[ScenarioIssue] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(sid: str, trail: list[str]) -> None:
        state[sid] = 1
        for ref, path in refs.get(sid, []):
            if state.get(ref) == 1:
                item = segments[sid]
                cycle = " -> ".join([*trail[trail.index(ref) :], ref]) if ref in trail else f"{sid} -> {ref}"
                issues.append(
                    ScenarioIssue(
                        item.file,
                        item.line_of(path),
                        _dotted((*path, "segment")),
                        f"segments refer to each other in a cycle: {cycle}",
                    )
                )
            elif state.get(ref) is None and ref in refs:
                visit(ref, [*trail, ref])
        state[sid] = 2

    for sid in sorted(refs):
        if state.get(sid) is None:
            visit(sid, [sid])
    return issues


def _issues_from(exc: ValidationError, located: Located, prefix: Path, raw: Any, name: str) -> Iterable[ScenarioIssue]:
    for error in exc.errors(include_url=False):
        path = _data_path(raw, error["loc"])
        field = _dotted(path)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field {path[-1]!r}" if path else "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "string_pattern_mismatch":
            pattern = str((error.get("ctx") or {}).get("pattern", ""))
            words = PATTERN_WORDS.get(pattern, "is not allowed here")
            message = f"{error['input']!r} {words}"
        yield ScenarioIssue(name, located.line_of((*prefix, *path)), field, message)


def _data_path(raw: Any, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Turn pydantic's error location into a path in the YAML data.

    Locations through a condition union carry the union's tag (e.g. "event")
    before the member's own fields; a tag is skipped when the element after it
    is a key of the same mapping.
    """
    path: list[str | int] = []
    node = raw
    elements = list(loc)
    for i, element in enumerate(elements):
        nxt = elements[i + 1] if i + 1 < len(elements) else None
        if isinstance(node, dict):
            if element == _condition_kind(node) and nxt is not None and nxt in node:
                continue
            key = "in" if element == "in_" else "not" if element == "not_" else element
            path.append(key)
            node = node.get(key) if key in node else None
        elif isinstance(node, list) and isinstance(element, int) and 0 <= element < len(node):
            path.append(element)
            node = node[element]
        elif node is None:
            path.append(element)
        # Otherwise the element is a tag or a validator name on a scalar; skip it.
    return tuple(path)


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
