"""What several CLI commands share: the signing key, the backend and its flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner._internal.settings import Settings
from runner.errors import InputError


def signer_for(args: argparse.Namespace, settings: Settings, term: Callable[[str], None]) -> Any:
    """The signer of ``--key``, or the default key (created, and said so, on first use)."""
    from runner.bundle.signing import generate_keypair, load_signer

    key = args.key
    if key is None:
        key = settings.default_private_key
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = generate_keypair(key, settings.default_public_key)
            term(
                f"created signing key {key} (public: {settings.default_public_key}, "
                f"keyid {info.keyid[:16]}…)"
            )
    return load_signer(key)


def backend_for(args: argparse.Namespace, output: Callable[[Any], None] | None = None) -> Any:
    """The backend chosen by ``--backend`` and its flags; ``output`` gets live output lines."""
    if args.backend == "docker":
        from runner.backends.docker import DockerBackend

        return DockerBackend(output=output)
    from runner.backends.kubernetes import ClusterTarget, KubernetesBackend

    return KubernetesBackend(
        ClusterTarget(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace),
        unschedulable_grace_s=args.stuck_after,
        image_pull_grace_s=args.stuck_after,
        extra_tolerations=tuple(toleration(t) for t in args.tolerate),
        ttl_after_finished_s=args.ttl_after_finished,
        output=output,
    )


def live_printer(term: Callable[[str], None]) -> Callable[[Any], None]:
    """Print each live output line of the evaluation (an ``OutputLine``) on the terminal."""
    return lambda line: term(f"\u2502 {line.text}")


def toleration(text: str) -> tuple[str, str]:
    key, _, effect = text.partition(":")
    if not key or effect not in ("NoSchedule", "NoExecute", "PreferNoSchedule"):
        raise InputError(
            f"--tolerate {text!r}: expected KEY:EFFECT (EFFECT NoSchedule, NoExecute or "
            "PreferNoSchedule)"
        )
    return key, effect


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend`` and the Kubernetes flags, plus ``--key``."""
    p.add_argument("--backend", default="docker", choices=["docker", "kubernetes"])
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    p.add_argument(
        "--stuck-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="kubernetes: fail a pod that stays Unschedulable or in image-pull backoff this "
        "long (default 60)",
    )
    p.add_argument(
        "--tolerate",
        action="append",
        default=[],
        metavar="KEY:EFFECT",
        help="kubernetes: also tolerate this node taint (cluster-specific; repeatable)",
    )
    p.add_argument(
        "--ttl-after-finished",
        type=int,
        default=600,
        metavar="SECONDS",
        help="kubernetes: remove a finished Job (and its ConfigMap) this long after its "
        "results are collected (default 600)",
    )
    p.add_argument("--key", type=Path, help="private signing key (default: $EVALRUN_HOME/keys)")
