"""What several CLI commands share: the signing key, trusted keys, the backend and its
flags, and the local bundle a REF argument names."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner._internal.settings import Settings
from runner.cli.output import Term
from runner.errors import InputError


def key_access(args: argparse.Namespace) -> Any:
    """How this command reaches and unlocks keys (passphrase and PIN variables, the cluster)."""
    from runner.bundle.keys import PASSPHRASE_ENV, PIN_ENV, KeyAccess

    return KeyAccess(
        passphrase_env=getattr(args, "key_passphrase_env", None) or PASSPHRASE_ENV,
        pin_env=getattr(args, "pin_env", None) or PIN_ENV,
        kubeconfig=getattr(args, "kubeconfig", None),
        kube_context=getattr(args, "context", None),
    )


def signer_for(args: argparse.Namespace, settings: Settings, term: Callable[[str], None]) -> Any:
    """The signer of ``--key``, else ``$EVALRUN_KEY``, else the default key.

    The default key is created on the fly only in an interactive session, and then
    announced loudly on stderr (even under ``--json``); in CI or without a terminal
    this raises SigningKeyRequired (exit 2) instead.
    """
    from runner.bundle.keys import Session, resolve_signing_key

    return resolve_signing_key(
        args.key,
        key_access(args),
        default_private=settings.default_private_key,
        default_public=settings.default_public_key,
        session=Session.current(),
        announce=lambda text: print(text, file=sys.stderr, flush=True),
    )


def verifier_for(args: argparse.Namespace, settings: Settings, public: Path | None = None) -> Any:
    """The keys a bundle may be signed by: ``public`` and/or ``--keyring``, else the default
    public key. InputError if none is there."""
    from runner.bundle.keys import load_keyring
    from runner.bundle.signing import Keyring, load_verifier

    keyring: Path | None = getattr(args, "keyring", None)
    if keyring is not None:
        ring = load_keyring(keyring)
        if public is None:
            return ring
        return Keyring.of((load_verifier(public), *ring.verifiers), source=str(keyring))
    if public is None and not settings.default_public_key.exists():
        raise InputError(
            "no public key to verify bundles with",
            file=str(settings.default_public_key),
            hint="pass --pub KEY.pub (the key the bundles were signed with) or --keyring PATH"
            + (" (or --no-verify, to read it unverified)" if hasattr(args, "no_verify") else ""),
        )
    return load_verifier(public or settings.default_public_key)


def add_signing_key_args(p: argparse.ArgumentParser) -> None:
    """``--key`` (any key source) and the variables that unlock it."""
    p.add_argument(
        "--key",
        metavar="KEY",
        help="signing key: a PEM file, env:VAR, - (stdin), k8s://NAMESPACE/SECRET[/FIELD] or "
        "pkcs11:token=…;object=… (default: $EVALRUN_KEY, then $EVALRUN_HOME/keys/evalrun.key)",
    )
    add_unlock_args(p)


def add_unlock_args(p: argparse.ArgumentParser) -> None:
    """``--key-passphrase-env`` and ``--pin-env``."""
    p.add_argument(
        "--key-passphrase-env",
        metavar="VAR",
        help="variable holding the passphrase of an encrypted PEM key "
        "(default EVALRUN_KEY_PASSPHRASE)",
    )
    p.add_argument(
        "--pin-env",
        metavar="VAR",
        help="variable holding the PKCS#11 token's user PIN (default EVALRUN_PKCS11_PIN)",
    )


def add_keyring_arg(p: argparse.ArgumentParser) -> None:
    """``--keyring``: several trusted public keys."""
    p.add_argument(
        "--keyring",
        type=Path,
        metavar="PATH",
        help="trusted public keys: a directory of *.pub/*.pem files or a file of concatenated "
        "PEM public keys; the bundle's keyid selects one (keys from before a rotation)",
    )


def backend_for(
    args: argparse.Namespace, output: Callable[[Any], None] | None = None, early: Any = None
) -> Any:
    """The backend chosen by ``--backend`` and its flags; ``output`` gets live output lines;
    ``early``, an EarlyEngine the Docker backend starts its first container with."""
    if args.backend == "docker":
        from runner.backends.docker import DockerBackend

        return DockerBackend(output=output, early=early)
    from runner.backends.kubernetes import ClusterTarget, KubernetesBackend

    return KubernetesBackend(
        ClusterTarget(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace),
        unschedulable_grace_s=args.stuck_after,
        image_pull_grace_s=args.stuck_after,
        extra_tolerations=tuple(toleration(t) for t in args.tolerate),
        ttl_after_finished_s=args.ttl_after_finished,
        active_deadline_s=args.active_deadline,
        image_pull_secrets=tuple(args.image_pull_secret),
        priority_class=args.priority_class,
        queue=args.queue,
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


GLOBAL_OPTIONS_TITLE = "global options (before or after the command, same meaning)"


def add_global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, in one group: output, logs and the cluster.

    The top-level parser gets them with their defaults (``defaults=True``); every
    command's parser gets them with no default at all, so a flag given before the
    command is never reset by the command's parser, and one given after it wins.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    g = p.add_argument_group(GLOBAL_OPTIONS_TITLE)
    g.add_argument(
        "--json", action="store_true", default=default(False), help="one JSON object on stdout"
    )
    g.add_argument(
        "--log-json",
        action="store_true",
        default=default(False),
        help="JSON-lines logs on stderr (they always go to $EVALRUN_HOME/logs too)",
    )
    g.add_argument(
        "-v", "--verbose", action="store_true", default=default(False), help="debug logs"
    )
    g.add_argument(
        "--kubeconfig",
        metavar="FILE",
        default=default(None),
        help="kubeconfig for commands that reach a cluster (default: $KUBECONFIG, ~/.kube/config)",
    )
    g.add_argument(
        "--context",
        metavar="NAME",
        default=default(None),
        help="kubeconfig context (default: the current one)",
    )
    g.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        default=default(None),
        help="Kubernetes namespace (default: the context's)",
    )


def _seconds(text: str) -> int:
    """A whole number of seconds, at least 1 (argparse reports the error as a usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds >= 1, found {text!r}")
    return value


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend`` and the Kubernetes flags, plus ``--key`` and what unlocks it.

    The cluster itself (``--kubeconfig``, ``--context``, ``-n``) is a global option.
    """
    p.add_argument("--backend", default="docker", choices=["docker", "kubernetes"])
    p.add_argument(
        "--stuck-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="kubernetes: fail a pod that stays Unschedulable or in image-pull backoff this "
        "long (default 60); a pod waiting for capacity other pods hold is not stuck",
    )
    p.add_argument(
        "--tolerate",
        action="append",
        default=[],
        metavar="KEY:EFFECT",
        help="kubernetes: also tolerate this node taint (cluster-specific; repeatable)",
    )
    p.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        metavar="SECRET",
        help="kubernetes: pull the image and inputs with this dockerconfigjson Secret of the "
        "namespace (repeatable; replaces the spec's cluster.image_pull_secrets)",
    )
    p.add_argument(
        "--priority-class",
        metavar="NAME",
        help="kubernetes: the pod's PriorityClass, and with a queue the Kueue "
        "WorkloadPriorityClass (overrides the spec's cluster.priority_class)",
    )
    p.add_argument(
        "--queue",
        metavar="LOCALQUEUE",
        help="kubernetes: submit through this Kueue LocalQueue; the Job waits suspended "
        "until admitted, and the wait is timed apart from the run (overrides the spec's "
        "cluster.queue)",
    )
    p.add_argument(
        "--ttl-after-finished",
        type=int,
        default=600,
        metavar="SECONDS",
        help="kubernetes: remove a finished Job (and its ConfigMap) this long after its "
        "results are collected (default 600)",
    )
    p.add_argument(
        "--active-deadline",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="kubernetes: the Job's activeDeadlineSeconds, a hard cap after which Kubernetes "
        "stops it and the run ends 'timeout' (default: timeout_s + 300 s for start and "
        "preflight + the results hold)",
    )
    add_signing_key_args(p)


def add_no_verify_arg(p: argparse.ArgumentParser) -> None:
    """``--no-verify``: read a bundle without verifying it (said loudly on stderr)."""
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not verify the bundle before reading it (rarely right: what is shown is "
        "then vouched for by nobody, and every output says so)",
    )


def trust_for(args: argparse.Namespace, settings: Settings) -> Any:
    """The keys bundles must verify with (``--pub``/``--keyring``, else the default public
    key), or, with ``--no-verify``, :data:`~runner.bundle.reader.UNVERIFIED` — announced on
    stderr (even under ``--json``) so a log never hides it."""
    from runner.bundle.reader import UNVERIFIED

    if getattr(args, "no_verify", False):
        print(
            "evalrun: WARNING: --no-verify: bundles are read WITHOUT verifying their signature "
            "and hashes; nothing shown is vouched for",
            file=sys.stderr,
            flush=True,
        )
        return UNVERIFIED
    return verifier_for(args, settings, getattr(args, "pub", None))


@contextmanager
def bundle_for(
    ref: str, settings: Settings, args: argparse.Namespace, term: Term
) -> Iterator[Path]:
    """A local bundle (directory or ``.tar``) for ``ref``: a path, a run id or bundle digest in
    the store, an image digest (its newest run), or a registry ref (pulled, verified)."""
    from runner.bundle.locate import check_reference, locate_bundle
    from runner.bundle.oci_artifacts import is_registry_ref, pull_bundle
    from runner.bundle.store import Store

    check_reference(ref)
    store = Store(settings.home)
    if is_registry_ref(ref):
        local = _latest_run_for_image(ref, settings)
        if local is not None:
            yield local
            return
        pulled = pull_bundle(ref, store, verifier_for(args, settings, args.pub), progress=term)
        # an image with several evaluations attached: the newest one
        newest = max(pulled, key=lambda p: (_started(p.stored.path), p.run_id))
        yield newest.stored.path
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
        yield located.path


@contextmanager
def opened_bundle(
    ref: str, settings: Settings, args: argparse.Namespace, term: Term, trust: Any
) -> Iterator[Any]:
    """The :class:`~runner.bundle.reader.OpenedBundle` for ``ref``: located, then verified
    with ``trust`` (see :func:`trust_for`) before anything of it is read."""
    from runner.bundle.reader import open_bundle

    with bundle_for(ref, settings, args, term) as path:
        yield open_bundle(path, trust)


def _started(bundle: Path) -> str:
    from runner.bundle.reader import read_predicate

    return read_predicate(bundle).timestamps.started or ""


def _latest_run_for_image(ref: str, settings: Settings) -> Path | None:
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
    return runs[-1].path if runs else None


def add_tar_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``-o/--out``: also write the bundle as a ``.tar`` (as ``audit`` does)."""
    p.add_argument(
        "-o",
        "--out",
        metavar="PATH",
        help=f"also write the {what}'s bundle as a .tar (a directory: DIR/<run id>.tar); "
        "it must not exist yet",
    )


def bundle_tar(where: str | None, bundle: Path, run_id: str) -> Path | None:
    """Write ``bundle`` as a deterministic ``.tar`` at ``where`` (a directory, existing or
    written with a trailing ``/``: ``where/RUN_ID.tar``)."""
    from runner.bundle.archive import write_bundle_tar

    if where is None:
        return None
    out = Path(where)
    if out.is_dir() or where.endswith("/"):
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"{run_id}.tar"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    return write_bundle_tar(bundle, out)
