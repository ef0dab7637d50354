"""Determinism settings for (GPU) evaluations: apply what the framework allows, record what was.

An evaluation calls :func:`apply_determinism` first thing, before any CUDA work, and
keeps the returned record with its outputs. The agent sets the variables that must
exist before the evaluation's interpreter starts (:func:`child_environment`).
Standard library only; ``numpy`` and ``torch`` are used when they import.
"""

from __future__ import annotations

import importlib
import os
import random
from typing import Any, Literal, NotRequired, TypedDict

from runner.agent.gpu import TorchView, torch_view

# cuBLAS is deterministic only with one of these workspace settings (CUDA >= 10.2 docs).
DETERMINISTIC_CUBLAS_CONFIGS = (":4096:8", ":16:8")
CUBLAS_WORKSPACE_CONFIG = DETERMINISTIC_CUBLAS_CONFIGS[0]


class Setting(TypedDict):
    """One setting: whether it was applied, its value, and why not or who set it."""

    applied: bool
    value: object
    reason: NotRequired[str]
    set_by: NotRequired[Literal["apply_determinism", "environment"]]
    warn_only: NotRequired[bool]


# One entry per setting, named as the code spells it ("random.seed", "torch.manual_seed").
Settings = dict[str, Setting]


class DeterminismRecord(TypedDict):
    """What :func:`apply_determinism` returns; ``torch`` only when torch imported."""

    seed: int
    settings: Settings
    torch: NotRequired[TorchView | None]


def child_environment(seed: int) -> dict[str, str]:
    """Variables that only work when set before the evaluation's interpreter starts."""
    return {
        "PYTHONHASHSEED": str(seed),
        "CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE_CONFIG,
        "EVALRUN_SEED": str(seed),
    }


def _optional_module(name: str) -> tuple[Any, str | None]:
    """The module, or None and why (not installed, or failed to import)."""
    try:
        return importlib.import_module(name), None
    except ImportError:
        return None, f"{name} is not installed"
    except Exception as exc:  # a broken install is recorded, not fatal
        return None, f"{name} failed to import: {exc!r}"


def _applied(value: object) -> Setting:
    return {"applied": True, "value": value}


def _not_applied(reason: str, value: object = None) -> Setting:
    return {"applied": False, "value": value, "reason": reason}


def _python_hash_seed() -> Setting:
    value = os.environ.get("PYTHONHASHSEED")
    if value is None or value == "random":
        return _not_applied("must be set before the interpreter starts (the agent sets it)", value)
    return _applied(value)


def _cublas_workspace(torch: Any) -> Setting:
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value is None:
        if torch is not None and torch.cuda.is_initialized():
            return _not_applied("CUDA was initialised before it could be set")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
        return {**_applied(CUBLAS_WORKSPACE_CONFIG), "set_by": "apply_determinism"}
    if value not in DETERMINISTIC_CUBLAS_CONFIGS:
        return _not_applied(
            f"not one of the deterministic settings {list(DETERMINISTIC_CUBLAS_CONFIGS)}", value
        )
    return {**_applied(value), "set_by": "environment"}


def _torch_settings(torch: Any, seed: int, warn_only: bool) -> Settings:
    out: Settings = {}
    try:
        torch.manual_seed(seed)  # seeds the CPU and every CUDA device
        out["torch.manual_seed"] = _applied(seed)
    except Exception as exc:
        out["torch.manual_seed"] = _not_applied(repr(exc))
    try:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        out["torch.use_deterministic_algorithms"] = {
            **_applied(bool(torch.are_deterministic_algorithms_enabled())),
            "warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
        }
    except Exception as exc:
        out["torch.use_deterministic_algorithms"] = _not_applied(repr(exc))
    cudnn = torch.backends.cudnn
    try:
        cudnn.deterministic = True
        cudnn.benchmark = False  # autotuning may pick a different kernel per run
        out["torch.backends.cudnn.deterministic"] = _applied(bool(cudnn.deterministic))
        out["torch.backends.cudnn.benchmark"] = _applied(bool(cudnn.benchmark))
    except Exception as exc:
        out["torch.backends.cudnn"] = _not_applied(repr(exc))
    # TF32 is repeatable run to run but changes results; recorded, not changed.
    out["torch.backends.cuda.matmul.allow_tf32"] = {
        "applied": False,
        "value": bool(torch.backends.cuda.matmul.allow_tf32),
        "reason": "recorded only",
    }
    out["torch.backends.cudnn.allow_tf32"] = {
        "applied": False,
        "value": bool(cudnn.allow_tf32),
        "reason": "recorded only",
    }
    return out


def apply_determinism(seed: int | None = None, *, warn_only: bool = False) -> DeterminismRecord:
    """Seed every generator present and switch torch to deterministic algorithms.

    ``seed`` defaults to ``$EVALRUN_SEED`` (set by the agent). Returns one entry per
    setting: ``applied`` (bool), ``value``, and ``reason`` when it was not applied.
    Call it before any CUDA work: ``CUBLAS_WORKSPACE_CONFIG`` is read when cuBLAS starts.
    """
    if seed is None:
        env_seed = os.environ.get("EVALRUN_SEED")
        if env_seed is None:
            raise ValueError("no seed: pass one or set EVALRUN_SEED")
        seed = int(env_seed)
    settings: Settings = {"PYTHONHASHSEED": _python_hash_seed()}
    random.seed(seed)
    settings["random.seed"] = _applied(seed)
    numpy, why_not = _optional_module("numpy")
    if numpy is None:
        settings["numpy.random.seed"] = _not_applied(str(why_not))
    else:
        numpy.random.seed(seed % 2**32)
        settings["numpy.random.seed"] = _applied(seed % 2**32)
    torch, why_not = _optional_module("torch")
    settings["CUBLAS_WORKSPACE_CONFIG"] = _cublas_workspace(torch)
    if torch is None:
        settings["torch"] = _not_applied(str(why_not))
    else:
        settings.update(_torch_settings(torch, seed, warn_only))
    record: DeterminismRecord = {"seed": seed, "settings": settings}
    if torch is not None:
        record["torch"] = torch_view()  # the flags as torch reports them after applying
    return record
