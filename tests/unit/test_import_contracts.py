"""The import-linter contracts in pyproject.toml hold today and bite on a wrong import.

Each case copies runner/ and pyproject.toml into a temporary tree, adds one import that a
contract forbids, and runs lint-imports there (offline, no cache): it must fail and name
the contract and the offending import.
"""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = {
    c["id"]: c["name"]
    for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
}


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH and cwd point at the copy, so the installed/editable runner is not analysed.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [sys.executable, "-c",
         "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())",
         "--no-cache", "--no-logo"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def tree(tmp_path):
    dest = tmp_path / "tree"
    shutil.copytree(ROOT / "runner", dest / "runner",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contracts_cover_layers_agent_shared_and_builders():
    assert {"layers", "agent", "shared", "host-not-agent", "pure-builders"} <= set(CONTRACTS)


def test_the_unmodified_tree_keeps_every_contract(tree):
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in result.stdout


@pytest.mark.parametrize(("module", "wrong_import", "contract", "chain"), [
    # a lower layer importing a higher one
    ("model/spec.py", "from runner.cli import main", "layers",
     "runner.model.spec -> runner.cli"),
    # build, backends and bundle are independent siblings
    ("bundle/store.py", "from runner.backends import collect", "layers",
     "runner.bundle.store -> runner.backends.collect"),
    # the agent reaching into the host side
    ("agent/rootfs.py", "import runner.bundle.store", "agent",
     "runner.agent.rootfs -> runner.bundle.store"),
    ("agent/capture.py", "import pydantic", "agent", "runner.agent.capture -> pydantic"),
    # shared is stdlib-only and depends on nothing of runner
    ("shared/metrics.py", "import yaml", "shared", "runner.shared.metrics -> yaml"),
    ("shared/metrics.py", "from runner import errors", "shared",
     "runner.shared.metrics -> runner.errors"),
    # the host ships the agent as files, it never imports it
    ("bundle/verify/verdict.py", "from runner.agent import capture", "host-not-agent",
     "runner.bundle.verify.verdict -> runner.agent.capture"),
    # pure builders never import a client
    ("backends/manifests.py", "import kubernetes", "pure-builders",
     "runner.backends.manifests -> kubernetes"),
    ("backends/manifests.py", "from runner.adapters import docker_engine", "pure-builders",
     "runner.backends.manifests -> runner.adapters.docker_engine"),
])
def test_a_wrong_import_breaks_its_contract(tree, module, wrong_import, contract, chain):
    path = tree / "runner" / module
    path.write_text(path.read_text() + f"\n{wrong_import}  # deliberately wrong\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert f"{CONTRACTS[contract]} BROKEN" in result.stdout, result.stdout + result.stderr
    assert chain in result.stdout
