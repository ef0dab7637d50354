"""The metric catalogue: each ``compute`` name, what it reads and which parameters it takes.

Stdlib only. One table (:data:`CATALOGUE`) serves both sides: the spec checks a metric's
parameters against it (:func:`definition_problems`, so the messages are the same wherever
a definition is checked), and :mod:`runner.shared.metric_functions` builds the computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from runner.shared.sample_fields import class_key

ROLES = ("label", "prediction", "score", "probabilities", "target", "reference", "n", "c")
PARAMETERS = ("average", "positive", "classes", "bins", "k", "normalize", "confusion_matrix")
# Computes that existed before the catalogue: their floats never change (old images agree).
LEGACY = ("accuracy", "error_rate", "macro_f1", "mean")

_LABELS = ("label", "prediction")
_SCORED = ("label", "probabilities")
_BINARY = ("label", "score")


class Kind(NamedTuple):
    """One compute name: what it reads, which parameters it takes, which CIs apply."""

    summary: str
    reads: tuple[str, ...]
    # what it reads when the metric names a ``positive`` class (None: the same as ``reads``)
    binary_reads: tuple[str, ...] | None = None
    params: frozenset[str] = frozenset()
    proportion: bool = False
    direction: Literal["higher_is_better", "lower_is_better"] = "higher_is_better"
    # the values it can take (None: unbounded on that side); reports scale their axes by it
    bounds: tuple[float | None, float | None] = (0.0, 1.0)


def _kind(summary: str, reads: tuple[str, ...], *params: str, **kw: Any) -> Kind:
    return Kind(summary, reads, params=frozenset(params), **kw)


CATALOGUE: dict[str, Kind] = {
    "accuracy": _kind(
        "share of predictions equal to the label", _LABELS, "confusion_matrix", proportion=True
    ),
    "error_rate": _kind(
        "1 - accuracy", _LABELS, "confusion_matrix", proportion=True, direction="lower_is_better"
    ),
    "balanced_accuracy": _kind("mean recall over the classes present", _LABELS, "confusion_matrix"),
    "precision": _kind(
        "precision of one class, or averaged", _LABELS, "average", "positive", "confusion_matrix"
    ),
    "recall": _kind(
        "recall of one class, or averaged", _LABELS, "average", "positive", "confusion_matrix"
    ),
    "f1": _kind("F1 of one class, or averaged", _LABELS, "average", "positive", "confusion_matrix"),
    "macro_f1": _kind(
        "F1 averaged over classes (same as f1 with average: macro)", _LABELS, "confusion_matrix"
    ),
    "roc_auc": _kind(
        "area under the ROC curve (binary, or one-vs-rest)",
        _SCORED,
        "average",
        "positive",
        "classes",
        binary_reads=_BINARY,
    ),
    "average_precision": _kind(
        "area under the precision-recall curve (PR-AUC)",
        _SCORED,
        "average",
        "positive",
        "classes",
        binary_reads=_BINARY,
    ),
    "log_loss": _kind(
        "mean negative log-likelihood of the true class",
        _SCORED,
        "positive",
        "classes",
        binary_reads=_BINARY,
        direction="lower_is_better",
        bounds=(0.0, None),
    ),
    "brier": _kind(
        "mean squared error of the probabilities",
        _SCORED,
        "positive",
        "classes",
        binary_reads=_BINARY,
        direction="lower_is_better",
        bounds=(0.0, 2.0),  # binary: at most 1; over several classes: at most 2
    ),
    "ece": _kind(
        "expected calibration error over equal-width bins",
        _SCORED,
        "positive",
        "classes",
        "bins",
        binary_reads=_BINARY,
        direction="lower_is_better",
    ),
    "mae": _kind(
        "mean absolute error",
        ("target", "prediction"),
        direction="lower_is_better",
        bounds=(0.0, None),
    ),
    "rmse": _kind(
        "root mean squared error",
        ("target", "prediction"),
        direction="lower_is_better",
        bounds=(0.0, None),
    ),
    "r2": _kind("coefficient of determination R²", ("target", "prediction"), bounds=(None, 1.0)),
    "exact_match": _kind(
        "share of predictions equal to a reference",
        ("prediction", "reference"),
        "normalize",
        proportion=True,
    ),
    "token_f1": _kind(
        "SQuAD token F1 against the best reference", ("prediction", "reference"), "normalize"
    ),
    "pass_at_k": _kind("unbiased pass@k from n generations, c correct", ("n", "c"), "k"),
    "mean": _kind("mean of a numeric per-sample field", (), bounds=(None, None)),
}
_AVERAGES = {
    "precision": ("micro", "macro", "weighted"),
    "recall": ("micro", "macro", "weighted"),
    "f1": ("micro", "macro", "weighted"),
    "roc_auc": ("macro", "weighted"),
    "average_precision": ("macro", "weighted"),
}
_NORMALIZE_DEFAULT = {"exact_match": "none", "token_f1": "squad"}


# _given, reads and definition_problems read a definition that may not be validated yet
# (the spec model's before-validator; a plan's metrics in the agent), hence a plain Mapping.


def _given(definition: Mapping[str, Any], key: str) -> bool:
    # ``positive: false`` names a class; only the confusion_matrix switch is off when false
    value = definition.get(key)
    return bool(value) if key == "confusion_matrix" else value is not None


def reads(definition: Mapping[str, Any]) -> dict[str, str]:
    """Role → per-sample field name for what this metric reads (``mean``: its ``field``)."""
    compute = definition["compute"]
    kind = CATALOGUE[compute]
    if compute == "mean":
        return {"field": definition["field"]}
    roles = kind.reads
    if kind.binary_reads is not None and _given(definition, "positive"):
        roles = kind.binary_reads
    renamed = {k: v for k, v in (definition.get("fields") or {}).items() if v is not None}
    return {role: renamed.get(role, role) for role in roles}


def value_bounds(compute: object) -> tuple[float | None, float | None] | None:
    """The values a ``compute`` can take, (low, high) with None for unbounded; None for a
    name the catalogue does not know (a custom metric, an odd bundle)."""
    kind = CATALOGUE.get(compute) if isinstance(compute, str) else None
    return kind.bounds if kind is not None else None


def _where(param: str) -> str:
    names = [c for c, k in CATALOGUE.items() if param in k.params]
    return ", ".join(names)


def definition_problems(definition: Mapping[str, Any]) -> list[str]:
    """What is wrong with a metric definition (empty when it is fine); messages name the key."""
    compute = definition.get("compute")
    kind = CATALOGUE.get(str(compute))
    if kind is None:
        return [f"unknown compute {compute!r}; expected one of {sorted(CATALOGUE)}"]
    problems = [
        f"{p!r} does not apply to {compute!r} (it applies to {_where(p)})"
        for p in PARAMETERS
        if _given(definition, p) and p not in kind.params
    ]
    if compute == "mean" and not definition.get("field"):
        problems.append("metric 'mean' needs 'field'")
    if compute not in LEGACY and definition.get("field") is not None:
        problems.append(
            f"'field' is for 'mean'; {compute!r} reads {list(kind.reads)} "
            "(rename those with 'fields: {role: field name}')"
        )
    given = {k: v for k, v in (definition.get("fields") or {}).items() if v is not None}
    if given and compute == "mean":
        problems.append("'fields' does not apply to 'mean' (it reads its 'field')")
    elif given:
        roles = reads(definition)
        for role in sorted(set(given) - set(roles)):
            problems.append(f"fields.{role}: {compute!r} reads {sorted(roles)} here, not {role!r}")
    average, positive = definition.get("average"), definition.get("positive")
    if compute in ("precision", "recall", "f1") and (average is None) == (positive is None):
        problems.append(
            f"{compute!r} needs either 'average' (micro, macro or weighted) or 'positive' "
            "(the one class it scores), not both"
            if average is not None
            else f"{compute!r} needs 'average' (micro, macro or weighted) or 'positive' "
            "(the one class it scores)"
        )
    if average is not None and compute in _AVERAGES and average not in _AVERAGES[compute]:
        problems.append(
            f"average {average!r} does not apply to {compute!r} "
            f"(expected one of {list(_AVERAGES[compute])})"
        )
    if kind.binary_reads is not None:
        if positive is not None and average is not None:
            problems.append(
                "give either 'positive' (binary, reads a 'score') or 'average' "
                "(one-vs-rest over 'classes'), not both"
            )
        classes = definition.get("classes")
        if positive is None and not classes:
            problems.append(
                f"{compute!r} needs 'positive' (the class its 'score' field scores) or "
                "'classes' (the classes its 'probabilities' field scores, in order)"
            )
        if positive is not None and classes:
            problems.append(
                "'classes' applies to multiclass 'probabilities'; with 'positive' the metric "
                "reads one 'score' per sample"
            )
        if classes:
            keys = [class_key(c) for c in classes]
            if len(set(keys)) != len(keys):
                problems.append(f"classes: duplicate classes in {list(classes)}")
    if compute == "ece" and not definition.get("bins"):
        problems.append("'ece' needs 'bins' (the number of equal-width bins over [0, 1])")
    if compute == "pass_at_k" and not definition.get("k"):
        problems.append("'pass_at_k' needs 'k'")
    method = (definition.get("ci") or {}).get("method")
    if method == "wilson" and not kind.proportion:
        proportions = ", ".join(c for c, k in CATALOGUE.items() if k.proportion)
        problems.append(f"the Wilson interval applies to proportions ({proportions})")
    return problems
