"""Reading what a metric needs from one per-sample row, with errors that say what was found.

Stdlib only (shared by the agent and the runner). A reader returns a plain value or raises
:class:`FieldError` naming the field, what was expected and what was found; the caller adds
the file, the line and the metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

Sample = Mapping[str, Any]
Label = str | int | float | bool


class SampleFormatError(ValueError):
    """The per-sample file is not what the metrics need."""


class MetricUndefined(SampleFormatError):
    """The metric has no value on these samples (e.g. ROC-AUC when only one class is present)."""


class FieldError(SampleFormatError):
    """One field of one row has the wrong shape."""

    def __init__(self, field: str, expected: str, found: Any) -> None:
        self.field = field
        self.expected = expected
        super().__init__(f"field {field!r}: expected {expected}, found {shown(found)}")


class MissingFieldError(FieldError):
    """A row lacks a field a metric reads."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.expected = "present"
        ValueError.__init__(self, f"missing field {field!r}")


def shown(value: Any) -> str:
    """A short description of a found value: its JSON type and (truncated) text."""
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}.get(
        type(value), "object" if isinstance(value, Mapping) else type(value).__name__
    )
    if value is None:
        return "null"
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return f"{kind} {text[:60] + '…' if len(text) > 60 else text}"


def class_key(value: Any) -> str:
    """How a class is named as a JSON object key: a string as is, anything else as JSON text.

    An integral float names the same class as the integer (``1.0`` → ``"1"``).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value)


def _get(row: Sample, field: str) -> Any:
    try:
        return row[field]
    except KeyError:
        raise MissingFieldError(field) from None


def raw(row: Sample, field: str) -> Any:
    """The field as found (the pre-catalogue metrics compared labels without checking them)."""
    return _get(row, field)


def hashable(row: Sample, field: str) -> Hashable:
    value = _get(row, field)
    if not isinstance(value, Hashable):
        raise FieldError(field, "a class label (string, number or boolean)", value)
    return value


def label(row: Sample, field: str) -> Label:
    """A class label: a string, a finite number or a boolean."""
    value = _get(row, field)
    if isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise FieldError(field, "a class label (string, number or boolean)", value)


def number(row: Sample, field: str) -> float:
    """A finite number (booleans are not numbers here)."""
    value = _get(row, field)
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
        if math.isfinite(result):
            return result
    raise FieldError(field, "a finite number", value)


def legacy_number(row: Sample, field: str) -> float:
    """What ``mean`` always accepted: anything ``float()`` takes."""
    value = _get(row, field)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FieldError(field, "a number", value) from None


def probability(row: Sample, field: str) -> float:
    value = _get(row, field)
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    raise FieldError(field, "a probability (a number from 0 to 1)", value)


def class_scores(
    row: Sample, field: str, classes: Sequence[str], *, probabilities: bool
) -> tuple[float, ...]:
    """One score per declared class, in the declared order.

    The field is an object keyed by class (JSON text of the class, e.g. ``"0"`` for 0) or
    a list in the order of the metric's ``classes``.
    """
    value = _get(row, field)
    what = "probabilities" if probabilities else "scores"
    expected = (
        f"{what} for the classes {list(classes)} (an object keyed by class, or a list of "
        f"{len(classes)} numbers in that order)"
    )
    if isinstance(value, Mapping):
        if set(value) != set(classes):
            raise FieldError(field, expected, value)
        items = [value[c] for c in classes]
    elif isinstance(value, list) and len(value) == len(classes):
        items = value
    else:
        raise FieldError(field, expected, value)
    out = []
    for item in items:
        if not isinstance(item, int | float) or isinstance(item, bool) or not math.isfinite(item):
            raise FieldError(field, expected, value)
        if probabilities and not 0.0 <= item <= 1.0:
            raise FieldError(field, f"{what} from 0 to 1 for the classes {list(classes)}", value)
        out.append(float(item))
    return tuple(out)


def text(row: Sample, field: str) -> str:
    value = _get(row, field)
    if isinstance(value, str):
        return value
    raise FieldError(field, "a string", value)


def texts(row: Sample, field: str) -> tuple[str, ...]:
    """One reference string, or a non-empty list of them (any one may match)."""
    value = _get(row, field)
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise FieldError(field, "a string or a non-empty list of strings", value)


def count(row: Sample, field: str) -> int:
    value = _get(row, field)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise FieldError(field, "a whole number ≥ 0", value)
