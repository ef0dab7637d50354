"""How the metric catalogue is declared in eval.yaml, and how sample files are checked."""

import json
from pathlib import Path
from typing import get_args

import pytest
import yaml

from runner.errors import SpecError
from runner.model.predicate import MetricDefinition
from runner.model.spec import load_spec
from runner.model.spec_metrics import MetricCompute, MetricSpec
from runner.shared.metric_catalogue import CATALOGUE, definition_problems
from runner.shared.metrics import SampleFormatError, compute_metric
from runner.shared.sample_file import read_samples
from runner.workflows.compare import _primaries

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"


def _spec(tmp_path, *metrics):
    data = yaml.safe_load(EXAMPLE.read_text())
    data["metrics"] = list(metrics)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _problems(tmp_path, metric):
    with pytest.raises(SpecError) as exc:
        load_spec(_spec(tmp_path, metric))
    return dict(exc.value.problems)


def test_spec_computes_are_the_catalogue():
    # and `custom`: a metric function of the evaluation's own, recomputed in a sandbox
    assert set(get_args(MetricCompute)) == set(CATALOGUE) | {"custom"}


def test_a_catalogue_metric_set_loads(tmp_path):
    spec = load_spec(
        _spec(
            tmp_path,
            {"name": "f1-malignant", "compute": "f1", "positive": "malignant", "threshold": 0.9},
            {"name": "f1-macro", "compute": "f1", "average": "macro", "confusion_matrix": True},
            {
                "name": "auc",
                "compute": "roc_auc",
                "positive": "malignant",
                "fields": {"score": "p_malignant"},
                "ci": {"method": "bootstrap_bca"},
            },
            {"name": "auc-ovr", "compute": "roc_auc", "classes": [0, 1, 2], "average": "weighted"},
            {"name": "logloss", "compute": "log_loss", "positive": True},
            {"name": "ece", "compute": "ece", "classes": ["a", "b"], "bins": 15},
            {"name": "rmse", "compute": "rmse", "fields": {"target": "y"}},
            {
                "name": "em",
                "compute": "exact_match",
                "normalize": "squad",
                "ci": {"method": "wilson"},
            },
            {"name": "pass-10", "compute": "pass_at_k", "k": 10},
        )
    )
    by = {m.name: m for m in spec.metrics}
    assert by["logloss"].direction == "lower_is_better"  # losses default to lower-is-better
    assert by["rmse"].direction == "lower_is_better"
    assert by["f1-macro"].direction == "higher_is_better"
    assert by["auc"].fields is not None and by["auc"].fields.score == "p_malignant"
    assert by["logloss"].positive is True


def test_error_rate_keeps_its_old_default_direction(tmp_path):
    # changing it would change the digest (and run id) of every existing spec using it
    spec = load_spec(_spec(tmp_path, {"name": "err", "compute": "error_rate"}))
    assert spec.metrics[0].direction == "higher_is_better"


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ({"compute": "f1"}, "'f1' needs 'average' (micro, macro or weighted) or 'positive'"),
        ({"compute": "recall", "average": "macro", "positive": 1}, "not both"),
        ({"compute": "roc_auc"}, "'roc_auc' needs 'positive' (the class its 'score' field"),
        ({"compute": "roc_auc", "positive": 1, "classes": [0, 1]}, "'classes' applies to"),
        (
            {"compute": "average_precision", "classes": [0, 1], "average": "micro"},
            "average 'micro' does not apply to 'average_precision'",
        ),
        ({"compute": "ece", "positive": 1}, "'ece' needs 'bins'"),
        ({"compute": "pass_at_k"}, "'pass_at_k' needs 'k'"),
        ({"compute": "accuracy", "bins": 10}, "'bins' does not apply to 'accuracy'"),
        ({"compute": "mae", "average": "macro"}, "'average' does not apply to 'mae'"),
        ({"compute": "mae", "field": "x"}, "'field' is for 'mean'"),
        (
            {"compute": "f1", "average": "macro", "fields": {"target": "y"}},
            "fields.target: 'f1' reads ['label', 'prediction'] here, not 'target'",
        ),
        (
            {"compute": "roc_auc", "positive": 1, "fields": {"probabilities": "p"}},
            "fields.probabilities: 'roc_auc' reads ['label', 'score'] here",
        ),
        (
            {"compute": "token_f1", "ci": {"method": "wilson"}},
            "the Wilson interval applies to proportions (accuracy, error_rate, exact_match)",
        ),
        (
            {"compute": "log_loss", "positive": 1, "direction": "higher_is_better"},
            "'log_loss' is lower-is-better; direction 'higher_is_better' contradicts it",
        ),
        ({"compute": "roc_auc", "classes": [1, "1"]}, "classes: duplicate classes"),
        ({"compute": "mean"}, "metric 'mean' needs 'field'"),
    ],
)
def test_metric_parameter_mistakes_are_named(tmp_path, metric, message):
    problems = _problems(tmp_path, {"name": "m", **metric})
    assert message in problems["metrics[0]"], problems


@pytest.mark.parametrize(
    ("metric", "where", "message"),
    [
        (
            {"compute": "f1", "average": "macro", "fields": {"lable": "y"}},
            "metrics[0].fields.lable",
            "did you mean 'label'?",
        ),
        ({"compute": "f1", "average": "mean"}, "metrics[0].average", "'micro', 'macro' or"),
        (
            {"compute": "exact_match", "normalize": ["lowercase", "stem"]},
            "metrics[0].normalize",
            "expected 'squad', 'none' or a list of steps",
        ),
        ({"compute": "ece", "positive": 1, "bins": 0}, "metrics[0].bins", "greater than or equal"),
        ({"compute": "roc_auc", "classes": [1]}, "metrics[0].classes", "at least 2"),
        ({"compute": "f1", "positive": 1.5}, "metrics[0].positive", "expected a class label"),
        ({"compute": "roc_auc", "classes": ["a", None]}, "metrics[0].classes",
         "expected a class label"),
        ({"compute": "auroc"}, "metrics[0].compute", "'roc_auc'"),
    ],
)
def test_metric_field_mistakes_are_named_at_the_field(tmp_path, metric, where, message):
    problems = _problems(tmp_path, {"name": "m", **metric})
    assert where in problems and message in problems[where], problems


