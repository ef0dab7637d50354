"""The local test cluster (tests/cluster/up.sh), as seen from Python.

Used by the pytest fixtures of the ``k8s`` and ``kwok`` tiers and by any test
that needs a real Kubernetes API server::

    sys.path.insert(0, "tests/cluster")
    import cluster
    info = cluster.ensure_cluster()   # starts it (building what is missing) or reuses it
    info.kubeconfig, info.kubectl, info.helm, info.cosign, info.probe_image

``ensure_cluster`` raises ``ClusterStartError`` (carrying the log tail of the
failing component) when the cluster cannot start: callers must fail, not skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

CLUSTER_DIR = Path(__file__).resolve().parent
UP_SCRIPT = CLUSTER_DIR / "up.sh"
COMPONENT_SCRIPT = CLUSTER_DIR / "component.sh"
VERSIONS_FILE = CLUSTER_DIR / "versions.env"
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-router",
    "kwok",
)


class ClusterStartError(RuntimeError):
    """The local cluster could not be started; ``log_tail`` says why."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}\n{log_tail}".rstrip())
        self.log_tail = log_tail


@dataclass(frozen=True)
class ClusterInfo:
    """Where the running cluster and its pinned tools are."""

    kubeconfig: Path
    kubectl: Path
    helm: Path
    cosign: Path
    registry: str
    #: ``REGISTRY/evalrun/probe@sha256:...``: a scratch image with the static ``/probe`` tool.
    probe_image: str
    pause_image: str
    node_name: str
    state_dir: Path
    #: The static probe binary inside ``probe_image``, for building derived images.
    probe_binary: Path
    versions: Mapping[str, str] = field(default_factory=dict)

    def kubectl_cmd(self, *args: str) -> list[str]:
        """The pinned kubectl with this cluster's kubeconfig, followed by ``args``."""
        return [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args]


def _read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def versions() -> dict[str, str]:
    """The pinned component versions from ``tests/cluster/versions.env``."""
    return _read_env(VERSIONS_FILE)


def state_dir() -> Path:
    """The runtime state directory (certs, logs, pid files, kubeconfig)."""
    return Path(os.environ.get("EVALRUN_CLUSTER_STATE", "/var/tmp/evalrun-cluster"))


def _info_from_state() -> ClusterInfo:
    state = state_dir()
    env = _read_env(state / "cluster.env")
    return ClusterInfo(
        kubeconfig=Path(env["KUBECONFIG"]),
        kubectl=Path(env["KUBECTL"]),
        helm=Path(env["HELM"]),
        cosign=Path(env["COSIGN"]),
        registry=env["REGISTRY"],
        probe_image=env["PROBE_IMAGE_REF"],
        pause_image=env["PAUSE_IMAGE_REF"],
        node_name=env["NODE_NAME"],
        state_dir=state,
        probe_binary=Path(env["PROBE_BINARY"]),
        versions=versions(),
    )


def component_running(name: str) -> bool:
    """True when ``name`` runs as the process up.sh started (per its pid file)."""
    result = subprocess.run(
        ["bash", str(COMPONENT_SCRIPT), "status", name], capture_output=True, text=True, check=False
    )
    return result.returncode == 0


def cluster_ready() -> bool:
    """True when every component runs and the API server answers /readyz."""
    env_file = state_dir() / "cluster.env"
    if not env_file.is_file() or not all(component_running(c) for c in COMPONENTS):
        return False
    info = _info_from_state()
    if not info.kubectl.is_file():  # versions changed since it was started
        return False
    # A cluster started before a containerd bump still runs the old runtime (up.sh says so).
    pinned = f"/containerd-{versions()['CONTAINERD_VERSION']}/bin/containerd"
    if not (state_dir() / "run" / "containerd.exe").read_text().strip().endswith(pinned):
        return False
    probe = subprocess.run(
        info.kubectl_cmd("get", "--raw", "/readyz"),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return probe.returncode == 0


def ensure_cluster(timeout_s: float = 5400) -> ClusterInfo:
    """Reuse the running cluster, or run ``up.sh`` (which builds what is missing)."""
    if cluster_ready():
        return _info_from_state()
    try:
        result = subprocess.run(
            ["bash", str(UP_SCRIPT)], capture_output=True, text=True, check=False, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as e:
        raise ClusterStartError(f"up.sh did not finish within {timeout_s:.0f}s") from e
    if result.returncode != 0:
        tail = "\n".join(result.stderr.splitlines()[-120:])
        raise ClusterStartError(f"tests/cluster/up.sh failed (exit {result.returncode})", tail)
    return _info_from_state()


def restart_component(name: str) -> None:
    """Stop and start one component (for the API server: wait until it is ready again)."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")
    result = subprocess.run(
        ["bash", str(COMPONENT_SCRIPT), "restart", name],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        raise ClusterStartError(f"restarting {name} failed", result.stderr[-4000:])


def push_probe_image(
    info: ClusterInfo,
    repository: str,
    tag: str,
    extra_files: Mapping[str, bytes] | None = None,
    cmd: Iterable[str] = ("sleep", "3600"),
) -> str:
    """Push the probe tool plus ``extra_files`` as a new image; return its digest reference."""
    files = {"/probe": (info.probe_binary.read_bytes(), 0o755)}
    files.update({name: (data, 0o644) for name, data in (extra_files or {}).items()})
    return str(_oci().push_image(info.registry, repository, tag, files, ["/probe"], list(cmd)))


def _oci() -> ModuleType:
    # oci.py sits next to this file; load it by path so any import style works.
    spec = importlib.util.spec_from_file_location("evalrun_cluster_oci", CLUSTER_DIR / "oci.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for_pod(
    core: Any,
    namespace: str,
    name: str,
    phases: Iterable[str] = ("Succeeded",),
    timeout_s: float = 180,
) -> Any:
    """Watch pod ``name`` until its phase is in ``phases``; fail fast on a terminal mismatch.

    ``core`` is a ``kubernetes.client.CoreV1Api``. Raises ``AssertionError`` on
    Failed (when not wanted), image pull / container create errors, or timeout.
    """
    from kubernetes import watch

    wanted = set(phases)
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        w = watch.Watch()
        remaining = max(1, int(deadline - time.monotonic()))
        for event in w.stream(
            core.list_namespaced_pod,
            namespace,
            field_selector=f"metadata.name={name}",
            timeout_seconds=min(remaining, 60),
        ):
            pod = event["object"]
            last = pod
            phase = pod.status.phase if pod.status else None
            if phase in wanted:
                w.stop()
                return pod
            if phase == "Failed":
                w.stop()
                raise AssertionError(f"pod {namespace}/{name} failed: {_pod_summary(pod)}")
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                waiting = cs.state.waiting if cs.state else None
                if waiting and waiting.reason in {
                    "ErrImagePull",
                    "ImagePullBackOff",
                    "CreateContainerError",
                    "InvalidImageName",
                    "CreateContainerConfigError",
                }:
                    w.stop()
                    raise AssertionError(
                        f"pod {namespace}/{name}: {waiting.reason}: {waiting.message}"
                    )
    raise AssertionError(
        f"pod {namespace}/{name} not in {sorted(wanted)} after {timeout_s}s: {_pod_summary(last)}"
    )


def _pod_summary(pod: Any) -> str:
    if pod is None:
        return "never seen"
    status = pod.status
    return (
        f"phase={status.phase} reason={status.reason} message={status.message} "
        f"containers={status.container_statuses}"
    )
