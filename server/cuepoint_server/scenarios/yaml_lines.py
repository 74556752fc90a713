"""YAML to plain data, remembering the line each key and item came from.

PyYAML's safe_load forgets positions; we compose the node graph ourselves so
that validation errors can name the line an admin has to fix. Duplicate keys,
which safe_load silently collapses, are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["Located", "YamlProblem", "load_yaml"]

Path = tuple[str | int, ...]


@dataclass
class Located:
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int:
        """Line of the deepest known prefix of `path` (1-based)."""
        for cut in range(len(path), -1, -1):
            line = self.lines.get(path[:cut])
            if line is not None:
                return line
        return 1


class YamlProblem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def load_yaml(text: str) -> Located:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlProblem(mark.line + 1 if mark else 1, str(exc.problem or exc)) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(1, str(exc)) from None
    located = Located(None)
    if node is None:
        return located
    located.lines[()] = node.start_mark.line + 1
    located.data = _convert(node, (), located.lines)
    return located


def _convert(node: yaml.Node, path: Path, lines: dict[Path, int]) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if isinstance(key, list | dict):
                raise YamlProblem(key_node.start_mark.line + 1, "mapping keys must be plain values")
            if key in out:
                raise YamlProblem(key_node.start_mark.line + 1, f"duplicate key {key!r}")
            child = (*path, key)
            lines[child] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, child, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            items.append(_convert(item, child, lines))
        return items
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return _convert(node, (), {})
    # Resolve tags (int, float, bool, null) the way safe_load would.
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
