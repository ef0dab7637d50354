"""What the agent loads for a plain run, pinned in a fresh process.

Under gVisor's ptrace platform every module the agent imports costs it ~5 ms to load and
~1 ms to check (its bytecode is one of the files the used-files check hashes), on the
evaluation's CPU, in every run. None of these is needed by a run whose results Docker
reads from the results folder; each came from one import in a shared module and was taken
out (see ``docs/design-decisions.md``). This test fails when one of them comes back.
"""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

NOT_LOADED = (
    "dataclasses",  # and inspect, ast, dis, tokenize with it
    "inspect",
    "concurrent.futures",  # and logging
    "logging",
    "tempfile",
    "random",
    "statistics",
    "tarfile",  # loaded by results_out.prepare only when the plan frames its results
    "socket",  # likewise, when the agent holds its results
    "shutil",  # and bz2, lzma
    "string",
    "importlib.util",
    "importlib.metadata",
)


def _fresh(code: str) -> object:
    """What ``code`` prints as JSON, run in a fresh interpreter on this checkout."""
    out = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_a_plain_agent_run_loads_none_of_the_costly_modules():
    loaded = set(
        _fresh("import runner.agent.__main__, sys, json; print(json.dumps(sorted(sys.modules)))")
    )
    assert "runner.agent.__main__" in loaded
    assert sorted(set(NOT_LOADED) & loaded) == []


def test_reading_the_command_line_loads_none_of_them_either():
    # argparse asks shutil for the terminal's width unless it is given one (agent._Parser)
    loaded = set(
        _fresh(
            "from runner.agent.__main__ import main, AgentExit; import json; "
            "code = main(['run', '--plan', '/nonexistent/plan.json']); "
            "assert code == AgentExit.BAD_PLAN, code; "
            "print(json.dumps(sorted(sys.modules)))"
        )
    )
    # the backends' own `run` command line is read without argparse (agent._run_args)
    assert "argparse" not in loaded and "gettext" not in loaded
    assert sorted(set(NOT_LOADED) & loaded) == []
    assert "bz2" not in loaded and "lzma" not in loaded


def test_any_other_command_line_is_read_by_argparse_without_the_costly_modules():
    # argparse asks shutil for the terminal's width unless it is given one (agent._parser)
    loaded = set(
        _fresh(
            "from runner.agent.__main__ import main, AgentExit; import json; "
            "code = main(['run', '--plan=/nonexistent/plan.json']); "
            "assert code == AgentExit.BAD_PLAN, code; "
            "print(json.dumps(sorted(sys.modules)))"
        )
    )
    assert "argparse" in loaded
    assert sorted(set(NOT_LOADED) & loaded) == []
    assert "bz2" not in loaded and "lzma" not in loaded


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "--plan", "/p/plan.json", "--results", "/r"],
        ["run", "--results", "/r", "--plan", "/p/plan.json", "--emit-results"],
        ["run", "--emit-results"],
    ],
)
def test_the_run_fast_path_reads_what_argparse_reads(argv):
    from runner.agent.__main__ import _parser, _run_args

    fast = _run_args(argv)
    slow = _parser().parse_args(argv)
    assert fast is not None
    assert (fast.command, fast.plan, fast.results, fast.emit_results) == (
        slow.command, slow.plan, slow.results, slow.emit_results,
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["ack"],
        ["run", "--plan=/p"],  # argparse's forms the fast path leaves to it
        ["run", "--pl", "/p"],
        ["run", "--plan"],
        ["run", "--plan", "/a", "--plan", "/b"],
        ["run", "--plan", "--results"],
        ["run", "--emit-results", "--emit-results"],
        ["run", "extra"],
        ["run", "-h"],
    ],
)
def test_anything_else_is_left_to_argparse(argv):
    from runner.agent.__main__ import _run_args

    assert _run_args(argv) is None


def test_the_copies_that_replace_them_agree_with_the_standard_library():
    import importlib.util

    from runner.agent.module_pack import bytecode_magic
    from runner.shared.generation import _PUNCTUATION

    assert frozenset(string.punctuation) == _PUNCTUATION
    assert bytecode_magic() == importlib.util.MAGIC_NUMBER


def test_the_results_are_framed_with_modules_loaded_before_the_check_ends():
    code = (
        "from runner.agent.results_out import prepare; import sys, json; "
        "prepare({'emit_results': True, 'collect': 'exec'}); "
        "print(json.dumps(['tarfile' in sys.modules, 'socket' in sys.modules]))"
    )
    assert _fresh(code) == [True, True]
