#!/usr/bin/env python3
"""Validate evalrun's GPU support on a real NVIDIA GPU: ``make gpu-validate``.

Meant for the GPU machine (Python + torch, no Docker or Kubernetes, no package
index); run it from the repository root with that machine's Python::

    python3 scripts/gpu_validate.py            # writes under $OUT, or --out DIR

It needs no install: the agent (``runner.agent``) is standard library only and runs
from this tree; pynvml comes from ``build/gpu-wheels/`` (``scripts/gpu-wheels.sh``)
when the machine has none. Steps, each recorded with what it found:

1. NVML capture through the agent, timed (NVML init + full capture + assertions):
   cold in a fresh interpreter and warm in-process, beside ``nvidia-smi -q``,
   whose readings are cross-checked against the capture.
2. Assertions: pins derived from the capture must pass; a deliberately wrong
   driver pin must fail, in-process and through the agent's own run path
   (``runner.agent.__main__.run``), which must end with exit 4.
3. Determinism: a small torch evaluation (matmul, conv, index_add) run twice
   through the agent and twice directly; per-sample outputs compared bit for bit.

Output, laid out as repository paths so it can be copied into the tree::

    docs/validation/<date>-<gpu>.json         the full report
    docs/validation/<date>-<gpu>.txt          the transcript
    tests/unit/fixtures/gpu/<date>-<gpu>.json the raw capture, a unit-test fixture

Exit codes: 0 every check passed · 4 no GPU visible · 1 a check failed.
``--rehearse FIXTURE`` replays a capture fixture instead of NVML and lets the
evaluation run on CPU: a dry run of this script on a machine without a GPU. Its
report says so, and it writes no fixture.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# Runs on the GPU machine's Python, which may predate 3.11 (datetime.UTC, zip strict).
UTC = datetime.timezone.utc  # noqa: UP017
ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "build" / "gpu-wheels"
SEED = 20240101
REPORT_SCHEMA = "evalrun-gpu-validation/v1"
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 4
REHEARSE_ENV = "EVALRUN_VALIDATE_REHEARSE_FIXTURE"
STANDIN_ENV = "EVALRUN_VALIDATE_ROOTFS"


def _file_digest(fileobj: Any, name: str) -> Any:
    digest = hashlib.new(name)
    for block in iter(lambda: fileobj.read(1 << 20), b""):
        digest.update(block)
    return digest


def setup_imports() -> dict[str, Any]:
    """Make this tree's runner.agent and a pynvml importable; say where pynvml came from."""
    if not hasattr(hashlib, "file_digest"):  # Python < 3.11: the agent's rootfs hash needs it
        hashlib.file_digest = _file_digest  # type: ignore[attr-defined]
    sys.path.insert(0, str(ROOT))
    carried = sorted(WHEELS.glob("nvidia_ml_py-*.whl"))
    if carried:
        sys.path.insert(1, str(carried[-1]))  # a pure-Python wheel imports as a zip
    info: dict[str, Any] = {"carried_wheels": [p.name for p in carried]}
    try:
        import pynvml

        info["pynvml_file"] = getattr(pynvml, "__file__", None)
    except Exception as exc:
        info["pynvml_error"] = repr(exc)
    return info


# --------------------------------------------------------------------------- children


def rehearsal_patch() -> None:
    """In a rehearsal, NVML's answers come from a fixture (there is no GPU to ask)."""
    fixture = os.environ.get(REHEARSE_ENV)
    if not fixture:
        return
    from runner.agent import gpu

    recorded = json.loads(Path(fixture).read_text(encoding="utf-8"))["capture"]

    def replay() -> dict[str, Any]:
        return dict(recorded, rehearsal=f"replayed from {fixture}")

    gpu.nvml_capture = replay  # type: ignore[assignment]


def agent_run(plan: Path, results: Path) -> int:
    """The agent's own run path, with the rootfs walk pointed at a stand-in tree.

    Outside a container "/" is the whole host; the digest check itself is the same code.
    """
    setup_imports()
    rehearsal_patch()
    import runner.agent.__main__ as agent
    from runner.agent.rootfs import rootfs_digest

    standin = os.environ[STANDIN_ENV]
    agent.rootfs_digest = lambda root="/": rootfs_digest(standin)  # type: ignore[assignment]
    return agent.main(["run", "--plan", str(plan), "--results", str(results)])


