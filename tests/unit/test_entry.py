"""The Docker helper forked before the command line loads (runner.entry).

Only a plain ``run`` on the local engine is read early, exactly as the parser will read
it; the command takes the helper only when its own key is the one the helper was forked
for, and lets any other go. The docker tier runs it end to end (every `evalrun run`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from runner import entry
from runner.cli.main import build_parser

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run", "eval.yaml"], ("eval.yaml", False, None)),
        (["run", "eval.yaml", "--rerun", "--json"], ("eval.yaml", True, None)),
        (["run", "--rerun", "e.yaml", "--verify-rootfs", "full"], ("e.yaml", True, "full")),
        (["run", "e.yaml", "--verify-rootfs=used", "--backend=docker"], ("e.yaml", False, "used")),
        (["run", "e.yaml", "--reason", "nightly", "--pub", "k.pub", "-o", "out", "-v", "-v"],
         ("e.yaml", False, None)),
        (["run", "e.yaml", "--junit", "j.xml", "--key", "env:K", "--log-json"],
         ("e.yaml", False, None)),
    ],
)
def test_a_plain_run_is_read_as_the_parser_reads_it(argv: list[str], words: tuple[Any, ...]):
    assert entry.run_words(argv) == words
    args = build_parser().parse_args(argv)
    assert (args.spec, args.rerun, args.verify_rootfs) == (Path(words[0]), words[1], words[2])
    assert args.backend == "docker" and not args.detach


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["runs", "ls"],
        ["run"],
        ["run", "a.yaml", "b.yaml"],
        ["run", "e.yaml", "--backend", "kubernetes"],
        ["run", "e.yaml", "--detach"],
        ["run", "e.yaml", "--verify-rootfs", "none"],
        ["run", "e.yaml", "--verify-rootfs"],
        ["run", "e.yaml", "--rer"],  # an abbreviation: the parser's to read
        ["run", "e.yaml", "--reason"],
        ["run", "e.yaml", "--reason", "--rerun"],
        ["run", "e.yaml", "--reason=x"],
        ["run", "e.yaml", "--rerun", "--rerun"],
        ["run", "e.yaml", "--kubeconfig", "k"],
        ["run", "--", "e.yaml"],
        ["--json", "run", "e.yaml"],
        ["run", "e.yaml", "-h"],
    ],
)
def test_anything_else_is_left_to_the_parser(argv: list[str]):
    assert entry.run_words(argv) is None


class _Engine:
    def __init__(self, key: Any) -> None:
        self.key = key
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def forked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[_Engine]:
    from runner.adapters import docker_early

    made: list[_Engine] = []

    def fork(key: Any) -> _Engine:
        made.append(_Engine(key))
        return made[-1]

    monkeypatch.setattr(docker_early.EarlyEngine, "fork", staticmethod(fork))
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    spec = tmp_path / "eval.yaml"
    spec.write_text("name: t\n")
    (tmp_path / "eval.lock.json").write_text(json.dumps({"image": {"ref": "r@sha256:" + "a" * 64}}))
    monkeypatch.chdir(tmp_path)
    yield made
    entry.release()


def test_the_command_takes_the_helper_forked_for_its_own_key(forked: list[_Engine], tmp_path):
    entry.fork_for(["run", "eval.yaml", "--rerun"])
    (engine,) = forked
    assert engine.key is not None and engine.key.speculate
    key = entry.key_for(tmp_path / "home", "eval.yaml", rerun=True, verify_rootfs=None)
    assert entry.take(key) is engine and not engine.closed
    assert entry.take(key) is None  # taken once


def test_a_helper_forked_for_another_key_is_let_go(forked: list[_Engine], tmp_path):
    entry.fork_for(["run", "eval.yaml", "--rerun"])
    other = entry.key_for(tmp_path / "home", "eval.yaml", rerun=True, verify_rootfs="full")
    assert entry.take(other) is None
    assert forked[0].closed


def test_nothing_is_forked_for_another_command(forked: list[_Engine]):
    entry.fork_for(["runs", "ls"])
    entry.fork_for(["run", "eval.yaml", "--backend", "kubernetes"])
    assert forked == []


def test_the_program_forks_the_helper_before_the_command_line_loads(tmp_path: Path):
    # the real entry point, up to the fork: which of the CLI's modules were loaded then
    code = textwrap.dedent(
        """
        import sys
        from runner.adapters import docker_early
        def fork(key):
            print("FORK", "runner.cli.main" in sys.modules, key is not None, flush=True)
            raise SystemExit(0)
        docker_early.EarlyEngine.fork = staticmethod(fork)
        sys.argv = ["evalrun", "run", "eval.yaml", "--rerun"]
        from runner.entry import console_main
        console_main()
        """
    )
    (tmp_path / "eval.yaml").write_text("name: t\n")
    (tmp_path / "eval.lock.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "EVALRUN_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["FORK", "False", "True"]
