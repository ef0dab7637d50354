"""NVML capture of the GPUs the container can see, plus the frameworks' own view.

Standard library only, with ``pynvml`` (nvidia-ml-py) and ``torch`` used when they
import. Every NVML field is read on its own: a field the GPU or driver does not
support (or may not be read here) is recorded as ``{"unsupported": reason}``, any
other NVML failure as ``{"error": reason}``; neither stops the capture. No pynvml,
no libnvidia-ml or no driver gives ``{"visible": False, "reason": ...}``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import (
    Any,
    Literal,
    NotRequired,
    Required,
    TypeAlias,
    TypedDict,
    TypeGuard,
    TypeVar,
    cast,
    overload,
)

T = TypeVar("T")
R = TypeVar("R")

GPU_CAPTURE_SCHEMA = "evalrun-gpu/v1"

# NVML answers that mean "this GPU, driver or container cannot tell", not "it broke".
UNSUPPORTED_ERRORS = (
    "NVMLError_NotSupported",
    "NVMLError_NoPermission",
    "NVMLError_FunctionNotFound",
)

ClockDomain = Literal["graphics", "sm", "memory"]

# Clock domains recorded for application and maximum clocks (NVML_CLOCK_* constants).
CLOCK_DOMAINS: tuple[tuple[ClockDomain, str], ...] = (
    ("graphics", "NVML_CLOCK_GRAPHICS"),
    ("sm", "NVML_CLOCK_SM"),
    ("memory", "NVML_CLOCK_MEM"),
)


class Unreadable(TypedDict, total=False):
    """A field recorded instead of a reading: unsupported here, or failed."""

    unsupported: str
    error: str


# One NVML field: its converted value, or why it could not be read.
Reading: TypeAlias = T | Unreadable


class ModeReading(TypedDict):
    current: str
    pending: str


class ClockReadings(TypedDict):
    applications: dict[ClockDomain, Reading[int]]
    max: dict[ClockDomain, Reading[int]]


class MigSlotError(TypedDict):
    """A MIG slot whose device handle could not be had."""

    slot: int
    error: str


class MigDevice(TypedDict):
    """One configured MIG device and its readings."""

    slot: int
    uuid: Reading[str]
    name: Reading[str]
    memory_total: Reading[int]
    gpu_instance_id: Reading[int]
    compute_instance_id: Reading[int]


class UnreadableGpu(Unreadable):
    """A GPU whose handle could not be had: its index and why."""

    index: Required[int]


class GpuDevice(TypedDict):
    """One GPU and its readings (MIG devices listed when MIG is enabled)."""

    index: int
    name: Reading[str]
    uuid: Reading[str]
    serial: Reading[str]
    pci_bus_id: Reading[str]
    memory_total: Reading[int]
    compute_capability: Reading[str]
    mig: Reading[ModeReading]
    ecc: Reading[ModeReading]
    persistence_mode: Reading[str]
    power_limit_mw: Reading[int]
    enforced_power_limit_mw: Reading[int]
    clocks_mhz: ClockReadings
    max_mig_devices: NotRequired[Reading[int]]
    mig_devices: NotRequired[list[MigDevice | MigSlotError]]


class TorchView(TypedDict, total=False):
    """What torch reports of itself once imported: each value, or ``{"error": ...}``."""

    error: str
    version: Reading[str]
    cuda: Reading[str | None]  # None in a CPU-only build
    cudnn_version: Reading[int | None]  # None without cuDNN
    cuda_available: Reading[bool]
    deterministic_algorithms: Reading[bool]
    deterministic_algorithms_warn_only: Reading[bool]
    cudnn_enabled: Reading[bool]
    cudnn_deterministic: Reading[bool]
    cudnn_benchmark: Reading[bool]
    cudnn_allow_tf32: Reading[bool]
    matmul_allow_tf32: Reading[bool]
    duration_s: float


class TorchStaticView(TypedDict, total=False):
    """torch as installed, read from its ``version.py`` without importing it."""

    source: str
    error: str
    version: object  # whatever constant version.py assigns (a str, or None)
    cuda: object
    git_version: object
    cudnn_package: str


class FrameworkViews(TypedDict, total=False):
    torch: TorchView | TorchStaticView


class GpuCapture(TypedDict, total=False):
    """NVML's view of the GPUs (``visible`` always; the rest when NVML answered)."""

    visible: Required[bool]
    reason: str
    schema: str
    driver_version: Reading[str]
    nvml_version: Reading[str]
    cuda_driver_version: Reading[str]
    cuda_driver_version_int: Reading[int]
    count: int
    gpus: list[GpuDevice | UnreadableGpu]
    duration_s: float
    frameworks: FrameworkViews


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _reason(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:  # str() of an NVMLError may call back into a missing library
        detail = ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _enabled(value: Any) -> str:
    return "enabled" if int(value) else "disabled"


def _current_pending(value: Any) -> ModeReading:
    current, pending = value
    return {"current": _enabled(current), "pending": _enabled(pending)}


def is_unsupported(value: object) -> TypeGuard[Unreadable]:
    """True for a field recorded as unsupported (or unreadable) rather than a reading."""
    return isinstance(value, dict) and ("unsupported" in value or "error" in value)


class _FieldReader:
    """Reads one NVML field at a time and turns failures into markers, never exceptions."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml
        found = [getattr(nvml, name, None) for name in UNSUPPORTED_ERRORS]
        self._unsupported: tuple[type[BaseException], ...] = tuple(
            c for c in found if isinstance(c, type) and issubclass(c, BaseException)
        )

    def read(
        self, call: Callable[[], Any], convert: Callable[[Any], Any] | None = None
    ) -> Reading[Any]:
        try:
            value = call()
        except self._unsupported as exc:
            return {"unsupported": _reason(exc)}
        except AttributeError as exc:  # this pynvml predates the function
            return {"unsupported": f"pynvml lacks it: {exc}"}
        except Exception as exc:
            return {"error": _reason(exc)}
        if convert is None:
            return value
        try:
            return convert(value)
        except Exception as exc:
            return {"error": f"unexpected NVML value {value!r}: {_reason(exc)}"}

    @overload
    def call(self, name: str, *args: Any) -> Reading[Any]: ...
    @overload
    def call(self, name: str, *args: Any, convert: Callable[[Any], R]) -> Reading[R]: ...
    def call(
        self, name: str, *args: Any, convert: Callable[[Any], Any] | None = None
    ) -> Reading[Any]:
        def invoke() -> Any:
            return getattr(self.nvml, name)(*args)

        return self.read(invoke, convert)


def _cuda_version(raw: Any) -> str:
    value = int(raw)
    return f"{value // 1000}.{(value % 1000) // 10}"


def _clocks(reader: _FieldReader, handle: Any, function: str) -> dict[ClockDomain, Reading[int]]:
    out: dict[ClockDomain, Reading[int]] = {}
    for domain, constant in CLOCK_DOMAINS:
        clock_type = getattr(reader.nvml, constant, None)
        if clock_type is None:
            out[domain] = {"unsupported": f"pynvml lacks {constant}"}
        else:
            out[domain] = reader.call(function, handle, clock_type, convert=int)
    return out


def _pci_bus_id(info: Any) -> str:
    bus_id = getattr(info, "busId", b"") or getattr(info, "busIdLegacy", b"")
    return _text(bus_id)


def _mig_devices(
    reader: _FieldReader, handle: Any, slots: Reading[int]
) -> list[MigDevice | MigSlotError]:
    if not isinstance(slots, int):
        return []  # the slot count itself was unreadable; recorded beside this list
    not_found = getattr(reader.nvml, "NVMLError_NotFound", None)
    devices: list[MigDevice | MigSlotError] = []
    for slot in range(slots):
        try:
            mig = reader.nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except Exception as exc:
            if isinstance(not_found, type) and isinstance(exc, not_found):
                continue  # an empty slot: no MIG device configured there
            devices.append({"slot": slot, "error": _reason(exc)})
            continue
        devices.append(
            {
                "slot": slot,
                "uuid": reader.call("nvmlDeviceGetUUID", mig, convert=_text),
                "name": reader.call("nvmlDeviceGetName", mig, convert=_text),
                "memory_total": reader.call(
                    "nvmlDeviceGetMemoryInfo", mig, convert=lambda m: int(m.total)
                ),
                "gpu_instance_id": reader.call("nvmlDeviceGetGpuInstanceId", mig, convert=int),
                "compute_instance_id": reader.call(
                    "nvmlDeviceGetComputeInstanceId", mig, convert=int
                ),
            }
        )
    return devices


def _device(reader: _FieldReader, index: int) -> GpuDevice | UnreadableGpu:
    handle = reader.call("nvmlDeviceGetHandleByIndex", index)
    if is_unsupported(handle):
        return {"index": index, **handle}
    gpu: GpuDevice = {
        "index": index,
        "name": reader.call("nvmlDeviceGetName", handle, convert=_text),
        "uuid": reader.call("nvmlDeviceGetUUID", handle, convert=_text),
        "serial": reader.call("nvmlDeviceGetSerial", handle, convert=_text),
        "pci_bus_id": reader.call("nvmlDeviceGetPciInfo", handle, convert=_pci_bus_id),
        "memory_total": reader.call(
            "nvmlDeviceGetMemoryInfo", handle, convert=lambda m: int(m.total)
        ),
        "compute_capability": reader.call(
            "nvmlDeviceGetCudaComputeCapability",
            handle,
            convert=lambda cc: f"{int(cc[0])}.{int(cc[1])}",
        ),
        "mig": reader.call("nvmlDeviceGetMigMode", handle, convert=_current_pending),
        "ecc": reader.call("nvmlDeviceGetEccMode", handle, convert=_current_pending),
        "persistence_mode": reader.call("nvmlDeviceGetPersistenceMode", handle, convert=_enabled),
        "power_limit_mw": reader.call("nvmlDeviceGetPowerManagementLimit", handle, convert=int),
        "enforced_power_limit_mw": reader.call(
            "nvmlDeviceGetEnforcedPowerLimit", handle, convert=int
        ),
        "clocks_mhz": {
            "applications": _clocks(reader, handle, "nvmlDeviceGetApplicationsClock"),
            "max": _clocks(reader, handle, "nvmlDeviceGetMaxClockInfo"),
        },
    }
    mig = gpu["mig"]
    if isinstance(mig, dict) and mig.get("current") == "enabled":
        gpu["max_mig_devices"] = reader.call("nvmlDeviceGetMaxMigDeviceCount", handle, convert=int)
        gpu["mig_devices"] = _mig_devices(reader, handle, gpu["max_mig_devices"])
    else:
        gpu["mig_devices"] = []
    return gpu


def _nvml_module() -> ModuleType | str:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return "nvidia-ml-py (pynvml) is not installed"
    except Exception as exc:  # a broken install must not stop the agent
        return f"pynvml failed to import: {_reason(exc)}"


def nvml_capture() -> GpuCapture:
    """NVML's view: driver, CUDA driver, NVML versions and every GPU it reports."""
    started = time.monotonic()
    nvml = _nvml_module()
    if isinstance(nvml, str):
        return {"visible": False, "reason": nvml}
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return {"visible": False, "reason": f"NVML unavailable: {_reason(exc)}"}
    info: GpuCapture = {"visible": True, "schema": GPU_CAPTURE_SCHEMA}
    try:
        reader = _FieldReader(nvml)
        info["driver_version"] = reader.call("nvmlSystemGetDriverVersion", convert=_text)
        info["nvml_version"] = reader.call("nvmlSystemGetNVMLVersion", convert=_text)
        # v2 on purpose: v1 reports a wrong version when libcuda is absent.
        cuda = reader.call("nvmlSystemGetCudaDriverVersion_v2", convert=int)
        info["cuda_driver_version"] = cuda if is_unsupported(cuda) else _cuda_version(cuda)
        info["cuda_driver_version_int"] = cuda
        count = reader.call("nvmlDeviceGetCount", convert=int)
        if is_unsupported(count):
            info["visible"] = False
            info["reason"] = f"NVML could not count GPUs: {count}"
            info["count"] = 0
            info["gpus"] = []
        else:
            count = cast(int, count)  # not Unreadable: a reading, converted by int
            info["count"] = count
            info["gpus"] = [_device(reader, i) for i in range(count)]
            if count == 0:
                info["visible"] = False
                info["reason"] = "NVML initialised but reports no GPU"
    finally:
        # A failed shutdown changes nothing that was read.
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    info["duration_s"] = round(time.monotonic() - started, 6)
    return info


def _guarded(call: Callable[[], T]) -> Reading[T]:
    try:
        return call()
    except Exception as exc:
        return {"error": _reason(exc)}


def torch_view() -> TorchView | None:
    """What torch itself reports (versions, determinism flags); None when torch is absent.

    Does not initialise CUDA in this process beyond ``torch.cuda.is_available()``.
    """
    started = time.monotonic()
    try:
        torch = importlib.import_module("torch")
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            return None
        return {"error": f"torch failed to import: {_reason(exc)}"}
    except Exception as exc:  # a broken install is recorded, not fatal
        return {"error": f"torch failed to import: {_reason(exc)}"}
    # An Unreadable here makes each cudnn read below fail into its own error, as recorded.
    cudnn: Any = _guarded(lambda: torch.backends.cudnn)
    view: TorchView = {
        "version": _guarded(lambda: str(torch.__version__)),
        "cuda": _guarded(lambda: torch.version.cuda),
        "cudnn_version": _guarded(lambda: cudnn.version()),
        "cuda_available": _guarded(lambda: bool(torch.cuda.is_available())),
        "deterministic_algorithms": _guarded(
            lambda: bool(torch.are_deterministic_algorithms_enabled())
        ),
        "deterministic_algorithms_warn_only": _guarded(
            lambda: bool(torch.is_deterministic_algorithms_warn_only_enabled())
        ),
        "cudnn_enabled": _guarded(lambda: bool(cudnn.enabled)),
        "cudnn_deterministic": _guarded(lambda: bool(cudnn.deterministic)),
        "cudnn_benchmark": _guarded(lambda: bool(cudnn.benchmark)),
        "cudnn_allow_tf32": _guarded(lambda: bool(cudnn.allow_tf32)),
        "matmul_allow_tf32": _guarded(lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
    }
    view["duration_s"] = round(time.monotonic() - started, 6)
    return view


# The wheels that carry cuDNN for torch; their version is cuDNN's, read without loading it.
CUDNN_DISTRIBUTIONS = ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13", "nvidia-cudnn-cu11")


def _static_assignments(source: str) -> dict[str, object]:
    import ast  # only for an image that has torch (see torch_static_view)

    values: dict[str, object] = {}
    for node in ast.parse(source).body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            values[target.id] = value.value
    return values


def torch_static_view() -> TorchStaticView | None:
    """torch's version, CUDA and cuDNN as installed, read from files without importing torch.

    Importing torch costs seconds; the agent's preflight must stay fast, and the flags
    that matter are the evaluation's own (see ``runner.agent.determinism``).
    """
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    # Imported here, only for an image that has torch: they cost a tenth of a second under
    # gVisor, and the agent imports what it checks before its rootfs check ends.
    from importlib import metadata

    view: TorchStaticView = {"source": "installed files (torch not imported)"}
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        values = _static_assignments(version_file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as exc:
        view["error"] = f"cannot read {version_file}: {_reason(exc)}"
    else:
        view["version"] = values.get("__version__")
        view["cuda"] = values.get("cuda")
        view["git_version"] = values.get("git_version")
    for dist in CUDNN_DISTRIBUTIONS:
        try:
            view["cudnn_package"] = f"{dist}=={metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    return view


def framework_capture() -> FrameworkViews:
    """The frameworks' own view: live when already imported here, else from installed files."""
    views: FrameworkViews = {}
    torch = torch_view() if sys.modules.get("torch") is not None else torch_static_view()
    if torch is not None:
        views["torch"] = torch
    return views


def gpu_capture(*, frameworks: bool = True) -> GpuCapture:
    """NVML's view of the GPUs and, when present, the frameworks' own view."""
    info = nvml_capture()
    if frameworks:
        info["frameworks"] = framework_capture()
    return info
