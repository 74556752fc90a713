"""YAML to plain data, remembering the line each key and item came from.

PyYAML's safe_load forgets positions; we compose the node graph ourselves so
that validation errors can name the line an admin has to fix. Duplicate keys,
which safe_load silently collapses, are reported too.

A scenario file is input the server must survive (it is read at start-up and
on every live reload), so parsing is bounded, each limit reported with a line:
what aliases add when expanded (433 bytes of "billion laughs" expand to 10^9
strings), nesting depth (PyYAML composes recursively: 800 levels raised
RecursionError), and the file's size (checked by the loader before reading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["MAX_ALIAS_VALUES", "MAX_DEPTH", "MAX_FILE_BYTES", "Located", "YamlProblem", "load_yaml"]

Path = tuple[str | int, ...]

# Values that aliases may add to a file when expanded: ample for sharing a condition block, far too
# little for a bomb, which is stopped at the alias that crosses it, before anything is expanded.
MAX_ALIAS_VALUES = 10_000
# Nesting levels of YAML collections; a condition three levels of all/any/not deep uses about ten.
MAX_DEPTH = 64
# Largest scenario file: 10,000 generated scenarios in one file (bench_eval.py) take about 4.5 MiB.
MAX_FILE_BYTES = 8 * 1024 * 1024


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


class _BoundedComposer(yaml.SafeLoader):
    """SafeLoader's composer with the depth and alias-expansion limits, checked as nodes are composed."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._through_aliases = 0
        # id(node) -> how many values the node expands to, aliases inside it expanded.
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:  # the anchor is still being composed: the value would contain itself
                raise YamlProblem(line, f"alias *{event.anchor} refers to a value that contains it")
            self._through_aliases += size
            if self._through_aliases > MAX_ALIAS_VALUES:
                raise YamlProblem(
                    line,
                    f"aliases expand to more than {MAX_ALIAS_VALUES:,} values (alias *{event.anchor} here); "
                    "write the values out or share less",
                )
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlProblem(line, f"nested too deep: more than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        self._sizes[id(node)] = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        return node


def load_yaml(text: str) -> Located:
    loader = _BoundedComposer(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlProblem(mark.line + 1 if mark else 1, str(exc.problem or exc)) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(1, str(exc)) from None
    finally:
        loader.dispose()
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
