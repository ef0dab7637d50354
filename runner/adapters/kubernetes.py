"""The boundary to the Kubernetes API: connect, translate its errors once, watch.

``kubernetes.client.ApiException`` and urllib3/transport errors become evalrun
errors here (and only here), split into transient ones (unreachable, 429, 5xx,
410 Gone), which the retry policy retries by type, and permanent ones that name
the namespace, the object, the HTTP status and the API server's reason.

The shared watch of Jobs and Pods is in :mod:`runner.adapters.kube_watch`; exec and
log following in :mod:`runner.adapters.kube_streams`. Both go through the translation
here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from tenacity import Retrying

from runner._internal.foreign import KubeObject
from runner._internal.retry import call_with_retries
from runner.errors import (
    APIConflict,
    APIForbidden,
    APIGone,
    APINotFound,
    InputError,
    KubernetesAPIError,
    KubernetesError,
    KubernetesRejected,
    TransientKubernetesError,
)

# The watch logged under this name before it moved here; log consumers filter on it.
log = logging.getLogger("evalrun.backend.kubernetes")

UNREACHABLE_HINT = "check the kubeconfig/context and that the cluster is up"


# --------------------------------------------------------------------------- errors


def _classify(status: int, message: str) -> tuple[type[KubernetesError], str]:
    """The error class and message tail for an API status (0: no HTTP answer at all)."""
    if status == 409:
        return APIConflict, f"conflict: {message}"
    if status == 403:
        return APIForbidden, f"forbidden: {message}"
    if status == 404:
        return APINotFound, f"not found: {message}"
    if status == 410:
        return APIGone, "resource version too old"
    if status in (0, 429) or status >= 500:
        return TransientKubernetesError, f"API server error {status}: {message}"
    if status in (400, 422):
        return KubernetesRejected, f"rejected by the API server: {message}"
    return KubernetesAPIError, f"API error {status}: {message}"


def _status_body(exc: ApiException) -> KubeObject:
    """The ``Status`` object the API server sent with the error, if it parses."""
    try:
        body = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


@contextlib.contextmanager
def translated(
    what: str, *, namespace: str | None = None, name: str | None = None
) -> Iterator[None]:
    """Turn ApiException/transport errors raised inside the block into evalrun errors."""
    try:
        yield
    except ApiException as exc:
        body = _status_body(exc)
        cls, tail = _classify(exc.status or 0, str(body.get("message") or exc.reason))
        reason = body.get("reason") or exc.reason  # the Status reason, e.g. AlreadyExists
        raise cls(
            f"{what}: {tail}",
            namespace=namespace,
            name=name,
            status=exc.status,
            reason=str(reason) if reason else None,
        ) from exc
    except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError) as exc:
        raise TransientKubernetesError(
            f"{what}: API server unreachable: {exc.__class__.__name__}",
            namespace=namespace,
            name=name,
            hint=UNREACHABLE_HINT,
        ) from exc


def api_call(
    what: str,
    fn: Callable[[], Any],
    *,
    namespace: str | None = None,
    name: str | None = None,
    retries: bool = True,
    policy: Retrying | None = None,
) -> Any:
    """Call ``fn`` with translation and (by default) transient errors retried by type."""

    def attempt() -> Any:
        with translated(what, namespace=namespace, name=name):
            return fn()

    return call_with_retries(attempt, what=what, policy=policy) if retries else attempt()


def as_plain(obj: Any) -> Any:
    """An API object (or anything the client returns) as plain JSON-compatible data."""
    return k8s.ApiClient().sanitize_for_serialization(obj)


# --------------------------------------------------------------------------- connect


@dataclass(frozen=True)
class ClusterTarget:
    """Where to run: kubeconfig, context and namespace, as kubectl users expect."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


