"""Docker tier: the real engine, registry and gVisor, started by scripts/host-up.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

from s3 import s3_server  # noqa: E402, F401  (a real S3 server: SeaweedFS on loopback)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits"
# the program as its console script runs it: a run forks its helper first (runner.entry)
EVALRUN = [sys.executable, "-m", "runner.entry"]


@dataclass
class Cli:
    home: Path
    env: dict[str, str]

    def __call__(self, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*EVALRUN, *args], capture_output=True, text=True, cwd=ROOT,
                              env={**self.env, **(env or {})}, timeout=timeout, check=False)

    def json(self, *args: str, **kw) -> tuple[int, dict]:
        proc = self(*args, "--json", **kw)
        try:
            return proc.returncode, json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"no JSON from evalrun {args}:\n{proc.stdout}\n{proc.stderr}")

    @property
    def pub(self) -> Path:
        return self.home / "keys" / "evalrun.pub"


def with_signing_key(cli: Cli) -> Cli:
    """Make this store's signing key first: evalrun never creates one without a terminal."""
    proc = cli("keys", "generate", "--if-absent")
    assert proc.returncode == 0, proc.stderr
    return cli


@pytest.fixture(scope="session")
def host() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "host-up.sh")], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"docker tier cannot start (scripts/host-up.sh):\n{proc.stderr[-3000:]}")


@pytest.fixture(scope="session")
def cli(host, tmp_path_factory) -> Cli:
    home = tmp_path_factory.mktemp("evalrun-home")
    env = {**os.environ, "EVALRUN_HOME": str(home)}
    return with_signing_key(Cli(home=home, env=env))


@pytest.fixture(scope="session")
def locked_example(cli, tmp_path_factory) -> Path:
    """A copy of examples/digits, locked once (image built and pushed)."""
    dest = tmp_path_factory.mktemp("digits") / "digits"
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("eval.lock.json", "__pycache__"))
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = cli("lock", str(dest / "eval.yaml"))
    assert proc.returncode == 0, proc.stderr
    return dest


@pytest.fixture
def vcli(host, tmp_path) -> Cli:
    """A CLI with its own store: variant runs must not find each other's runs."""
    home = tmp_path / "evalrun-home"
    return with_signing_key(Cli(home=home, env={**os.environ, "EVALRUN_HOME": str(home)}))


@pytest.fixture
def variant(locked_example, tmp_path, vcli):
    """A locked copy of the example using the prebuilt image by digest, with changes."""

    made: list[int] = []

    def make(lock: bool = True, **changes) -> Path:
        made.append(1)
        dest = tmp_path / ("variant" if len(made) == 1 else f"variant-{len(made)}")
        shutil.copytree(locked_example, dest, ignore=shutil.ignore_patterns("eval.lock.json"))
        ref = json.loads((locked_example / "eval.lock.json").read_text())["image"]["ref"]
        spec = yaml.safe_load((dest / "eval.yaml").read_text())
        spec["image"] = {"ref": ref}
        for key, value in changes.items():
            spec[key] = value
        path = dest / "eval.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        if lock:
            proc = vcli("lock", str(path))
            assert proc.returncode == 0, proc.stderr
        return path

    return make


def predicate_of(bundle: Path) -> dict:
    return json.loads((bundle / "statement.json").read_text())["predicate"]
