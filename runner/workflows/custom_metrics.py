"""Custom metrics in a run: their locked files, and their values from the recompute sandbox.

:func:`custom_jobs` checks each custom metric file against the digest in the lock (exit 3
when it changed, as for preprocessing code). :func:`with_custom_metrics` adds the values
the runner recomputed in the sandbox (:mod:`runner.backends.custom_metric`) to the checked
catalogue metrics; a value the container reported for a custom metric is recorded as
``container_reported`` and never used.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runner.backends.collect import MetricCheck, read_json
from runner.build.preprocessing import code_digest
from runner.errors import DigestMismatch, SpecError
from runner.model.lock import LockedSpec
from runner.model.plan import RunPlan
from runner.model.spec import EvalSpec

if TYPE_CHECKING:  # the sandbox (and the Docker SDK) loads only for a spec with custom metrics
    from runner.backends.custom_metric import CustomMetricJob, CustomMetricSandbox

# Where a bundle keeps the custom metric files it was computed with.
BUNDLE_DIR = "custom_metrics"


def custom_jobs(spec: EvalSpec, spec_path: Path, lock: LockedSpec) -> list[CustomMetricJob]:
    """The spec's custom metrics with their files, each checked against the lock."""
    spec_dir = spec_path.resolve().parent
    locked = {c.name: c for c in lock.custom_metrics}
    jobs = []
    for metric in spec.metrics:
        if metric.custom is None:
            continue
        entry = locked.get(metric.name)
        if entry is None or entry.file != metric.custom.file:
            raise SpecError(
                f"custom metric {metric.name} is not in the lock",
                file=str(spec_path),
                problems=[(f"metrics.{metric.name}.custom", "not locked")],
                hint="run `evalrun lock` to lock the metric file's digest",
            )
        path = spec_dir / metric.custom.file
        if not path.is_file() or path.is_symlink():
            raise SpecError(
                f"custom metric file {metric.custom.file} not found",
                file=str(spec_path),
                problems=[
                    (f"metrics.{metric.name}.custom.file", f"{metric.custom.file} not found")
                ],
            )
        found = code_digest(path)
        if found != entry.digest:
            raise DigestMismatch(
                f"custom metric {metric.name} ({metric.custom.file})",
                expected=entry.digest,
                found=found,
                hint="the metric file changed since it was locked; re-lock deliberately",
            )
        from runner.backends.custom_metric import CustomMetricJob

        jobs.append(CustomMetricJob(metric.definition(), path, entry.digest))
    return jobs


def carry_files(jobs: Sequence[CustomMetricJob], spec_dir: Path, dest: Path) -> None:
    """Copy each metric file into the bundle (at its path relative to the spec)."""
    for job in jobs:
        rel = job.file.relative_to(spec_dir)
        target = dest / BUNDLE_DIR / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(job.file, target)


def _sample_count(predictions: Path) -> int:
    with predictions.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _reported(results: Path) -> dict[str, object]:
    """Each metric's value as the container reported it (untrusted: kept as found)."""
    reported = read_json(results / "metrics.json")
    items = reported.get("metrics") if isinstance(reported, dict) else None
    return {
        str(m["name"]): m.get("value") for m in items or [] if isinstance(m, dict) and "name" in m
    }


def with_custom_metrics(
    check: MetricCheck,
    results: Path,
    plan: RunPlan,
    jobs: Sequence[CustomMetricJob],
    sandbox: CustomMetricSandbox | None,
) -> MetricCheck:
    """``check`` with every custom metric recomputed in the sandbox (after the catalogue's;
    a new sandbox when ``sandbox`` is None).

    Nothing is recomputed when the catalogue check already failed or there are no per-sample
    outputs; IntegrityError (exit 3) when the sandbox cannot give a value it can verify.
    """
    predictions = results / "predictions.jsonl"
    if not jobs or check.problems or not predictions.is_file():
        return check
    if sandbox is None:
        from runner.backends.custom_metric import CustomMetricSandbox

        sandbox = CustomMetricSandbox()
    values = sandbox.recompute(
        jobs,
        predictions,
        image_ref=plan.image_ref,
        run_id=plan.run_id,
        seed=plan.seed,
        n=_sample_count(predictions),
        timeout_s=plan.timeout_s,
        memory_mib=plan.memory_mib,
        cpus=plan.cpus,
        pids=plan.pids,
    )
    reported = _reported(results)
    for value in values:
        if value["name"] in reported:
            theirs = reported[value["name"]]
            value["custom"]["container_reported"] = theirs
            value["custom"]["overridden"] = theirs != value["value"]
    return dataclasses.replace(check, metrics=[*check.metrics, *values])