def connect(target: ClusterTarget) -> tuple[k8s.ApiClient, str]:
    """An API client and the namespace (flag, then the context's, then 'default')."""
    if (
        target.kubeconfig is None
        and target.context is None
        and not os.environ.get("KUBECONFIG")
        and not Path("~/.kube/config").expanduser().exists()
        and os.environ.get("KUBERNETES_SERVICE_HOST")
    ):
        # Inside a pod (e.g. the audit CronJob): the mounted service-account token.
        cfg = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=cfg)
        ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        in_pod_ns = target.namespace or (
            ns_file.read_text().strip() if ns_file.exists() else "default"
        )
        return k8s.ApiClient(cfg), in_pod_ns
    try:
        api = k8s_config.new_client_from_config(
            config_file=target.kubeconfig, context=target.context, persist_config=False
        )
        contexts, active = k8s_config.list_kube_config_contexts(config_file=target.kubeconfig)
    except (k8s_config.ConfigException, FileNotFoundError, TypeError) as exc:
        raise InputError(f"cannot load kubeconfig: {exc}", file=target.kubeconfig) from exc
    namespace = target.namespace
    if namespace is None:
        chosen = next((c for c in contexts if c["name"] == target.context), active)
        namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
    return api, namespace


def read_secret_data(target: ClusterTarget, namespace: str, name: str) -> dict[str, bytes]:
    """The decoded ``data`` of Secret ``namespace/name`` (field name -> bytes).

    Errors are translated (404: APINotFound, 403: APIForbidden); a field that is not
    valid base64 is left out rather than guessed at.
    """
    api, _ = connect(ClusterTarget(target.kubeconfig, target.context, namespace))
    try:
        secret = api_call(
            f"read Secret {namespace}/{name}",
            lambda: k8s.CoreV1Api(api).read_namespaced_secret(name, namespace),
            namespace=namespace,
            name=name,
        )
    finally:
        api.close()
    data: dict[str, bytes] = {}
    for field_name, value in ((secret.data or {}) if secret is not None else {}).items():
        try:
            data[str(field_name)] = base64.b64decode(str(value), validate=True)
        except binascii.Error:
            continue
    return data


# --------------------------------------------------------------------------- namespace policy


@dataclass(frozen=True)
class NamespaceRead:
    """The Namespace, its NetworkPolicies and a RuntimeClass as plain JSON; None (with a
    reason in ``unreadable``) where the API server refused to show them."""

    namespace: KubeObject | None
    network_policies: list[KubeObject] | None
    runtime_class_found: bool | None
    unreadable: tuple[str, ...] = ()


def read_namespace_policy(
    api: k8s.ApiClient, namespace: str, runtime_class: str | None
) -> NamespaceRead:
    """Read what decides whether ``namespace`` enforces a run's sandbox policy.

    Forbidden or absent objects are reported, not raised (the pure check turns them into
    findings); a transient failure is retried and then raised like any API error.
    """
    unreadable: list[str] = []
    ns_object: KubeObject | None = None
    policies: list[KubeObject] | None = None
    found: bool | None = None
    try:
        ns_object = as_plain(
            api_call(
                f"read Namespace {namespace}",
                lambda: k8s.CoreV1Api(api).read_namespace(namespace),
                name=namespace,
            )
        )
    except (APIForbidden, APINotFound) as exc:
        unreadable.append(exc.message)
    try:
        listing = api_call(
            f"list NetworkPolicies in {namespace}",
            lambda: k8s.NetworkingV1Api(api).list_namespaced_network_policy(namespace),
            namespace=namespace,
        )
        policies = [as_plain(p) for p in (listing.items or [])]
    except (APIForbidden, APINotFound) as exc:
        unreadable.append(exc.message)
    if runtime_class is not None:
        try:
            api_call(
                f"read RuntimeClass {runtime_class}",
                lambda: k8s.NodeV1Api(api).read_runtime_class(runtime_class),
                name=runtime_class,
            )
            found = True
        except APINotFound:
            found = False
        except APIForbidden:
            found = None  # cluster-scoped: the runner may not read it; admission decides
    return NamespaceRead(ns_object, policies, found, tuple(unreadable))
