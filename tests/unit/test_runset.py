import numpy as np
import pytest

from runner.workflows.runset import across_seeds, student_t_cdf, student_t_quantile
from runner.model.spec import parse_spec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("df", "p", "expected"), [
    (1, 0.975, 12.706204736),
    (2, 0.975, 4.302652730),
    (4, 0.975, 2.776445105),
    (9, 0.975, 2.262157163),
    (30, 0.995, 2.749995654),
    (200, 0.95, 1.652508100),
])
def test_student_t_quantiles_match_tables(df, p, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-7)
    assert student_t_cdf(expected, df) == pytest.approx(p, abs=1e-9)


def test_across_seed_ci_matches_a_direct_numpy_computation():
    values = [0.912, 0.905, 0.931, 0.918]
    s = across_seeds("accuracy", values, 0.95)
    arr = np.asarray(values)
    sd = arr.std(ddof=1)
    half = 3.182446305284263 * sd / np.sqrt(len(arr))  # t(0.975, df=3)
    assert s.mean == pytest.approx(arr.mean(), abs=1e-15)
    assert s.sd == pytest.approx(sd, abs=1e-15)
    assert (s.ci_low, s.ci_high) == pytest.approx((arr.mean() - half, arr.mean() + half),
                                                  abs=1e-9)


def test_identical_seeds_give_a_zero_width_interval():
    s = across_seeds("a", [0.9, 0.9, 0.9], 0.95)
    assert s.sd == 0 and s.ci_low == s.ci_high == pytest.approx(0.9)


def _spec(**extra):
    import yaml
    from pathlib import Path

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples/digits/eval.yaml")
                          .read_text())
    data.pop("seed", None)
    data.update(extra)
    return parse_spec(data, source="test")


def test_seed_policies():
    assert _spec(seeds=[3, 1, 2]).run_set_seeds() == [3, 1, 2]
    assert _spec(repeats=3).run_set_seeds() == [0, 1, 2]
    assert _spec(seed=10, repeats=2).run_set_seeds() == [10, 11]
    assert _spec().run_set_seeds() is None


@pytest.mark.parametrize(("extra", "message"), [
    ({"seeds": [1, 1]}, "duplicate"),
    ({"seeds": [1, 2], "repeats": 2}, "not both"),
    ({"seeds": [1, 2], "seed": 5}, "not both"),
    ({"seeds": [1]}, "at least 2"),
])
def test_bad_seed_policies_are_refused(extra, message):
    from runner.errors import SpecError

    with pytest.raises(SpecError) as exc:
        _spec(**extra)
    assert message in exc.value.diagnostics()


def test_run_set_reports_show_per_seed_and_across_seed_tables():
    from runner.model.predicate import RunSetPredicate
    from runner.render.html import render_run_set_html
    from runner.workflows.runset import render_run_set

    pred = {
        "run_id": "rs-1", "kind": "run_set", "spec": {"name": "digits"}, "outcome": "passed",
        "exit_code": 0,
        "seeds": {"seeds": [1, 2]},
        "members": [{"seed": s, "run_id": f"r-{s}", "outcome": "passed",
                     "metrics": [{"name": "accuracy", "value": v,
                                  "ci": {"low": v - 0.02, "high": v + 0.02}}]}
                    for s, v in ((1, 0.9), (2, 0.92))],
        "across_seeds": [across_seeds("accuracy", [0.9, 0.92], 0.95).as_dict()],
    }
    pred = RunSetPredicate.model_validate(pred)
    md = render_run_set(pred)
    assert "| 1 | `r-1` | 0.9000 [0.8800, 0.9200] |" in md
    assert "Across seeds" in md and "0.9100" in md
    page = render_run_set_html(pred, "valid")
    assert page == render_run_set_html(pred, "valid")  # deterministic
    assert "Student-t" in page and "r-2" in page and "http" not in page.split("</head>")[1]
