"""Custom metrics, recomputed by the runner in a separate sandbox of the pinned image.

The evaluation's container may report any number for a custom metric; it is never used.
After the run, the runner starts a second container of the run's image (by digest) on
the runner host's Docker engine, always under gVisor (``runsc``), with no network, a
read-only root filesystem, the non-root sandbox user, no capabilities, pids/memory/CPU
limits and one read-only mount holding only the per-sample file and the metric file.
The stdlib driver (:mod:`runner.shared.custom_metric`, passed as ``python3 -I -B -c``)
calls the function on all samples and on each bootstrap resample drawn from the seed the
runner chose; the runner checks the digest of the indices the driver used, computes the
interval itself and records the metric file digest and the image digest it ran.

On Kubernetes the same host sandbox is used (docs/design-decisions.md); without a Docker
engine with ``runsc`` on the runner host a spec with custom metrics is refused (exit 4)
before anything is submitted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from runner.adapters.docker_engine import (
    connect,
    create_container,
    docker_call,
    remove_container,
    remove_named,
    runtimes,
    translated,
)
from runner.backends.docker_policy import RUNTIME_NAMES, BindMount, ContainerPolicy
from runner.errors import EnvironmentMismatch, EvalrunError, IntegrityError
from runner.model.base import parse_digest_ref
from runner.model.plan import SANDBOX_UID
from runner.shared import custom_metric as driver
from runner.shared.definitions import MetricDefinition
from runner.shared.metrics import CiRecord
from runner.shared.protocol import RUN_ID_LABEL

log = logging.getLogger("evalrun.custom_metric")

# stdout the runner reads back from the driver at most (the per-resample values)
MAX_RESULT_BYTES = 16 << 20
GVISOR = RUNTIME_NAMES["gvisor"]


@dataclass(frozen=True)
class CustomMetricJob:
    """One custom metric to recompute: its definition, its locked file and digest."""

    definition: MetricDefinition
    file: Path
    file_digest: str


def resample_seed(seed: int, name: str) -> int:
    """The metric's resampling stream: the run seed and the metric name (as for the
    catalogue's metrics), chosen by the runner."""
    digest = hashlib.sha256(f"evalrun-bootstrap/v1:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


def driver_source() -> str:
    """The driver's source, run in the sandbox with ``python3 -c`` (no file of it there)."""
    return Path(driver.__file__).read_text(encoding="utf-8")


def recompute_policy(
    image_ref: str,
    *,
    run_id: str,
    index: int,
    mount_dir: Path,
    args: driver.DriverArgs,
    memory_mib: int,
    cpus: float,
    pids: int,
) -> ContainerPolicy:
    """The recompute container for one metric: pure, pinned by unit tests."""
    parse_digest_ref(image_ref)  # only ever by digest
    memory = f"{memory_mib}m"
    return ContainerPolicy(
        image=image_ref,
        entrypoint=("python3", "-I", "-B", "-c", driver_source()),
        command=(json.dumps(dict(args), sort_keys=True),),
        name=f"evalrun-{run_id}-metric-{index}",
        runtime=GVISOR,
        network_mode="none",
        read_only_rootfs=True,
        tmpfs={},
        user=f"{SANDBOX_UID}:{SANDBOX_UID}",
        cap_drop=("ALL",),
        security_opt=("no-new-privileges",),
        pids_limit=pids,
        memory=memory,
        memory_and_swap=memory,
        nano_cpus=int(cpus * 1e9),
        mounts=(BindMount(target=driver.MOUNT, source=str(mount_dir), read_only=True),),
        labels={RUN_ID_LABEL: run_id, "org.evalrun.role": "custom-metric"},
    )


def _ci_settings(definition: MetricDefinition) -> tuple[str, float, int]:
    """The metric's CI method, level and resamples (none: no resamples at all)."""
    ci = definition.get("ci")
    method = str(ci.get("method", "bootstrap_percentile")) if ci else "bootstrap_percentile"
    level = float(ci.get("level", 0.95)) if ci else 0.95
    resamples = 0 if method == "none" else (int(ci.get("resamples", 1000)) if ci else 1000)
    return method, level, resamples


def _percentile(values: Sequence[float], q: float) -> float:
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


class RecomputedIn(TypedDict):
    """Where the runner recomputed a custom metric: the run's image, gVisor, no network."""

    image: str
    runtime: str
    network: str


class CustomRecord(TypedDict):
    """A custom metric's own part of its record: its function, file and sandbox; what the
    container reported beside it is added by :func:`runner.workflows.custom_metrics`."""

    file: str
    function: str
    file_sha256: str
    recomputed_in: RecomputedIn
    container_reported: NotRequired[object]
    overridden: NotRequired[bool]


class CustomMetricRecord(TypedDict):
    """A custom metric as the runner records it (a :class:`MetricRecord` and its custom part)."""

    name: str
    value: float
    n: int
    ci: CiRecord
    custom: CustomRecord


# The driver's reply, decoded from its result line: untrusted JSON, checked field by field.
DriverReply = Mapping[str, object]


def result_from_driver(
    job: CustomMetricJob, reply: DriverReply, *, stream: int, n: int, image_digest: str
) -> CustomMetricRecord:
    """The metric as the runner records it, from the driver's reply — checked first.

    ``stream`` is the resampling seed the runner gave the driver (:func:`resample_seed`).

    IntegrityError (exit 3) when the driver reports an error (the function raised, or
    returned something that is not a finite number), another sample count, or resamples
    that are not the ones the runner drew.
    """
    name = str(job.definition["name"])
    if "error" in reply:
        raise IntegrityError(
            f"custom metric {name} could not be recomputed in the sandbox: "
            f"{str(reply['error'])[:300]}",
            file=str(job.definition["custom"]["file"]),
        )
    method, level, resamples = _ci_settings(job.definition)
    try:
        value = driver.number(reply.get("value"), f"custom metric {name}")
        values = reply.get("resamples")
        if reply.get("n") != n or not isinstance(values, list) or len(values) != resamples:
            raise ValueError("the sandbox did not compute what the runner asked for")
        if reply.get("indices_sha256") != driver.indices_digest(stream, n, resamples):
            raise ValueError("the resamples used are not the ones the runner drew")
        stats = sorted(
            driver.number(v, f"custom metric {name} (resample)") for v in values if v is not None
        )
    except ValueError as exc:
        raise IntegrityError(f"custom metric {name}: {exc}") from None
    low = high = None
    if stats:
        alpha = (1 - level) / 2
        low, high = _percentile(stats, alpha), _percentile(stats, 1 - alpha)
    ci_record: CiRecord = {
        "low": low,
        "high": high,
        "method": method,
        "level": level,
        "resamples": resamples,
    }
    custom = job.definition["custom"]
    out: CustomMetricRecord = {
        "name": name,
        "value": value,
        "n": n,
        "ci": ci_record,
        "custom": {
            "file": custom["file"],
            "function": custom["function"],
            "file_sha256": job.file_digest,
            "recomputed_in": {"image": image_digest, "runtime": GVISOR, "network": "none"},
        },
    }
    undefined = len(values) - len(stats)
    if undefined:
        out["ci"]["undefined_resamples"] = undefined
    return out


def _last_result_line(stdout: str) -> DriverReply:
    for line in reversed(stdout.splitlines()):
        if line.startswith(driver.RESULT_MARKER):
            try:
                reply = json.loads(line[len(driver.RESULT_MARKER) :])
            except ValueError:
                break
            if isinstance(reply, dict):
                return reply
            break
    return {"error": "the sandbox gave no result line"}


class CustomMetricSandbox:
    """Runs recompute containers on the runner host's Docker engine (gVisor only)."""

    def __init__(self, client: Any | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect(timeout=60)
        return self._client

    def preflight(self, image_ref: str | None = None) -> None:
        """EnvironmentMismatch (exit 4) unless a Docker engine with gVisor is reachable (and,
        given ``image_ref``, has or can pull that image) — checked before the run starts."""
        try:
            available = runtimes(self.client)
        except EvalrunError as exc:
            raise EnvironmentMismatch(
                "the spec declares custom metrics, which the runner recomputes in a gVisor "
                "sandbox on this host's Docker engine, but no Docker engine is reachable "
                f"({exc.message})",
                hint="run where Docker with runsc is available (make host-up), or drop the "
                "custom metrics; user code never runs on the runner host itself",
            ) from None
        if GVISOR not in available:
            raise EnvironmentMismatch(
                "the spec declares custom metrics, which the runner recomputes in a gVisor "
                f"sandbox, but the Docker engine has no {GVISOR!r} runtime",
                expected=GVISOR,
                found=sorted(available),
                hint="install runsc and register it in /etc/docker/daemon.json (make host-up)",
            )
        if image_ref is None:
            return
        try:
            self._ensure_image(image_ref)
        except EvalrunError as exc:
            raise EnvironmentMismatch(
                "the spec declares custom metrics, which the runner recomputes in a sandbox of "
                f"the run's image, but this host's Docker engine cannot get {image_ref} "
                f"({exc.message})",
                hint="make the image's registry reachable from the runner host",
            ) from None

    def _ensure_image(self, ref: str) -> str:
        """The local image id of ``ref`` (pulled by digest when absent)."""
        try:
            with translated(f"inspect {ref}"):
                return str(self.client.images.get(ref).id)
        except EvalrunError:
            pass
        repo, digest = ref.split("@", 1)
        docker_call(f"pull {ref}", lambda: self.client.api.pull(repo, tag=digest))
        with translated(f"inspect {ref}"):
            return str(self.client.images.get(ref).id)

    def recompute(
        self,
        jobs: Sequence[CustomMetricJob],
        predictions: Path,
        *,
        image_ref: str,
        run_id: str,
        seed: int,
        n: int,
        timeout_s: int,
        memory_mib: int = 2048,
        cpus: float = 1.0,
        pids: int = 128,
    ) -> list[CustomMetricRecord]:
        """Every job's metric, recomputed in its own sandbox (see :func:`result_from_driver`)."""
        image_digest = parse_digest_ref(image_ref)[1]
        if jobs:
            self._ensure_image(image_ref)
        out = []
        for index, job in enumerate(jobs):
            name = str(job.definition["name"])
            _, _, resamples = _ci_settings(job.definition)
            args: driver.DriverArgs = {
                "function": job.definition["custom"]["function"],
                "seed": resample_seed(seed, name),
                "resamples": resamples,
            }
            with tempfile.TemporaryDirectory(prefix="evalrun-metric-") as tmp:
                mount = Path(tmp)
                shutil.copyfile(predictions, mount / driver.SAMPLES_FILE)
                shutil.copyfile(job.file, mount / driver.METRIC_FILE)
                for f in mount.iterdir():
                    f.chmod(0o444)
                mount.chmod(0o755)
                policy = recompute_policy(
                    image_ref,
                    run_id=run_id,
                    index=index,
                    mount_dir=mount,
                    args=args,
                    memory_mib=memory_mib,
                    cpus=cpus,
                    pids=pids,
                )
                reply = self._run(policy, timeout_s)
            log.info(
                "custom metric recomputed",
                extra={"event": "custom_metric", "metric": name, "run_id": run_id},
            )
            out.append(
                result_from_driver(job, reply, stream=args["seed"], n=n, image_digest=image_digest)
            )
        return out

    def _run(self, policy: ContainerPolicy, timeout_s: int) -> DriverReply:
        client = self.client
        remove_named(client, policy.name)
        mounts = [(m.target, m.source, m.read_only) for m in policy.mounts]
        options = dict(policy.engine_options())
        container = docker_call(
            "create custom metric container",
            lambda: create_container(client, policy.image, list(policy.command), mounts, options),
        )
        try:
            docker_call("start container", container.start, retries=False)
            try:
                with translated("wait for container"):
                    container.wait(timeout=timeout_s)
            except EvalrunError:
                return {"error": f"the metric did not finish within {timeout_s} s"}
            with translated("read container output"):
                stdout = container.logs(stdout=True, stderr=False)[-MAX_RESULT_BYTES:]
                stderr = container.logs(stdout=False, stderr=True, tail=5)
            reply = _last_result_line(stdout.decode("utf-8", "replace"))
            if "error" in reply and reply["error"] == "the sandbox gave no result line":
                tail = stderr.decode("utf-8", "replace").strip().replace("\n", " | ")
                reply = {"error": f"the sandbox gave no result ({tail[-300:]})"}
            return reply
        finally:
            remove_container(container, log)
