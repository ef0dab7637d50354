"""GPU capture against a fake ``pynvml`` that raises the real nvidia-ml-py exceptions.

No GPU exists on the development machines, so the fake answers each NVML call from
a table; a table value that is an exception instance is raised. Fixtures captured
on real hardware (tests/unit/fixtures/gpu/*.json) are replayed through the same fake.
"""

import importlib.machinery
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pynvml as real_nvml  # the real nvidia-ml-py: exception classes and constants
import pytest

from runner.agent import gpu as gpu_mod
from runner.agent.__main__ import check_expected_environment
from runner.agent.capture import gpu_capture as agent_gpu_capture

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "gpu"

CLOCK = {"graphics": real_nvml.NVML_CLOCK_GRAPHICS, "sm": real_nvml.NVML_CLOCK_SM,
         "memory": real_nvml.NVML_CLOCK_MEM}


def nvml_error(name):
    """An instance of the real pynvml exception class ``name`` (e.g. NVMLError_NotSupported)."""
    return getattr(real_nvml, name)()


class Handle:
    def __init__(self, table):
        self.table = table


def fake_nvml(system, devices, init_error=None):
    """A module that looks like pynvml to the capture code, answering from tables."""
    mod = types.ModuleType("pynvml")
    mod.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)
    for name in dir(real_nvml):
        if name.startswith(("NVMLError", "NVML_")):
            setattr(mod, name, getattr(real_nvml, name))
    mod.calls = []

    def answer(table, name, *key):
        mod.calls.append(name)
        value = table.get(name, nvml_error("NVMLError_NotSupported"))
        for k in key:
            if isinstance(value, dict):
                value = value.get(k, nvml_error("NVMLError_NotSupported"))
        if isinstance(value, BaseException):
            raise value
        return value

    def init():
        mod.calls.append("nvmlInit")
        if init_error is not None:
            raise init_error

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: mod.calls.append("nvmlShutdown")
    for name in ("nvmlSystemGetDriverVersion", "nvmlSystemGetNVMLVersion",
                 "nvmlSystemGetCudaDriverVersion", "nvmlSystemGetCudaDriverVersion_v2",
                 "nvmlDeviceGetCount"):
        setattr(mod, name, lambda name=name: answer(system, name))

    def handle_by_index(index):
        mod.calls.append("nvmlDeviceGetHandleByIndex")
        table = devices[index]
        if isinstance(table, BaseException):
            raise table
        return Handle(table)

    mod.nvmlDeviceGetHandleByIndex = handle_by_index
    for name in ("nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetSerial",
                 "nvmlDeviceGetPciInfo", "nvmlDeviceGetMemoryInfo",
                 "nvmlDeviceGetCudaComputeCapability", "nvmlDeviceGetMigMode",
                 "nvmlDeviceGetEccMode", "nvmlDeviceGetPersistenceMode",
                 "nvmlDeviceGetPowerManagementLimit", "nvmlDeviceGetEnforcedPowerLimit",
                 "nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetGpuInstanceId",
                 "nvmlDeviceGetComputeInstanceId"):
        setattr(mod, name, lambda h, name=name: answer(h.table, name))
    for name in ("nvmlDeviceGetApplicationsClock", "nvmlDeviceGetMaxClockInfo"):
        setattr(mod, name, lambda h, clock, name=name: answer(h.table, name, clock))

    def mig_handle(h, slot):
        mod.calls.append("nvmlDeviceGetMigDeviceHandleByIndex")
        migs = h.table.get("mig_slots", {})
        if slot not in migs:
            raise nvml_error("NVMLError_NotFound")
        return Handle(migs[slot])

    mod.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    return mod


def h100_device(**overrides):
    table = {
        "nvmlDeviceGetName": "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": "GPU-5b1a0f0e-0000-4000-8000-000000000001",
        "nvmlDeviceGetSerial": "1650123456789",
        "nvmlDeviceGetPciInfo": types.SimpleNamespace(busId=b"00000000:19:00.0",
                                                      busIdLegacy=b"0000:19:00.0"),
        "nvmlDeviceGetMemoryInfo": types.SimpleNamespace(total=85520809984),
        "nvmlDeviceGetCudaComputeCapability": (9, 0),
        "nvmlDeviceGetMigMode": [0, 0],
        "nvmlDeviceGetEccMode": [1, 1],
        "nvmlDeviceGetPersistenceMode": 1,
        "nvmlDeviceGetPowerManagementLimit": 700000,
        "nvmlDeviceGetEnforcedPowerLimit": 700000,
        "nvmlDeviceGetApplicationsClock": {CLOCK["graphics"]: 1755, CLOCK["sm"]: 1755,
                                           CLOCK["memory"]: 2619},
        "nvmlDeviceGetMaxClockInfo": {CLOCK["graphics"]: 1980, CLOCK["sm"]: 1980,
                                      CLOCK["memory"]: 2619},
    }
    table.update(overrides)
    return table


