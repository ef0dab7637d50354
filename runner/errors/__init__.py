"""The evalrun error tree: every error class of the host side is defined in this package.

Every error the runner raises on purpose derives from :class:`EvalrunError`.
Each subclass maps to one process exit code (see DESIGN.md) and carries the
fields a user needs to act on it. Deep code raises these (chaining the cause
with ``raise … from exc``); only the CLI prints them and exits. Errors of an
SDK (Docker, Kubernetes, registry HTTP) are translated into these classes in
``runner/adapters/`` only: the transient ones derive from
:class:`TransientInfrastructureError`, which is what the retry policy retries.

How an error renders is one mechanism, in the root class (``root.py``): the message, its
fields, the items it lists (:class:`Problem`), and a hint. Subclasses only declare what
they carry: how a run ends badly in ``run_end.py``, policy (exit 4) in ``environment.py``,
bad input (exit 2) in ``bad_input.py``, integrity (exit 3) in ``integrity.py``, the SDK
boundaries in ``sdk.py``. Import every name from ``runner.errors``.
``runner.agent`` and ``runner.shared`` keep their own stdlib errors: they must not import
the host side.
"""

from runner.errors.bad_input import (
    BundleNotFound,
    ComparisonDifference,
    NotComparable,
    RefusedFile,
    SigningKeyRequired,
    SpecError,
)
from runner.errors.environment import (
    NamespacePolicyUnmet,
    UnmetDemand,
)
from runner.errors.integrity import (
    DigestMismatch,
    ImageUnavailable,
    InputsUnavailable,
    StoreConflict,
    UnresolvedInputLike,
    UnsafeBundleEntry,
    VerificationFailed,
    WantedInputLike,
)
from runner.errors.root import (
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
    IntegrityError,
    Problem,
    StoreFull,
    TransientInfrastructureError,
)
from runner.errors.run_end import (
    Interrupted,
    RunCancelled,
    StillRunning,
    StopRequested,
    ThresholdsFailed,
    interrupted_reason,
)
from runner.errors.sdk import (
    APIConflict,
    APIForbidden,
    APIGone,
    APINotFound,
    DockerAPIError,
    DockerEngineError,
    DockerImageNotFound,
    KubernetesAPIError,
    KubernetesError,
    KubernetesRejected,
    RegistryAccessDenied,
    RegistryAPIError,
    RegistryError,
    RegistryUntrusted,
    TokenError,
    TokenFailure,
    TokenRefused,
    TransientDockerError,
    TransientKubernetesError,
    TransientRegistryError,
)

__all__ = [
    "APIConflict",
    "APIForbidden",
    "APIGone",
    "APINotFound",
    "BundleNotFound",
    "ComparisonDifference",
    "DigestMismatch",
    "DockerAPIError",
    "DockerEngineError",
    "DockerImageNotFound",
    "EnvironmentMismatch",
    "EvalrunError",
    "ImageUnavailable",
    "InfrastructureError",
    "InputError",
    "InputsUnavailable",
    "IntegrityError",
    "Interrupted",
    "KubernetesAPIError",
    "KubernetesError",
    "KubernetesRejected",
    "NamespacePolicyUnmet",
    "NotComparable",
    "Problem",
    "RefusedFile",
    "RegistryAPIError",
    "RegistryAccessDenied",
    "RegistryError",
    "RegistryUntrusted",
    "RunCancelled",
    "SigningKeyRequired",
    "SpecError",
    "StillRunning",
    "StopRequested",
    "StoreConflict",
    "StoreFull",
    "ThresholdsFailed",
    "TokenError",
    "TokenFailure",
    "TokenRefused",
    "TransientDockerError",
    "TransientInfrastructureError",
    "TransientKubernetesError",
    "TransientRegistryError",
    "UnmetDemand",
    "UnresolvedInputLike",
    "UnsafeBundleEntry",
    "VerificationFailed",
    "WantedInputLike",
    "interrupted_reason",
]
