"""Text from a bundle, a registry or a container, made safe to show.

Anything evalrun did not write itself (a predicate's strings, a tar member's name, a
registry's error detail) may carry terminal escape sequences, carriage returns that
overwrite a line, bidi controls that reorder it, lone surrogates that cannot be
encoded, newlines that forge a line of evalrun's own output, or raw HTML for a
Markdown viewer. These functions neutralise all of it by showing each such character
as a visible escape (``\\x1b``, ``\\u202e``); text without them is returned unchanged,
so reports of ordinary bundles stay byte-identical.

- :func:`terminal_text` — a whole output (newlines and tabs kept): what the CLI writes.
- :func:`one_line` — one value inside a line or a table cell, length-bounded.
- :func:`markdown_text` — one value inside Markdown: :func:`one_line` plus raw HTML
  escaped and table pipes escaped.
- :func:`map_strings` — apply one of them to every key and string of a JSON value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# C0 and C1 controls and DEL; format characters that reorder or hide text (bidi
# embeddings, overrides and isolates, zero-width characters, the BOM, tag characters);
# line and paragraph separators; lone surrogates.
_INVISIBLE = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f"
    "\u00ad\u061c\u115f\u1160\u17b4\u17b5\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb"
    "\ud800-\udfff"
    "\U000e0000-\U000e007f"
)
_TERMINAL = re.compile(f"[{_INVISIBLE}]")
_LINE = re.compile(f"[{_INVISIBLE}\n\t]")
_MARKDOWN = re.compile(f"[{_INVISIBLE}\n\t&<>|]")
_MARKDOWN_SAFE = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|"}

# A value longer than this is cut when shown (the bundle keeps all of it).
VALUE_LIMIT = 2000


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _shown(match: re.Match[str]) -> str:
    return _escape(match.group())


def _cut(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text) - limit} more characters)"


# Printable ASCII, newline and tab: the characters :data:`_TERMINAL` never matches.
_PLAIN_ASCII = bytes(range(0x20, 0x7F)) + b"\n\t"


def _has_invisible(text: str) -> bool:
    """Whether :data:`_TERMINAL` matches somewhere in ``text``.

    The regex looks at every character (~10 ns each: 0.15 s for ``runs ls`` of 100,000
    runs). Output is mostly plain ASCII, which it never matches: dropping those bytes
    from the UTF-8 form (C speed) leaves every other character whole, in order, and the
    regex runs over what is left. Text that cannot be UTF-8 (lone surrogates, which the
    regex matches) goes to the regex as it is.
    """
    try:
        rest = text.encode("utf-8").translate(None, _PLAIN_ASCII)
    except UnicodeEncodeError:
        return _TERMINAL.search(text) is not None
    return _TERMINAL.search(rest.decode("utf-8")) is not None


def terminal_text(text: str) -> str:
    """``text`` with every control character but newline and tab shown as an escape."""
    return _TERMINAL.sub(_shown, text) if _has_invisible(text) else text


def is_one_line(text: str) -> bool:
    """Whether ``text`` shows as itself on one line (no character :func:`one_line` escapes)."""
    return _LINE.search(text) is None


def one_line(text: object, *, limit: int | None = VALUE_LIMIT) -> str:
    """``str(text)`` as one line: newlines, tabs and every control character escaped;
    longer than ``limit`` characters: cut, saying how much was left out."""
    value = _cut(str(text), limit)
    return _LINE.sub(_shown, value) if _LINE.search(value) else value


def markdown_text(text: object, *, limit: int | None = VALUE_LIMIT) -> str:
    """``str(text)`` for a Markdown line or table cell: :func:`one_line`, with ``&``, ``<``,
    ``>`` written as HTML entities (no raw HTML reaches a viewer) and ``|`` escaped."""
    value = _cut(str(text), limit)
    if not _MARKDOWN.search(value):
        return value
    return _MARKDOWN.sub(lambda m: _MARKDOWN_SAFE.get(m.group()) or _escape(m.group()), value)


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """A copy of the JSON ``value`` with ``fn`` applied to every object key and string."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(str(k)): map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [map_strings(v, fn) for v in value]
    return value


def exception_text(exc: BaseException, *, limit: int = 300) -> str:
    """What went wrong, in one line: a pydantic ValidationError as its first error
    (``field: message``, and how many more), anything else as its text."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        found = errors(include_url=False, include_input=False)
        if found:
            first = found[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            return one_line(f"{where}: {first.get('msg', '')}{more}", limit=limit)
    return one_line(str(exc) or type(exc).__name__, limit=limit)


__all__ = [
    "VALUE_LIMIT",
    "exception_text",
    "map_strings",
    "markdown_text",
    "one_line",
    "terminal_text",
]
