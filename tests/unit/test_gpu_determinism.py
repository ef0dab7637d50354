"""Determinism settings: applied where possible, and the record says which were."""

import importlib.machinery
import random
import sys
import types

import pytest

from runner.agent.determinism import CUBLAS_WORKSPACE_CONFIG, apply_determinism, child_environment

pytestmark = pytest.mark.unit


@pytest.fixture
def no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)


def fake_torch(cuda_initialized=False):
    torch = types.ModuleType("torch")
    torch.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    state = {"deterministic": False, "warn_only": False, "seed": None}
    torch.manual_seed = lambda s: state.update(seed=s)

    def use(flag, warn_only=False):
        state.update(deterministic=flag, warn_only=warn_only)

    torch.use_deterministic_algorithms = use
    torch.are_deterministic_algorithms_enabled = lambda: state["deterministic"]
    torch.is_deterministic_algorithms_warn_only_enabled = lambda: state["warn_only"]
    torch.backends = types.SimpleNamespace(
        cudnn=types.SimpleNamespace(deterministic=False, benchmark=True, allow_tf32=True),
        cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(allow_tf32=False)))
    torch.cuda = types.SimpleNamespace(is_initialized=lambda: cuda_initialized)
    torch.state = state
    return torch


def test_child_environment_pins_hash_seed_and_cublas_workspace():
    assert child_environment(42) == {"PYTHONHASHSEED": "42", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                                     "EVALRUN_SEED": "42"}


def test_without_torch_python_and_numpy_are_seeded_and_torch_is_recorded_absent(
        no_torch, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "5")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    record = apply_determinism(5)
    first = random.random()
    apply_determinism(5)
    assert random.random() == first
    s = record["settings"]
    assert record["seed"] == 5
    assert s["PYTHONHASHSEED"] == {"applied": True, "value": "5"}
    assert s["random.seed"]["applied"] and s["numpy.random.seed"]["applied"]
    assert s["torch"] == {"applied": False, "value": None, "reason": "torch is not installed"}
    assert s["CUBLAS_WORKSPACE_CONFIG"]["set_by"] == "apply_determinism"


def test_seed_defaults_to_the_agent_seed(no_torch, monkeypatch):
    monkeypatch.setenv("EVALRUN_SEED", "1234")
    assert apply_determinism()["seed"] == 1234
    monkeypatch.delenv("EVALRUN_SEED")
    with pytest.raises(ValueError, match="no seed"):
        apply_determinism()


def test_hash_seed_set_too_late_is_recorded_not_applied(no_torch, monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    s = apply_determinism(1)["settings"]
    assert s["PYTHONHASHSEED"]["applied"] is False
    assert "before the interpreter starts" in s["PYTHONHASHSEED"]["reason"]


def test_torch_is_switched_to_deterministic_algorithms(monkeypatch):
    torch = fake_torch()
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    s = apply_determinism(3)["settings"]
    assert torch.state == {"deterministic": True, "warn_only": False, "seed": 3}
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert s["torch.use_deterministic_algorithms"] == {"applied": True, "value": True,
                                                       "warn_only": False}
    assert s["torch.backends.cudnn.benchmark"] == {"applied": True, "value": False}
    assert s["CUBLAS_WORKSPACE_CONFIG"] == {"applied": True, "value": ":16:8",
                                            "set_by": "environment"}
    assert s["torch.backends.cuda.matmul.allow_tf32"]["applied"] is False


def test_cublas_workspace_after_cuda_started_is_recorded_not_applied(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(cuda_initialized=True))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    s = apply_determinism(3)["settings"]["CUBLAS_WORKSPACE_CONFIG"]
    assert s["applied"] is False and "initialised" in s["reason"]


def test_a_non_deterministic_cublas_setting_is_flagged(no_torch, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    s = apply_determinism(3)["settings"]["CUBLAS_WORKSPACE_CONFIG"]
    assert s["applied"] is False and s["value"] == ":0:0"
    assert CUBLAS_WORKSPACE_CONFIG in s["reason"]