def h100_system(**overrides):
    system = {
        "nvmlSystemGetDriverVersion": "550.54.15",
        "nvmlSystemGetNVMLVersion": b"12.550.54.15",
        "nvmlSystemGetCudaDriverVersion_v2": 12040,
        "nvmlSystemGetCudaDriverVersion": 11000,  # v1: wrong without libcuda
        "nvmlDeviceGetCount": 1,
    }
    system.update(overrides)
    return system


@pytest.fixture
def use_nvml(monkeypatch):
    def install(module):
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module
    return install


def capture_with(use_nvml, system, devices, **kw):
    mod = use_nvml(fake_nvml(system, devices, **kw))
    return gpu_mod.nvml_capture(), mod


def test_capture_records_every_field_of_an_h100(use_nvml):
    cap, mod = capture_with(use_nvml, h100_system(), [h100_device()])
    assert cap["visible"] is True and cap["schema"] == "evalrun-gpu/v1"
    assert cap["driver_version"] == "550.54.15"
    assert cap["nvml_version"] == "12.550.54.15"
    assert cap["cuda_driver_version"] == "12.4" and cap["cuda_driver_version_int"] == 12040
    assert cap["count"] == 1
    (g,) = cap["gpus"]
    assert g == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-5b1a0f0e-0000-4000-8000-000000000001",
        "serial": "1650123456789",
        "pci_bus_id": "00000000:19:00.0",
        "memory_total": 85520809984,
        "compute_capability": "9.0",
        "mig": {"current": "disabled", "pending": "disabled"},
        "mig_devices": [],
        "ecc": {"current": "enabled", "pending": "enabled"},
        "persistence_mode": "enabled",
        "power_limit_mw": 700000,
        "enforced_power_limit_mw": 700000,
        "clocks_mhz": {"applications": {"graphics": 1755, "sm": 1755, "memory": 2619},
                       "max": {"graphics": 1980, "sm": 1980, "memory": 2619}},
    }
    assert mod.calls[0] == "nvmlInit" and mod.calls[-1] == "nvmlShutdown"
    assert isinstance(cap["duration_s"], float)


def test_cuda_driver_version_comes_from_the_v2_call(use_nvml):
    cap, mod = capture_with(use_nvml, h100_system(), [h100_device()])
    assert cap["cuda_driver_version"] == "12.4"  # v1 would have said 11.0
    assert "nvmlSystemGetCudaDriverVersion_v2" in mod.calls
    assert "nvmlSystemGetCudaDriverVersion" not in mod.calls


def test_missing_v2_call_is_unsupported_and_fails_a_cuda_pin(use_nvml):
    system = h100_system(nvmlSystemGetCudaDriverVersion_v2=nvml_error("NVMLError_FunctionNotFound"))
    cap, mod = capture_with(use_nvml, system, [h100_device()])
    assert cap["cuda_driver_version"] == {
        "unsupported": "NVMLError_FunctionNotFound: Function Not Found"}
    assert "nvmlSystemGetCudaDriverVersion" not in mod.calls  # no silent fallback to v1
    (check,) = check_expected_environment({"cuda": ">=12"}, cap)
    assert check["passed"] is False and check["found"] == cap["cuda_driver_version"]
    assert "not readable" in check["reason"]


