"""``evalrun lock`` of inputs (acquire, verify, cache, publish) and re-runs that fetch them
by digest, against the in-memory registry; the CLI's transfer progress."""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.error
from pathlib import Path

import pytest
import yaml
from test_input_artifacts import RangedRegistry

from runner._internal.cas import ContentStore
from runner._internal.input_tree import scan_tree
from runner._internal.retry import transient_policy
from runner._internal.settings import Settings
from runner.adapters import registry
from runner.build.lock import image_repository, lock_inputs, publish_inputs
from runner.cli.progress import TransferBars
from runner.errors import DigestMismatch, InfrastructureError, InputError, InputsUnavailable
from runner.model.lock import LockedSpec
from runner.model.spec import load_spec
from runner.workflows.inputs import InputResolver, WantedInput, host_inputs, wanted_inputs
from runner.workflows.rerun import Original, resolve_inputs

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"
LEGACY_LOCK = Path(__file__).resolve().parent / "fixtures" / "legacy" / "source" / "eval.lock.json"


@pytest.fixture
def reg(monkeypatch: pytest.MonkeyPatch) -> RangedRegistry:
    fake = RangedRegistry()
    monkeypatch.setattr(registry, "_urlopen", fake)
    monkeypatch.setattr(registry, "_retry_policy", lambda: transient_policy(sleep=lambda _: None))
    return fake


def _sharded_spec(tmp_path: Path) -> Path:
    """A spec whose model is a directory of shards and whose dataset is a directory."""
    spec_dir = tmp_path / "sharded"
    for i in range(3):
        path = spec_dir / "model" / f"model-{i + 1:05d}-of-00003.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(100_000 + i))
    (spec_dir / "model" / "config.json").write_text('{"shards": 3}')
    (spec_dir / "data" / "part-0.jsonl").parent.mkdir(parents=True)
    (spec_dir / "data" / "part-0.jsonl").write_text('{"id": "a", "label": 1}\n')
    (spec_dir / "data" / "part-1.jsonl").write_text('{"id": "b", "label": 2}\n')
    data = yaml.safe_load(EXAMPLE.read_text())
    data["image"] = {"ref": "127.0.0.1:5000/evalrun/sharded@sha256:" + "a" * 64}
    data["metadata"]["name"] = "sharded"
    data["model"] = {"uri": "model/", "sha256": scan_tree(spec_dir / "model", what="m").digest}
    data["datasets"][0].update(
        uri="data", sha256=scan_tree(spec_dir / "data", what="d").digest.removeprefix("sha256:")
    )
    path = spec_dir / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _lock(spec_path: Path, store: ContentStore) -> tuple[LockedSpec, list]:
    spec = load_spec(spec_path)
    inputs = lock_inputs(spec, spec_path.parent, store)
    inputs = publish_inputs(inputs, image_repository(spec), store)
    data = json.loads(LEGACY_LOCK.read_text())
    data["model"] = inputs[0].locked.model_dump(mode="json")
    data["datasets"] = [i.locked.model_dump(mode="json") for i in inputs[1:]]
    return LockedSpec.model_validate(data), inputs


