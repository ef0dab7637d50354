"""An installed evalrun (a wheel, outside a source checkout) finds its images and agent files.

The wheel is built offline from a copy of the sources (pip, no build isolation, no index) and
unpacked into a temporary site directory; a fresh interpreter imports runner from there,
with its working directory outside any checkout.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools
from packaging.version import Version

from runner.build.base_image import load_recipe
from runner.build.package_files import AGENT_FILES, agent_digest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "runner", "images")

PROBE = """
import json, sys
from importlib.metadata import Distribution
from pathlib import Path
import runner
from runner.build import base_image, package_files
site = Path(sys.argv[1])
recipe, recipe_sha = base_image.load_recipe("bookworm-python")
(dist_info,) = site.glob("evalrun-*.dist-info")
(entry,) = [e for e in Distribution.at(dist_info).entry_points if e.name == "evalrun"]
print(json.dumps({
    "runner": runner.__file__,
    "images_dir": str(package_files.IMAGES_DIR),
    "template": (package_files.IMAGES_DIR / "python-eval.Dockerfile.j2").read_text(),
    "recipe_name": recipe.name,
    "recipe_sha": recipe_sha,
    "agent_files": list(package_files.AGENT_FILES),
    "agent_files_exist": all((package_files.PACKAGE_DIR / rel).is_file() for rel in package_files.AGENT_FILES),
    "agent_digest": package_files.agent_digest(),
    "entry_point": entry.value,
}))
"""


def _can_build_wheels() -> bool:
    return Version(setuptools.__version__) >= Version("70.1") or bool(
        importlib.util.find_spec("wheel")
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of this checkout, unpacked into a site directory."""
    if not _can_build_wheels():
        pytest.fail("building a wheel offline needs setuptools>=70.1 (the dev extras): make venv")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps",
         "--no-build-isolation", "--disable-pip-version-check", "-q", "-w", str(dist), str(src)],
        cwd=tmp, capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("evalrun-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EVALRUN_IMAGES_DIR")}
    env.update(PYTHONPATH=str(site), EVALRUN_HOME=str(tmp / "home"),
               EVALRUN_CACHE=str(tmp / "cache"))
    return {"names": names, "site": site, "cwd": elsewhere, "env": env}


def run_installed(installed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=installed["cwd"], env=installed["env"],
                          capture_output=True, text=True, timeout=120)


def test_wheel_carries_the_images_and_every_agent_file(installed):
    names = installed["names"]
    images = {p.relative_to(ROOT / "images").as_posix()
              for p in (ROOT / "images").rglob("*") if p.is_file()}
    assert {"base/bookworm-python.yaml", "python-eval.Dockerfile.j2"} <= images
    assert {f"runner/_images/{rel}" for rel in images} <= names
    assert {f"runner/{rel}" for rel in AGENT_FILES} <= names
    assert "runner/build/__init__.py" in names


def test_installed_runner_resolves_images_and_agent_files_from_the_package(installed):
    probe = run_installed(installed, "-c", PROBE, str(installed["site"]))
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    package = installed["site"].resolve() / "runner"
    assert Path(found["runner"]).resolve().parent == package
    assert Path(found["images_dir"]) == package / "_images"
    assert found["template"] == (ROOT / "images" / "python-eval.Dockerfile.j2").read_text()
    assert (found["recipe_name"], found["recipe_sha"]) == (
        "bookworm-python", load_recipe("bookworm-python")[1])
    # Same files, same bytes: an installed evalrun builds the same images as a checkout.
    assert found["agent_files"] == list(AGENT_FILES)
    assert found["agent_files_exist"] is True
    assert found["agent_digest"] == agent_digest()
    assert found["entry_point"] == "runner.entry:console_main"


def test_installed_evalrun_schema_runs_outside_the_checkout(installed):
    result = run_installed(installed, "-c", "import sys; from runner.cli import main; "
                           "sys.exit(main(sys.argv[1:]))", "schema")
    assert result.returncode == 0, result.stderr
    checked_in = json.loads((ROOT / "runner" / "schema" / "evaluation-v1.json").read_text())
    assert json.loads(result.stdout) == checked_in
    # the program as its console script runs it (runner.entry), and as `python -m`
    for args in (("-c", "import sys; from runner.entry import console_main; "
                  "sys.exit(console_main())", "schema"), ("-m", "runner.entry", "schema")):
        result = run_installed(installed, *args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == checked_in
