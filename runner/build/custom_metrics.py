"""The custom metric files a spec declares: found, parsed (never run) and digested.

A custom metric's file is code of the evaluation's repository, locked by digest like the
preprocessing code. The host only reads it: :func:`custom_metric_records` checks that the
file is a regular Python file inside the spec directory that parses and defines the named
function at top level (with :mod:`ast`; the code is never imported on the runner host),
and records its digest. The function runs only in the recompute sandbox.
"""

from __future__ import annotations

import ast
from pathlib import Path

from runner.build.preprocessing import code_digest
from runner.errors import SpecError
from runner.model.lock import LockedCustomMetric
from runner.model.spec import EvalSpec

# A metric file is small code; a bigger one is refused before it is read.
MAX_METRIC_FILE_BYTES = 1 << 20


def _defined_functions(tree: ast.Module) -> set[str]:
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def _problem(spec_dir: Path, rel: str, function: str) -> str | None:
    path = spec_dir / rel
    if path.is_symlink() or not path.exists():
        return f"{rel} not found" if not path.is_symlink() else f"{rel} is a symbolic link"
    if not path.is_file():
        return f"{rel} is not a regular file"
    try:
        path.resolve().relative_to(spec_dir.resolve())
    except ValueError:
        return f"{rel} is outside the spec directory"
    if path.stat().st_size > MAX_METRIC_FILE_BYTES:
        return f"{rel} is larger than {MAX_METRIC_FILE_BYTES} bytes"
    try:
        tree = ast.parse(path.read_bytes(), filename=rel)
    except (SyntaxError, ValueError) as exc:
        return f"{rel} is not valid Python: {exc}"
    if function not in _defined_functions(tree):
        found = sorted(_defined_functions(tree))
        return f"{rel} defines no function {function!r} (found: {found or 'none'})"
    return None


def custom_metric_records(spec: EvalSpec, spec_path: Path) -> list[LockedCustomMetric]:
    """Each custom metric of the spec with the digest of its file, as found now.

    SpecError (exit 2) naming ``metrics[i].custom`` for a file that is missing, not a
    regular Python file inside the spec directory, does not parse, or does not define the
    function at top level.
    """
    spec_dir = spec_path.resolve().parent
    records = []
    problems = []
    for index, metric in enumerate(spec.metrics):
        if metric.custom is None:
            continue
        where = f"metrics[{index}].custom"
        problem = _problem(spec_dir, metric.custom.file, metric.custom.function)
        if problem is not None:
            problems.append((where, problem))
            continue
        records.append(
            LockedCustomMetric(
                name=metric.name,
                file=metric.custom.file,
                function=metric.custom.function,
                digest=code_digest(spec_dir / metric.custom.file),
            )
        )
    if problems:
        raise SpecError("custom metric file unusable", file=str(spec_path), problems=problems)
    return records
