"""Synthetic but realistic signed bundles for the history/diff/report unit tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from runner.bundle.build import build_bundle
from runner.bundle.signing import Signer
from runner.bundle.store import Store, StoredBundle

BASE_PREDICATE = {
    "run_id": "r-000000000000000000000000",
    "attempt": 0,
    "evalrun_version": "0.1.0",
    "backend": "docker",
    "spec": {"name": "digits-logreg", "digest": "sha256:" + "a" * 64},
    "lock_digest": "sha256:" + "b" * 64,
    "image": {
        "ref": "127.0.0.1:5000/evalrun/digits-logreg@sha256:" + "c" * 64,
        "digest": "sha256:" + "c" * 64,
        "rootfs_expected": "sha256:" + "d" * 64,
        "rootfs_found": "sha256:" + "d" * 64,
        "digest_confirmed_by_backend": True,
    },
    "sandbox": {"runtime_requested": "gvisor", "runtime_used": "runsc", "network": "none"},
    "model": {"path": "model/weights.json", "sha256": "e" * 64, "size": 10},
    "datasets": [
        {
            "name": "digits-test",
            "path": "data/digits_test.jsonl",
            "sha256": "f" * 64,
            "size": 20,
            "split": "test",
            "license": "BSD-3-Clause",
            "source": "sklearn",
        }
    ],
    "source": {"commit": "1" * 40, "dirty": False, "tree_sha256": "2" * 64},
    "params": {"batch": 32},
    "seeds": {"seed": 1234, "determinism": {"PYTHONHASHSEED": "1234"}},
    "environment": {
        "os": {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"},
        "kernel": {"release": "4.4.0"},
        "python": {"version": "3.11.2"},
        "packages": [{"name": "numpy", "version": "2.2.6"}],
        "cpu": {"model": "unknown", "usable_cpus": 2},
        "gpu": {"visible": False, "reason": "no NVML"},
    },
    "metrics": [
        {
            "name": "accuracy",
            "compute": "accuracy",
            "direction": "higher_is_better",
            "threshold": 0.9,
            "value": 0.9244444444444444,
            "n": 450,
            "passed": True,
            "ci": {"low": 0.9, "high": 0.9467, "level": 0.95, "method": "bootstrap_percentile",
                   "resamples": 1000},
        },
        {
            "name": "macro-f1",
            "compute": "macro_f1",
            "direction": "higher_is_better",
            "threshold": 0.9,
            "value": 0.9238,
            "n": 450,
            "passed": True,
            "ci": {"low": 0.8978, "high": 0.9460, "level": 0.95, "method": "bootstrap_percentile",
                   "resamples": 1000},
        },
    ],
    "outcome": "passed",
    "reason": None,
    "exit_code": 0,
    "timestamps": {"started": "2026-11-20T10:00:00.000+00:00",
                   "finished": "2026-11-20T10:00:10.000+00:00"},
}

PREDICTIONS = "".join(
    json.dumps({"id": f"s{i}", "label": i % 3, "prediction": i % 3 if i % 5 else (i + 1) % 3})
    + "\n"
    for i in range(30)
)


def predicate(**changes: object) -> dict:
    """A copy of BASE_PREDICATE; keys with dots set nested values (``seeds.seed``)."""
    data = copy.deepcopy(BASE_PREDICATE)
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return data


def store_run(store: Store, signer: Signer, pred: dict) -> StoredBundle:
    """Seal ``pred`` (with a spec, lock and per-sample file) into ``store``."""
    with store.staging_dir() as stage:
        (stage / "spec.yaml").write_text("apiVersion: evalrun/v1\n")
        (stage / "eval.lock.json").write_text(
            json.dumps({"base": {"ref": "127.0.0.1:5000/evalrun/base@sha256:" + "9" * 64},
                        "wheels": [{"filename": "numpy.whl", "sha256": "8" * 64}]})
        )
        (stage / "results").mkdir()
        (stage / "results" / "predictions.jsonl").write_text(PREDICTIONS)
        build_bundle(stage, pred, signer, stage)
        return store.put(stage)
