"""The one strict JSON reader for input evalrun did not write itself this run.

Bundle metadata, locks, registry manifests and container reports are parsed here:
duplicate object keys are refused (two readers must never see two different
documents), and so is every non-finite number in every spelling — ``NaN``,
``Infinity``, ``-Infinity``, and literals such as ``1e400`` that only overflow to
infinity when parsed. Nesting deeper than Python can parse is a ValueError too.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is not finite as a float")
    return value


def load_json_strict(data: bytes | str) -> Any:
    """Parse JSON, refusing duplicate object keys and non-finite numbers (ValueError)."""
    try:
        return json.loads(
            data,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


__all__ = ["load_json_strict"]
