"""``evalrun sweep``: one locked spec over a matrix of seeds, params, models and datasets.

Each cell becomes its own derived spec and lock (same image digest, its own input
digests), runs as its own evaluation with its own signed bundle, and the sweep
ends with one summary table. Submission is bounded-parallel.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NotRequired, TypedDict

import yaml

from runner._internal.cas import ContentStore
from runner._internal.settings import Settings
from runner.build.lock import LockedInput, lock_inputs, publish_inputs, write_lock
from runner.bundle.signing import Signer
from runner.errors import EvalrunError, InputError
from runner.model.base import parse_digest_ref
from runner.model.input_uri import LocalUri, parse_input_uri
from runner.model.lock import LockedSpec, lock_path_for
from runner.model.outcome import worst_exit_code
from runner.model.plan import Backend
from runner.model.spec import EvalSpec, parse_spec
from runner.model.spec_yaml import load_yaml_document
from runner.workflows.run import RunOutcome, load_locked, run_evaluation

Progress = Callable[[str], None]
MAX_CELLS = 10_000


@dataclass(frozen=True)
class Cell:
    index: int
    # axis → the value the matrix file gives it (any YAML: a seed, a param, a model, datasets)
    overrides: dict[str, object]

    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.overrides.items()) or "(base)"


def _short(value: object) -> str:
    if isinstance(value, dict) and "uri" in value:
        return Path(str(value["uri"])).name
    if isinstance(value, list) and value and isinstance(value[0], dict) and "name" in value[0]:
        return "+".join(str(d["name"]) for d in value)
    return json.dumps(value) if not isinstance(value, str) else value


def load_matrix(path: Path) -> list[Cell]:
    """A matrix file: ``seed: [...]``, ``params.<name>: [...]``, ``model: [...]``,
    ``datasets: [[...], ...]``; the cells are their Cartesian product."""
    data = load_yaml_document(path)
    if not isinstance(data, dict) or not data:
        raise InputError(
            "the matrix must be a non-empty mapping of axis → list of values", file=str(path)
        )
    axes: list[tuple[str, list[object]]] = []
    for key, values in data.items():
        if not isinstance(values, list) or not values:
            raise InputError(
                f"matrix axis {key!r}: expected a non-empty list",
                file=str(path),
                found=type(values).__name__,
            )
        if key not in ("seed", "model", "datasets") and not str(key).startswith("params."):
            raise InputError(
                f"matrix axis {key!r} is not supported",
                file=str(path),
                hint="use seed, model, datasets or params.<name>",
            )
        axes.append((str(key), values))
    cells = [
        Cell(i, dict(zip([a for a, _ in axes], combo, strict=True)))
        for i, combo in enumerate(itertools.product(*(v for _, v in axes)))
    ]
    if len(cells) > MAX_CELLS:
        raise InputError(
            f"the matrix has {len(cells)} cells; the limit is {MAX_CELLS}", file=str(path)
        )
    return cells


def _cell_inputs(
    spec: EvalSpec, cell_dir: Path, base_lock: LockedSpec, store: ContentStore
) -> list[LockedInput]:
    """The cell's inputs, locked; published where the base's are (artifacts reused by digest)."""
    inputs = lock_inputs(spec, cell_dir, store)
    base = [base_lock.model, *base_lock.datasets]
    known = {(a.kind, a.sha256): a.artifact for a in base if a.artifact}
    if not known:
        return inputs  # the base lock publishes nothing (locked before inputs were)
    carried = []
    for item in inputs:
        artifact = known.get((item.locked.kind, item.locked.sha256))
        if artifact is None:
            repository = parse_digest_ref(base_lock.image.ref)[0]
            item = publish_inputs([item], repository, store)[0]
        else:
            record = item.locked.model_dump(mode="json") | {"artifact": artifact}
            item = replace(item, locked=type(item.locked).model_validate(record))
        carried.append(item)
    return carried


def _derive(
    spec_path: Path, base_lock: LockedSpec, cell: Cell, root: Path, store: ContentStore
) -> Path:
    """Write the cell's spec and lock: the base image by digest, the cell's inputs."""
    spec_dir = spec_path.resolve().parent
    data = load_yaml_document(spec_path)
    data["image"] = {"ref": base_lock.image.ref}
    data["metadata"]["labels"] = {
        **(data["metadata"].get("labels") or {}),
        "evalrun.dev/sweep-cell": str(cell.index),
    }
    if "seed" in cell.overrides:
        # A cell runs exactly one seed: the run-set policy of the base spec does not apply.
        data.pop("seeds", None)
        data.pop("repeats", None)
    for key, value in cell.overrides.items():
        if key.startswith("params."):
            data.setdefault("params", {})[key.removeprefix("params.")] = value
        else:
            data[key] = value
    for artifact in [data["model"], *data["datasets"]]:
        parsed = parse_input_uri(str(artifact["uri"]), field="uri")
        if isinstance(parsed, LocalUri):
            artifact["uri"] = str(parsed.resolve(spec_dir))
        if artifact.get("ca_file"):
            artifact["ca_file"] = str((spec_dir / str(artifact["ca_file"])).resolve())
    cell_dir = root / f"cell-{cell.index:04d}"
    cell_dir.mkdir(parents=True, exist_ok=True)
    for step in data.get("preprocessing") or []:
        # Preprocessing code is named relative to the spec: the cell gets the same code.
        src, dst = spec_dir / step["code"], cell_dir / step["code"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dst)
    for metric in data.get("metrics") or []:
        # so is a custom metric's file (its digest is in the base lock the cell inherits)
        custom = metric.get("custom") if isinstance(metric, dict) else None
        if isinstance(custom, dict) and (spec_dir / str(custom.get("file"))).is_file():
            dst = cell_dir / str(custom["file"])
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(spec_dir / str(custom["file"]), dst)
    cell_spec = cell_dir / "eval.yaml"
    cell_spec.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = parse_spec(data, source=f"{cell_spec} (sweep cell {cell.index})")
    inputs = _cell_inputs(spec, cell_dir, base_lock, store)
    lock = base_lock.model_copy(
        update={
            "spec_digest": spec.digest(),
            "model": inputs[0].locked,
            "datasets": [i.locked for i in inputs[1:]],
        }
    )
    write_lock(LockedSpec.model_validate(lock.model_dump(by_alias=True)), lock_path_for(cell_spec))
    return cell_spec


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    outcome: RunOutcome | None
    error: EvalrunError | None

    @property
    def exit_code(self) -> int:
        if self.outcome is not None:
            return self.outcome.exit_code
        return self.error.exit_code if self.error else 1


def run_sweep(
    spec_path: Path,
    matrix: list[Cell],
    backend: Backend,
    signer: Signer,
    settings: Settings,
    *,
    parallel: int = 4,
    progress: Progress = lambda _: None,
) -> list[CellResult]:
    """Run every cell (at most ``parallel`` at once); one bundle per cell."""
    _, base_lock = load_locked(spec_path)
    root = settings.home / "sweeps" / base_lock.digest().removeprefix("sha256:")[:16]
    store = ContentStore(settings.input_cache)
    specs = [(cell, _derive(spec_path, base_lock, cell, root, store)) for cell in matrix]
    results: list[CellResult] = []
    done = 0
    lock = threading.Lock()

    def one(cell: Cell, path: Path) -> CellResult:
        try:
            return CellResult(cell, run_evaluation(path, backend, signer, settings), None)
        except EvalrunError as exc:
            return CellResult(cell, None, exc)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(one, cell, path) for cell, path in specs]
        for future in as_completed(futures):
            result = future.result()
            with lock:
                done += 1
                results.append(result)
                status = (
                    result.outcome.outcome
                    if result.outcome
                    else (f"error: {result.error.message}" if result.error else "?")
                )
                progress(f"[{done}/{len(specs)}] {result.cell.label()}: {status}")
    results.sort(key=lambda r: r.cell.index)
    return results


def sweep_exit_code(results: list[CellResult]) -> int:
    """The sweep's exit code: the most severe of its cells' (see ``model.outcome.SEVERITY``)."""
    return worst_exit_code(r.exit_code for r in results)


class SweepRow(TypedDict):
    """One cell of ``evalrun sweep --json``: its axes and its run (or why it has none)."""

    cell: int
    axes: dict[str, object]
    outcome: str
    exit_code: int
    run_id: NotRequired[str]
    bundle: NotRequired[str]
    metrics: NotRequired[dict[str, float | None]]
    reason: NotRequired[str | None]


def summary_rows(results: list[CellResult]) -> list[SweepRow]:
    rows: list[SweepRow] = []
    for r in results:
        if r.outcome:
            rows.append(
                {
                    "cell": r.cell.index,
                    "axes": r.cell.overrides,
                    "run_id": r.outcome.run_id,
                    "outcome": r.outcome.outcome,
                    "exit_code": r.outcome.exit_code,
                    "bundle": str(r.outcome.bundle.path),
                    "metrics": {m.name: m.value for m in r.outcome.predicate.metrics},
                    "reason": r.outcome.reason,
                }
            )
        else:
            rows.append(
                {
                    "cell": r.cell.index,
                    "axes": r.cell.overrides,
                    "outcome": "error",
                    "exit_code": r.exit_code,
                    "reason": r.error.message if r.error else None,
                }
            )
    return rows


def summary_table(results: list[CellResult]) -> str:
    rows = summary_rows(results)
    names = sorted({n for r in rows for n in r.get("metrics", {})})
    header = ["cell", "axes", "run id", "outcome", *names]
    table = [header]
    for r, res in zip(rows, results, strict=True):
        metrics = r.get("metrics", {})
        table.append(
            [
                str(r["cell"]),
                res.cell.label(),
                r.get("run_id", "—"),
                str(r["outcome"]),
                *[f"{metrics[n]:.4f}" if n in metrics else "—" for n in names],
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r["outcome"])] = counts.get(str(r["outcome"]), 0) + 1
    lines.append("")
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


__all__ = ["Cell", "CellResult", "load_matrix", "run_sweep", "summary_table"]
