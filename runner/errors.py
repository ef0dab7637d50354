"""The evalrun error tree: every error class of the host side is defined here.

Every error the runner raises on purpose derives from :class:`EvalrunError`.
Each subclass maps to one process exit code (see DESIGN.md) and carries the
fields a user needs to act on it. Deep code raises these (chaining the cause
with ``raise … from exc``); only the CLI prints them and exits. Errors of an
SDK (Docker, Kubernetes, registry HTTP) are translated into these classes in
``runner/adapters/`` only: the transient ones derive from
:class:`TransientInfrastructureError`, which is what the retry policy retries.

How an error renders is one mechanism, in the base class: the message, its
fields, the items it lists (:class:`Problem`), and a hint. Subclasses only
declare what they carry. ``runner.agent`` and ``runner.shared`` keep their own
stdlib errors: they must not import the host side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol


@dataclass(frozen=True)
class Problem:
    """One item an error lists: a line for people and a JSON-safe record for machines.

    ``text`` may span several lines; continuation lines carry their own indentation.
    """

    text: str
    record: object


class EvalrunError(Exception):
    """Root of every intentional evalrun failure."""

    exit_code: ClassVar[int] = 1
    kind: ClassVar[str] = "internal"
    listing_key: ClassVar[str | None] = None
    """Key of the listed problems in :meth:`as_dict`; None: ``problems``, only when any."""
    stated_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields the message already states: kept in :meth:`as_dict`, not repeated by diagnostics."""

    listing: tuple[Problem, ...] = ()
    """What the error lists (failed checks, offending fields); subclasses fill it in."""

    def __init__(self, message: str, *, hint: str | None = None, **fields: object) -> None:
        # the message is one line, whatever text (an SDK's, a bundle's) went into it
        if "\n" in message or "\r" in message:
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.fields: dict[str, object] = {k: v for k, v in fields.items() if v is not None}

    def diagnostics(self) -> str:
        """A human explanation: the message, the facts, what is listed, and what to do next."""
        lines = [self.message]
        lines.extend(
            f"  {key}: {value}"
            for key, value in self.fields.items()
            if key not in self.stated_fields and not self._states(value)
        )
        lines.extend(f"  - {problem.text}" for problem in self.listing)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def _states(self, value: object) -> bool:
        # a long value the message already quotes (a file path, a digest) is not repeated
        text = str(value)
        return len(text) >= 8 and text in self.message

    def as_dict(self) -> dict[str, object]:
        """A JSON-safe description for ``--json`` output and log lines."""
        data: dict[str, object] = {
            "error": self.kind,
            "exit_code": self.exit_code,
            "message": self.message,
            **{k: str(v) for k, v in self.fields.items()},
        }
        if self.listing or self.listing_key:
            data[self.listing_key or "problems"] = [p.record for p in self.listing]
        if self.hint:
            data["hint"] = self.hint
        return data


# --------------------------------------------------------------------------- by exit code


class InputError(EvalrunError):
    """Bad input or usage: a spec, lock, flag or file the user must fix (exit 2)."""

    exit_code = 2
    kind = "bad_input"


class IntegrityError(EvalrunError):
    """A digest, signature or content check failed (exit 3)."""

    exit_code = 3
    kind = "integrity"


class EnvironmentMismatch(EvalrunError):
    """The sandbox, driver, GPU or policy is not what the spec demands (exit 4)."""

    exit_code = 4
    kind = "environment_mismatch"


class InfrastructureError(EvalrunError):
    """A daemon, registry or cluster failed after bounded retries (exit 5)."""

    exit_code = 5
    kind = "infrastructure"


class StoreFull(InfrastructureError):
    """The store's filesystem ran out of space (or quota) while a bundle was written."""

    kind = "store_full"


class TransientInfrastructureError(InfrastructureError):
    """An infrastructure failure worth retrying (connection refused, 5xx, timeouts)."""

    kind = "infrastructure_transient"


class ThresholdsFailed(EvalrunError):
    """The evaluation ran and its metrics missed their thresholds (exit 6)."""

    exit_code = 6
    kind = "thresholds_failed"
    listing_key = "failed"

    def __init__(self, message: str, *, failed: Mapping[str, str]) -> None:
        super().__init__(message)
        self.failed = dict(failed)
        self.listing = tuple(
            Problem(f"{k}: {v}", {"metric": k, "reason": v}) for k, v in self.failed.items()
        )


