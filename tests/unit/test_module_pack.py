"""The agent's module pack: one file holding the modules a run imports (runner.agent.module_pack)."""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.agent import module_pack
from runner.agent.module_pack import FORMAT, PACK_FILE, build_pack, load_pack

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pack") / "modules.pack"
    build_pack(str(path))
    return path


def _fresh(code: str, pack: Path) -> object:
    """What ``code`` prints as JSON in a fresh interpreter whose agent imports from ``pack``
    (installed as the entry point does), on this checkout."""
    prelude = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from runner.agent.module_pack import install_pack; "
        f"finder = install_pack({str(pack)!r}); "
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", prelude + code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


def test_the_pack_holds_the_agents_and_the_standard_librarys_modules(pack):
    loaded = load_pack(str(pack))
    assert loaded is not None
    modules = loaded[0]
    for name in ("runner.agent.verification", "runner.shared.agent_plan", "json", "subprocess"):
        assert name in modules, name
    is_package, origin, code = modules["json"]
    assert is_package is True and origin.endswith("json/__init__.py")
    assert marshal.loads(code).co_filename == origin
    # imported before the pack is installed, or not pure Python from a file
    for name in ("runner", "runner.agent", "runner.agent.__main__", "runner.agent.module_pack"):
        assert name not in modules
    assert not any(origin.endswith(".so") for _, origin, _ in modules.values())


def test_a_run_imports_from_the_pack_and_the_check_covers_the_pack(pack):
    code = (
        "import runner.agent.__main__, json\n"
        "from runner.agent.usage import agent_paths\n"
        "mod = sys.modules['runner.agent.verification']\n"
        "print(json.dumps({'cached': mod.__cached__, 'file': mod.__file__,"
        " 'packed': sorted(n for n, m in sys.modules.items()"
        " if getattr(m, '__cached__', None) == finder.path),"
        " 'paths': agent_paths()}))"
    )
    out = _fresh(code, pack)
    assert out["cached"] == str(pack)
    assert out["file"].endswith("runner/agent/verification.py")  # tracebacks show its source
    assert len(out["packed"]) > 40
    assert str(pack) in out["paths"]
    # a packed module's own bytecode is not what ran, so it is not what is checked
    assert not any("/runner/agent/__pycache__/verification." in p for p in out["paths"])


def test_a_module_not_in_the_pack_is_imported_from_its_file(pack):
    # runner.agent.determinism is not imported by a run: not packed
    loaded = load_pack(str(pack))
    assert loaded is not None and "runner.agent.determinism" not in loaded[0]
    modules = loaded[0]
    assert "runner.agent.gpu" in modules  # every run's capture asks it
    out = _fresh(
        "import runner.agent.__main__, runner.agent.determinism, json; "
        "print(json.dumps(sys.modules['runner.agent.determinism'].__cached__))",
        pack,
    )
    assert isinstance(out, str) and out.endswith(".pyc")


def test_the_pack_is_the_same_bytes_on_every_build(tmp_path):
    builds = []
    for name in ("first.pack", "again.pack"):
        path = tmp_path / name
        script = f"from runner.agent.module_pack import build_pack; build_pack({str(path)!r})"
        subprocess.run(
            [sys.executable, "-c", script],
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            cwd=ROOT,
        )
        builds.append(path.read_bytes())
    assert builds[0] == builds[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pack", "first.pack"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not marshal at all",
        marshal.dumps([1, 2, 3]),
        marshal.dumps({"format": FORMAT + 1, "magic": module_pack.bytecode_magic(), "modules": {}}),
        marshal.dumps({"format": FORMAT, "magic": b"\x00\x00\r\n", "modules": {}}),  # other Python
        marshal.dumps({"format": FORMAT, "magic": module_pack.bytecode_magic(), "modules": []}),
        marshal.dumps({"format": FORMAT, "magic": module_pack.bytecode_magic(), "modules": {}}),
        marshal.dumps({"format": 1, "magic": module_pack.bytecode_magic(), "modules": {}}),
    ],
    ids=[
        "empty",
        "garbage",
        "a-list",
        "other-format",
        "other-interpreter",
        "bad-modules",
        "no-absent-list",
        "format-1",
    ],
)
def test_a_pack_that_cannot_be_used_changes_nothing(tmp_path, content):
    path = tmp_path / "modules.pack"
    path.write_bytes(content)
    before = list(sys.meta_path)
    assert module_pack.install_pack(str(path)) is None
    assert sys.meta_path == before


def test_no_pack_changes_nothing(tmp_path):
    before = list(sys.meta_path)
    assert module_pack.install_pack(str(tmp_path / "missing.pack")) is None
    assert sys.meta_path == before
    assert module_pack.installed() is None


def test_the_pack_lives_beside_the_agent():
    assert Path(PACK_FILE).parent == ROOT / "runner" / "agent"
    # the template writes it, after the agent's bytecode
    template = (ROOT / "images" / "python-eval.Dockerfile.j2").read_text()
    assert template.index('"runner.agent", "pack"') > template.index("compileall")
    shared = ROOT / "runner" / "blueprints" / "shared" / "python-eval.Dockerfile.j2"
    assert shared.read_text() == template