def test_unsupported_and_forbidden_fields_are_recorded_not_raised(use_nvml):
    device = h100_device(
        nvmlDeviceGetSerial=nvml_error("NVMLError_NoPermission"),
        nvmlDeviceGetPersistenceMode=nvml_error("NVMLError_NotSupported"),
        nvmlDeviceGetApplicationsClock={},  # every domain: NotSupported
        nvmlDeviceGetMigMode=nvml_error("NVMLError_NotSupported"),
        nvmlDeviceGetEnforcedPowerLimit=nvml_error("NVMLError_FunctionNotFound"),
    )
    cap, _ = capture_with(use_nvml, h100_system(), [device])
    g = cap["gpus"][0]
    assert cap["visible"] is True
    assert g["serial"] == {"unsupported": "NVMLError_NoPermission: Insufficient Permissions"}
    assert g["persistence_mode"] == {"unsupported": "NVMLError_NotSupported: Not Supported"}
    assert g["clocks_mhz"]["applications"] == {
        d: {"unsupported": "NVMLError_NotSupported: Not Supported"} for d in CLOCK}
    assert g["mig"] == {"unsupported": "NVMLError_NotSupported: Not Supported"}
    assert g["mig_devices"] == []
    assert gpu_mod.is_unsupported(g["enforced_power_limit_mw"])
    assert g["name"] == "NVIDIA H100 80GB HBM3"  # the rest is still read


def test_other_nvml_failures_are_recorded_as_errors_and_fail_closed(use_nvml):
    device = h100_device(nvmlDeviceGetEccMode=nvml_error("NVMLError_Unknown"),
                         nvmlDeviceGetName=nvml_error("NVMLError_GpuIsLost"))
    cap, _ = capture_with(use_nvml, h100_system(), [device])
    g = cap["gpus"][0]
    assert g["ecc"] == {"error": "NVMLError_Unknown: Unknown Error"}
    assert g["name"] == {"error": "NVMLError_GpuIsLost: GPU is lost"}
    by = {c["check"]: c for c in check_expected_environment(
        {"ecc": "required", "gpu_product": "H100"}, cap)}
    assert by["ecc"]["passed"] is False and by["ecc"]["found"] == ["unknown"]
    assert by["gpu_product"]["passed"] is False


def test_a_gpu_whose_handle_fails_is_recorded_with_the_reason(use_nvml):
    system = h100_system(nvmlDeviceGetCount=2)
    cap, _ = capture_with(use_nvml, system, [h100_device(), nvml_error("NVMLError_GpuIsLost")])
    assert cap["count"] == 2
    assert cap["gpus"][1] == {"index": 1, "error": "NVMLError_GpuIsLost: GPU is lost"}


def test_mig_enabled_lists_mig_devices_and_skips_empty_slots(use_nvml):
    mig = {
        "nvmlDeviceGetUUID": "MIG-11111111-2222-3333-4444-555555555555",
        "nvmlDeviceGetName": "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
        "nvmlDeviceGetMemoryInfo": types.SimpleNamespace(total=10468982784),
        "nvmlDeviceGetGpuInstanceId": 9,
        "nvmlDeviceGetComputeInstanceId": 0,
    }
    device = h100_device(nvmlDeviceGetMigMode=[1, 1], nvmlDeviceGetMaxMigDeviceCount=7,
                         mig_slots={2: mig})
    cap, _ = capture_with(use_nvml, h100_system(), [device])
    g = cap["gpus"][0]
    assert g["mig"] == {"current": "enabled", "pending": "enabled"}
    assert g["max_mig_devices"] == 7
    assert g["mig_devices"] == [{"slot": 2, "uuid": mig["nvmlDeviceGetUUID"],
                                 "name": mig["nvmlDeviceGetName"], "memory_total": 10468982784,
                                 "gpu_instance_id": 9, "compute_instance_id": 0}]
    checks = check_expected_environment({"mig": "required"}, cap)
    assert checks == [{"check": "mig", "expected": "required", "found": ["enabled"],
                       "passed": True}]
    assert check_expected_environment({"mig": "forbidden"}, cap)[0]["passed"] is False


def test_mig_disabled_reads_no_mig_devices(use_nvml):
    device = h100_device(nvmlDeviceGetMigMode=[0, 1])  # enabling is pending a reset
    cap, mod = capture_with(use_nvml, h100_system(), [device])
    g = cap["gpus"][0]
    assert g["mig"] == {"current": "disabled", "pending": "enabled"}
    assert g["mig_devices"] == [] and "max_mig_devices" not in g
    assert "nvmlDeviceGetMigDeviceHandleByIndex" not in mod.calls
    assert check_expected_environment({"mig": "forbidden"}, cap)[0]["passed"] is True
    assert check_expected_environment({"mig": "required"}, cap)[0]["passed"] is False


@pytest.mark.parametrize("error", ["NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded",
                                   "NVMLError_NoPermission"])
