"""Which attempt `evalrun run --rerun` takes (runner.workflows.run_setup._next_attempt)."""

from __future__ import annotations

import pytest

from runner.workflows import run_setup

pytestmark = pytest.mark.unit


class _Store:
    def __init__(self, stored: set[int]) -> None:
        self.stored = {run_setup.run_id_for("sha256:l", a) for a in stored}
        self.looked_up = 0

    def find_run(self, run_id: str) -> object | None:
        self.looked_up += 1
        return object() if run_id in self.stored else None


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5, 7, 8, 9, 100, 365, 1000])
def test_a_rerun_takes_the_attempt_after_the_stored_ones_in_few_lookups(count):
    store = _Store(set(range(count)))
    assert run_setup._next_attempt(store, "sha256:l", None) == count  # type: ignore[arg-type]
    assert store.looked_up <= 2 * max(1, count).bit_length() + 1


def test_a_rerun_never_takes_a_stored_attempt_even_with_gaps():
    store = _Store({0, 1, 2, 4, 5})  # an index entry removed by hand
    attempt = run_setup._next_attempt(store, "sha256:l", None)  # type: ignore[arg-type]
    assert attempt not in {0, 1, 2, 4, 5}
