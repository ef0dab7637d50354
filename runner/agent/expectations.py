"""The expected environment a plan states (driver and CUDA versions, GPU product and count,
MIG, ECC), checked against what the agent captured; each failed check says expected vs found."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NotRequired, TypedDict, cast

from runner.shared.definitions import PlanExpect

if TYPE_CHECKING:
    from runner.agent.gpu import GpuCapture, GpuDevice, MigDevice, MigSlotError, UnreadableGpu


class Check(TypedDict):
    """One check of the expected environment: expected vs found, and why it failed."""

    check: str
    expected: object
    found: object
    passed: bool
    reason: NotRequired[str]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def version_satisfies(version: str, specifier: str) -> bool:
    """Check ``version`` against a comma-separated specifier like ``>=550,<600``.

    ``==550`` and ``==550.*`` match every 550.x; a version with no number never
    satisfies anything. Raises ValueError for a clause it cannot read.
    """
    have = _version_tuple(version)
    clauses = [c.strip() for c in specifier.split(",") if c.strip()]
    if not clauses:
        raise ValueError(f"empty version specifier {specifier!r}")
    for clause in clauses:
        match = re.fullmatch(r"(==|!=|>=|<=|>|<)\s*([0-9]+(?:\.[0-9]+)*)(\.\*)?", clause)
        if not match or (match.group(3) and match.group(1) not in ("==", "!=")):
            raise ValueError(f"unsupported version specifier clause {clause!r}")
        if not have:
            return False
        op, want_text, _ = match.groups()
        want = _version_tuple(want_text)
        width = max(len(have), len(want))
        a = have + (0,) * (width - len(have))
        b = want + (0,) * (width - len(want))
        prefix_equal = have[: len(want)] == want
        ok = {
            "==": prefix_equal,
            "!=": not prefix_equal,
            ">=": a >= b,
            "<=": a <= b,
            ">": a > b,
            "<": a < b,
        }[op]
        if not ok:
            return False
    return True


GPU_EXPECTATIONS = (
    "driver",
    "cuda",
    "gpu_product",
    "gpu_count",
    "mig",
    "mig_profile",
    "mig_count",
    "ecc",
)


def _failed(check: str, expected: object, found: object, reason: str) -> Check:
    return {"check": check, "expected": expected, "found": found, "passed": False, "reason": reason}


def _version_check(check: str, specifier: str, found: object) -> Check:
    if not isinstance(found, str) or not found:
        return _failed(check, specifier, found, "version not readable from NVML")
    try:
        passed = version_satisfies(found, specifier)
    except ValueError as exc:
        return _failed(check, specifier, found, f"invalid specifier: {exc}")
    return {"check": check, "expected": specifier, "found": found, "passed": passed}


def _per_gpu(gpus: Sequence[Mapping[str, object]], field: str) -> list[object]:
    return [g.get(field) if isinstance(g, dict) else None for g in gpus]


def _mode(state: object) -> str:
    """'enabled', 'disabled', 'not_supported' (the GPU cannot have it) or 'unknown'."""
    if isinstance(state, dict):
        if state.get("current") in ("enabled", "disabled"):
            return str(state["current"])
        if str(state.get("unsupported", "")).startswith("NVMLError_NotSupported"):
            return "not_supported"
    return "unknown"


def _mig_profile_of(name: object) -> str | None:
    """'NVIDIA H100 80GB HBM3 MIG 1g.10gb' → '1g.10gb' (NVML's MIG device names)."""
    if not isinstance(name, str):
        return None
    match = re.search(r"\bMIG\s+([0-9]+g\.[0-9]+gb(?:\+[a-z]+)?)\s*$", name)
    return match.group(1) if match else None


def _mig_device_checks(expect: PlanExpect, gpus: list[GpuDevice | UnreadableGpu]) -> list[Check]:
    """The MIG devices NVML shows the container: their profile and their number."""
    if expect.get("mig_profile") is None and expect.get("mig_count") is None:
        return []
    # An UnreadableGpu has no "mig_devices": get() gives None there, hence the cast.
    devices = [
        d
        for g in gpus
        for d in cast("list[MigDevice | MigSlotError]", g.get("mig_devices") or [])
        if isinstance(d, dict)
    ]
    profiles = [_mig_profile_of(d.get("name")) for d in devices]
    checks: list[Check] = []
    if expect.get("mig_profile") is not None:
        want = expect["mig_profile"]
        ok = bool(profiles) and all(p == want for p in profiles)
        checks.append({"check": "mig_profile", "expected": want, "found": profiles, "passed": ok})
    if expect.get("mig_count") is not None:
        checks.append(
            {
                "check": "mig_count",
                "expected": expect["mig_count"],
                "found": len(devices),
                "passed": len(devices) == expect["mig_count"],
            }
        )
    return checks


def check_expected_environment(expect: PlanExpect, gpu: GpuCapture) -> list[Check]:
    """Compare the spec's expected environment with what NVML saw; one entry per check.

    Fails closed: an expectation this agent does not know, a field NVML could not
    read, or a specifier it cannot parse is a failed check, never a pass.
    Every entry has ``check``, ``expected``, ``found`` and ``passed``.
    """
    checks: list[Check] = []
    # every key as sent, those this agent does not know included (a newer host's)
    sent: Mapping[str, object] = expect
    for key in sorted(sent):
        if key not in GPU_EXPECTATIONS and sent[key] is not None:
            checks.append(_failed(key, sent[key], None, "this agent does not know how to check it"))
    wants_gpu = any(sent.get(k) is not None for k in GPU_EXPECTATIONS)
    if not wants_gpu:
        return checks
    if not gpu.get("visible"):
        checks.append(
            {"check": "gpu_visible", "expected": True, "found": gpu.get("reason"), "passed": False}
        )
        return checks
    gpus = [g for g in gpu.get("gpus") or [] if isinstance(g, dict)]
    if (driver := expect.get("driver")) is not None:
        checks.append(_version_check("driver", driver, gpu.get("driver_version")))
    if (cuda := expect.get("cuda")) is not None:
        checks.append(_version_check("cuda", cuda, gpu.get("cuda_driver_version")))
    if (pattern := expect.get("gpu_product")) is not None:
        names = _per_gpu(gpus, "name")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            checks.append(_failed("gpu_product", pattern, names, f"invalid pattern: {exc}"))
        else:
            ok = bool(names) and all(isinstance(n, str) and regex.search(n) for n in names)
            checks.append(
                {"check": "gpu_product", "expected": pattern, "found": names, "passed": ok}
            )
    if expect.get("gpu_count") is not None:
        count = gpu.get("count")
        checks.append(
            {
                "check": "gpu_count",
                "expected": expect["gpu_count"],
                "found": count,
                "passed": isinstance(count, int) and count == expect["gpu_count"],
            }
        )
    if expect.get("mig") is not None:
        modes = [_mode(state) for state in _per_gpu(gpus, "mig")]
        if expect["mig"] == "required":
            ok = bool(modes) and all(m == "enabled" for m in modes)
        elif expect["mig"] == "forbidden":
            ok = bool(modes) and all(m in ("disabled", "not_supported") for m in modes)
        else:
            ok = False
        checks.append({"check": "mig", "expected": expect["mig"], "found": modes, "passed": ok})
    checks.extend(_mig_device_checks(expect, gpus))
    if expect.get("ecc") is not None:
        modes = [_mode(state) for state in _per_gpu(gpus, "ecc")]
        ok = expect["ecc"] == "required" and bool(modes) and all(m == "enabled" for m in modes)
        checks.append({"check": "ecc", "expected": expect["ecc"], "found": modes, "passed": ok})
    return checks
