"""The suite collects as one run: test files in folders without ``__init__.py`` (unit,
docker) share one module namespace, so a repeated basename breaks collection of the
whole run (as two files once did)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_rootless_test_files_share_a_name() -> None:
    rootless = [
        p.name
        for folder in TESTS.iterdir()
        if folder.is_dir() and not (folder / "__init__.py").exists()
        for p in folder.glob("*.py")
        if p.name != "conftest.py"  # pytest imports each conftest under its own path
    ]
    repeated = sorted(name for name, n in Counter(rootless).items() if n > 1)
    assert not repeated, f"rename one of each: {repeated}"