def torch_eval() -> int:
    """The evaluation the agent runs: seeded data, a small net on the GPU, per-sample outputs."""
    sys.path.insert(0, str(ROOT))
    from runner.agent.determinism import apply_determinism

    params = json.loads(os.environ.get("EVALRUN_PARAMS") or "{}")
    output = Path(os.environ["EVALRUN_OUTPUT"])
    record = apply_determinism()  # seed from EVALRUN_SEED; before any CUDA work
    import torch

    if params.get("require_cuda") and not torch.cuda.is_available():
        print("torch_eval: CUDA is not available to torch", file=sys.stderr)
        return 3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, d, h, k = int(params.get("samples", 4096)), 256, 512, 10
    gen = torch.Generator().manual_seed(record["seed"])
    x = torch.randn(n, d, generator=gen)
    teacher = torch.randn(d, k, generator=gen, dtype=torch.float64)
    labels = (x.double() @ teacher).argmax(dim=1)
    conv_w = torch.randn(16, 4, 5, generator=gen) / 10
    w1 = torch.randn(16 * 60, h, generator=gen) / 31
    w2 = torch.randn(h, k, generator=gen) / 22
    started = time.monotonic()
    xs = x.to(device)
    feats = torch.nn.functional.conv1d(xs.view(n, 4, 64), conv_w.to(device))  # cuDNN
    hidden = torch.relu(feats.reshape(n, -1) @ w1.to(device))  # cuBLAS
    buckets = torch.arange(n, device=device) % 64
    try:
        # Float atomics on CUDA unless deterministic algorithms are on.
        pooled = torch.zeros(64, h, device=device).index_add_(0, buckets, hidden)
        aggregation = "index_add_"
    except RuntimeError as exc:
        pooled = torch.zeros(64, h, device=device)
        aggregation = f"skipped index_add_: {exc}"
    logits = (hidden + pooled[buckets] / n) @ w2.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    compute_s = time.monotonic() - started
    rows = logits.double().cpu().tolist()
    with output.open("w", encoding="utf-8") as out:
        for i, (row, label) in enumerate(zip(rows, labels.tolist())):  # noqa: B905
            exact = ",".join(float.hex(v) for v in row)
            sample = {
                "id": i,
                "label": int(label),
                "prediction": max(range(k), key=row.__getitem__),
                "logits_sha256": hashlib.sha256(exact.encode()).hexdigest(),
                "max_logit": float.hex(max(row)),
            }
            out.write(json.dumps(sample, separators=(",", ":")) + "\n")
    record.update(
        device=device,
        device_name=torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
        aggregation=aggregation,
        compute_s=round(compute_s, 6),
        samples=n,
    )
    output.with_name("determinism.json").write_text(
        json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    return 0


# ------------------------------------------------------------------------ orchestrator


class Validation:
    def __init__(self, out: Path, rehearse: Path | None) -> None:
        self.out = out
        self.rehearse = rehearse
        self.lines: list[str] = []
        self.report: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "mode": "rehearsal (no hardware: NVML replayed from a fixture)"
            if rehearse
            else "hardware",
            "started": datetime.datetime.now(UTC).isoformat(),
            "host": {
                "python": sys.version.split()[0],
                "executable": sys.executable,
                "platform": platform.platform(),
                "machine": platform.machine(),
                "git_commit": _git(["rev-parse", "HEAD"]),
                "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
            },
            "steps": {},
            "checks": [],
            "goals": [],
        }
        self.scratch = Path(tempfile.mkdtemp(prefix="evalrun-gpu-validate-"))
        self.stem = "gpu"  # <date>-<gpu name>, set once the capture names the GPU
        self.out_docs = out / "docs" / "validation"
        self.out_fixtures = out / "tests" / "unit" / "fixtures" / "gpu"
        self.standin = self.scratch / "rootfs"  # see agent_run
        self.standin_digest = ""

    def log(self, message: str) -> None:
        stamp = datetime.datetime.now(UTC).strftime("%H:%M:%S")
        line = f"[{stamp}] {message}"
        print(line, flush=True)
        self.lines.append(line)

    def check(self, name: str, passed: bool, **detail: Any) -> bool:
        self.report["checks"].append({"check": name, "passed": bool(passed), **detail})
        self.log(f"{'PASS' if passed else 'FAIL'} {name}" + (f" {detail}" if detail else ""))
        return bool(passed)

    def goal(self, name: str, met: bool, **detail: Any) -> None:
        """A performance goal: reported, but it does not decide the exit code."""
        self.report["goals"].append({"goal": name, "met": bool(met), **detail})
        self.log(f"GOAL {'MET' if met else 'MISSED'} {name} {detail}")

    def step(self, name: str, fn: Any, *args: Any) -> Any:
        self.log(f"--- {name}")
        started = time.monotonic()
        try:
            result = fn(*args)
        except Exception as exc:
            self.report["steps"][name] = {"error": repr(exc), "traceback": traceback.format_exc()}
            self.check(f"{name} ran", False, error=repr(exc))
            return None
        self.report["steps"].setdefault(name, {})["duration_s"] = round(
            time.monotonic() - started, 4
        )
        return result

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        if self.rehearse:
            env[REHEARSE_ENV] = str(self.rehearse)
        return env


