"""``evalrun lock --refresh-pins`` (issue 19, item 6): pins from the files, nothing else edited."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from runner._internal.input_tree import scan_tree
from runner._internal.settings import Settings
from runner.build.pins import describe, refresh_pins
from runner.build.wheels import _remember_resolution, remembered_wheels
from runner.errors import InputError, SpecError
from runner.model.spec import load_spec
from runner.model.lock import LockedWheel

pytestmark = pytest.mark.unit

OLD = "ab" * 32

SPEC = """\
# my evaluation — comments, quoting and order must survive
apiVersion: evalrun/v1
kind: Evaluation
metadata: {name: pins}   # flow style stays
image:
  ref: 127.0.0.1:5000/evalrun/pins@sha256:%(img)s
model:
  uri: model.json
  sha256: %(old)s   # the model under test
datasets:
  - name: test-split
    uri: data/test.jsonl
    sha256: "sha256:%(old)s"
    split: test
    license: CC0-1.0
    source: made here
  - name: tree
    uri: tree
    sha256: '%(old)s'
    split: test
    license: CC0-1.0
    source: made here
  - name: remote
    uri: https://example.org/data.jsonl
    sha256: %(old)s
    split: test
    license: CC0-1.0
    source: elsewhere
command: ["python3", "/app/evaluate.py"]
metrics:
  - {name: accuracy, compute: accuracy}
"""


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    (tmp_path / "model.json").write_text('{"w": [1, 2]}\n')
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text('{"id": "a", "label": 1}\n')
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "part.txt").write_text("x\n")
    path = tmp_path / "eval.yaml"
    path.write_text(SPEC % {"old": OLD, "img": "3" * 64})
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_refresh_rewrites_only_the_pins_and_keeps_their_spelling(spec: Path):
    model, data = _sha(spec.parent / "model.json"), _sha(spec.parent / "data" / "test.jsonl")
    tree = scan_tree(spec.parent / "tree", what="tree").digest.removeprefix("sha256:")
    refresh = refresh_pins(spec)
    assert [p.label for p in refresh.changes] == [
        "model", "datasets[0] (test-split)", "datasets[1] (tree)"
    ]
    assert refresh.skipped == (
        "datasets[2] (remote): https://example.org/data.jsonl (remote: its pin is kept as declared)",
    )
    # byte for byte the file it was, but for the three pins (each spelled as before)
    original = SPEC % {"old": OLD, "img": "3" * 64}
    assert spec.read_text() == original.replace(
        f"sha256: {OLD}   # the model", f"sha256: {model}   # the model"
    ).replace(f'"sha256:{OLD}"', f'"sha256:{data}"').replace(f"'{OLD}'", f"'{tree}'")
    loaded = load_spec(spec)
    assert loaded.model.sha256.removeprefix("sha256:") == model
    assert loaded.datasets[2].sha256 == OLD  # remote: untouched
    lines = describe(refresh)
    assert lines[0].startswith(f"model: sha256 {OLD[:12]}… → {model} (")


def test_refresh_of_pins_already_right_leaves_the_file_alone(spec: Path):
    refresh_pins(spec)
    before, mtime = spec.read_bytes(), spec.stat().st_mtime_ns
    again = refresh_pins(spec)
    assert again.changes == () and len(again.pins) == 3
    assert spec.read_bytes() == before and spec.stat().st_mtime_ns == mtime
    assert all(line.endswith("up to date") for line in describe(again)[:3])


def test_refresh_of_a_missing_input_names_it_and_writes_nothing(spec: Path):
    (spec.parent / "data" / "test.jsonl").unlink()
    before = spec.read_bytes()
    with pytest.raises(InputError, match=r"datasets\[0\] \(test-split\): input not found"):
        refresh_pins(spec)
    assert spec.read_bytes() == before


def test_refresh_of_an_invalid_spec_is_refused_before_anything_is_written(spec: Path):
    spec.write_text(spec.read_text().replace("kind: Evaluation", "kind: Evaluation\nbogus: 1"))
    before = spec.read_bytes()
    with pytest.raises(SpecError):
        refresh_pins(spec)
    assert spec.read_bytes() == before


def test_cli_lock_refresh_pins_prints_each_change(spec: Path, capsys, monkeypatch, tmp_path):
    from runner.cli.main import main

    monkeypatch.setenv("EVALRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVALRUN_CACHE", str(tmp_path / "cache"))
    # the lock itself needs the registry (unit tier: none); the pins are refreshed first
    monkeypatch.setenv("EVALRUN_REGISTRY", "127.0.0.1:9")
    main(["lock", "--refresh-pins", str(spec)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("pin model: sha256 abababababab… → ")
    assert "pin datasets[2] (remote): https://example.org/data.jsonl" in out
    assert load_spec(spec).model.sha256 != OLD


def test_a_wheel_resolution_is_remembered_while_its_wheels_are_cached(tmp_path: Path):
    settings = Settings(home=tmp_path / "home", cache=tmp_path / "cache", registry="r")
    body = b"not really a wheel"
    digest = hashlib.sha256(body).hexdigest()
    wheel = LockedWheel(name="numpy", version="2.2.6",
                        filename="numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.whl", sha256=digest)
    assert remembered_wheels(["numpy==2.2.6"], settings) is None
    (settings.wheel_cache / digest).mkdir(parents=True)
    (settings.wheel_cache / digest / wheel.filename).write_bytes(body)
    _remember_resolution(["numpy==2.2.6"], [wheel], settings)
    assert remembered_wheels(["numpy==2.2.6"], settings) == [wheel]
    assert remembered_wheels(["numpy==2.2.5"], settings) is None
    # a cached wheel that no longer matches its hash: resolve again
    (settings.wheel_cache / digest / wheel.filename).write_bytes(b"tampered")
    assert remembered_wheels(["numpy==2.2.6"], settings) is None
    # an unreadable record: resolve again
    for record in (settings.wheel_cache / "resolved").glob("*.json"):
        record.write_text(json.dumps({"not": "a list"}))
    assert remembered_wheels(["numpy==2.2.6"], settings) is None
