import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.agent.__main__ import check_expected_environment, version_satisfies
from runner.agent.rootfs import rootfs_digest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("version", "spec", "ok"), [
    ("550.54.15", ">=550,<600", True),
    ("535.104.05", ">=550,<600", False),
    ("12.4", ">=12.2", True),
    ("12.4", "==12", True),
    ("12.4", "==12.2", False),
    ("600.1", "<600", False),
])
def test_version_specifiers(version, spec, ok):
    assert version_satisfies(version, spec) is ok


def test_no_gpu_visible_fails_a_gpu_expectation():
    checks = check_expected_environment({"driver": ">=550"}, {"visible": False,
                                                              "reason": "no NVML"})
    assert checks == [{"check": "gpu_visible", "expected": True, "found": "no NVML",
                       "passed": False}]


def test_no_expectation_no_checks():
    assert check_expected_environment({}, {"visible": False}) == []


def test_driver_mismatch_reports_expected_and_found():
    gpu = {"visible": True, "driver_version": "535.104.05", "cuda_driver_version": "12.2",
           "count": 1, "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}
    checks = check_expected_environment(
        {"driver": ">=550", "gpu_product": "H100", "gpu_count": 1}, gpu)
    by = {c["check"]: c for c in checks}
    assert by["driver"]["passed"] is False and by["driver"]["found"] == "535.104.05"
    assert by["gpu_product"]["passed"] is True and by["gpu_count"]["passed"] is True


def test_rootfs_digest_sees_content_mode_and_links(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "l").symlink_to("../a")
    d1, n = rootfs_digest(str(tmp_path))
    assert n == 3
    (tmp_path / "a").write_text("2")
    d2, _ = rootfs_digest(str(tmp_path))
    (tmp_path / "a").chmod(0o600)
    d3, _ = rootfs_digest(str(tmp_path))
    os.utime(tmp_path / "a", (1, 1))
    d4, _ = rootfs_digest(str(tmp_path))
    assert len({d1, d2, d3}) == 3
    assert d3 == d4  # timestamps are not part of the digest


def test_agent_package_imports_nothing_from_runner_outside_agent_and_metrics():
    code = ("import sys, runner.agent.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('runner')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    mods = json.loads(out.replace("'", '"'))
    outside = [m for m in mods if m != "runner"
               and not m.startswith(("runner.agent.", "runner.shared."))
               and m not in ("runner.agent", "runner.shared")]
    assert outside == []
    assert {"runner.agent.__main__", "runner.shared.metrics", "runner.shared.protocol",
            "runner.shared.agent_plan"} <= set(mods)


def test_every_agent_module_goes_into_the_image():
    from runner.build.package_files import AGENT_FILES

    modules = {f"agent/{p.name}" for p in (ROOT / "runner" / "agent").glob("*.py")}
    assert modules <= set(AGENT_FILES)
    assert {"shared/__init__.py", "shared/metrics.py", "shared/protocol.py",
            "shared/agent_plan.py", "shared/tarformat.py"} <= set(AGENT_FILES)
    # the metric catalogue is split over several shared modules: every one ships
    shared = {f"shared/{p.name}" for p in (ROOT / "runner" / "shared").glob("*.py")}
    assert shared <= set(AGENT_FILES)