def test_nvml_that_cannot_start_gives_a_clear_not_visible_capture(use_nvml, error):
    cap, mod = capture_with(use_nvml, h100_system(), [], init_error=nvml_error(error))
    assert cap["visible"] is False
    assert cap["reason"].startswith(f"NVML unavailable: {error}")
    assert "nvmlShutdown" not in mod.calls
    (check,) = check_expected_environment({"driver": ">=550"}, cap)
    assert check["check"] == "gpu_visible" and check["passed"] is False


def test_no_pynvml_installed_gives_a_clear_not_visible_capture(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    cap = gpu_mod.nvml_capture()
    assert cap == {"visible": False, "reason": "nvidia-ml-py (pynvml) is not installed"}


def test_nvml_with_no_gpu_is_not_visible(use_nvml):
    cap, mod = capture_with(use_nvml, h100_system(nvmlDeviceGetCount=0), [])
    assert cap["visible"] is False and cap["count"] == 0
    assert cap["driver_version"] == "550.54.15"  # what was read is kept
    assert "no GPU" in cap["reason"] and mod.calls[-1] == "nvmlShutdown"


def test_real_pynvml_on_this_machine_reports_no_gpu_visible():
    # Development and CI machines have no NVIDIA driver: the real library path must
    # end in a clear reason, never an exception.
    cap = agent_gpu_capture()
    assert cap["visible"] is False
    assert cap["reason"].startswith("NVML unavailable: NVMLError_")
    assert "frameworks" in cap


def test_framework_view_reads_torch_when_importable(use_nvml, monkeypatch):
    use_nvml(fake_nvml(h100_system(), [h100_device()]))
    torch = types.ModuleType("torch")
    torch.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    torch.__version__ = "2.5.1+cu124"
    torch.version = types.SimpleNamespace(cuda="12.4")
    cudnn = types.SimpleNamespace(version=lambda: 90100, enabled=True, deterministic=False,
                                  benchmark=False, allow_tf32=True)
    torch.backends = types.SimpleNamespace(
        cudnn=cudnn, cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(allow_tf32=False)))
    torch.cuda = types.SimpleNamespace(is_available=lambda: True)
    torch.are_deterministic_algorithms_enabled = lambda: False

    def broken():
        raise RuntimeError("not in this build")

    torch.is_deterministic_algorithms_warn_only_enabled = broken
    monkeypatch.setitem(sys.modules, "torch", torch)
    cap = gpu_mod.gpu_capture()
    view = cap["frameworks"]["torch"]
    assert view["version"] == "2.5.1+cu124" and view["cuda"] == "12.4"
    assert view["cudnn_version"] == 90100 and view["cuda_available"] is True
    assert view["deterministic_algorithms"] is False and view["cudnn_benchmark"] is False
    assert view["deterministic_algorithms_warn_only"] == {
        "error": "RuntimeError: not in this build"}
    assert cap["visible"] is True


def test_agent_reads_torch_versions_from_installed_files_without_importing_it(
        monkeypatch, tmp_path):
    package = tmp_path / "torch"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('torch must not be imported')\n")
    (package / "version.py").write_text(
        "from typing import Optional\n__version__ = '2.5.1+cu124'\ndebug = False\n"
        "cuda: Optional[str] = '12.4'\ngit_version = 'a8d6afb511a69687bbb2b7e88a3cf67917e1697e'\n")
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    view = gpu_mod.framework_capture()["torch"]
    assert view["version"] == "2.5.1+cu124" and view["cuda"] == "12.4"
    assert view["git_version"].startswith("a8d6afb")
    assert "not imported" in view["source"] and "torch" not in sys.modules


