"""A locked copy of examples/digits that `evalrun run` can seal a bundle for without a daemon.

The lock is written here (no image is built); pointed at a Docker socket that does not
exist, `evalrun run` fails its preflight and seals a signed `infrastructure_failure`
bundle — a real run through the CLI's signing path, in the unit tier.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits"


def locked_example(dest: Path) -> Path:
    """Copy examples/digits to ``dest``, write its lock there; returns the spec path."""
    from runner.build.lock import write_lock
    from runner.model.spec import load_spec
    from runner.model.lock import LockedSpec

    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("eval.lock.json", "__pycache__"))
    spec = load_spec(dest / "eval.yaml")
    lock = LockedSpec.model_validate(
        {
            "schema": "evalrun/lock/v1",
            "spec_name": spec.metadata.name,
            "spec_digest": spec.digest(),
            "base": None,
            "wheels": [],
            "image": {
                "ref": "127.0.0.1:5000/evalrun/digits-logreg@sha256:" + "a" * 64,
                "rootfs_digest": "sha256:" + "b" * 64,
            },
            "model": {
                "path": "model/weights.json",
                "sha256": spec.model.sha256,
                "size": (dest / "model" / "weights.json").stat().st_size,
            },
            "datasets": [
                {
                    "path": "data/digits_test.jsonl",
                    "sha256": d.sha256,
                    "size": (dest / "data" / "digits_test.jsonl").stat().st_size,
                    "name": d.name,
                    "split": d.split,
                    "license": d.license,
                    "source": d.source,
                }
                for d in spec.datasets
            ],
            "source": {"commit": None, "dirty": False, "tree_sha256": "e" * 64},
        }
    )
    write_lock(lock, dest / "eval.lock.json")
    return dest / "eval.yaml"
