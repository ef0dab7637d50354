"""Expected-environment assertions: fail closed, every check says expected vs found."""

import json
import sys
from pathlib import Path

import pytest

import runner.agent.__main__ as agent
from runner.agent.__main__ import check_expected_environment, version_satisfies
from runner.agent.determinism import child_environment

pytestmark = pytest.mark.unit
FIXTURE = Path(__file__).parent / "fixtures" / "gpu" / "synthetic-h100-sxm5.json"


@pytest.fixture
def h100():
    return json.loads(FIXTURE.read_text())["capture"]


def by_check(checks):
    return {c["check"]: c for c in checks}


def test_driver_pin_mismatch_fails_with_expected_and_found(h100):
    (check,) = check_expected_environment({"driver": ">=555,<600"}, h100)
    assert check == {"check": "driver", "expected": ">=555,<600", "found": "550.54.15",
                     "passed": False}


def test_a_matching_environment_passes_every_check(h100):
    expect = {"driver": ">=550,<600", "cuda": ">=12.2", "gpu_product": r"^NVIDIA H100\b",
              "gpu_count": 1, "mig": "forbidden", "ecc": "required"}
    checks = check_expected_environment(expect, h100)
    assert [c["check"] for c in checks] == ["driver", "cuda", "gpu_product", "gpu_count",
                                            "mig", "ecc"]
    assert all(c["passed"] for c in checks), checks
    assert by_check(checks)["gpu_product"]["found"] == ["NVIDIA H100 80GB HBM3"]


@pytest.mark.parametrize(("expect", "check", "found"), [
    ({"cuda": ">=12.6"}, "cuda", "12.4"),
    ({"gpu_product": "A100"}, "gpu_product", ["NVIDIA H100 80GB HBM3"]),
    ({"gpu_count": 8}, "gpu_count", 1),
    ({"mig": "required"}, "mig", ["disabled"]),
])
def test_each_mismatch_fails_its_check(h100, expect, check, found):
    (result,) = check_expected_environment(expect, h100)
    assert result["check"] == check and result["passed"] is False
    assert result["expected"] == next(iter(expect.values())) and result["found"] == found


def test_ecc_disabled_or_unsupported_fails_ecc_required(h100):
    h100["gpus"][0]["ecc"] = {"current": "disabled", "pending": "enabled"}
    assert check_expected_environment({"ecc": "required"}, h100)[0]["found"] == ["disabled"]
    h100["gpus"][0]["ecc"] = {"unsupported": "NVMLError_NotSupported: Not Supported"}
    (check,) = check_expected_environment({"ecc": "required"}, h100)
    assert check["passed"] is False and check["found"] == ["not_supported"]


def test_mig_forbidden_passes_on_a_gpu_without_mig_but_not_on_an_unreadable_one(h100):
    h100["gpus"][0]["mig"] = {"unsupported": "NVMLError_NotSupported: Not Supported"}
    assert check_expected_environment({"mig": "forbidden"}, h100)[0]["passed"] is True
    h100["gpus"][0]["mig"] = {"unsupported": "NVMLError_NoPermission: Insufficient Permissions"}
    (check,) = check_expected_environment({"mig": "forbidden"}, h100)
    assert check["passed"] is False and check["found"] == ["unknown"]


def test_every_gpu_must_match_the_product_and_mig_expectation(h100):
    second = dict(h100["gpus"][0], index=1, name="NVIDIA A100-SXM4-80GB",
                  mig={"current": "enabled", "pending": "enabled"})
    h100["gpus"].append(second)
    h100["count"] = 2
    checks = by_check(check_expected_environment(
        {"gpu_product": "H100", "mig": "forbidden", "gpu_count": 2}, h100))
    assert checks["gpu_product"]["passed"] is False
    assert checks["mig"]["found"] == ["disabled", "enabled"] and not checks["mig"]["passed"]
    assert checks["gpu_count"]["passed"] is True


def test_invalid_specifier_or_pattern_fails_closed_instead_of_crashing(h100):
    checks = by_check(check_expected_environment(
        {"driver": "~=550", "gpu_product": "H100(", "cuda": ""}, h100))
    assert checks["driver"]["passed"] is False and "invalid specifier" in checks["driver"]["reason"]
    assert checks["gpu_product"]["passed"] is False
    assert "invalid pattern" in checks["gpu_product"]["reason"]
    assert checks["cuda"]["passed"] is False  # an empty specifier pins nothing: not a pass


