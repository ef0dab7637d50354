import random

import pytest

from runner.errors import SpecError
from runner.shared.metrics import SampleFormatError
from runner.shared.perturbations import perturbation_effects, select_perturbed
from runner.model.spec_metrics import PerturbationSpec

pytestmark = pytest.mark.unit
DEFS = [{"name": "accuracy", "compute": "accuracy", "ci": {"resamples": 300, "level": 0.95}}]


def _samples(n=400, acc=0.9, seed=1):
    rng = random.Random(seed)
    return [{"id": str(i), "label": i % 10,
             "prediction": i % 10 if rng.random() < acc else (i + 1) % 10} for i in range(n)]


def test_subsample_is_seeded_and_sized():
    base = _samples()
    a = select_perturbed({"name": "half", "kind": "subsample", "fraction": 0.5}, base, 7)
    b = select_perturbed({"name": "half", "kind": "subsample", "fraction": 0.5}, base, 7)
    c = select_perturbed({"name": "half", "kind": "subsample", "fraction": 0.5}, base, 8)
    assert len(a) == 200 and a == b and a != c


def test_slice_keeps_matching_samples():
    base = _samples()
    threes = select_perturbed({"name": "t", "kind": "slice", "field": "label", "value": 3},
                              base, 0)
    assert len(threes) == 40 and all(s["label"] == 3 for s in threes)


def test_identical_outputs_have_zero_change():
    base = _samples()
    eff = perturbation_effects(DEFS, {"name": "same", "kind": "noise"}, base, list(base), 3)
    m = eff["metrics"][0]
    assert m["delta"] == 0.0 and m["delta_ci"]["low"] == m["delta_ci"]["high"] == 0.0


def test_degraded_outputs_have_a_negative_change_with_an_interval_excluding_zero():
    base = _samples(acc=0.95)
    worse = [dict(s, prediction=(s["prediction"] + 1) % 10) if i % 4 == 0 else s
             for i, s in enumerate(base)]
    eff = perturbation_effects(DEFS, {"name": "noisy", "kind": "noise"}, base, worse, 3)
    m = eff["metrics"][0]
    assert m["delta"] < -0.15
    assert m["delta_ci"]["low"] < m["delta"] < m["delta_ci"]["high"] < 0


def test_perturbed_ids_must_come_from_the_baseline():
    base = _samples(n=10)
    with pytest.raises(SampleFormatError, match="not in the baseline"):
        perturbation_effects(DEFS, {"name": "x", "kind": "noise"}, base,
                             [{"id": "stranger", "label": 1, "prediction": 1}], 0)


def test_perturbation_parameters_are_required_by_kind():
    with pytest.raises(ValueError, match="needs"):
        PerturbationSpec(name="n", kind="noise")
    assert PerturbationSpec(name="s", kind="slice", field="label", value=3).value == 3
    assert issubclass(SpecError, Exception)