def test_gpu_capture_keeps_the_agent_inside_its_import_boundary():
    code = ("import sys, runner.agent.__main__, runner.agent.determinism;"
            "from runner.agent.capture import gpu_capture; gpu_capture();"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('runner'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert all(m in ("runner", "runner.shared", "runner.shared.inputs", "runner.shared.metrics",
                     "runner.shared.protocol", "runner.shared.tarformat")
               or m.startswith("runner.agent") for m in out), out


# --- fixtures captured on real hardware, replayed through the fake ---------------------

def _raise_marker(value):
    name = next(iter(value.values())).split(":", 1)[0]
    cls = getattr(real_nvml, name, None)
    return cls() if isinstance(cls, type) else RuntimeError(name)


def _raw(value, convert):
    return _raise_marker(value) if gpu_mod.is_unsupported(value) else convert(value)


def _mode(value):
    return [int(value[k] == "enabled") for k in ("current", "pending")]


def fake_from_capture(cap):
    """The NVML answers that would have produced ``cap`` (the inverse of nvml_capture)."""
    system = {
        "nvmlSystemGetDriverVersion": _raw(cap["driver_version"], str),
        "nvmlSystemGetNVMLVersion": _raw(cap["nvml_version"], str.encode),
        "nvmlSystemGetCudaDriverVersion_v2": _raw(cap["cuda_driver_version_int"], int),
        "nvmlDeviceGetCount": cap["count"],
    }
    devices = []
    for g in cap["gpus"]:
        if "error" in g or "unsupported" in g:
            devices.append(_raise_marker({k: g[k] for k in ("error", "unsupported") if k in g}))
            continue
        table = {
            "nvmlDeviceGetName": _raw(g["name"], str),
            "nvmlDeviceGetUUID": _raw(g["uuid"], str),
            "nvmlDeviceGetSerial": _raw(g["serial"], str),
            "nvmlDeviceGetPciInfo": _raw(g["pci_bus_id"],
                                         lambda v: types.SimpleNamespace(busId=v.encode())),
            "nvmlDeviceGetMemoryInfo": _raw(g["memory_total"],
                                            lambda v: types.SimpleNamespace(total=v)),
            "nvmlDeviceGetCudaComputeCapability": _raw(
                g["compute_capability"], lambda v: tuple(int(x) for x in v.split("."))),
            "nvmlDeviceGetMigMode": _raw(g["mig"], _mode),
            "nvmlDeviceGetEccMode": _raw(g["ecc"], _mode),
            "nvmlDeviceGetPersistenceMode": _raw(g["persistence_mode"],
                                                 lambda v: int(v == "enabled")),
            "nvmlDeviceGetPowerManagementLimit": _raw(g["power_limit_mw"], int),
            "nvmlDeviceGetEnforcedPowerLimit": _raw(g["enforced_power_limit_mw"], int),
        }
        for kind, fn in (("applications", "nvmlDeviceGetApplicationsClock"),
                         ("max", "nvmlDeviceGetMaxClockInfo")):
            table[fn] = {CLOCK[d]: _raw(v, int) for d, v in g["clocks_mhz"][kind].items()}
        if "max_mig_devices" in g:
            table["nvmlDeviceGetMaxMigDeviceCount"] = _raw(g["max_mig_devices"], int)
            table["mig_slots"] = {
                m["slot"]: {
                    "nvmlDeviceGetUUID": _raw(m["uuid"], str),
                    "nvmlDeviceGetName": _raw(m["name"], str),
                    "nvmlDeviceGetMemoryInfo": _raw(m["memory_total"],
                                                    lambda v: types.SimpleNamespace(total=v)),
                    "nvmlDeviceGetGpuInstanceId": _raw(m["gpu_instance_id"], int),
                    "nvmlDeviceGetComputeInstanceId": _raw(m["compute_instance_id"], int),
                }
                for m in g["mig_devices"]
            }
        devices.append(table)
    return fake_nvml(system, devices)


def _fixtures():
    return sorted(FIXTURES.glob("*.json"))


def _comparable(cap):
    return {k: v for k, v in cap.items() if k not in ("duration_s", "frameworks")}


def test_there_is_at_least_one_gpu_fixture():
    assert _fixtures(), f"no GPU capture fixture under {FIXTURES}"


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: p.name)
def test_fixture_replays_to_the_same_capture(use_nvml, path):
    fixture = json.loads(path.read_text())
    assert fixture["provenance"]
    recorded = fixture["capture"]
    use_nvml(fake_from_capture(recorded))
    assert _comparable(gpu_mod.nvml_capture()) == _comparable(recorded)


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: p.name)
def test_fixture_passes_pins_derived_from_it_and_fails_a_wrong_driver_pin(path):
    cap = json.loads(path.read_text())["capture"]
    driver = cap["driver_version"]
    major = int(driver.split(".")[0])
    good = {"driver": f">={major},<{major + 1}", "cuda": f"=={cap['cuda_driver_version']}",
            "gpu_product": re.escape(cap["gpus"][0]["name"]), "gpu_count": cap["count"]}
    assert all(c["passed"] for c in check_expected_environment(good, cap))
    (bad,) = check_expected_environment({"driver": f"<{major}"}, cap)
    assert bad == {"check": "driver", "expected": f"<{major}", "found": driver, "passed": False}