def test_lock_caches_verifies_and_publishes_every_input(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    store = ContentStore(tmp_path / "cache")
    lock, _inputs = _lock(spec_path, store)
    model = lock.model
    assert model.kind == "directory" and model.path == "model"
    assert [f.path for f in model.entries()] == [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert model.artifact and model.artifact.startswith("127.0.0.1:5000/evalrun/sharded-inputs@")
    assert lock.datasets[0].artifact and lock.datasets[0].kind == "directory"
    assert store.tree_files(model.digest) is not None
    manifest = json.loads(reg.manifests["evalrun/sharded-inputs", model.artifact.split("@")[1]][1])
    assert manifest["annotations"]["org.evalrun.input.role"] == "model"
    ds = json.loads(
        reg.manifests["evalrun/sharded-inputs", lock.datasets[0].artifact.split("@")[1]][1]
    )
    assert ds["annotations"]["org.evalrun.input.license"] == lock.datasets[0].license
    # locking again publishes nothing new
    uploads = [c for c in reg.calls if c[0] == "PUT"]
    again, _ = _lock(spec_path, store)
    assert again.model == lock.model and [c for c in reg.calls if c[0] == "PUT"] == uploads


def test_lock_refuses_a_wrong_checksum_before_anything_is_published(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    (spec_path.parent / "model" / "config.json").write_text('{"shards": 4}')
    with pytest.raises(DigestMismatch) as err:
        _lock(spec_path, ContentStore(tmp_path / "cache"))
    assert err.value.exit_code == 3 and err.value.message.startswith("model:")
    assert reg.calls == []


def test_lock_refuses_a_directory_entry_escaping_its_root(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    (spec_path.parent / "data" / "escape.jsonl").symlink_to("/etc/passwd")
    with pytest.raises(InputError) as err:
        _lock(spec_path, ContentStore(tmp_path / "cache"))
    assert err.value.exit_code == 2
    assert "datasets[0] (digits-test)" in err.value.message and "escape.jsonl" in err.value.message


def test_lock_with_the_registry_down_is_exit_5_after_bounded_retries(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    reg.failures = [urllib.error.URLError("connection refused")] * 100
    with pytest.raises(InfrastructureError) as err:
        _lock(spec_path, ContentStore(tmp_path / "cache"))
    assert err.value.exit_code == 5 and "still failing after retries" in err.value.message
    assert len(reg.calls) == 4  # the first request, tried four times: then it gave up


# --------------------------------------------------------------------------- re-run by digest


def _original(lock: LockedSpec) -> Original:
    return Original(
        path=Path("/nonexistent"),
        digest="sha256:" + "0" * 64,
        run_id="r-orig",
        predicate=None,  # type: ignore[arg-type]
        spec=None,
        lock=lock,
        spec_bytes=b"",
        lock_bytes=b"",
        keyid="k",  # type: ignore[arg-type]
    )


def test_an_empty_machine_fetches_every_input_by_its_artifact(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    lock, _ = _lock(spec_path, ContentStore(tmp_path / "cache"))
    empty = Settings(home=tmp_path / "h2", cache=tmp_path / "c2")
    found = resolve_inputs(_original(lock), InputResolver(empty))
    store = ContentStore(empty.input_cache)
    for want, path in found.items():
        assert path == store.tree_path(want.locked.digest)
        assert scan_tree(path, what=want.what).digest == want.locked.digest


def test_an_input_altered_in_the_registry_is_refused_listing_it(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    lock, _ = _lock(spec_path, ContentStore(tmp_path / "cache"))
    manifest = json.loads(
        reg.manifests["evalrun/sharded-inputs", lock.model.artifact.split("@")[1]][1]
    )  # type: ignore[union-attr]
    reg.corrupt.add(manifest["layers"][1]["digest"])
    empty = Settings(home=tmp_path / "h2", cache=tmp_path / "c2")
    with pytest.raises(InputsUnavailable) as err:
        resolve_inputs(_original(lock), InputResolver(empty))
    assert err.value.exit_code == 3
    (missing,) = err.value.missing
    assert missing.wanted.name == "model" and "model-00001-of-00003" in missing.reason
    assert ContentStore(empty.input_cache).tree_files(lock.model.digest) is None


def test_a_rerun_with_the_registry_unreachable_is_exit_5(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    lock, _ = _lock(spec_path, ContentStore(tmp_path / "cache"))
    reg.failures = [urllib.error.URLError("connection refused")] * 100
    empty = Settings(home=tmp_path / "h2", cache=tmp_path / "c2")
    with pytest.raises(InfrastructureError) as err:
        resolve_inputs(_original(lock), InputResolver(empty))
    assert err.value.exit_code == 5 and "model model" in err.value.message


def test_inputs_dir_holding_the_directory_is_used_before_the_registry(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    lock, _ = _lock(spec_path, ContentStore(tmp_path / "cache"))
    reg.calls.clear()
    empty = Settings(home=tmp_path / "h2", cache=tmp_path / "c2")
    found = resolve_inputs(_original(lock), InputResolver(empty, [spec_path.parent]))
    assert len(found) == 2 and reg.calls == []
    # a changed copy is noted, and the registry delivers the locked bytes instead
    changed = tmp_path / "changed"
    (changed / "model").mkdir(parents=True)
    for f in (spec_path.parent / "model").iterdir():
        (changed / "model" / f.name).write_bytes(f.read_bytes())
    (changed / "model" / "config.json").write_text('{"shards": 5}')
    again = Settings(home=tmp_path / "h3", cache=tmp_path / "c3")
    resolver = InputResolver(again, [changed])
    want = WantedInput("model", "model", lock.model)
    assert resolver.resolve(want) == ContentStore(again.input_cache).tree_path(lock.model.digest)
    assert [c for c in reg.calls if "/manifests/" in c[1]]


def test_wanted_inputs_name_remote_inputs_by_uri(reg, tmp_path):
    data = json.loads(LEGACY_LOCK.read_text())
    data["model"] = {
        "uri": "https://example.org/w.bin",
        "sha256": "0" * 64,
        "size": 1,
        "files": [{"path": "w.bin", "sha256": "0" * 64, "size": 1}],
    }
    (model, _) = wanted_inputs(LockedSpec.model_validate(data))
    assert model.path == "https://example.org/w.bin" and "https://example.org/w.bin" in model.label


# --------------------------------------------------------------------------- progress


def test_transfer_bars_print_start_and_end_of_large_transfers_off_a_terminal():
    out = io.StringIO()
    clock = iter([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    bars = TransferBars(stream=out, min_bytes=100, clock=lambda: next(clock))
    bar = bars("model: fetching")
    assert bar is not None
    for done in (0, 50, 150, 200):
        bar(done, 200)
    bars("small")(5, 10)  # type: ignore[misc]
    lines = out.getvalue().splitlines()
    assert lines[0] == "  model: fetching: 200 B" and lines[-1].startswith(
        "  model: fetching: 200 B in "
    )
    assert len(lines) == 2
    assert TransferBars(quiet=True)("x") is None


def test_transfer_bars_redraw_one_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    ticks = iter(float(i) for i in range(100))
    bars = TransferBars(stream=out, min_bytes=1, interval=0.0, clock=lambda: next(ticks))
    bar = bars("model: publishing")
    assert bar is not None
    for done in range(0, 101, 25):
        bar(done, 100)
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and "100%" in text


def test_a_run_whose_input_must_come_from_a_registry_that_is_down_is_exit_5(reg, tmp_path):
    spec_path = _sharded_spec(tmp_path)
    lock, _ = _lock(spec_path, ContentStore(tmp_path / "cache"))
    shutil.rmtree(spec_path.parent / "model")  # not next to the spec, not cached here
    reg.failures = [urllib.error.URLError("connection refused")] * 100
    elsewhere = Settings(home=tmp_path / "h2", cache=tmp_path / "c2")
    with pytest.raises(InfrastructureError) as err:
        host_inputs(lock, InputResolver(elsewhere, spec_dir=spec_path.parent))
    assert err.value.exit_code == 5 and err.value.message.startswith("model model:")
