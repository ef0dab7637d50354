"""Every committed fuzz corpus input, replayed through its target (no atheris needed).

The corpora (tests/fuzz/corpus/<target>/) hold what the coverage-guided runs found
interesting, and tests/fuzz/crashes/<target>/ every input that ever crashed a target; replaying them here keeps every path they reach free of tracebacks on every
test run. The targets' own property checks (tests/fuzz/harness.py) do the asserting.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
TARGETS = ("spec", "bundle", "frame", "pull", "index", "ahead", "engine", "table")


def _module(target: str):  # type: ignore[no-untyped-def]
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    return importlib.import_module(f"fuzz_{target}")


def _inputs() -> list[tuple[str, Path]]:
    # corpus/: what the coverage-guided runs keep (rewritten by each run's merge);
    # crashes/: every input that ever crashed a target, kept for good
    return [
        (target, path)
        for target in TARGETS
        for folder in ("corpus", "crashes")
        for path in sorted((FUZZ / folder / target).glob("*"))
    ]


def test_every_target_has_a_committed_corpus() -> None:
    for target in TARGETS:
        assert any((FUZZ / "corpus" / target).glob("*")), target


@pytest.mark.parametrize("target", TARGETS)
def test_every_corpus_input_holds_the_property(target: str) -> None:
    module = _module(target)
    paths = [p for t, p in _inputs() if t == target]
    for path in paths:
        module.test_one_input(path.read_bytes())
