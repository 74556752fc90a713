"""Read scenario files from a folder and report every problem precisely.

Every issue names file, line and field, and all of them are collected in one
pass so an admin fixes a folder in one round. Loading is all-or-nothing: a
caller keeps serving its previous good set when this raises.
"""

from __future__ import annotations

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
    "ScenarioError",
    "ScenarioIssue",
    "load_directory",
    "load_file",
    "load_text",
    "scenario_files",
    "walk_paths",
]

# A path into the YAML data, e.g. ("trigger", "all", 0).
Path = tuple[str | int, ...]

SUFFIXES = (".yaml", ".yml")


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

    def merge(self, other: LoadedSet, issues: list[ScenarioIssue]) -> None:
        self.scenarios.extend(other.scenarios)
        self.segments.extend(other.segments)
        self.milestones.extend(other.milestones)
        self.outcomes.extend(other.outcomes)
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
        result.merge(part, issues)
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
            result.scenarios.append(LoadedScenario(spec, name, line, template, located, prefix))
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
    if loaded.routing_at is not None:
        file, line = loaded.routing_at
        routing_lines = loaded.routing_line_of or (lambda path: line)
        rules = (
            pair for i, rule in enumerate(loaded.routing.rules) for pair in walk_paths(rule.when, ("rules", i, "when"))
        )
        located.append((file, routing_lines, rules, ("routing",)))
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
    if loaded.routing_at is not None:
        known = {s.spec.id for s in loaded.scenarios}
        routing_file, routing_line = loaded.routing_at
        rule_line = loaded.routing_line_of or (lambda path: routing_line)
        for i, rule in enumerate(loaded.routing.rules):
            for j, scenario_id in enumerate(rule.scenarios):
                if scenario_id not in known:
                    issues.append(
                        ScenarioIssue(
                            routing_file,
                            rule_line(("rules", i, "scenarios", j)),
                            f"routing.rules[{i}].scenarios[{j}]",
                            f"unknown scenario {scenario_id!r}",
                        )
                    )
    for scenario in loaded.scenarios:
        spec = scenario.spec
        if spec.outcome is not None and spec.outcome not in milestones:
            line = scenario.line_of(("outcome",))
            issues.append(ScenarioIssue(scenario.file, line, "outcome", f"unknown milestone {spec.outcome!r}"))
    issues.extend(_segment_cycles(segments))
    return issues


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
