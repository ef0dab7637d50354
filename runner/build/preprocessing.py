"""The declared preprocessing steps of a spec, with the digest of their code as found now.

Apart from :mod:`runner.build.provenance` because a run needs it before its sandbox starts,
and the predicate's models only for a spec that declares steps: the provenance block and
the rest of the predicate are built while the evaluation runs (runner.workflows.run).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runner._internal.tree import TreeDigestFormat, digest_tree, sha256_file
from runner.errors import SpecError

if TYPE_CHECKING:
    from runner.model.predicate import JsonObject
    from runner.model.spec import EvalSpec


def code_digest(path: Path) -> str:
    """``sha256:`` of a file, or of a directory (sorted relative paths and file digests).

    A directory uses the :attr:`~runner._internal.tree.TreeDigestFormat.CODE`
    layout; a symlink below it raises InputError (links are never followed).
    """
    if path.is_file():
        return "sha256:" + sha256_file(path)
    return digest_tree(path, TreeDigestFormat.CODE, what="preprocessing code")


def preprocessing_records(spec: EvalSpec, spec_dir: Path) -> list[JsonObject]:
    """The spec's preprocessing steps with the digest of their code, as found now.

    Each is a :class:`PreprocessingRecord` as the JSON it is signed as (workflows/run.py
    compares them with the lock by key). A step whose code is missing is a spec error
    (exit 2): its digest cannot be recorded.
    """
    if not spec.preprocessing:
        return []
    from runner.model.predicate import PreprocessingRecord

    records = []
    missing = []
    for index, step in enumerate(spec.preprocessing):
        path = spec_dir / step.code
        if not path.exists():
            missing.append((f"preprocessing[{index}].code", f"{step.code} not found"))
            continue
        records.append(
            PreprocessingRecord(
                name=step.name,
                code=step.code,
                code_digest=code_digest(path),
                kind="file" if path.is_file() else "directory",
                params=step.params,
            ).to_json()
        )
    if missing:
        raise SpecError("preprocessing code not found", file=str(spec_dir), problems=missing)
    return records
