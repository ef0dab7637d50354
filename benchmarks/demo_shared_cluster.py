"""The issue's shared-cluster scenario at full size, on the local test cluster.

Two teams (chart tenants, each with its own ServiceAccount token) share one Kueue quota
of 8 GPUs on the real node; team B's image is only in a TLS registry with credentials;
each team runs a 32-run nightly sweep (64 in all) and, once the quota is full, team A
starts one urgent run. Every run is a real evaluation under gVisor that the runner
seals; the script checks that none is lost, that every bundle verifies, that at most 8
were admitted at once (from Kueue's Workloads), and that the urgent run overtook the
waiting nightly ones. Prints one JSON line.

    python benchmarks/demo_shared_cluster.py [--runs-per-team 32] [--quota 8] [--sleep 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

import cluster as cluster_mod  # noqa: E402
from bench_k8s_data import locked_image  # noqa: E402
from kubernetes import config  # noqa: E402

from tests.k8s.shared_cluster import run_scenario  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-per-team", type=int, default=32)
    parser.add_argument("--quota", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=5.0)
    args = parser.parse_args()
    cluster = cluster_mod.ensure_cluster()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    with tempfile.TemporaryDirectory(prefix="evalrun-shared-") as tmp:
        work = Path(tmp)
        locked_image(work / "home-lock")  # examples/digits copied to home-lock/digits, locked
        out = run_scenario(cluster, api, work / "home-lock" / "digits", work,
                           runs_per_team=args.runs_per_team, quota=args.quota,
                           sleep_s=args.sleep, log=lambda m: print(m, file=sys.stderr))
    runs = 2 * args.runs_per_team + 1
    sealed = [b for b in out.bundles if b["verify_rc"] == 0 and b["outcome"] == "passed"]
    result = {
        "runs": runs, "sealed_and_verified": len(sealed), "quota_gpus": args.quota,
        "peak_admitted": out.peak_admitted, "preempted": len(out.preempted),
        "readmitted_runs": sum(1 for b in out.bundles
                               if b["details"]["queue"]["admissions"] >= 2),
        "nightly_waiting_when_urgent_admitted": out.waiting_when_urgent_admitted,
        "sweep_exit_codes": {team[:12]: s["rc"] for team, s in out.sweeps.items()},
        "urgent_exit_code": out.urgent["rc"],
        "team_b_private_registry": all("team-b/digits@" in b["image"] for b in out.bundles
                                       if "shared-b" in b["team"]),
        "wall_s": round(out.wall_s, 1),
    }
    print(json.dumps(result))
    ok = (len(sealed) == runs and 1 <= out.peak_admitted <= args.quota
          and out.waiting_when_urgent_admitted >= 1 and result["team_b_private_registry"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
