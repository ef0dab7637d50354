"""Blueprints scaffolded outside the repository, locked by `init`, and run for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, predicate_of

pytestmark = pytest.mark.docker


def scaffold(cli, blueprint: str, dest: Path) -> dict:
    code, out = cli.json("init", "--blueprint", blueprint, str(dest))
    assert code == 0, out
    assert out["locked"] is True, out
    assert not dest.is_relative_to(ROOT)
    lock = json.loads((dest / "eval.lock.json").read_text())
    assert lock["image"]["ref"] == out["image"] and "@sha256:" in out["image"]
    assert lock["image"]["template_sha256"]  # built from the project's own template copy
    return out


def test_digits_blueprint_scaffolds_locked_and_runs(cli, tmp_path):
    dest = tmp_path / "my-digits"
    scaffold(cli, "digits", dest)
    code, out = cli.json("run", str(dest / "eval.yaml"))
    assert code == 0, out
    assert out["outcome"] == "passed"
    metrics = {m["name"]: m for m in out["metrics"]}
    assert metrics["accuracy"]["value"] == pytest.approx(0.9244, abs=1e-4)
    assert cli("verify", out["bundle"], "--key", str(cli.pub)).returncode == 0
    assert predicate_of(Path(out["bundle"]))["image"]["ref"] == json.loads(
        (dest / "eval.lock.json").read_text()
    )["image"]["ref"]


def test_sweep_blueprint_scaffolds_locked_and_sweeps(cli, tmp_path):
    dest = tmp_path / "noise"
    scaffold(cli, "sweep", dest)
    code, out = cli.json(
        "sweep", str(dest / "eval.yaml"), "--matrix", str(dest / "sweep.yaml"), timeout=900
    )
    assert code == 0, out
    cells = out["cells"]
    assert len(cells) == 4
    assert {c["outcome"] for c in cells} == {"passed"}
    assert len({c["run_id"] for c in cells}) == 4
    acc = {(c["axes"]["seed"], c["axes"]["params.noise_std"]): c["metrics"]["accuracy"]
           for c in cells}
    assert acc[(1, 0.0)] == acc[(2, 0.0)] == pytest.approx(0.9244, abs=1e-4)
    assert acc[(1, 4.0)] < acc[(1, 0.0)] and acc[(1, 4.0)] != acc[(2, 4.0)]
    for cell in cells:
        assert cli("verify", cell["bundle"], "--key", str(cli.pub)).returncode == 0
