"""Small, valid inputs the corpora start from (``run_fuzzers.py --seed`` writes them)."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from harness import fuzz_signer

from runner.adapters.docker_ahead import Request
from runner.bundle.archive import write_bundle_tar
from runner.bundle.build import build_bundle
from runner.shared.protocol import (
    AGENT_RUN_COMMAND,
    INPUTS_MOUNT,
    PLAN_MOUNT,
    RESULTS_MOUNT,
    RUN_ID_LABEL,
)
from runner.shared.run_ids import run_id_for

ROOT = Path(__file__).resolve().parents[2]
SPEC = (ROOT / "examples" / "digits" / "eval.yaml").read_bytes()
IMAGE = "127.0.0.1:5000/evalrun/fuzz@sha256:" + "c" * 64

PREDICATE = {
    "run_id": "r-fuzz00000000000000000000",
    "attempt": 1,
    "backend": "docker",
    "spec": {"name": "fuzz", "digest": "sha256:" + "a" * 64},
    "lock_digest": "sha256:" + "b" * 64,
    "image": {"ref": IMAGE, "digest": "sha256:" + "c" * 64},
    "sandbox": {"runtime_requested": "gvisor", "runtime_used": "runsc", "network": "none"},
    "model": {"path": "model.json", "sha256": "e" * 64, "size": 10},
    "datasets": [
        {
            "name": "d",
            "sha256": "f" * 64,
            "split": "test",
            "license": "x",
            "source": "y",
            "path": "d.jsonl",
            "size": 3,
        }
    ],
    "params": {"c": 1.5},
    "seeds": {"seed": 1},
    "environment": {"os": {"PRETTY_NAME": "Debian"}, "packages": [{"name": "a", "version": "1"}]},
    "metrics": [
        {
            "name": "accuracy",
            "value": 0.9,
            "n": 3,
            "direction": "higher_is_better",
            "threshold": 0.5,
            "passed": True,
            "ci": {"low": 0.8, "high": 0.95, "level": 0.95, "method": "wilson"},
        }
    ],
    "outcome": "passed",
    "exit_code": 0,
    "timestamps": {"started": "2026-01-01T00:00:00.000+00:00"},
}
PREDICTIONS = (
    b'{"id": "1", "label": 1, "prediction": 1}\n{"id": "2", "label": 0, "prediction": 1}\n'
)
LOCK = json.dumps({"base": {"ref": "r@sha256:" + "9" * 64}, "wheels": []}).encode()


def bundle_dir(root: Path) -> Path:
    """A small signed bundle (the fuzz key) under ``root``."""
    content = root / "bundle"
    (content / "results").mkdir(parents=True)
    (content / "results" / "predictions.jsonl").write_bytes(PREDICTIONS)
    (content / "eval.lock.json").write_bytes(LOCK)
    (content / "spec.yaml").write_bytes(b"apiVersion: evalrun/v1\n")
    build_bundle(content, PREDICATE, fuzz_signer(), content)
    return content


def bundle_tar() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = bundle_dir(Path(tmp))
        return write_bundle_tar(bundle, Path(tmp) / "b.tar").read_bytes()


def results_tar() -> bytes:
    files = {
        "predictions.jsonl": PREDICTIONS,
        "metrics.json": json.dumps(
            {"metrics": [{"name": "accuracy", "value": 0.5, "ci": {"low": 0.0, "high": 1.0}}]}
        ).encode(),
        "env.json": b'{"os": {"PRETTY_NAME": "Debian"}}',
        "summary.json": b'{"evaluation": {"ok": true}}',
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sandbox_request(
    image: str,
    lock_digest: str,
    attempt: int,
    plan: str | None = "/tmp/p",
    results: str | None = "/tmp/r",
    spec_name: str = "fuzz",
    **options: Any,
) -> Request:
    """The Docker request the sandbox policy makes for one attempt (one model input);
    ``options`` replace the policy's. Shared by the ``ahead`` target and its unit tests."""
    run_id = run_id_for(lock_digest, attempt)
    return Request(
        image,
        AGENT_RUN_COMMAND,
        (
            (PLAN_MOUNT, plan, True),
            (RESULTS_MOUNT, results, False),
            (f"{INPUTS_MOUNT}/model/w.json", "/cache/blobs/sha256/ab", True),
        ),
        {
            "name": f"evalrun-{run_id}",
            "runtime": "runsc",
            "network_mode": "none",
            "read_only": True,
            "tmpfs": {"/tmp": "rw,nosuid,nodev,size=256m"},
            "user": "65532:65532",
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": 128,
            "mem_limit": "512m",
            "memswap_limit": "512m",
            "nano_cpus": 1_000_000_000,
            "labels": {RUN_ID_LABEL: run_id, "org.evalrun.spec": spec_name},
            **options,
        },
    )
