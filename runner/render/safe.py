"""What a renderer shows of a bundle, made safe for where it is shown.

Every string of a predicate came from someone evalrun does not trust (the spec author,
the container, whoever handed the bundle over). Renderers take the predicate through
one of these views first, and the CLI writes everything through
:func:`runner._internal.sanitize.terminal_text`:

- :func:`markdown_view` — every string escaped for Markdown (no raw HTML, no control
  characters, no line breaks, bounded length): the Markdown renderers use it;
- :func:`line_view` — every string on one line and bounded: terminal tables use it.

A predicate without such characters comes back equal to itself, so the reports of
ordinary bundles do not change by a byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, JsonValue

from runner._internal.sanitize import map_strings, markdown_text, one_line

M = TypeVar("M", bound=BaseModel)


def _view(model: M, fn: Callable[[str], str]) -> M:
    data = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return type(model).model_validate(map_strings(data, fn))


def markdown_view(model: M) -> M:
    """A copy of ``model`` (a predicate or a part of one) with every string Markdown-safe."""
    return _view(model, markdown_text)


def line_view(model: M) -> M:
    """A copy of ``model`` with every string on one line, control characters escaped."""
    return _view(model, one_line)


def markdown_json(value: JsonValue) -> JsonValue:
    """Free-form JSON from a bundle (a lock, a capture) with every string Markdown-safe."""
    escaped: JsonValue = map_strings(value, markdown_text)
    return escaped


__all__ = ["line_view", "markdown_json", "markdown_view"]
