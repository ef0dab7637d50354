"""A run's id from what makes it that run (standard library only: the Docker helper that
starts a sandbox ahead of the runner computes it too, see runner.adapters.docker_ahead)."""

from __future__ import annotations

import hashlib


def run_id_for(lock_digest: str, attempt: int, target: str | None = None) -> str:
    """Deterministic run id: the same locked spec, attempt and target name the same run.

    ``target`` is where the run runs beyond the embedded default (a backend's
    ``run_target``, e.g. a cluster's API server and namespace); None — the local Docker
    engine — keeps the id runs have always had there, so earlier runs are still found.
    """
    if target is None:
        text = f"evalrun-run/v1\n{lock_digest}\n{attempt}"
    else:
        text = f"evalrun-run/v2\n{lock_digest}\n{attempt}\n{target}"
    return f"r-{hashlib.sha256(text.encode()).hexdigest()[:24]}"
