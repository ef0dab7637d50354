"""Waiting in a Kueue queue: telling a queued Job from a stuck one, and timing the wait.

A Job submitted to a LocalQueue is created suspended and stays so until Kueue
admits its Workload (Kueue then resumes it). While it waits it has no pod at all,
so nothing of the stuck-pod logic applies, and the run's own deadline does not
run either: it starts at admission (Kubernetes likewise restarts a Job's
activeDeadlineSeconds when it is resumed). Kueue may also take a running Job back
(preemption): it is suspended again and waits again; the waits add up.

Why a Workload waits is read from Kueue's Workload object (its QuotaReserved
condition, and how many wait in its LocalQueue: ``runner.adapters.kueue``) — best
effort: a runner without read access to workloads still reports "queued".
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from runner.model.backend_details import QueueFacts

# How often the Workload is read for its reason while the Job waits.
REASON_POLL_S = 10.0


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def is_suspended(job: Any) -> bool:
    """The Job is suspended (in a queue: not admitted, or taken back by preemption)."""
    spec = getattr(job, "spec", None)
    return bool(getattr(spec, "suspend", False))


@dataclass
class QueueClock:
    """When a queued run was submitted and admitted, and how long it waited in all."""

    queue: str
    submitted_at: str = field(default_factory=_now_iso)
    admitted_at: str | None = None
    waited_s: float = 0.0
    admissions: int = 0
    _since: float | None = field(default_factory=lambda: time.monotonic())
    reason: str | None = None
    _polled: float = 0.0

    @property
    def waiting(self) -> bool:
        return self._since is not None

    def suspended(self) -> bool:
        """Note the Job suspended; True when it was running before (taken back)."""
        if self._since is None:
            self._since = time.monotonic()
            return True
        return False

    def admitted(self) -> None:
        """Note the Job running; the time since it was queued counts as waiting."""
        if self._since is not None:
            self.waited_s += time.monotonic() - self._since
            self._since = None
            self.admissions += 1
            if self.admitted_at is None:
                self.admitted_at = _now_iso()

    def waited(self) -> float:
        """Seconds waited in all so far, the current wait included."""
        return self.waited_s + (time.monotonic() - self._since if self._since else 0.0)

    def facts(self) -> QueueFacts:
        """What goes into the run's details (and the bundle's timestamps)."""
        waited = self.waited()
        return {
            "queue": self.queue,
            "queued_at": self.submitted_at,
            "admitted_at": self.admitted_at,
            "queue_wait_s": round(waited, 3),
            "admissions": self.admissions,
            "last_queue_reason": self.reason,
        }

    def due_for_reason(self) -> bool:
        now = time.monotonic()
        if now - self._polled < REASON_POLL_S:
            return False
        self._polled = now
        return True
