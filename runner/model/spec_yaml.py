"""Strict YAML reading for the files a user names (``eval.yaml``, sweep matrices).

The loader refuses custom tags, duplicate and non-scalar keys, non-finite numbers, alias
bombs, deep nesting and oversized files; every refusal is a :class:`SpecError` naming the
file and the line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from runner.errors import SpecError
from runner.model.base import decoded_text, read_input_file

MAX_SPEC_BYTES = 256 * 1024
MAX_ALIASES = 16
# Deeper YAML is refused before it is composed (the composer recurses per level).
MAX_YAML_DEPTH = 64


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also refuses duplicate and non-scalar keys, non-finite numbers,
    tags beyond plain JSON types and deep nesting, and counts aliases."""

    alias_count = 0
    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"more than {MAX_ALIASES} YAML aliases; refusing possible alias expansion",
                    event.start_mark,
                )
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "a mapping key must be a plain scalar, not a "
                    + ("sequence" if isinstance(key_node, yaml.SequenceNode) else "mapping"),
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first defined at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_finite_float(self, node: yaml.ScalarNode) -> float:
        value: float = self.construct_yaml_float(node)
        if not math.isfinite(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"non-finite number {node.value!r} is not allowed", node.start_mark
            )
        return value

    def construct_text(self, node: yaml.ScalarNode) -> str:
        return str(self.construct_scalar(node))

    def construct_refused(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"YAML type {node.tag} is not allowed in a spec", node.start_mark
        )


_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_finite_float)
# dates stay the text they were written as; a spec holds JSON types only
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _StrictLoader.construct_text)
for _tag in ("binary", "omap", "pairs", "set"):
    _StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _StrictLoader.construct_refused)


def load_yaml_bytes(data: bytes, *, source: str, what: str = "spec file") -> Any:
    """One YAML document from ``data`` (read from ``source``), strictly.

    Raises :class:`SpecError` naming ``source`` (and the line, where there is one) for
    text that is not UTF-8, malformed YAML, custom tags, duplicate or non-scalar keys,
    non-finite numbers, alias bombs, nesting deeper than :data:`MAX_YAML_DEPTH`, or
    not exactly one document.
    """
    text = decoded_text(data, what=what, source=source)
    try:
        loader = _StrictLoader(text)
        try:
            docs = []
            while loader.check_data():  # type: ignore[no-untyped-call]
                docs.append(loader.get_data())
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = getattr(exc, "problem", None) or str(exc)
        if "could not determine a constructor" in str(exc):
            tag = getattr(exc, "problem", "")
            problem = f"custom YAML tags are not allowed: {tag}"
        raise SpecError(
            f"malformed YAML in {source}", file=source, problems=[(where, str(problem))]
        ) from None
    except (ValueError, RecursionError) as exc:
        # e.g. an integer literal with more digits than Python converts
        raise SpecError(
            f"malformed YAML in {source}", file=source, problems=[("document", str(exc)[:200])]
        ) from None
    if len(docs) != 1:
        raise SpecError(
            f"{source}: expected exactly one YAML document, found {len(docs)}", file=source
        )
    return docs[0]


def load_yaml_document(path: Path, *, what: str = "spec file") -> Any:
    """Read one YAML document safely, raising :class:`SpecError` naming the file and line."""
    data = read_input_file(path, what=what, max_bytes=MAX_SPEC_BYTES)
    return load_yaml_bytes(data, source=str(path), what=what)