def test_a_module_the_image_lacked_when_packed_is_not_looked_for_again(tmp_path, pack):
    # the build's probe records what a run asked for and no finder had
    loaded = load_pack(str(pack))
    assert loaded is not None
    assert "msvcrt" in loaded[1]  # asked for by the standard library, on Linux never there
    assert not set(loaded[1]) & set(loaded[0])
    # a pack saying "evalrun_gone" is absent: the import fails at once, even where a file of
    # that name has appeared on sys.path since (the image is immutable; /tmp is not)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "evalrun_gone.py").write_text("raise SystemExit('imported')\n")
    custom = tmp_path / "custom.pack"
    custom.write_bytes(
        marshal.dumps(
            {
                "format": FORMAT,
                "magic": module_pack.bytecode_magic(),
                "modules": {},
                "absent": ["evalrun_gone"],
            }
        )
    )
    out = _fresh(
        f"sys.path.insert(0, {str(planted)!r}); import json\n"
        "try:\n"
        "    import evalrun_gone\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(json.dumps([type(exc).__name__, exc.name, str(exc)]))\n",
        custom,
    )
    assert out == ["ModuleNotFoundError", "evalrun_gone", "No module named 'evalrun_gone'"]


def test_the_launcher_runs_the_agent_without_runpy_and_from_the_package_folder(tmp_path):
    # -S: no site-packages, so no installed evalrun either; nothing on PYTHONPATH: the
    # launcher finds the runner package beside itself, not in its own folder or the cwd
    launcher = ROOT / "runner" / "agent" / "launch.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", str(launcher), "run", "--plan", "missing.json"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr  # AgentExit.BAD_PLAN: the agent's own answer
    assert "agent: plan not found: missing.json" in proc.stderr
    order = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert "runner.agent.__main__" in order
    assert "runpy" not in order
    # before the pack is installed (all that precedes module_pack's line, its own imports
    # included) nothing loads that the pack could serve: each would come from its files
    bare = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", "-c", "import os"],  # as site does
        capture_output=True, text=True, check=True, cwd=tmp_path, env=env,
    ).stderr
    at_start = {line.rsplit("|", 1)[1].strip() for line in bare.splitlines() if "|" in line}
    before_pack = set(order[: order.index("runner.agent.module_pack")]) - at_start
    assert before_pack <= {"runner", "runner.agent"}, before_pack


def test_the_template_starts_the_agent_with_the_launcher():
    template = (ROOT / "images" / "python-eval.Dockerfile.j2").read_text()
    assert 'ENTRYPOINT ["python3", "-S", "/opt/evalrun/agent/runner/agent/launch.py"]' in template


def _sys_path(*flags: str, code: str, cwd: Path) -> list[str]:
    out = subprocess.run(
        [sys.executable, *flags, "-c", f"import json, sys\n{code}\nprint(json.dumps(sys.path))"],
        capture_output=True, text=True, check=True, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    return json.loads(out)


def test_the_launcher_puts_the_site_folders_on_sys_path_as_site_does(tmp_path):
    # the interpreter's and its venv's site-packages, and the folders their .pth files name,
    # in site's order; what .pth import lines add (this venv's editable finder) is not run
    with_site = _sys_path(code="sys.path.pop(0)", cwd=tmp_path)
    launched = _sys_path(
        "-S",
        code="sys.path.pop(0)\nfrom runner.agent.launch import site_folders\nsite_folders()",
        cwd=tmp_path,
    )
    bare = _sys_path("-S", code="sys.path.pop(0)", cwd=tmp_path)
    assert [p for p in with_site if p in bare or os.path.exists(p)] == launched
    assert any(p.endswith("-packages") for p in launched)


def test_a_pth_file_adds_its_folders_and_runs_none_of_its_lines(tmp_path):
    from runner.agent.launch import _pth_folders

    site_dir = tmp_path / "site-packages"
    (site_dir / "extra").mkdir(parents=True)
    marker = tmp_path / "ran"
    (site_dir / "a.pth").write_text(
        "# a comment\n\nextra\nmissing\n"
        f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
        "extra\n"
    )
    before = list(sys.path)
    try:
        known: set[str] = set()
        assert _pth_folders(str(site_dir), "a.pth", known) is known
        added = sys.path[len(before):]
    finally:
        sys.path[:] = before
    assert added == [str(site_dir / "extra")]  # once, and only a folder that exists
    assert not marker.exists()
    assert _pth_folders(str(site_dir), "gone.pth", set()) == set()  # unreadable: nothing


def test_the_launcher_leaves_site_as_it_found_it():
    import site

    from runner.agent.launch import site_folders

    before, add_lines = list(sys.path), site.addpackage
    try:
        site_folders()
    finally:
        sys.path[:] = before
    assert site.addpackage is add_lines

