"""Blueprints: the catalogue, offline scaffolding, and what each blueprint promises."""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from runner.workflows import blueprints
from runner.build.context import render_dockerfile
from runner.cli.main import main
from runner.errors import InfrastructureError, InputError
from runner.model.spec import load_spec
from runner.workflows.sweep import load_matrix

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits"
PACKAGED = ROOT / "runner" / "blueprints"
NAMES = ["digits", "sweep", "torch-gpu"]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))


def init_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["init", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def run_app(project: Path, tmp_path: Path, params: dict, seed: int = 1) -> list[dict]:
    """Run a scaffolded app/evaluate.py on the host under the evalrun contract."""
    output = tmp_path / "samples.jsonl"
    env = {
        **os.environ,
        "EVALRUN_MODEL": str(project / "model" / "weights.json"),
        "EVALRUN_DATA_DIGITS_TEST": str(project / "data" / "digits_test.jsonl"),
        "EVALRUN_PARAMS": json.dumps(params),
        "EVALRUN_SEED": str(seed),
        "EVALRUN_OUTPUT": str(output),
    }
    proc = subprocess.run([sys.executable, str(project / "app" / "evaluate.py")], env=env,
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in output.read_text().splitlines()]


def accuracy(rows: list[dict]) -> float:
    return sum(r["label"] == r["prediction"] for r in rows) / len(rows)


# --------------------------------------------------------------------------- catalogue


def test_ls_lists_every_blueprint_with_a_one_line_description(capsys):
    assert main(["blueprints", "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in listed] == NAMES
    for entry in listed:
        assert entry["description"] and "\n" not in entry["description"]
        assert len(entry["description"]) <= 100
    assert {b["name"]: b["requires"] for b in listed}["torch-gpu"] == "gpu"

    assert main(["blueprints", "ls"]) == 0
    text = capsys.readouterr().out
    for entry in listed:
        assert f"{entry['name']}  " in text and entry["description"] in text


def test_unknown_blueprint_is_refused_naming_the_known_ones(tmp_path, capsys):
    code = main(["init", "--blueprint", "mnist", str(tmp_path / "p")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown blueprint 'mnist'" in err
    assert "digits, sweep, torch-gpu" in err
    assert not (tmp_path / "p").exists()
    with pytest.raises(InputError) as exc:
        blueprints.get_blueprint("mnist")
    assert exc.value.fields["known"] == "digits, sweep, torch-gpu"


def test_packaged_shared_files_are_the_repository_copies():
    """The blueprints ship copies; they must not drift from the template and the example."""
    shared = PACKAGED / "shared"
    assert (shared / "python-eval.Dockerfile.j2").read_bytes() == (
        ROOT / "images" / "python-eval.Dockerfile.j2"
    ).read_bytes(), "copy images/python-eval.Dockerfile.j2 to runner/blueprints/shared/"
    for rel in ("data/digits_test.jsonl", "model/weights.json"):
        assert (shared / "digits" / rel).read_bytes() == (EXAMPLE / rel).read_bytes()


def test_packaged_python_sources_are_not_importable_modules():
    """Blueprint apps are *.py-tpl, so mypy and ruff over runner/ never see them."""
    assert not list(PACKAGED.rglob("*.py"))
    assert list(PACKAGED.rglob("*.py-tpl"))


# --------------------------------------------------------------------------- scaffolding


@pytest.mark.parametrize("name", NAMES)
def test_every_blueprint_scaffolds_a_valid_project_offline(name, tmp_path, capsys):
    dest = tmp_path / "projects" / name
    code, out = init_json(capsys, "--blueprint", name, "--no-lock", str(dest))
    assert code == 0, out
    assert out["locked"] is False and out["spec"] == str(dest / "eval.yaml")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == sorted(out["files"])
    assert "blueprint.yaml" not in files and not [f for f in files if f.endswith("-tpl")]
    assert "app/evaluate.py" in files and "README.md" in files
    py_compile.compile(str(dest / "app" / "evaluate.py"), cfile=str(tmp_path / "x.pyc"),
                       doraise=True)

    # The spec validates and everything it names lies inside the project.
    spec = load_spec(dest / "eval.yaml")
    template = (dest / spec.image.template).resolve()
    assert template.is_relative_to(dest) and template.is_file()
    assert (dest / spec.image.context).resolve() == dest / "app"
    assert main(["validate", str(dest / "eval.yaml")]) == 0
    rendered = render_dockerfile(template, {
        "base_image": "127.0.0.1:5000/evalrun/base@sha256:" + "0" * 64,
        "spec_name": spec.metadata.name,
        "inputs_digest": "sha256:" + "1" * 64,
        "source_date_epoch": 1735689600,
        "has_wheels": True,
    })
    assert rendered.startswith("FROM 127.0.0.1:5000/evalrun/base@sha256:")
    # Nothing left behind next to the project (the staging directory is gone).
    assert [p.name for p in dest.parent.iterdir()] == [name]


def test_digits_blueprint_is_the_example(tmp_path, capsys):
    dest = tmp_path / "digits"
    init_json(capsys, "--blueprint", "digits", "--no-lock", str(dest))
    spec, example = load_spec(dest / "eval.yaml"), load_spec(EXAMPLE / "eval.yaml")
    assert spec.model == example.model and spec.datasets == example.datasets
    assert spec.metrics == example.metrics and spec.image.requirements == example.image.requirements
    rows = run_app(dest, tmp_path, {})
    assert len(rows) == 450 and accuracy(rows) == pytest.approx(0.9244, abs=1e-4)


def test_sweep_blueprint_cells_vary_noise_and_seed_and_pass(tmp_path, capsys):
    dest = tmp_path / "sweep"
    init_json(capsys, "--blueprint", "sweep", "--no-lock", str(dest))
    cells = load_matrix(dest / "sweep.yaml")
    assert len(cells) == 4
    assert {tuple(sorted(c.overrides)) for c in cells} == {("params.noise_std", "seed")}
    threshold = {m.name: m.threshold for m in load_spec(dest / "eval.yaml").metrics}["accuracy"]
    seen = {}
    for cell in cells:
        rows = run_app(dest, tmp_path, {"noise_std": cell.overrides["params.noise_std"]},
                       seed=cell.overrides["seed"])
        seen[(cell.overrides["seed"], cell.overrides["params.noise_std"])] = accuracy(rows)
    assert all(acc >= threshold for acc in seen.values()), seen
    assert seen[(1, 0.0)] == seen[(2, 0.0)]  # no noise: the seed does not matter
    assert seen[(1, 4.0)] != seen[(2, 4.0)] and seen[(1, 4.0)] < seen[(1, 0.0)]


def test_torch_gpu_blueprint_pins_its_gpu_environment_explicitly(tmp_path, capsys):
    dest = tmp_path / "gpu"
    code, out = init_json(capsys, "--blueprint", "torch-gpu", str(dest))
    assert code == 0 and out["locked"] is False and out["requires"] == "gpu"
    assert "evalrun lock eval.yaml" in out["next"]
    assert any("--backend kubernetes" in c for c in out["next"])
    spec = load_spec(dest / "eval.yaml")
    assert spec.resources.gpus == 1
    assert spec.sandbox.runtime_class == "gvisor-nvproxy"
    assert spec.expect.driver and spec.expect.cuda and spec.expect.gpu_count == 1
    assert [r.split("==")[0] for r in spec.image.requirements] == ["torch", "nvidia-ml-py"]
    assert spec.params["device"] == "cuda"
    readme = (dest / "README.md").read_text()
    assert "GPU node" in readme and "--backend kubernetes" in readme


# --------------------------------------------------------------------------- locking


class _FakeLock:
    class image:  # mimics LockedSpec.image
        ref = "127.0.0.1:5000/evalrun/digits-logreg@sha256:" + "a" * 64

    def digest(self) -> str:
        return "sha256:" + "b" * 64


def test_init_locks_through_the_lock_code_path(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_lock_spec(spec, spec_path, settings, *, progress, rebuild=False):
        calls.append((spec.metadata.name, spec_path))
        return _FakeLock(), None

    monkeypatch.setattr("runner.build.lock.lock_spec", fake_lock_spec)
    dest = tmp_path / "d"
    code, out = init_json(capsys, "--blueprint", "digits", str(dest))
    assert code == 0
    assert calls == [("digits-logreg", dest / "eval.yaml")]
    assert out["locked"] is True and out["image"] == _FakeLock.image.ref
    assert out["lock"] == str(dest / "eval.lock.json")

    # torch-gpu is not locked by default, but --lock asks for it.
    code, out = init_json(capsys, "--blueprint", "torch-gpu", "--lock", str(tmp_path / "g"))
    assert code == 0 and out["locked"] is True
    assert calls[-1] == ("digits-torch-gpu", tmp_path / "g" / "eval.yaml")


def test_init_that_cannot_lock_keeps_the_project_and_says_how_to_finish(
    tmp_path, capsys, monkeypatch
):
    def failing_lock_spec(*args, **kwargs):
        raise InfrastructureError("registry unreachable", hint="run scripts/host-up.sh")

    monkeypatch.setattr("runner.build.lock.lock_spec", failing_lock_spec)
    dest = tmp_path / "d"
    assert main(["init", "--blueprint", "digits", str(dest)]) == 5
    err = capsys.readouterr().err
    assert "registry unreachable" in err and "host-up.sh" in err
    assert f"evalrun lock {dest / 'eval.yaml'}" in err
    assert load_spec(dest / "eval.yaml").metadata.name == "digits-logreg"


# --------------------------------------------------------------------------- destination


def test_non_empty_directory_is_refused_and_left_untouched(tmp_path, capsys):
    dest = tmp_path / "p"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert main(["init", "--blueprint", "digits", "--no-lock", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "notes.txt" in err
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "p"]


def test_a_file_in_place_of_the_directory_is_refused(tmp_path, capsys):
    dest = tmp_path / "p"
    dest.write_text("x")
    assert main(["init", "--blueprint", "digits", "--no-lock", str(dest)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert dest.read_text() == "x"


def test_an_existing_empty_directory_is_used(tmp_path, capsys):
    dest = tmp_path / "p"
    dest.mkdir()
    code, _ = init_json(capsys, "--blueprint", "sweep", "--no-lock", str(dest))
    assert code == 0 and (dest / "sweep.yaml").is_file()


def test_name_replaces_metadata_name_only(tmp_path, capsys):
    dest = tmp_path / "p"
    code, out = init_json(capsys, "--blueprint", "digits", "--no-lock", "--name", "my-eval",
                          str(dest))
    assert code == 0 and out["name"] == "my-eval"
    spec = load_spec(dest / "eval.yaml")
    assert spec.metadata.name == "my-eval" and spec.datasets[0].name == "digits-test"


def test_invalid_name_is_refused_before_anything_is_written(tmp_path, capsys):
    dest = tmp_path / "p"
    assert main(["init", "--blueprint", "digits", "--no-lock", "--name", "My Eval",
                 str(dest)]) == 2
    assert "not a valid evaluation name" in capsys.readouterr().err
    assert not dest.exists()


def test_init_into_the_current_directory_keeps_that_directory(tmp_path, capsys, monkeypatch):
    dest = tmp_path / "here"
    dest.mkdir()
    inode = dest.stat().st_ino
    monkeypatch.chdir(dest)
    code, out = init_json(capsys, "--blueprint", "digits", "--no-lock", ".")
    assert code == 0 and out["dir"] == str(dest)
    assert dest.stat().st_ino == inode  # a shell sitting in it still sees the project
    assert (Path.cwd() / "eval.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "home"]
