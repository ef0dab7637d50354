"""A backend that plays the in-container agent in-process, and a pinned clock/host/user.

No container runs: :class:`InProcessBackend` writes what the agent writes (summary,
preflight, environment, metrics, per-sample outputs, perturbations) as a pure function
of the plan, so a run through ``run_evaluation`` signs the same predicate every time
under :func:`pinned_world`.

It made the legacy fixture bundles under ``fixtures/legacy/`` with the evalrun of
commit db9e3c9 (see ``fixtures/legacy/make_bundles.py``), and the unit tests use it to
check that today's builders sign the same predicates for the same runs. Keep it working
against both: it only uses ``RunPlan``/``BackendResult`` and ``runner.shared.metrics``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from runner.errors import InfrastructureError
from runner.model.plan import BackendResult, RunPlan
from runner.shared.metrics import compute_metrics
from runner.shared.perturbations import perturbation_effects, select_perturbed
from runner.shared.sample_file import read_samples

FIXED_NOW = "2026-11-29T12:00:00.000+00:00"
FIXED_DATETIME = dt.datetime(2026, 11, 29, 12, 0, 0, tzinfo=dt.UTC)
ENVIRON = {"USER": "fixture-user", "CI": "true", "BUILD_URL": "https://ci.example/builds/7"}

ENVIRONMENT = {
    "image_ref": None,  # filled from the plan
    "os": {"ID": "debian", "VERSION_ID": "12", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"},
    "kernel": {"release": "4.4.0", "version": "#1 SMP", "system": "Linux"},
    "python": {"version": "3.11.2", "implementation": "cpython", "executable": "/usr/bin/python3"},
    "packages": [
        {"name": "evalrun-agent", "version": "0.1.0", "record_sha256": "1" * 64},
        {"name": "numpy", "version": "2.2.6", "record_sha256": "2" * 64},
    ],
    "cpu": {"model": "Fixture CPU", "logical_cpus": 2, "usable_cpus": 1, "machine": "x86_64"},
    "limits": {"memory_bytes": "536870912", "pids_max": "128", "mem_total_kib": 4194304},
    "user": {"uid": 65532, "gid": 65532},
    "gpu": {"visible": False, "reason": "NVML unavailable: no libnvidia-ml (fixture)"},
}


def _draw(seed: int, sample_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:8], 16)


class InProcessBackend:
    """Deterministic stand-in for a sandboxed agent run (no container, no network)."""

    name = "inprocess"
    pulls_inputs = False

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail

    def preflight(self, plan: RunPlan) -> None:
        return None

    def run(
        self, plan: RunPlan, results_dir: Path, *, on_start: Callable[[], None] | None = None
    ) -> BackendResult:
        if self.fail:
            raise InfrastructureError("the fixture daemon is down", hint="start it again")
        if on_start is not None:  # as a real backend does, once its sandbox runs
            on_start()
        (results_dir / "logs").mkdir(parents=True, exist_ok=True)
        dataset = next(i for i in plan.inputs if i.role == "dataset")
        rows = [json.loads(line) for line in dataset.host_path.read_text().splitlines() if line]
        lines = []
        for row in rows:
            draw = _draw(plan.seed, row["id"])
            wrong = draw % 9 == 0
            lines.append(
                json.dumps(
                    {
                        "id": row["id"],
                        "label": row["label"],
                        "prediction": (row["label"] + 1) % 10 if wrong else row["label"],
                        "score": round(0.5 + (draw % 50) / 100, 6),
                    },
                    separators=(",", ":"),
                )
            )
        output = results_dir / "predictions.jsonl"
        output.write_text("\n".join(lines) + "\n")
        samples = read_samples(output, plan.metrics)
        values = compute_metrics(plan.metrics, samples, plan.seed)
        perturbations = []
        for pert in plan.perturbations:
            perturbed = select_perturbed(pert, samples, plan.seed)
            perturbations.append(
                perturbation_effects(plan.metrics, pert, samples, perturbed, plan.seed)
            )
        report: dict[str, Any] = {"seed": plan.seed, "metrics": [v.as_dict() for v in values]}
        if perturbations:
            report["perturbations"] = perturbations
        _write(results_dir / "metrics.json", report)
        _write(results_dir / "env.json", {**ENVIRONMENT, "image_ref": plan.image_ref})
        _write(
            results_dir / "preflight.json",
            {
                "rootfs": {
                    "expected": plan.expected_rootfs_digest,
                    "found": plan.expected_rootfs_digest,
                    "entries": 1234,
                    "passed": True,
                },
                "inputs": [
                    {
                        "name": i.name,
                        "role": i.role,
                        "expected": i.sha256,
                        "found": i.sha256,
                        "passed": True,
                    }
                    for i in plan.inputs
                ],
                "environment": [],
                "duration_s": 0.25,
            },
        )
        _write(
            results_dir / "summary.json",
            {
                "run_id": plan.run_id,
                "started": 1796040000.0,
                "finished": 1796040001.5,
                "exit_code": 0,
                "outcome": "completed",
                "determinism": {
                    "PYTHONHASHSEED": str(plan.seed),
                    "EVALRUN_SEED": str(plan.seed),
                    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                },
                "evaluation": {"returncode": 0, "duration_s": 0.75, "peak_rss_kib": 20480},
            },
        )
        (results_dir / "logs" / "evaluation.stderr").write_text(
            f"evaluate.py: scored {len(rows)} samples\n"
        )
        return BackendResult(
            backend=self.name,
            exit_code=0,
            image_digest_confirmed=True,
            runtime="runsc",
            network="none",
            started_at="2026-11-29T12:00:01.000+00:00",
            finished_at="2026-11-29T12:00:02.500+00:00",
            duration_s=1.5,
            container_log="agent: done\n",
            details={"container_id": "f" * 12, "security_opt": ["no-new-privileges"]},
        )


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class _FixedDatetime(dt.datetime):
    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> _FixedDatetime:  # type: ignore[override]
        return cls.fromtimestamp(FIXED_DATETIME.timestamp(), tz)


@contextlib.contextmanager
def pinned_world() -> Iterator[None]:
    """Clock, host, uid, evalrun version and launcher environment fixed for a run."""
    import runner.workflows.audit as audit
    import runner.workflows.run as run
    import runner.workflows.runset as runset

    fixed_dt = types.SimpleNamespace(datetime=_FixedDatetime, UTC=dt.UTC, date=dt.date)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, ENVIRON, clear=True))
        stack.enter_context(mock.patch.object(run, "_now", lambda: FIXED_NOW))
        stack.enter_context(mock.patch.object(run, "_evalrun_version", lambda: "0.1.0"))
        # the run journal's timestamps (logs/runner.jsonl is a signed file of the bundle)
        stack.enter_context(
            mock.patch.object(run, "time", types.SimpleNamespace(time=lambda: 1796040000.0))
        )
        stack.enter_context(mock.patch.object(runset, "dt", fixed_dt))
        stack.enter_context(mock.patch.object(audit, "dt", fixed_dt))
        stack.enter_context(mock.patch.object(socket, "gethostname", lambda: "fixture-host"))
        stack.enter_context(mock.patch.object(os, "getuid", lambda: 1000))
        # the fixture image is not in any registry: a re-run's availability check passes
        stack.enter_context(
            mock.patch("runner.workflows.rerun.manifest_exists", lambda *_: True)
        )
        yield


# --------------------------------------------------------------------------- the sequence

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy"
SOURCE = FIXTURES / "source"
BUNDLES = FIXTURES / "bundles"
KEY = FIXTURES / "keys" / "legacy.key"
PUBLIC_KEY = FIXTURES / "keys" / "legacy.pub"
# what each checked-in bundle is, in the order the sequence makes them
BUNDLE_NAMES = ("run-infrastructure-failure", "run", "rerun", "run-set", "audit")


def run_sequence(source: Path, home: Path) -> dict[str, Path]:
    """Every kind of bundle, made by the evalrun on ``sys.path``: name → stored bundle dir.

    A run whose backend fails (infrastructure), a plain run, a re-run of it, a run set
    of three seeds and an audit of one run; all signed with the fixture key.
    """
    from runner._internal.settings import Settings
    from runner.bundle.signing import load_signer, load_verifier
    from runner.workflows.audit import run_audit
    from runner.workflows.rerun import load_original, rerun
    from runner.workflows.run import run_evaluation
    from runner.workflows.runset import run_set

    settings = Settings(home=home, cache=home / "cache", registry="127.0.0.1:5000")
    signer, verifier = load_signer(KEY), load_verifier(PUBLIC_KEY)
    with pinned_world():
        failed = run_evaluation(source / "eval.yaml", InProcessBackend(fail=True), signer, settings)
        ran = run_evaluation(source / "eval.yaml", InProcessBackend(), signer, settings)
        again = rerun(
            load_original(ran.bundle.path, verifier),
            InProcessBackend(),
            signer,
            settings,
            search_dirs=[source],
        )
        seeds = run_set(
            source / "seeds.yaml", [1, 2, 3], InProcessBackend(), signer, settings, parallel=1
        )
        audit = run_audit(
            n=1,
            seed=7,
            since=None,
            until=None,
            spec="legacy-digits",
            backend=InProcessBackend(),
            signer=signer,
            verifier=verifier,
            settings=settings,
            search_dirs=[source],
        )
    paths = (failed.bundle, ran.bundle, again.outcome.bundle, seeds.bundle, audit.bundle)
    return {name: b.path for name, b in zip(BUNDLE_NAMES, paths, strict=True)}