class Interrupted(EvalrunError):
    """The user interrupted a run (Ctrl-C); state was cleaned up (exit 130)."""

    exit_code = 130
    kind = "interrupted"


class RunCancelled(EvalrunError):
    """The run was cancelled (``evalrun cancel``) before it ended; it is sealed so (exit 130)."""

    exit_code = 130
    kind = "cancelled"


class StillRunning(EvalrunError):
    """``evalrun wait --timeout`` gave up while the run goes on; nothing was sealed (exit 124,
    as timeout(1) has it)."""

    exit_code = 124
    kind = "still_running"


class StopRequested(KeyboardInterrupt):
    """A signal asked evalrun to stop (SIGTERM, as a CI runner cancels a job).

    Raised by the CLI's signal handler in the main thread; a ``KeyboardInterrupt``, so
    every path that cleans up after Ctrl-C cleans up after it the same way.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def interrupted_reason(signal_name: str | None) -> str:
    """What an interrupted run's bundle says stopped it."""
    if signal_name and signal_name != "SIGINT":
        return f"interrupted by {signal_name} (the job running evalrun was cancelled)"
    return "interrupted by the user (Ctrl-C)"


class UnmetDemand(Protocol):
    """What :class:`NamespacePolicyUnmet` needs of one finding (see backends.namespace_policy)."""

    @property
    def demand(self) -> str: ...

    @property
    def observed(self) -> str: ...

    @property
    def required(self) -> str: ...

    def as_json(self) -> Mapping[str, object]: ...


class NamespacePolicyUnmet(EnvironmentMismatch):
    """The target namespace does not enforce what the spec's sandbox policy demands (exit 4).

    Lists each demand not met with what was found and what is required.
    """

    kind = "namespace_policy_unmet"
    listing_key = "unmet"
    stated_fields = frozenset({"namespace"})

    def __init__(
        self, namespace: str, unmet: Sequence[UnmetDemand], *, hint: str | None = None
    ) -> None:
        names = ", ".join(f.demand for f in unmet)
        super().__init__(
            f"namespace {namespace!r} does not enforce what the sandbox policy demands: {names}",
            namespace=namespace,
            hint=hint,
        )
        self.listing = tuple(
            Problem(f"{f.demand}: found {f.observed}; required {f.required}", dict(f.as_json()))
            for f in unmet
        )


# --------------------------------------------------------------------------- bad input (2)


class SpecError(InputError):
    """A spec or lock file does not satisfy its schema.

    ``problems`` lists each offending field as ``(location, message)``.
    """

    kind = "invalid_spec"
    listing_key = "problems"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        problems: Sequence[tuple[str, str]] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, file=file)
        self.file = file
        self.problems = list(problems or [])
        self.listing = tuple(
            Problem(f"{loc}: {msg}", {"field": loc, "message": msg}) for loc, msg in self.problems
        )


class RefusedFile(InputError):
    """A file that is there but not one to read: a directory, FIFO or device, larger than
    the reader's bound, or unreadable (exit 2). ``reason`` fits a one-line message."""

    kind = "refused_file"

    def __init__(self, reason: str, *, file: str | None = None) -> None:
        super().__init__(reason, file=file)
        self.reason = reason


class BundleNotFound(InputError):
    """No stored bundle has the requested digest (or matches the requested run)."""

    kind = "bundle_not_found"

    def __init__(self, message: str, *, digest: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, digest=digest)
        self.digest = digest


class ComparisonDifference(Protocol):
    """What :class:`NotComparable` needs of one differing field (see workflows.compare)."""

    @property
    def field(self) -> str: ...

    @property
    def variants(self) -> Sequence[tuple[str, Sequence[str]]]: ...

    def as_dict(self) -> Mapping[str, object]: ...


