"""Read scenario files from a folder and report every problem precisely.

Every issue names file, line and field, and all of them are collected in one
pass so an admin fixes a folder in one round. Loading is all-or-nothing: a
caller keeps serving its previous good set when this raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .model import ScenarioSpec, _condition_kind
from .template import Template, TemplateError
from .yaml_lines import Located, YamlProblem, load_yaml

__all__ = [
    "LoadedScenario",
    "ScenarioError",
    "ScenarioIssue",
    "load_directory",
    "load_file",
    "scenario_files",
]

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


def scenario_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.parts)
    )


def load_directory(directory: str | Path) -> list[LoadedScenario]:
    root = Path(directory)
    if not root.is_dir():
        raise ScenarioError([ScenarioIssue(str(root), 1, "", "not a folder of scenario files")])
    issues: list[ScenarioIssue] = []
    loaded: list[LoadedScenario] = []
    for path in scenario_files(root):
        try:
            loaded.extend(load_file(path))
        except ScenarioError as exc:
            issues.extend(exc.issues)
    seen: dict[str, LoadedScenario] = {}
    for item in loaded:
        first = seen.setdefault(item.spec.id, item)
        if first is not item:
            issues.append(
                ScenarioIssue(
                    item.file,
                    item.line,
                    "id",
                    f"scenario id {item.spec.id!r} is already used at {first.file}:{first.line}",
                )
            )
    if issues:
        raise ScenarioError(issues)
    return loaded


def load_file(path: str | Path) -> list[LoadedScenario]:
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([ScenarioIssue(name, 1, "", f"cannot read file: {exc}")]) from None
    return load_text(text, name)


def load_text(text: str, name: str) -> list[LoadedScenario]:
    try:
        located = load_yaml(text)
    except YamlProblem as exc:
        raise ScenarioError([ScenarioIssue(name, exc.line, "", f"invalid YAML: {exc.message}")]) from None
    entries, issues = _entries(located, name)
    out: list[LoadedScenario] = []
    for prefix, raw in entries:
        try:
            spec = ScenarioSpec.model_validate(raw)
        except ValidationError as exc:
            issues.extend(_issues_from(exc, located, prefix, raw, name))
            continue
        line = located.line_of(prefix)
        try:
            template = Template(spec.cue.message)
        except TemplateError as exc:
            issues.append(
                ScenarioIssue(name, located.line_of((*prefix, "cue", "message")), "cue.message", str(exc))
            )
            continue
        out.append(LoadedScenario(spec, name, line, template))
    if issues:
        raise ScenarioError(issues)
    return out


def _entries(
    located: Located, name: str
) -> tuple[list[tuple[tuple[str | int, ...], Any]], list[ScenarioIssue]]:
    data = located.data
    base: tuple[str | int, ...]
    if isinstance(data, dict) and "scenarios" in data and set(data) == {"scenarios"}:
        data, base = data["scenarios"], ("scenarios",)
    else:
        base = ()
    if isinstance(data, dict):
        return [(base, data)], []
    if isinstance(data, list) and data:
        return [((*base, i), item) for i, item in enumerate(data)], []
    what = "empty" if data in (None, []) else f"a {type(data).__name__}"
    return [], [
        ScenarioIssue(
            name, 1, "", f"expected a scenario, a list of scenarios or `scenarios:`; the file is {what}"
        )
    ]


def _issues_from(
    exc: ValidationError, located: Located, prefix: tuple[str | int, ...], raw: Any, name: str
) -> Iterable[ScenarioIssue]:
    for error in exc.errors(include_url=False):
        path = _data_path(raw, error["loc"])
        field = _dotted(path)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field {path[-1]!r}" if path else "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
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
