"""What several CLI commands share: the signing and verifying keys, the backend and its
flags, and the local bundle a REF argument names."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner._internal.settings import Settings
from runner.cli.output import Term
from runner.errors import InputError, VerificationFailed


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


def backend_for(args: argparse.Namespace) -> Any:
    """The backend chosen by ``--backend`` and its flags."""
    if args.backend == "docker":
        from runner.backends.docker import DockerBackend

        return DockerBackend()
    from runner.backends.kubernetes import ClusterTarget, KubernetesBackend

    return KubernetesBackend(
        ClusterTarget(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace),
        unschedulable_grace_s=args.stuck_after,
        image_pull_grace_s=args.stuck_after,
        extra_tolerations=tuple(toleration(t) for t in args.tolerate),
    )


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
    p.add_argument("--key", type=Path, help="private signing key (default: $EVALRUN_HOME/keys)")


def verifier_for(args: argparse.Namespace, settings: Settings) -> Any:
    """The verifier of ``--pub``, or of the default public key; InputError if there is none."""
    from runner.bundle.signing import load_verifier

    public: Path = args.pub or settings.default_public_key
    if not public.exists():
        raise InputError(
            "no public key to verify bundles with",
            file=str(public),
            hint="pass --pub KEY.pub (the key the bundles were signed with)",
        )
    return load_verifier(public)


@contextmanager
def bundle_for(
    ref: str, settings: Settings, args: argparse.Namespace, term: Term
) -> Iterator[tuple[Path, str | None]]:
    """A local bundle directory for ``ref``: path, run id/digest in the store, or registry ref."""
    from runner.bundle.locate import locate_bundle
    from runner.bundle.oci_artifacts import is_registry_ref, pull_bundle
    from runner.bundle.store import Store

    store = Store(settings.home)
    if is_registry_ref(ref):
        local = _latest_run_for_image(ref, settings)
        if local is not None:
            yield local
            return
        pulled = pull_bundle(ref, store, verifier_for(args, settings), progress=term)
        # an image with several evaluations attached: the newest one
        newest = max(pulled, key=lambda p: (_started(p.stored.path), p.run_id))
        yield newest.stored.path, newest.stored.digest
        return
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ref-", dir=store.tmp_dir) as tmp:
        try:
            located = locate_bundle(ref, store, Path(tmp))
        except InputError:
            image_run = _latest_run_for_image(ref, settings)
            if image_run is None:
                raise
            yield image_run
            return
        yield located.path, located.digest


def _started(bundle: Path) -> str:
    from runner.bundle.reader import read_predicate

    return read_predicate(bundle).timestamps.started or ""


def _latest_run_for_image(ref: str, settings: Settings) -> tuple[Path, str] | None:
    """The newest original run of an image given by digest (``sha256:…``), if any."""
    from runner.bundle.index import History
    from runner.bundle.run_records import RunFilter
    from runner.bundle.store import Store

    text = ref.split("@", 1)[-1]
    if not text.startswith("sha256:") or len(text) != 71:
        return None
    runs = [
        r
        for r in History(Store(settings.home)).query(RunFilter(image=text))
        if r.reproduction_of is None
    ]
    return (runs[-1].path, runs[-1].bundle_digest) if runs else None


def verification_text(bundle: Path, args: argparse.Namespace, settings: Settings) -> str:
    """One line on whether ``bundle`` verifies with the ``--pub`` (or default) key."""
    from runner.bundle.signing import load_verifier
    from runner.bundle.verify import verify_bundle

    public: Path = args.pub or settings.default_public_key
    if not public.exists():
        return "not checked (no public key; pass --pub)"
    try:
        vb = verify_bundle(bundle, load_verifier(public))
    except VerificationFailed as exc:
        return "FAILED: " + "; ".join(exc.problems)
    return f"valid: signed by keyid {vb.keyid}, {vb.file_count} files, every hash matches"