def _git(args: list[str]) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


COLD_PREFLIGHT = """
import json, sys, time
t0 = time.perf_counter()
sys.path[:0] = {paths!r}
exec({patch!r})
from runner.agent.__main__ import check_expected_environment
from runner.agent.gpu import nvml_capture
t1 = time.perf_counter()
cap = nvml_capture()
checks = check_expected_environment({expect!r}, cap)
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "capture_and_assert_s": t2 - t1,
                  "total_s": t2 - t0, "passed": all(c["passed"] for c in checks)}}))
"""

REHEARSAL_PATCH_SNIPPET = """
import os, json
if os.environ.get({env!r}):
    import runner.agent.gpu as _g
    _rec = json.load(open(os.environ[{env!r}]))["capture"]
    _g.nvml_capture = lambda: dict(_rec)
"""


def derive_pins(cap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A spec pin that this machine satisfies exactly, and one whose driver pin it cannot."""
    driver = str(cap["driver_version"])
    gpus = [g for g in cap.get("gpus", []) if isinstance(g.get("name"), str)]
    names = sorted({g["name"] for g in gpus})
    passing: dict[str, Any] = {
        "driver": f"=={driver}",
        "gpu_product": "^(" + "|".join(re.escape(n) for n in names) + ")$",
        "gpu_count": cap["count"],
    }
    if isinstance(cap.get("cuda_driver_version"), str):
        passing["cuda"] = f"=={cap['cuda_driver_version']}"
    mig = [g.get("mig") for g in gpus]
    if all(isinstance(m, dict) and m.get("current") == "enabled" for m in mig):
        passing["mig"] = "required"
    elif all(isinstance(m, dict) and m.get("current") == "disabled" for m in mig):
        passing["mig"] = "forbidden"
    ecc = [g.get("ecc") for g in gpus]
    if ecc and all(isinstance(e, dict) and e.get("current") == "enabled" for e in ecc):
        passing["ecc"] = "required"
    wrong = dict(passing, driver=f"<{int(driver.split('.')[0])}")
    return passing, wrong


def time_preflight(v: Validation, expect: dict[str, Any]) -> dict[str, Any]:
    from runner.agent.__main__ import check_expected_environment
    from runner.agent.gpu import nvml_capture

    paths = [str(ROOT)] + [str(p) for p in sorted(WHEELS.glob("nvidia_ml_py-*.whl"))[-1:]]
    code = COLD_PREFLIGHT.format(
        paths=paths, patch=REHEARSAL_PATCH_SNIPPET.format(env=REHEARSE_ENV), expect=expect
    )
    cold = []
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=v.child_env(),
            timeout=120,
            check=True,
        )
        cold.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        cap = nvml_capture()
        check_expected_environment(expect, cap)
        warm.append(time.perf_counter() - t0)
    smi = shutil.which("nvidia-smi")
    smi_times: list[float] = []
    if smi:
        for i in range(3):
            t0 = time.perf_counter()
            proc = subprocess.run([smi, "-q"], capture_output=True, text=True, timeout=120)
            smi_times.append(time.perf_counter() - t0)
            if i == 0:
                (v.out_docs / f"{v.stem}-nvidia-smi-q.txt").write_text(proc.stdout + proc.stderr)
    result = {
        "cold_subprocess": cold,
        "cold_capture_and_assert_ms": [round(c["capture_and_assert_s"] * 1000, 2) for c in cold],
        "cold_total_with_imports_ms": [round(c["total_s"] * 1000, 2) for c in cold],
        "warm_in_process_ms": [round(t * 1000, 2) for t in warm],
        "warm_median_ms": round(statistics.median(warm) * 1000, 2),
        "nvidia_smi_q_ms": [round(t * 1000, 2) for t in smi_times],
        "nvidia_smi": smi,
    }
    v.report["steps"]["preflight_timing"] = result
    best_cold = min(c["capture_and_assert_s"] for c in cold) * 1000
    v.log(
        f"preflight NVML init+capture+assertions: cold {result['cold_capture_and_assert_ms']} ms, "
        f"warm median {result['warm_median_ms']} ms; nvidia-smi -q {result['nvidia_smi_q_ms']} ms"
    )
    v.goal(
        "preflight under 200 ms (cold NVML init + capture + assertions)",
        best_cold < 200,
        found_ms=round(best_cold, 2),
        nvidia_smi_q_ms=min(smi_times) * 1000 if smi_times else None,
    )
    return result


SMI_FIELDS = {
    "Driver Version": "driver_version",
    "CUDA Version": "cuda_driver_version",
}


def cross_check_smi(v: Validation, cap: dict[str, Any]) -> None:
    path = v.out_docs / f"{v.stem}-nvidia-smi-q.txt"
    if not path.is_file():
        v.check("nvidia-smi agrees with the capture", False, reason="nvidia-smi -q not available")
        return
    text = path.read_text()
    found: dict[str, Any] = {}
    for label, key in SMI_FIELDS.items():
        m = re.search(rf"^\s*{re.escape(label)}\s*:\s*(\S+)", text, re.M)
        found[key] = m.group(1) if m else None
    found["uuids"] = re.findall(r"^\s*GPU UUID\s*:\s*(\S+)", text, re.M)
    found["product_names"] = [
        s.strip() for s in re.findall(r"^\s*Product Name\s*:\s*(.+)$", text, re.M)
    ]
    ours = {
        "driver_version": cap.get("driver_version"),
        "cuda_driver_version": cap.get("cuda_driver_version"),
        "uuids": [g.get("uuid") for g in cap.get("gpus", [])],
        "product_names": [g.get("name") for g in cap.get("gpus", [])],
    }
    v.report["steps"]["nvidia_smi_cross_check"] = {"nvidia_smi": found, "capture": ours}
    for key in ours:
        v.check(
            f"nvidia-smi agrees: {key}",
            found[key] == ours[key],
            nvidia_smi=found[key],
            capture=ours[key],
        )


# The agent gives the evaluation a minimal environment; where this machine's torch needs
# one of these to find CUDA, the plan's command carries it (visible in the report).
PASS_THROUGH = ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "NVIDIA_VISIBLE_DEVICES")


def eval_command() -> list[str]:
    carried = [f"{k}={os.environ[k]}" for k in PASS_THROUGH if os.environ.get(k)]
    script = [sys.executable, str(Path(__file__).resolve()), "--torch-eval"]
    return ["/usr/bin/env", *carried, *script] if carried else script


def write_plan(v: Validation, name: str, expect: dict[str, Any]) -> Path:
    plan = {
        "run_id": f"gpu-validate-{name}",
        "image_ref": "host/gpu-validate@sha256:" + "0" * 64,
        "expected_rootfs_digest": v.standin_digest,
        "seed": SEED,
        "params": {"require_cuda": not v.rehearse, "samples": 4096},
        "command": eval_command(),
        "timeout_s": 300,
        "metrics": [{"name": "accuracy", "compute": "accuracy", "ci": {"method": "none"}}],
        "expect": expect,
        "inputs": [],
    }
    path = v.scratch / f"plan-{name}.json"
    path.write_text(json.dumps(plan, indent=2, sort_keys=True))
    return path


def run_agent(v: Validation, name: str, expect: dict[str, Any]) -> dict[str, Any]:
    plan = write_plan(v, name, expect)
    results = v.scratch / f"results-{name}"
    env = dict(v.child_env(), **{STANDIN_ENV: str(v.standin)})
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--agent-run", str(plan), str(results)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    outcome: dict[str, Any] = {
        "exit_code": proc.returncode,
        "wall_s": round(time.monotonic() - t0, 3),
    }
    for name_ in ("summary.json", "preflight.json", "determinism.json"):
        path = results / name_
        if path.is_file():
            outcome[name_.removesuffix(".json")] = json.loads(path.read_text())
    err = results / "logs" / "evaluation.stderr"
    if err.is_file():
        outcome["evaluation_stderr_tail"] = err.read_text(errors="replace")[-3000:]
    if proc.returncode not in (0, 4):
        outcome["agent_stderr_tail"] = proc.stderr[-3000:]
    outcome["predictions"] = results / "predictions.jsonl"
    env_json = results / "env.json"
    if env_json.is_file():
        outcome["env_gpu"] = json.loads(env_json.read_text()).get("gpu")
    v.report["steps"][f"agent_{name}"] = {
        k: val for k, val in outcome.items() if k != "predictions"
    }
    v.log(f"agent {name}: exit {proc.returncode}, {outcome.get('summary', {}).get('outcome')}")
    return outcome


def run_direct(v: Validation, name: str, seed: int = SEED) -> Path:
    """The same evaluation outside the agent, with the environment the agent would give it."""
    from runner.agent.determinism import child_environment

    results = v.scratch / f"direct-{name}"
    results.mkdir(parents=True)
    out = results / "predictions.jsonl"
    env = dict(v.child_env(), **child_environment(seed))
    env.update(
        EVALRUN_OUTPUT=str(out),
        EVALRUN_PARAMS=json.dumps({"require_cuda": not v.rehearse, "samples": 4096}),
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--torch-eval"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    v.report["steps"][f"direct_{name}"] = {
        "exit_code": proc.returncode,
        "stderr_tail": proc.stderr[-3000:],
        "determinism": json.loads(out.with_name("determinism.json").read_text())
        if out.with_name("determinism.json").is_file()
        else None,
    }
    v.log(f"direct {name}: exit {proc.returncode}")
    return out


def compare_outputs(v: Validation, outputs: dict[str, Path]) -> None:
    present = {k: p for k, p in outputs.items() if p.is_file()}
    v.check(
        "every evaluation run wrote per-sample outputs",
        len(present) == len(outputs),
        missing=sorted(set(outputs) - set(present)),
    )
    if len(present) < 2:
        return
    rows = {k: p.read_text().splitlines() for k, p in present.items()}
    digests = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in present.items()}
    base_name = next(iter(rows))
    base = rows[base_name]
    differing = {
        k: sum(1 for a, b in zip(base, r) if a != b) + abs(len(base) - len(r))  # noqa: B905
        for k, r in rows.items()
    }
    v.report["steps"]["determinism_comparison"] = {
        "file_sha256": digests,
        "samples": len(base),
        "samples_differing_from_" + base_name: differing,
    }
    v.check(
        "per-sample outputs bit-identical across runs",
        len(set(digests.values())) == 1,
        samples=len(base),
        differing=differing,
    )


def validate(v: Validation) -> int:
    from runner.agent.__main__ import check_expected_environment
    from runner.agent.gpu import gpu_capture
    from runner.agent.rootfs import rootfs_digest

    cap = v.step("capture", gpu_capture)
    if cap is None:
        return EXIT_FAILED
    v.report["capture"] = cap
    if not cap.get("visible"):
        v.log(f"no GPU visible: {cap.get('reason')}")
        v.check("GPU visible to NVML", False, reason=cap.get("reason"))
        return EXIT_NO_GPU
    v.check(
        "GPU visible to NVML",
        True,
        count=cap.get("count"),
        names=[g.get("name") for g in cap.get("gpus", [])],
    )
    v.log(
        f"driver {cap.get('driver_version')}, CUDA {cap.get('cuda_driver_version')}, "
        f"NVML {cap.get('nvml_version')}"
    )
    if not v.rehearse:
        fixture = {
            "provenance": f"captured by scripts/gpu_validate.py on {v.report['started']} "
            f"(git {v.report['host']['git_commit']}); a hardware reading",
            "capture": {k: val for k, val in cap.items() if k != "duration_s"},
        }
        v.out_fixtures.mkdir(parents=True, exist_ok=True)
        (v.out_fixtures / f"{v.stem}.json").write_text(
            json.dumps(fixture, indent=2, sort_keys=True) + "\n"
        )
    passing, wrong = derive_pins(cap)
    v.report["pins"] = {"passing": passing, "wrong_driver": wrong}
    v.report["eval_command"] = eval_command()

    checks = check_expected_environment(passing, cap)
    v.check("derived pins pass in-process", all(c["passed"] for c in checks), checks=checks)
    checks = check_expected_environment(wrong, cap)
    failed = [c for c in checks if not c["passed"]]
    v.check(
        "wrong driver pin fails in-process, and only it",
        [c["check"] for c in failed] == ["driver"],
        failed=failed,
    )

    v.step("preflight_timing", time_preflight, v, passing)
    if not v.rehearse:
        v.step("nvidia_smi_cross_check", cross_check_smi, v, cap)

    torch_spec = importlib.util.find_spec("torch")
    v.check(
        "torch importable by this Python",
        torch_spec is not None,
        python=sys.executable,
        origin=getattr(torch_spec, "origin", None),
        hint=None if torch_spec else "run this script with the Python that has torch",
    )

    # The stand-in rootfs: a copy of the agent's code (see agent_run).
    shutil.copytree(
        ROOT / "runner" / "agent", v.standin / "agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    v.standin_digest = rootfs_digest(str(v.standin))[0]

    bad = v.step("agent_wrong_driver", run_agent, v, "wrong-driver", wrong)
    if bad is not None:
        summary = bad.get("summary") or {}
        v.check(
            "agent run with the wrong driver pin exits 4",
            bad["exit_code"] == 4,
            exit_code=bad["exit_code"],
            outcome=summary.get("outcome"),
            reason=summary.get("reason"),
        )
        env_checks = (bad.get("preflight") or {}).get("environment") or []
        driver = next((c for c in env_checks if c["check"] == "driver"), {})
        v.check(
            "its preflight shows expected vs found",
            driver.get("expected") == wrong["driver"]
            and driver.get("found") == cap["driver_version"]
            and not driver.get("passed"),
            driver_check=driver,
        )
        v.check("the evaluation never started", not bad["predictions"].exists())

    outputs: dict[str, Path] = {}
    for run in ("pass-1", "pass-2"):
        good = v.step(f"agent_{run}", run_agent, v, run, passing)
        if good is None:
            continue
        summary = good.get("summary") or {}
        v.check(
            f"agent run {run} with derived pins completes",
            good["exit_code"] == 0,
            exit_code=good["exit_code"],
            outcome=summary.get("outcome"),
            reason=summary.get("reason"),
            stderr=good.get("evaluation_stderr_tail"),
        )
        pre = good.get("preflight") or {}
        v.report["steps"][f"agent_{run}"]["preflight_duration_s"] = pre.get("duration_s")
        v.log(
            f"agent preflight (stand-in rootfs + env capture + assertions): "
            f"{pre.get('duration_s')} s"
        )
        record = good.get("determinism") or {}
        settings = record.get("settings") or {}
        wanted = (
            "torch.use_deterministic_algorithms",
            "CUBLAS_WORKSPACE_CONFIG",
            "PYTHONHASHSEED",
            "torch.manual_seed",
            "torch.backends.cudnn.deterministic",
        )
        v.check(
            f"{run}: determinism settings applied and recorded",
            all((settings.get(s) or {}).get("applied") for s in wanted),
            settings={s: settings.get(s) for s in wanted},
            device=record.get("device"),
            device_name=record.get("device_name"),
            aggregation=record.get("aggregation"),
        )
        outputs[f"agent-{run}"] = good["predictions"]
    for run in ("1", "2"):
        path = v.step(f"direct_{run}", run_direct, v, run)
        if path is not None:
            outputs[f"direct-{run}"] = path
    v.step("determinism_comparison", compare_outputs, v, outputs)
    other = v.step("direct_other_seed", run_direct, v, "other-seed", SEED + 1)
    if other is not None and other.is_file() and outputs.get("direct-1", other).is_file():
        v.check(
            "control: another seed gives different outputs",
            other.read_bytes() != outputs["direct-1"].read_bytes(),
        )
    return EXIT_OK if all(c["passed"] for c in v.report["checks"]) else EXIT_FAILED


def orchestrate(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT)
    v = Validation(out, args.rehearse.resolve() if args.rehearse else None)
    v.report["imports"] = setup_imports()
    date = datetime.date.today().isoformat()
    v.stem = f"{date}-gpu"
    v.out_docs.mkdir(parents=True, exist_ok=True)
    v.log(f"evalrun GPU validation ({v.report['mode']}), writing under {out}")
    v.log(
        f"python {v.report['host']['python']} at {sys.executable}; "
        f"pynvml {v.report['imports'].get('pynvml_file') or v.report['imports']}"
    )
    if v.rehearse:
        os.environ[REHEARSE_ENV] = str(v.rehearse)
        rehearsal_patch()
    else:
        os.environ.pop(REHEARSE_ENV, None)
    try:
        from runner.agent.gpu import nvml_capture

        first = nvml_capture()
        if first.get("visible") and first.get("gpus"):
            slug = re.sub(r"[^a-z0-9]+", "-", str(first["gpus"][0].get("name", "gpu")).lower())
            v.stem = f"{date}-{slug.strip('-').removeprefix('nvidia-')}"
        if args.rehearse:
            v.stem += "-rehearsal"
        code = validate(v)
    except Exception as exc:
        v.report["error"] = traceback.format_exc()
        v.log(f"validation crashed: {exc!r}")
        code = EXIT_FAILED
    finally:
        shutil.rmtree(v.scratch, ignore_errors=True)
    v.report["finished"] = datetime.datetime.now(UTC).isoformat()
    v.report["exit_code"] = code
    failed = [c["check"] for c in v.report["checks"] if not c["passed"]]
    verdict = {EXIT_OK: "ALL CHECKS PASSED", EXIT_NO_GPU: "NO GPU VISIBLE"}.get(
        code, f"FAILED: {failed}"
    )
    v.log(
        f"=== {verdict} (exit {code}); "
        f"{len(v.report['checks']) - len(failed)}/{len(v.report['checks'])} checks passed"
    )
    (v.out_docs / f"{v.stem}.json").write_text(
        json.dumps(v.report, indent=2, sort_keys=True, default=str) + "\n"
    )
    v.log(f"report: {v.out_docs / (v.stem + '.json')}")
    (v.out_docs / f"{v.stem}.txt").write_text("\n".join(v.lines) + "\n")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output root (default: $OUT, else the repository)")
    parser.add_argument(
        "--rehearse",
        type=Path,
        metavar="FIXTURE",
        help="dry run: replay this capture fixture instead of NVML",
    )
    parser.add_argument(
        "--agent-run", nargs=2, type=Path, metavar=("PLAN", "RESULTS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--torch-eval", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.agent_run:
        return agent_run(*args.agent_run)
    if args.torch_eval:
        return torch_eval()
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