class NotComparable(InputError):
    """The runs of a group differ in fields that make a ranking unfair (exit 2)."""

    kind = "not_comparable"
    listing_key = "differences"
    stated_fields = frozenset({"group"})

    def __init__(self, group: str, differences: Sequence[ComparisonDifference]) -> None:
        names = ", ".join(d.field for d in differences)
        super().__init__(
            f"the runs of comparison group {group!r} are not comparable: {names} differ",
            group=group,
            hint="make the runs comparable, or name each field you accept to differ with "
            + " ".join(f"--allow {d.field}" for d in differences),
        )
        self.group = group
        self.differences = list(differences)
        self.listing = tuple(
            Problem(
                f"{d.field}:"
                + "".join(f"\n      {', '.join(runs)}: {value}" for value, runs in d.variants),
                d.as_dict(),
            )
            for d in self.differences
        )


class SigningKeyRequired(InputError):
    """No signing key was given, and evalrun will not create one here (CI, or no terminal).

    ``reason`` says why this is not an interactive session; the message names every way
    to provide a key.
    """

    kind = "signing_key_required"
    stated_fields = frozenset({"reason"})

    def __init__(self, message: str, *, reason: str, default_key: str) -> None:
        super().__init__(message, reason=reason, default_key=default_key)
        self.reason = reason
        self.default_key = default_key


# --------------------------------------------------------------------------- integrity (3)


class DigestMismatch(IntegrityError):
    """An artifact's content does not hash to the digest it was pinned to."""

    def __init__(
        self,
        what: str,
        *,
        expected: str,
        found: str,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(
            f"{what}: digest mismatch", hint=hint, path=path, expected=expected, found=found
        )
        self.expected = expected
        self.found = found
        self.path = path


class VerificationFailed(IntegrityError):
    """A bundle failed verification; ``problems`` names every check that failed."""

    kind = "verification_failed"
    listing_key = "problems"

    def __init__(self, message: str, *, problems: Sequence[str], bundle: str | None = None) -> None:
        super().__init__(message, bundle=bundle)
        self.problems = list(problems)
        self.bundle = bundle
        self.listing = tuple(Problem(p, p) for p in self.problems)


class UnsafeBundleEntry(IntegrityError):
    """A bundle (or the content it is built from) holds an entry the runner refuses.

    Symlinks, hard links, devices, FIFOs, sockets, and paths that are absolute or
    contain ``..``: following any of them could read or write outside the bundle.
    """

    kind = "unsafe_bundle_entry"

    def __init__(self, message: str, *, path: str, reason: str, root: str | None = None) -> None:
        super().__init__(message, path=path, reason=reason, root=root)
        self.path = path
        self.reason = reason
        self.root = root


class StoreConflict(IntegrityError):
    """A run id is already indexed to a different bundle; the index is write-once."""

    kind = "store_conflict"

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        expected: str | None = None,
        found: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, run_id=run_id, expected=expected, found=found)
        self.run_id = run_id
        self.expected = expected
        self.found = found


