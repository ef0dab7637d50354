"""The metric catalogue end to end: computed in the sandbox, recomputed by the runner, sealed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

# Runs the example's evaluation, then derives the fields the catalogue metrics read: a
# probability-like score for class 3 (above 0.5 exactly when 3 is predicted) and text
# forms of label and prediction. `drop` names a field left out of every row after the
# first ten.
_DERIVE = (
    "import json, math, os, subprocess, sys, tempfile;"
    "out = os.environ['EVALRUN_OUTPUT']; tmp = tempfile.mktemp(dir='/tmp');"
    "rc = subprocess.call(['python3', '/app/evaluate.py'],"
    " env={**os.environ, 'EVALRUN_OUTPUT': tmp});"
    "rows = [json.loads(l) for l in open(tmp)];"
    "drop = sys.argv[1] if len(sys.argv) > 1 else None;"
    "f = open(out, 'w');"
    "sig = lambda v: 1 / (1 + math.exp(-v));"
    "[f.write(json.dumps({**r, 's3': 0.5 + 0.5 * sig(r['score']) if r['prediction'] == 3 "
    "else 0.5 - 0.5 * sig(r['score']), 'label_text': str(r['label']), "
    "'prediction_text': ' ' + str(r['prediction']) + '.'}) + '\\n') if not drop or i < 10 "
    "else f.write(json.dumps({k: v for k, v in {**r, 's3': 0.5, 'label_text': str(r['label']), "
    "'prediction_text': str(r['prediction'])}.items() if k != drop}) + '\\n') "
    "for i, r in enumerate(rows)];"
    "f.close(); sys.exit(rc)"
)
METRICS = [
    {"name": "accuracy", "compute": "accuracy", "threshold": 0.5},
    {"name": "f1-3", "compute": "f1", "positive": 3},
    {"name": "f1-macro", "compute": "f1", "average": "macro", "confusion_matrix": True,
     "ci": {"method": "bootstrap_bca", "resamples": 300}},
    {"name": "balanced-accuracy", "compute": "balanced_accuracy"},
    {"name": "auc-3", "compute": "roc_auc", "positive": 3, "fields": {"score": "s3"}},
    {"name": "ece-3", "compute": "ece", "positive": 3, "bins": 10, "fields": {"score": "s3"}},
    {"name": "exact", "compute": "exact_match", "normalize": "squad",
     "fields": {"prediction": "prediction_text", "reference": "label_text"},
     "ci": {"method": "wilson"}},
]


def predicate_of(bundle: Path) -> dict:
    return json.loads((bundle / "statement.json").read_text())["predicate"]


def test_catalogue_metrics_are_recomputed_and_sealed(vcli, variant):
    spec = variant(command=["python3", "-c", _DERIVE], metrics=METRICS)
    code, out = vcli.json("run", str(spec))
    assert code == 0, out
    pred = predicate_of(Path(out["bundle"]))
    assert pred["outcome"] == "passed", pred.get("reason")
    by = {m["name"]: m for m in pred["metrics"]}
    assert set(by) == {m["name"] for m in METRICS}
    assert by["exact"]["value"] == by["accuracy"]["value"]  # SQuAD normalisation strips " ."
    matrix = by["f1-macro"]["confusion_matrix"]
    assert matrix["labels"] == list(range(10))
    assert sum(map(sum, matrix["counts"])) == by["accuracy"]["n"]
    assert 0.5 < by["auc-3"]["value"] <= 1.0 and by["ece-3"]["direction"] == "lower_is_better"
    definitions = {d["name"]: d for d in pred["metric_definitions"]}
    assert definitions["f1-3"]["positive"] == 3 and "positive" not in definitions["accuracy"]
    proc = vcli("verify", out["bundle"], "--key", str(vcli.pub))
    assert proc.returncode == 0, proc.stderr


def test_a_missing_field_fails_the_run_but_keeps_what_could_be_computed(vcli, variant):
    spec = variant(command=["python3", "-c", _DERIVE, "s3"], metrics=METRICS)
    code, out = vcli.json("run", str(spec))
    assert code == 6, out
    pred = predicate_of(Path(out["bundle"]))
    assert pred["outcome"] == "bad_output"
    assert pred["reason"].startswith(
        "per-sample output unusable for 2 of 7 metrics (auc-3: predictions.jsonl line 11: "
        "missing field(s) ['s3']; ece-3: predictions.jsonl line 11: missing field(s) ['s3'])"
    ), pred["reason"]
    assert [m["name"] for m in pred["metrics"]] == [
        "accuracy", "f1-3", "f1-macro", "balanced-accuracy", "exact"
    ]
    assert all(m.get("passed") is None for m in pred["metrics"])  # a failed run gates nothing
