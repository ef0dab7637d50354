"""Keys and signed bundles for the unit tests that build them: one way to make each.

test_bundle, test_verify and test_store make their key pairs and seal their bundles here,
so a change to how a key is written or a bundle is sealed is one edit, not one per module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from runner.bundle.build import build_bundle
from runner.bundle.signing import (
    Algorithm,
    Signer,
    Verifier,
    generate_keypair,
    load_signer,
    load_verifier,
)

Keys = tuple[Signer, Verifier]

# A small but realistic payload: spec, lock, environment, report, results and logs.
PAYLOAD: dict[str, bytes] = {
    "spec.yaml": b"apiVersion: evalrun/v1\nkind: Evaluation\n",
    "eval.lock.json": b'{"lock": true}\n',
    "env.json": b'{"python": "3.11"}\n',
    "report.md": b"# Report\n\naccuracy 0.97\n",
    "results/metrics.json": b'{"accuracy": {"value": 0.97, "ci": [0.95, 0.98]}}\n',
    "results/samples.jsonl": b'{"id": 0, "pred": 1, "label": 1}\n' * 50,
    "logs/events.jsonl": b'{"event": "start"}\n{"event": "end"}\n',
}


def make_keys(directory: Path, name: str = "k", algorithm: Algorithm = "ed25519") -> Keys:
    """A fresh key pair, written as ``directory/name`` and ``directory/name.pub`` and loaded."""
    generate_keypair(directory / name, directory / f"{name}.pub", algorithm)
    return load_signer(directory / name), load_verifier(directory / f"{name}.pub")


def write_payload(root: Path, files: Mapping[str, bytes] = PAYLOAD) -> Path:
    """Write ``files`` (relative path -> bytes) under ``root``; returns ``root``."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def seal_bundle(
    root: Path,
    signer: Signer,
    run_id: str = "run-a",
    files: Mapping[str, bytes] = PAYLOAD,
    *,
    outcome: object = "passed",
) -> Path:
    """Write ``files`` under ``root`` and seal them there, in place, as a signed bundle."""
    write_payload(root, files)
    build_bundle(root, {"run_id": run_id, "outcome": outcome}, signer, root)
    return root