class WantedInputLike(Protocol):
    """What :class:`InputsUnavailable` shows of one pinned input (see workflows.rerun)."""

    @property
    def role(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def label(self) -> str: ...


class UnresolvedInputLike(Protocol):
    """One pinned input that no longer resolves, and why."""

    @property
    def wanted(self) -> WantedInputLike: ...

    @property
    def reason(self) -> str: ...

    def as_dict(self) -> dict[str, str]: ...


class InputsUnavailable(IntegrityError):
    """Inputs of the original run that no longer resolve to their pinned digests (exit 3)."""

    kind = "inputs_unavailable"
    listing_key = "missing"
    stated_fields = frozenset({"run_id"})

    def __init__(self, run_id: str, missing: Sequence[UnresolvedInputLike]) -> None:
        super().__init__(
            f"cannot re-run {run_id}: {len(missing)} input(s) no longer resolve to the "
            "pinned digest; nothing was started",
            run_id=run_id,
            hint="pass --inputs DIR where the original files are (matched by sha256)",
        )
        self.run_id = run_id
        self.missing = list(missing)
        self.listing = tuple(
            Problem(
                f"{m.wanted.label}: {m.reason}",
                {
                    "role": m.wanted.role,
                    "name": m.wanted.name,
                    "path": m.wanted.path,
                    "sha256": m.wanted.sha256,
                    "reason": m.reason,
                },
            )
            for m in self.missing
        )


class ImageUnavailable(IntegrityError):
    """The pinned image digest is no longer in its registry (exit 3)."""

    kind = "image_unavailable"

    def __init__(self, message: str, *, image: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, image=image)
        self.image = image


# --------------------------------------------------------------------------- SDK boundaries
# The facts classes below carry what a user needs about one request; each concrete
# error combines them with the category (exit code, retried or not) it belongs to.


class KubernetesError(EvalrunError):
    """Facts of a failed Kubernetes API request: namespace, object name, HTTP status, reason.

    Raised only as one of its subclasses, which set the exit code.
    """

    def __init__(
        self,
        message: str,
        *,
        namespace: str | None = None,
        name: str | None = None,
        status: int | None = None,
        reason: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(
            message, hint=hint, namespace=namespace, name=name, status=status, reason=reason
        )
        self.namespace = namespace
        self.name = name
        self.status = status
        self.reason = reason


class KubernetesAPIError(KubernetesError, InfrastructureError):
    """The API server refused a request for a reason retrying will not change (exit 5)."""


class APIConflict(KubernetesAPIError):
    """409: the object exists (the caller may attach to it)."""

    kind = "k8s_conflict"


class APIForbidden(KubernetesAPIError):
    """403: RBAC or an admission policy refused the request."""

    kind = "k8s_forbidden"


class APINotFound(KubernetesAPIError):
    """404: the object (or its kind) does not exist."""

    kind = "k8s_not_found"


class TransientKubernetesError(KubernetesError, TransientInfrastructureError):
    """API server unreachable, overloaded (429) or failing (5xx): retried."""


class APIGone(TransientKubernetesError):
    """410: the resourceVersion is too old; re-list and watch again."""

    kind = "k8s_gone"


class KubernetesRejected(KubernetesError, InputError):
    """400/422: the API server rejected what the spec produced (exit 2)."""


class RegistryError(EvalrunError):
    """Facts of a failed OCI registry request: registry, repository, HTTP status, URL.

    Raised only as one of its subclasses, which set the exit code.
    """

    def __init__(
        self,
        message: str,
        *,
        registry: str | None = None,
        repository: str | None = None,
        status: int | None = None,
        url: str | None = None,
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(
            message,
            hint=hint,
            registry=registry,
            repository=repository,
            status=status,
            url=url,
            detail=detail,
        )
        self.registry = registry
        self.repository = repository
        self.status = status
        self.url = url


class RegistryAPIError(RegistryError, InfrastructureError):
    """The registry refused a request (a 4xx other than the ones callers expect) (exit 5)."""


class TransientRegistryError(RegistryError, TransientInfrastructureError):
    """The registry is unreachable or failing (5xx): retried."""


class RegistryAccessDenied(RegistryError, EnvironmentMismatch):
    """The registry wants credentials evalrun does not have, or refused them (exit 4)."""


class RegistryUntrusted(RegistryError, EnvironmentMismatch):
    """The registry's TLS certificate is not trusted (no CA for it under certs.d) (exit 4)."""


class DockerEngineError(EvalrunError):
    """Facts of a failed Docker engine request: what was attempted and the HTTP status.

    Raised only as one of its subclasses, which set the exit code.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        status: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, status=status)
        self.operation = operation
        self.status = status


class DockerAPIError(DockerEngineError, InfrastructureError):
    """The engine refused a request, or the object is gone (exit 5)."""


class TransientDockerError(DockerEngineError, TransientInfrastructureError):
    """The engine is unreachable or failing (5xx): retried."""


class DockerImageNotFound(DockerEngineError, InputError):
    """The engine does not have the image (exit 2; callers may pull it)."""


class TokenError(EvalrunError):
    """Facts of a failed PKCS#11 token operation: module, token and key object (never the PIN).

    Raised only as one of its subclasses, which set the exit code.
    """

    def __init__(
        self,
        message: str,
        *,
        module: str | None = None,
        token: str | None = None,
        key_object: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint, module=module, token=token, key_object=key_object)
        self.module = module
        self.token = token
        self.key_object = key_object


class TokenRefused(TokenError, InputError):
    """The token, key, PIN or module named is not usable as given (exit 2)."""

    kind = "token_refused"


class TokenFailure(TokenError, InfrastructureError):
    """The token failed an operation it should have done (device or module error) (exit 5)."""

    kind = "token_failure"
