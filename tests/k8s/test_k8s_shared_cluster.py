"""Two teams share one Kueue GPU quota on the real node; team B pulls from a TLS registry
with credentials; an urgent run overtakes the nightly sweeps by preemption; every run is
sealed and verifies, none is lost (the scenario: tests/k8s/shared_cluster.py; the issue's
64-run version is ``make demo-shared``)."""

from __future__ import annotations

import pytest

from .shared_cluster import run_scenario
from .test_backend_kubernetes import k8s_example  # noqa: F401  (a fixture)

pytestmark = pytest.mark.k8s
RUNS_PER_TEAM, QUOTA = 3, 2


def test_two_teams_share_a_gpu_quota_and_an_urgent_run_preempts_a_nightly_one(
    cluster, k8s_client, k8s_example, tmp_path
):
    out = run_scenario(cluster, k8s_client, k8s_example, tmp_path,
                       runs_per_team=RUNS_PER_TEAM, quota=QUOTA, sleep_s=20)
    print(f"shared cluster: {len(out.bundles)} runs sealed in {out.wall_s:.0f} s; peak "
          f"{out.peak_admitted} admitted (quota {QUOTA}); preempted {sorted(out.preempted)}; "
          f"{out.waiting_when_urgent_admitted} nightly runs still waiting when the urgent "
          "one was admitted")
    for team, sweep in out.sweeps.items():
        why = [(c.get("run_id"), c["outcome"], c.get("reason")) for c in sweep["cells"]
               if c["outcome"] != "passed"]
        assert sweep["rc"] == 0, f"{team}: {why} {sweep['stderr']}"
        assert len(sweep["cells"]) == RUNS_PER_TEAM
        assert all(c["outcome"] == "passed" for c in sweep["cells"]), sweep["cells"]
    assert out.urgent["rc"] == 0, out.urgent["stderr"]
    # none lost: every run (2 sweeps + the urgent one) sealed, and each bundle verifies
    assert len(out.bundles) == 2 * RUNS_PER_TEAM + 1
    for b in out.bundles:
        assert b["verify_rc"] == 0, b
        assert b["outcome"] == "passed", b
        assert b["details"]["queue"]["queue"] == "gpus", b["details"]
    team_b = [b for b in out.bundles if "shared-b" in b["team"]]
    assert team_b and all("team-b/digits@sha256:" in b["image"] for b in team_b), team_b
    # the quota held, as the API showed it
    assert 1 <= out.peak_admitted <= QUOTA, out.peak_admitted
    # the urgent run was admitted while nightly runs still waited: it took a nightly
    # run's GPU (Kueue preempted it), and that run was queued again and still sealed
    assert out.waiting_when_urgent_admitted >= 1, out
    assert out.preempted, "Kueue preempted no nightly run"
    readmitted = [b for b in out.bundles if b["details"]["queue"]["admissions"] >= 2]
    assert readmitted, [b["details"]["queue"] for b in out.bundles]
