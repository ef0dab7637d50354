"""`evalrun compare` on real runs: --metric, a paired test on the samples the runs share,
filters and --group-by model."""

from __future__ import annotations

import pytest
import yaml
from conftest import EXAMPLE

pytestmark = pytest.mark.docker


def _changes(dropout: float) -> dict:
    example = yaml.safe_load((EXAMPLE / "eval.yaml").read_text())
    return {
        "metadata": {**example["metadata"], "comparison_group": "digits-questions"},
        "params": {"pixel_dropout": dropout},
        # no thresholds: every run has metrics to rank, however poor
        "metrics": [{k: v for k, v in m.items() if k != "threshold"} for m in example["metrics"]],
    }


def test_compare_ranks_real_runs_by_the_chosen_metric_with_a_paired_test(variant, vcli):
    ids = {}
    for dropout in (0.0, 0.6):
        code, out = vcli.json("run", str(variant(**_changes(dropout))))
        assert code == 0, out
        ids[dropout] = out["run_id"]
    code, out = vcli.json("compare", "digits-questions", "--metric", "macro-f1")
    assert code == 0, out
    assert out["metric"] == "macro-f1"
    leader, second = out["ranking"]
    assert (leader["run_id"], second["run_id"]) == (ids[0.0], ids[0.6])
    # the runs scored the same samples: the paired bootstrap decides, and separates them
    assert second["test_vs_leader"] == "paired"
    assert second["paired_vs_leader"]["shared"] == 450
    assert second["paired_vs_leader"]["low"] > 0 and second["significant_vs_leader"] is True
    assert (leader["rank"], second["rank"], second["tied"]) == (1, 2, False)
    # filters: no run on another backend; one model, so one entry when grouped by model
    assert vcli.json("compare", "digits-questions", "--backend", "kubernetes")[0] == 2
    code, grouped = vcli.json("compare", "digits-questions", "--group-by", "model")
    assert code == 0 and [r["run_id"] for r in grouped["ranking"]] == [ids[0.6]]
    # the gate: the newest (the poorer) run is significantly worse than the leader
    assert vcli("compare", "digits-questions", "--candidate", "newest").returncode == 6
