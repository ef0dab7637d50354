"""The metrics that existed before the catalogue keep their exact floats.

An image built by an older evalrun carries the older agent; re-running it by digest makes
today's runner recompute that agent's metrics, so accuracy, error_rate, macro_f1 and mean
(values, intervals, perturbation deltas) must stay bit-identical. The fixture was written by
``fixtures/metrics/generate_legacy.py`` against the pre-catalogue code.
"""

import json
import random
from pathlib import Path

import pytest

from runner.shared.metrics import compute_metric
from runner.shared.perturbations import perturbation_effects, select_perturbed

pytestmark = pytest.mark.unit

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "metrics" / "legacy.json").read_text())


def _samples(n, seed, classes, acc):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.randrange(classes)
        pred = label if rng.random() < acc else rng.randrange(classes)
        out.append({"id": str(i), "label": label, "prediction": pred,
                    "score": rng.random() * 3 - 1, "group": i % 3})
    return out


@pytest.mark.parametrize(
    "case", [c for c in FIXTURE["cases"] if c["kind"] == "metric"],
    ids=lambda c: f"{c['definition']['compute']}-{c['definition']['ci']['method']}-n{c['samples'][0]}",
)
def test_legacy_metric_is_bit_identical(case):
    got = compute_metric(case["definition"], _samples(*case["samples"]), case["seed"]).as_dict()
    assert json.dumps(got, sort_keys=True) == json.dumps(case["result"], sort_keys=True)


@pytest.mark.parametrize(
    "case", [c for c in FIXTURE["cases"] if c["kind"] == "perturbation"],
    ids=lambda c: f"{c['perturbation']['name']}-n{c['samples'][0]}",
)
def test_legacy_perturbation_effects_are_bit_identical(case):
    base = _samples(*case["samples"])
    picked = select_perturbed(case["perturbation"], base, case["seed"])
    assert [s["id"] for s in picked] == case["ids"]
    got = perturbation_effects(case["definitions"], case["perturbation"], base, picked, case["seed"])
    assert json.dumps(got, sort_keys=True) == json.dumps(case["result"], sort_keys=True)
