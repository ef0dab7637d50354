"""Taking the results of a run's pod: by exec from the agent that holds them (a cut
stream retried, an API server away waited out), then releasing that agent; or, from an
older agent that did not hold them, from the results frame on its log.

Used by :class:`runner.backends.job_session.RunSession`, which decides when a pod's
results are ready; this module only fetches them into the run's results directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client as k8s

from runner.adapters.kube_streams import exec_in_pod
from runner.adapters.kube_watch import NamespaceWatch
from runner.adapters.kubernetes import api_call
from runner.backends.collect import StreamReceiver, extract_results_frame
from runner.backends.manifests import CONTAINER_NAME
from runner.backends.pod_states import ack_exit, running
from runner.errors import (
    APIForbidden,
    APINotFound,
    EvalrunError,
    InfrastructureError,
    TransientKubernetesError,
)
from runner.model.backend_details import CollectionFacts
from runner.shared.protocol import ACK_COMMAND, EMIT_COMMAND, FRAME_BEGIN, NOT_HOLDING_EXIT

if TYPE_CHECKING:
    from runner.backends.kubernetes import KubernetesBackend

log = logging.getLogger("evalrun.backend.kubernetes")

# Attempts at one collection (a stream cut half way is retried; a refused one is not).
COLLECT_ATTEMPTS = 3
# How long collection waits out an unreachable API server (a restart) before giving up,
# and the pause between tries; the holding agent keeps its results meanwhile.
COLLECT_UNREACHABLE_S = 180.0
COLLECT_BACKOFF_S = 3.0


@dataclass
class Collection:
    """The results the runner took from one pod by exec, and how."""

    pod: str
    facts: CollectionFacts
    problems: list[str] = field(default_factory=list)
    acked_exit: int | None = None


class PodResults:
    """Fetches a run's results from its pods into ``results_dir``."""

    def __init__(
        self,
        backend: KubernetesBackend,
        api: k8s.ApiClient,
        watch: NamespaceWatch,
        results_dir: Path,
        run_id: str,
    ) -> None:
        self.backend = backend
        self.run_id = run_id
        self.api = api
        self.watch = watch
        self.namespace = watch.namespace
        self.results_dir = results_dir

    def collect(self, pod_name: str) -> Collection:
        """Take the held results of ``pod_name`` (retrying a cut stream), then acknowledge."""
        t0 = time.monotonic()
        problems: list[str] = []
        facts: CollectionFacts = {"pod": pod_name, "mode": "exec"}
        unreachable_until = time.monotonic() + COLLECT_UNREACHABLE_S
        attempt = 0
        while attempt < COLLECT_ATTEMPTS:
            attempt += 1
            receiver = StreamReceiver(self.results_dir.parent)
            try:
                ran = exec_in_pod(
                    self.api,
                    self.namespace,
                    pod_name,
                    CONTAINER_NAME,
                    list(EMIT_COMMAND),
                    stdout=receiver.feed,
                )
            except TransientKubernetesError as exc:
                receiver.discard()
                problems = [f"collection attempt {attempt}: {exc.message}"]
                log.warning(
                    "results stream broke; retrying",
                    extra={"event": "collect_retry", "pod": pod_name, "error": exc.message},
                )
                if time.monotonic() < unreachable_until:
                    # an API server away (e.g. restarting) is not a cut stream: wait it out
                    attempt -= 1
                    time.sleep(COLLECT_BACKOFF_S)
                continue
            except APINotFound:
                receiver.discard()
                problems = [f"pod {pod_name} disappeared before its results were collected"]
                break
            except APIForbidden as exc:
                receiver.discard()
                raise InfrastructureError(
                    f"the runner may not exec into pod {pod_name}: {exc.message}",
                    hint="the runner's Role needs pods/exec (create, get): install the evalrun "
                    "chart (charts/evalrun) or manifests/evalrun.yaml",
                ) from exc
            facts["attempts"] = attempt
            if ran.exit_code == NOT_HOLDING_EXIT:
                receiver.discard()
                problems = [f"pod {pod_name}: the agent no longer holds its results"]
                break
            if ran.exit_code != 0:
                receiver.discard()
                problems = [
                    f"emit-results in pod {pod_name} failed ({ran.message or ran.exit_code}): "
                    + ran.stderr.strip()[-300:]
                ]
                break
            collected = receiver.unpack(self.results_dir)
            facts["bytes"] = ran.stdout_bytes
            facts["files"] = len(collected.files)
            problems = collected.problems
            if problems and "truncated" in problems[0] and attempt < COLLECT_ATTEMPTS:
                continue
            break
        facts["duration_s"] = round(time.monotonic() - t0, 3)
        released, acked = self._ack(pod_name)
        facts["acknowledged"] = released
        log.info(
            "results collected",
            extra={"event": "results_collected_exec", "run_id": self.run_id, **facts},
        )
        return Collection(pod_name, facts, problems, acked)

    def _ack(self, pod_name: str) -> tuple[bool, int | None]:
        """Release the holding agent: (released, the exit code it answered, if it did).

        The agent exits right after answering, so the exec's own status may be lost with
        its container; an agent container that has ended after an ack counts as released.
        """
        answer = bytearray()
        for _ in range(COLLECT_ATTEMPTS):
            answer.clear()
            try:
                ran = exec_in_pod(
                    self.api,
                    self.namespace,
                    pod_name,
                    CONTAINER_NAME,
                    list(ACK_COMMAND),
                    stdout=answer.extend,
                    idle_timeout_s=30.0,
                )
            except TransientKubernetesError:
                if self._agent_ended(pod_name):
                    return True, ack_exit(answer)
                continue
            except EvalrunError:
                return self._agent_ended(pod_name), ack_exit(answer)
            code = ack_exit(answer)
            if ran.exit_code == 0 and code is not None:
                return True, code
            return self._agent_ended(pod_name), code
        return self._agent_ended(pod_name), None

    def _agent_ended(self, pod_name: str, timeout_s: float = 30.0) -> bool:
        """Whether the pod's agent container stops running (or the pod goes) within a while."""

        def ended() -> bool:
            pod = self.watch.pods.objects.get(pod_name)
            return pod is None or not running(pod)

        return bool(self.watch.wait(ended, timeout=timeout_s))

    def from_log(self, pod_name: str) -> tuple[list[str], CollectionFacts | None]:
        """Results of a pod that was not collected by exec: an older agent's log frame
        (its problems, and how they were taken when there was a frame to take)."""
        try:
            text = api_call(
                "read pod log",
                lambda: k8s.CoreV1Api(self.api).read_namespaced_pod_log(
                    pod_name, self.namespace, container=CONTAINER_NAME
                ),
                namespace=self.namespace,
                name=pod_name,
            )
            self.backend.requests += 1
        except EvalrunError as exc:
            return [f"could not read the pod log: {exc.message}"], None
        if FRAME_BEGIN not in text:
            return [
                f"the results of pod {pod_name} were not collected: the agent ended without "
                f"holding them (crashed, killed, or its hold of {self.backend.hold_s} s expired)"
            ], None
        facts: CollectionFacts = {"pod": pod_name, "mode": "log-frame"}
        return extract_results_frame(text, self.results_dir).problems, facts
