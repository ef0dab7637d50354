"""Unit tests never touch the user's own evalrun store: a test that does not name its
``EVALRUN_HOME`` gets a fresh one (the default store, its logs and keys included)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_evalrun_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
