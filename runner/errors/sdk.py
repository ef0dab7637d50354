"""Errors at the SDK boundaries: Kubernetes, OCI registries, the Docker engine, PKCS#11
tokens.

The facts classes carry what a user needs about one request; each concrete error combines
them with the category (exit code, retried or not) it belongs to. Only ``runner/adapters/``
raises them.
"""

from __future__ import annotations

from runner.errors.root import (
    EnvironmentMismatch,
    EvalrunError,
    InfrastructureError,
    InputError,
    TransientInfrastructureError,
)


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
