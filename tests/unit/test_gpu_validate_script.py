"""scripts/gpu_validate.py, the one script a GPU session runs: its no-GPU path and its pins."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.agent.__main__ import check_expected_environment

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_validate.py"
FIXTURES = sorted((Path(__file__).parent / "fixtures" / "gpu").glob("*.json"))


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_the_script_exits_4_with_the_reason_and_a_report(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "no GPU visible: NVML unavailable" in proc.stdout
    (report_path,) = (tmp_path / "docs" / "validation").glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["exit_code"] == 4 and report["capture"]["visible"] is False
    assert report["checks"] == [{"check": "GPU visible to NVML", "passed": False,
                                 "reason": report["capture"]["reason"]}]
    assert report_path.with_suffix(".txt").read_text().count("NO GPU VISIBLE") == 1
    assert not (tmp_path / "tests").exists()  # no fixture from a machine without a GPU


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_derived_pins_pass_and_the_wrong_driver_pin_fails_only_the_driver(path):
    cap = json.loads(path.read_text())["capture"]
    passing, wrong = load_script().derive_pins(cap)
    assert set(passing) >= {"driver", "cuda", "gpu_product", "gpu_count", "mig"}
    assert all(c["passed"] for c in check_expected_environment(passing, cap))
    failed = [c for c in check_expected_environment(wrong, cap) if not c["passed"]]
    assert [c["check"] for c in failed] == ["driver"]
