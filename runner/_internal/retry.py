"""Retry policies as values (tenacity). Transient errors are retried by type only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from runner.errors import InfrastructureError, TransientInfrastructureError

log = logging.getLogger("evalrun.retry")


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "retrying after transient error",
        extra={"event": "retry", "attempt": state.attempt_number, "error": str(exc)},
    )


def transient_policy(
    *, attempts: int = 4, max_delay_s: float = 20.0, sleep: Callable[[float], None] = time.sleep
) -> Retrying:
    """A fresh policy: retry TransientInfrastructureError with jittered backoff, bounded."""
    return Retrying(
        retry=retry_if_exception_type(TransientInfrastructureError),
        stop=stop_after_attempt(attempts) | stop_after_delay(max_delay_s),
        wait=wait_exponential_jitter(multiplier=0.25, max=4.0),
        before_sleep=_log_retry,
        sleep=sleep,
        reraise=True,
    )


def call_with_retries(fn: Callable[[], Any], *, what: str, policy: Retrying | None = None) -> Any:
    """Call ``fn`` under ``policy``; a transient error that outlives it becomes permanent."""
    try:
        return (policy or transient_policy())(fn)
    except TransientInfrastructureError as exc:
        raise InfrastructureError(
            f"{what}: still failing after retries: {exc.message}", **exc.fields, hint=exc.hint
        ) from exc
