"""Every ``evalrun`` command the docs show exists, and ``evalrun digest`` gives the pins
the examples carry (the command was once dropped from the parser while the README used it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from runner.cli.main import build_parser, command_tree, main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "examples").rglob("*.md")),
]


def _documented() -> set[tuple[str, str]]:
    """(file, "cmd" or "cmd sub") for each ``evalrun …`` line in a fenced code block."""
    found: set[tuple[str, str]] = set()
    for doc in DOCS:
        inside = False
        for line in doc.read_text().splitlines():
            if line.lstrip().startswith("```"):
                inside = not inside
                continue
            m = re.match(r"\s*(?:\$ )?evalrun((?: [a-z][a-z-]*){1,2})\b", line)
            if inside and m:
                found.add((doc.name, m.group(1).strip()))
    return found


def test_every_documented_command_exists() -> None:
    names = {name for name, _ in command_tree(build_parser())}
    tops = {name.split()[0] for name in names}
    documented = _documented()
    assert documented, "no evalrun command found in the docs: the pattern is wrong"
    missing = []
    for doc, words in sorted(documented):
        first, *rest = words.split()
        groups = {n.split()[0] for n in names if " " in n}
        if first in groups and rest and f"{first} {rest[0]}" not in names:
            missing.append(f"{doc}: evalrun {words}")
        elif first not in tops:
            missing.append(f"{doc}: evalrun {first}")
    assert not missing, missing


def test_digest_prints_the_pins_the_sharded_example_declares(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = ROOT / "examples" / "sharded"
    spec = yaml.safe_load((example / "eval.yaml").read_text())
    code = main(["digest", str(example / "model"), str(example / "data"), "--json"])
    assert code == 0
    found = json.loads(capsys.readouterr().out)
    assert [f["sha256"] for f in found] == [spec["model"]["sha256"], spec["datasets"][0]["sha256"]]
    assert [f["kind"] for f in found] == ["directory", "directory"]


def test_building_the_parser_imports_no_workflow_engine() -> None:
    """Every command pays for the parser: it must not import the heavy engines."""
    import subprocess
    import sys

    probe = (
        "import sys; from runner.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('runner.workflows.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "runner.workflows.compare'" not in out, out
    assert "runner.workflows.run'" not in out, out
