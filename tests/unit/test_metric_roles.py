"""Metric roles: primary metrics gate, supplementary ones never do unless promoted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runner.errors import SpecError
from runner.shared.metrics import threshold_verdicts
from runner.model.predicate import RunPredicate
from runner.render.markdown import render_markdown
from runner.render.markdown import metric_table as _metric_table
from runner.model.spec import parse_spec

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits" / "eval.yaml"


def _metrics(*extra: dict) -> list[dict]:
    base = yaml.safe_load(EXAMPLE.read_text())
    spec = parse_spec({**base, "metrics": list(extra)}, source="eval.yaml")
    return [m.model_dump(mode="json") for m in spec.metrics]


def test_metrics_default_to_primary_and_gate():
    defs = _metrics({"name": "acc", "compute": "accuracy", "threshold": 0.9})
    assert defs[0]["role"] == "primary"
    v = threshold_verdicts(defs, {"acc": 0.5})
    assert v["acc"]["passed"] is False and v["acc"]["gating"] is True


def test_supplementary_threshold_is_reported_but_never_gates():
    defs = _metrics(
        {"name": "acc", "compute": "accuracy", "threshold": 0.9},
        {"name": "f1", "compute": "macro_f1", "threshold": 0.99, "role": "supplementary"},
    )
    v = threshold_verdicts(defs, {"acc": 0.95, "f1": 0.5})
    assert v["acc"]["passed"] is True
    assert v["f1"]["passed"] is None
    assert v["f1"]["threshold_met"] is False
    assert v["f1"]["gating"] is False


def test_promoted_supplementary_metric_gates():
    defs = _metrics(
        {"name": "acc", "compute": "accuracy"},
        {
            "name": "f1",
            "compute": "macro_f1",
            "threshold": 0.99,
            "role": "supplementary",
            "promoted": {"justification": "class balance matters for this release"},
        },
    )
    v = threshold_verdicts(defs, {"acc": 0.95, "f1": 0.5})
    assert v["f1"]["passed"] is False and v["f1"]["gating"] is True


@pytest.mark.parametrize(
    "metric",
    [
        {"name": "f1", "compute": "macro_f1", "promoted": {"justification": "x"}},
        {
            "name": "f1",
            "compute": "macro_f1",
            "role": "supplementary",
            "promoted": {"justification": "  "},
        },
        {"name": "f1", "compute": "macro_f1", "role": "secondary"},
    ],
)
def test_promotion_needs_a_supplementary_metric_and_a_justification(metric):
    with pytest.raises(SpecError):
        _metrics(metric)


def metric_table(predicate: RunPredicate) -> str:
    return _metric_table(predicate.metrics)


def _predicate() -> RunPredicate:
    ci = {"low": 0.9, "high": 0.95, "level": 0.95, "method": "bootstrap_percentile"}
    return RunPredicate.model_validate({
        "run_id": "r-roles",
        "metrics": [
            {
                "name": "acc",
                "value": 0.93,
                "ci": ci,
                "threshold": 0.9,
                "passed": True,
                "role": "primary",
                "gating": True,
                "promoted": None,
                "threshold_met": True,
            },
            {
                "name": "f1",
                "value": 0.5,
                "ci": ci,
                "threshold": 0.99,
                "passed": None,
                "role": "supplementary",
                "gating": False,
                "promoted": None,
                "threshold_met": False,
            },
            {
                "name": "ece",
                "value": 0.1,
                "ci": ci,
                "threshold": 0.2,
                "passed": True,
                "direction": "lower_is_better",
                "role": "supplementary",
                "gating": True,
                "promoted": {"justification": "calibration is a release criterion"},
                "threshold_met": True,
            },
        ]
    })


def test_terminal_table_and_report_show_roles_and_promotions():
    table = metric_table(_predicate())
    assert table.splitlines()[0].split()[:2] == ["metric", "role"]
    assert "missed (not gating)" in table
    assert "supplementary (promoted)" in table
    assert "promoted to gating: ece — calibration is a release criterion" in table
    md = render_markdown(_predicate())
    assert "| metric | role | value |" in md
    assert "| f1 | supplementary |" in md
    assert "promoted to gating: ece — calibration is a release criterion" in md


def test_a_partial_field_rename_signs_only_the_renamed_fields():
    from runner.model.predicate import MetricDefinition
    from runner.model.spec_metrics import MetricSpec

    spec = MetricSpec.model_validate(
        {"name": "auc", "compute": "roc_auc", "positive": 1, "fields": {"score": "p1"}}
    )
    definition = spec.definition()
    assert definition["fields"] == {"score": "p1"}
    assert MetricDefinition.model_validate(definition | {"gating": True}).fields == {"score": "p1"}
