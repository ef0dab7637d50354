"""Global flags mean the same before and after the command, on every command, and
`evalrun --help` shows one command tree (issue 16, item 6)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from runner.cli.common import GLOBAL_OPTIONS_TITLE, backend_for, key_access
from runner.cli.main import build_parser, command_tree, main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "digits" / "eval.yaml"

# Several commands of different areas, nested ones included, with their required arguments.
COMMANDS = {
    "validate": ["validate", "eval.yaml"],
    "lock": ["lock", "eval.yaml"],
    "run": ["run", "eval.yaml", "--backend", "kubernetes"],
    "sweep": ["sweep", "eval.yaml", "--matrix", "m.yaml"],
    "verify": ["verify", "bundle", "--key", "k.pub"],
    "keys describe": ["keys", "describe", "k8s://ns/secret"],
    "keys list": ["keys", "list"],
    "runs ls": ["runs", "ls"],
    "rerun": ["rerun", "r-1"],
    "audit": ["audit"],
    "report": ["report", "r-1"],
    "compare": ["compare", "group"],
    "blueprints ls": ["blueprints", "ls"],
    "status": ["status", "r-1"],
    "wait": ["wait", "r-1", "--timeout", "5"],
    "logs": ["logs", "r-1", "-f"],
    "cancel": ["cancel", "r-1"],
}
# flag arguments → the namespace attribute and the value they set
FLAGS = {
    "--json": ([], "json", True),
    "--log-json": ([], "log_json", True),
    "-v": ([], "verbose", True),
    "--kubeconfig": (["/tmp/kc.yaml"], "kubeconfig", "/tmp/kc.yaml"),
    "--context": (["ctx-a"], "context", "ctx-a"),
    "-n": (["ns-b"], "namespace", "ns-b"),
    "--namespace": (["ns-c"], "namespace", "ns-c"),
}
DEFAULTS = {
    "json": False,
    "log_json": False,
    "verbose": False,
    "kubeconfig": None,
    "context": None,
    "namespace": None,
}


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_a_global_flag_means_the_same_before_and_after_the_command(command: str, flag: str) -> None:
    values, dest, expected = FLAGS[flag]
    argv = COMMANDS[command]
    before = _parse([flag, *values, *argv])
    after = _parse([*argv, flag, *values])
    assert getattr(before, dest) == expected
    assert getattr(after, dest) == expected
    # and nothing else moved: the other global options keep their defaults
    for other, default in DEFAULTS.items():
        if other != dest:
            assert getattr(before, other) == default == getattr(after, other)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_without_global_flags_every_command_has_the_defaults(command: str) -> None:
    args = _parse(COMMANDS[command])
    for dest, default in DEFAULTS.items():
        assert getattr(args, dest) == default


def test_flags_between_a_command_and_its_subcommand_count_too() -> None:
    args = _parse(["keys", "--json", "-n", "ns", "list"])
    assert args.json is True and args.namespace == "ns"
    args = _parse(["runs", "--log-json", "ls", "--kubeconfig", "kc"])
    assert args.log_json is True and args.kubeconfig == "kc"


def test_the_flag_after_the_command_wins_over_the_one_before() -> None:
    args = _parse(["-n", "first", "run", "eval.yaml", "-n", "second"])
    assert args.namespace == "second"


def test_the_cluster_flags_reach_the_backend_and_the_key_sources_from_either_side() -> None:
    cluster = ["--kubeconfig", "/tmp/kc", "--context", "c1", "-n", "evals"]
    for argv in (
        [*cluster, "run", "eval.yaml", "--backend", "kubernetes"],
        ["run", "eval.yaml", "--backend", "kubernetes", *cluster],
        [
            "--kubeconfig",
            "/tmp/kc",
            "run",
            "eval.yaml",
            "--backend",
            "kubernetes",
            "--context",
            "c1",
            "-n",
            "evals",
        ],
    ):
        args = _parse(argv)
        target = backend_for(args).target
        assert (target.kubeconfig, target.context, target.namespace) == ("/tmp/kc", "c1", "evals")
        access = key_access(args)
        assert (access.kubeconfig, access.kube_context) == ("/tmp/kc", "c1")
    for argv in (
        [*cluster, "keys", "describe", "k8s://ns/s"],
        ["keys", "describe", "k8s://ns/s", *cluster],
    ):
        access = key_access(_parse(argv))
        assert (access.kubeconfig, access.kube_context) == ("/tmp/kc", "c1")


@pytest.mark.parametrize("position", ["before", "after"])
def test_json_before_or_after_validate_prints_one_json_object(
    position: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the reproducer: `evalrun --json validate X` printed text
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    argv = (
        ["--json", "validate", str(SPEC)]
        if position == "before"
        else ["validate", str(SPEC), "--json"]
    )
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is True and out["name"] == "digits-logreg"


@pytest.mark.parametrize("position", ["before", "after"])
def test_json_errors_are_json_in_either_position(
    position: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    missing = str(tmp_path / "missing.yaml")
    argv = (
        ["--json", "validate", missing] if position == "before" else ["validate", missing, "--json"]
    )
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["exit_code"] == 2
    assert captured.err == ""


@pytest.mark.parametrize("position", ["before", "after"])
def test_log_json_in_either_position_logs_json_lines_on_stderr(
    position: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    missing = str(tmp_path / "missing.yaml")
    argv = (
        ["--log-json", "verify", missing, "--key", missing]
        if position == "before"
        else ["verify", missing, "--key", missing, "--log-json"]
    )
    assert main(argv) == 2
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    assert any(rec["event"] == "error" and rec["level"] == "error" for rec in lines)


@pytest.mark.parametrize("position", ["before", "after"])
def test_json_in_either_position_on_keys_public_key_is_one_object(
    position: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from runner.bundle.signing import generate_keypair

    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    info = generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    argv = ["keys", "public-key", str(info.private_path)]
    assert main(["--json", *argv] if position == "before" else [*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["keyid"] == info.keyid
    assert out["public_pem"].startswith("-----BEGIN PUBLIC KEY-----")


def _leaf_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += _leaf_parsers(child, (*path, name)) or [(" ".join((*path, name)), child)]
    return found


def test_every_command_takes_every_global_option_in_one_group() -> None:
    root = build_parser()
    want = {s for a in root._actions for s in a.option_strings if not s.startswith("-h")}
    want -= {"--help"}
    leaves = _leaf_parsers(root)
    assert len(leaves) >= 20
    for name, parser in leaves:
        group = next(g for g in parser._action_groups if g.title == GLOBAL_OPTIONS_TITLE)
        have = {s for a in group._group_actions for s in a.option_strings}
        assert have == want, name
        assert parser.format_usage().rstrip().endswith("[global options]"), name


def test_help_shows_one_tree_with_every_command_nested_ones_included(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    tree = command_tree(build_parser())
    names = [name for name, _ in tree]
    assert names == [name for name, _ in _leaf_parsers(build_parser())]
    for name in ("validate", "run", "keys generate", "keys public-key", "runs ls", "blueprints ls"):
        assert f"\n  {name} " in text
    assert "{generate," not in text  # no argparse choice sets: one style everywhere
    assert GLOBAL_OPTIONS_TITLE in text
    with pytest.raises(SystemExit):
        main(["keys", "--help"])
    keys_help = capsys.readouterr().out
    for name, summary in tree:
        if name.startswith("keys "):
            assert f"  {name}" in keys_help and summary in keys_help
    assert "{generate," not in keys_help


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "keys"],
        ["keys", "--json"],
        ["--json", "run", "eval.yaml", "--no-such-flag"],
        ["run", "--backend", "nomad", "eval.yaml", "--json"],
    ],
)
def test_a_usage_error_under_json_is_one_json_object_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["error"] == "bad_input" and error["exit_code"] == 2
    assert error["usage"].startswith("usage: evalrun")
    assert captured.err == ""


def test_a_usage_error_without_json_is_argparse_s_two_lines_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "usage: evalrun keys [-h] COMMAND ... [global options]\n"
        "evalrun keys: error: the following arguments are required: COMMAND\n"
    )