def test_unknown_expectation_fails_closed(h100):
    (check,) = check_expected_environment({"nvlink": "required"}, h100)
    assert check["check"] == "nvlink" and check["passed"] is False
    assert "does not know" in check["reason"]


def test_unreadable_driver_version_fails_the_pin(h100):
    h100["driver_version"] = {"error": "NVMLError_Unknown: Unknown Error"}
    (check,) = check_expected_environment({"driver": "<600"}, h100)
    assert check["passed"] is False and check["found"] == h100["driver_version"]


@pytest.mark.parametrize(("version", "spec", "ok"), [
    ("550.54.15", "==550.*", True),
    ("551.1", "==550.*", False),
    ("550.54.15", "!=550.*", False),
    ("550.54.15", "!=535", True),
    ("550.54.15", ">=550.54.15,<=550.54.15", True),
    ("", "<600", False),
    ("n/a", ">=0", False),
])
def test_version_specifier_edges(version, spec, ok):
    assert version_satisfies(version, spec) is ok


@pytest.mark.parametrize("spec", ["", ">=550.*", "~=550", "550", ">=abc"])
def test_unreadable_specifiers_raise(spec):
    with pytest.raises(ValueError, match="specifier"):
        version_satisfies("550.1", spec)


# --- the agent's own run path: a wrong pin ends the run with exit 4 ------------------

def _plan(tmp_path, expect):
    out = tmp_path / "write.py"
    out.write_text(
        "import json, os\n"
        "with open(os.environ['EVALRUN_OUTPUT'], 'w') as fh:\n"
        "    fh.write(json.dumps({'id': 0, 'label': 1, 'prediction': 1}) + '\\n')\n"
        "    fh.write(json.dumps({'id': 1, 'label': 0, 'prediction': 0}) + '\\n')\n"
    )
    plan = {"run_id": "gpu-unit", "image_ref": "local/test@sha256:" + "0" * 64,
            "expected_rootfs_digest": "sha256:fake", "seed": 7, "params": {},
            "command": [sys.executable, str(out)], "timeout_s": 60,
            "metrics": [{"name": "accuracy", "compute": "accuracy",
                         "ci": {"method": "none"}}],
            "expect": expect, "inputs": []}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


@pytest.fixture
def nvml_h100(monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_gpu_capture import fake_nvml, h100_device, h100_system
    finally:
        sys.path.pop(0)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(h100_system(), [h100_device()]))
    # The rootfs walk of this machine is not what these tests are about.
    monkeypatch.setattr(agent, "rootfs_digest", lambda root: ("sha256:fake", 0))
    # the full check runs in the agent's usage module (no digest table here)
    monkeypatch.setattr("runner.agent.usage.rootfs_digest", lambda root: ("sha256:fake", 0))


def test_agent_run_with_a_wrong_driver_pin_exits_4_with_expected_vs_found(tmp_path, nvml_h100):
    results = tmp_path / "results"
    code = agent.run(_plan(tmp_path, {"driver": ">=560", "gpu_product": "H100"}), results)
    assert code == agent.AgentExit.ENVIRONMENT == 4
    summary = json.loads((results / "summary.json").read_text())
    assert summary["outcome"] == "environment_mismatch"
    assert summary["reason"] == "driver: expected >=560, found 550.54.15"
    preflight = json.loads((results / "preflight.json").read_text())
    assert by_check(preflight["environment"])["gpu_product"]["passed"] is True
    env = json.loads((results / "env.json").read_text())
    assert env["gpu"]["gpus"][0]["uuid"].startswith("GPU-")
    assert not (results / "predictions.jsonl").exists()  # the evaluation never started


def test_agent_run_with_matching_pins_runs_and_records_determinism(tmp_path, nvml_h100):
    results = tmp_path / "results"
    code = agent.run(_plan(tmp_path, {"driver": ">=550,<560", "gpu_count": 1,
                                      "ecc": "required"}), results)
    summary = json.loads((results / "summary.json").read_text())
    assert code == 0, summary
    assert summary["determinism"] == child_environment(7)
