"""`evalrun run --backend kubernetes`, with the inputs taken from published artifacts.

Used by tests/k8s/test_k8s_data_plane.py as a subprocess (so it can be killed like a
real runner). It runs the real CLI; the only change is that the Kubernetes backend
mounts the inputs listed in ``--inputs`` (PlanInputs with ``artifact_ref``, published by
tests/cluster/input_artifacts.py) instead of the ones the run workflow derives from the
lock, which carry no artifact reference until ``evalrun lock`` publishes inputs itself.

``--die-after-bytes N``: the runner SIGKILLs itself once N bytes of the results stream
have arrived (a runner lost in the middle of a collection).

    python data_plane_driver.py --inputs inputs.json [--die-after-bytes N] -- run SPEC ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import importlib

import runner.backends.kubernetes as k8s_backend
from runner.backends.collect import StreamReceiver
from runner.model.plan import PlanInput, RunPlan


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--die-after-bytes", type=int, default=0)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    published = [PlanInput.model_validate(i) for i in json.loads(args.inputs.read_text())]

    class Published(k8s_backend.KubernetesBackend):
        def _swap(self, plan: RunPlan) -> RunPlan:
            by_name = {(i.role, i.name): i for i in published}
            inputs = [by_name[(i.role, i.name)] for i in plan.inputs]
            return plan.model_copy(update={"inputs": inputs})

        def preflight(self, plan: RunPlan) -> None:
            super().preflight(self._swap(plan))

        def run(self, plan: RunPlan, results_dir: Path, **kwargs: Any) -> Any:
            return super().run(self._swap(plan), results_dir, **kwargs)

    k8s_backend.KubernetesBackend = Published  # type: ignore[misc]
    if args.die_after_bytes:
        feed = StreamReceiver.feed

        def dying_feed(self: StreamReceiver, data: bytes) -> None:
            feed(self, data)
            if self.received >= args.die_after_bytes:
                print(f"driver: dying after {self.received} bytes", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        StreamReceiver.feed = dying_feed  # type: ignore[method-assign]
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    # runner.cli re-exports main(), which hides the submodule of that name
    cli = importlib.import_module("runner.cli")
    return int(cli.main(rest))


if __name__ == "__main__":
    sys.exit(main())