def test_definition_omits_unset_catalogue_parameters():
    plain = MetricSpec(name="acc", compute="accuracy")
    assert set(plain.definition()) == {
        "name",
        "compute",
        "field",
        "direction",
        "threshold",
        "ci",
        "role",
        "promoted",
    }
    f1 = MetricSpec(name="f", compute="f1", positive=False, confusion_matrix=True)
    assert f1.definition()["positive"] is False and f1.definition()["confusion_matrix"] is True
    assert definition_problems(f1.definition()) == []


def test_comparability_sees_catalogue_parameters():
    def primaries(**params):
        spec = MetricSpec(name="f", compute="f1", **params)
        return _primaries([MetricDefinition.model_validate(spec.definition())])

    assert primaries(average="macro") != primaries(average="micro")
    assert primaries(average="macro") == primaries(average="macro")
    # a pre-catalogue definition compares as it always did
    old = _primaries(
        [MetricDefinition.model_validate(MetricSpec(name="a", compute="accuracy").definition())]
    )
    assert set(old[0]) == {"name", "compute", "field", "direction", "threshold", "ci"}


# --------------------------------------------------------------------------- sample files


def _file(tmp_path, rows):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("definition", "row", "message"),
    [
        (
            {"compute": "roc_auc", "positive": 1, "fields": {"score": "p"}},
            {"label": 1, "p": "high"},
            "field 'p': expected a finite number, found string \"high\"",
        ),
        (
            {"compute": "log_loss", "positive": 1},
            {"label": 1, "score": 1.5},
            "field 'score': expected a probability (a number from 0 to 1), found number 1.5",
        ),
        (
            {"compute": "log_loss", "classes": ["a", "b"]},
            {"label": "a", "probabilities": {"a": 0.5}},
            "field 'probabilities': expected probabilities for the classes ['a', 'b']",
        ),
        (
            {"compute": "brier", "classes": ["a", "b"]},
            {"label": "c", "probabilities": [0.5, 0.5]},
            "field 'label': expected one of the classes ['a', 'b'], found string \"c\"",
        ),
        (
            {"compute": "f1", "average": "macro"},
            {"label": [1], "prediction": 1},
            "field 'label': expected a class label (string, number or boolean), found array [1]",
        ),
        (
            {"compute": "mae"},
            {"target": True, "prediction": 1.0},
            "field 'target': expected a finite number, found boolean true",
        ),
        (
            {"compute": "token_f1"},
            {"prediction": "x", "reference": []},
            "field 'reference': expected a string or a non-empty list of strings",
        ),
        (
            {"compute": "pass_at_k", "k": 10},
            {"n": 5, "c": 1},
            "field 'n': expected at least k=10 generations, found integer 5",
        ),
        (
            {"compute": "pass_at_k", "k": 1},
            {"n": 5, "c": 6},
            "field 'c': expected at most n=5 correct generations, found integer 6",
        ),
    ],
)
def test_sample_shape_errors_name_file_line_field_metric_expected_and_found(
    tmp_path, definition, row, message
):
    good = {"compute": "accuracy"}
    defs = [{"name": "acc", **good}, {"name": "mine", **definition}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n" + json.dumps({"id": "1", "label": 1, "prediction": 1, **row}) + "\n")
    with pytest.raises(SampleFormatError) as exc:
        read_samples(path, defs)
    text = str(exc.value)
    assert text.startswith("predictions.jsonl line 2: ")
    assert message in text
    assert text.endswith("(metric mine)")


def test_missing_fields_name_the_metrics_that_read_them(tmp_path):
    defs = [
        {"name": "auc", "compute": "roc_auc", "positive": 1, "fields": {"score": "p"}},
        {"name": "acc", "compute": "accuracy"},
    ]
    path = _file(tmp_path, [{"id": "0", "label": 1, "prediction": 1}])
    with pytest.raises(
        SampleFormatError,
        match=r"line 1: missing field\(s\) \['p'\] "
        r"\(read by metric\(s\) auc\)",
    ):
        read_samples(path, defs)


def test_renamed_fields_are_read(tmp_path):
    defs = [{"name": "r2", "compute": "r2", "fields": {"target": "y", "prediction": "yhat"}}]
    rows = [{"id": str(i), "y": float(i), "yhat": float(i) + 0.5} for i in range(5)]
    samples = read_samples(_file(tmp_path, rows), defs)
    assert compute_metric({**defs[0], "ci": {"method": "none"}}, samples, 0).value == 0.875


def test_labels_match_classes_by_their_json_text():
    definition = {"name": "ll", "compute": "log_loss", "classes": [0, 1], "ci": {"method": "none"}}
    rows = [
        {"id": "a", "label": 1, "probabilities": {"0": 0.2, "1": 0.8}},
        {"id": "b", "label": 0.0, "probabilities": {"0": 0.6, "1": 0.4}},
    ]
    value = compute_metric(definition, rows, 0).value
    assert value == pytest.approx(-(__import__("math").log(0.8) + __import__("math").log(0.6)) / 2)
