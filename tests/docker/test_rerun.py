"""Re-run by digest, registry round trip, diff and audits — real dockerd, registry, gVisor."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import Cli, predicate_of, with_signing_key

pytestmark = pytest.mark.docker


def fresh_cli(tmp_path: Path, name: str = "home") -> Cli:
    """An empty store with its own signing key."""
    home = tmp_path / name
    return with_signing_key(Cli(home=home, env={**os.environ, "EVALRUN_HOME": str(home)}))


@pytest.fixture(scope="module")
def original(cli, locked_example) -> dict:
    code, out = cli.json("run", str(locked_example / "eval.yaml"))
    assert code == 0, out
    return out


def test_rerun_by_run_id_is_identical_and_linked(cli, locked_example, original, tmp_path):
    code, out = cli.json("rerun", original["run_id"], "--inputs", str(locked_example))
    assert code == 0, out
    assert out["verdict"] == "identical" and out["run_id"] != original["run_id"]
    assert {m["verdict"] for m in out["metrics"]} == {"identical"}
    pred = predicate_of(Path(out["bundle"]))
    assert pred["reproduction_of"]["run_id"] == original["run_id"]
    assert pred["reproduction_of"]["bundle_digest"] == original["bundle_digest"]
    assert pred["reproduction"]["verdict"] == "identical"
    assert pred["image"]["ref"] == predicate_of(Path(original["bundle"]))["image"]["ref"]
    assert "## Reproduction" in (Path(out["bundle"]) / "report.md").read_text()
    # the new bundle verifies, and history links it to the original
    assert cli("verify", out["bundle"], "--key", str(cli.pub)).returncode == 0
    code, listed = cli.json("runs", "ls")
    assert code == 0
    linked = [r for r in listed if r["reproduction_of"] == original["run_id"]]
    assert out["run_id"] in {r["run_id"] for r in linked}

    # the inputs are in the content cache by digest: a re-run needs no --inputs
    code, ready = cli.json("rerun", original["run_id"], "--check")
    assert code == 0 and ready["ready"] is True, ready
    assert all("/inputs/blobs/sha256/" in path for path in ready["inputs"].values())
    code, again = cli.json("rerun", out["bundle_digest"].split(":")[1][:16])
    assert code == 0 and again["verdict"] == "identical", again

    # reports of a real bundle are byte-identical across renders and self-contained
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    assert cli("report", out["run_id"], "-o", str(a)).returncode == 0
    assert cli("report", out["run_id"], "-o", str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    assert "Reproduction" in a.read_text() and "<script" not in a.read_text()


def test_rerun_never_uses_a_changed_copy_and_fetches_the_locked_bytes_instead(
    cli, locked_example, original, tmp_path
):
    changed = tmp_path / "digits"
    shutil.copytree(locked_example, changed)
    data = changed / "data" / "digits_test.jsonl"
    data.write_text(data.read_text().replace('"label": 4', '"label": 5', 1) + "\n")
    home, cache = tmp_path / "empty-home", tmp_path / "empty-cache"
    empty = with_signing_key(
        Cli(home=home, env={**os.environ, "EVALRUN_HOME": str(home), "EVALRUN_CACHE": str(cache)})
    )
    # nothing cached, the --inputs copy is changed: the published artifact has the bytes
    code, out = empty.json(
        "rerun", original["bundle"], "--inputs", str(changed), "--pub", str(cli.pub)
    )
    assert code == 0 and out["verdict"] == "identical", out
    cached = cache / "inputs" / "blobs" / "sha256"
    locked = json.loads((locked_example / "eval.lock.json").read_text())
    assert (cached / locked["datasets"][0]["sha256"]).read_bytes() == (
        locked_example / "data" / "digits_test.jsonl"
    ).read_bytes()


def test_push_pull_and_rerun_from_registry_on_an_empty_store(
    cli, locked_example, original, tmp_path
):
    code, pushed = cli.json("push", original["run_id"])
    assert code == 0, pushed
    ref = pushed["reference"]
    code, again = cli.json("push", original["run_id"])
    assert code == 0 and again["already_present"] and again["reference"] == ref  # no-op

    trust = ("--pub", str(cli.pub))  # the originals' signer
    empty = fresh_cli(tmp_path, "empty")
    code, pulled = empty.json("pull", ref, *trust)
    assert code == 0, pulled
    assert pulled[0]["bundle_digest"] == original["bundle_digest"]
    # the image's referrers list the bundle: pulling the image ref finds it too
    code, via_image = empty.json("pull", pushed["subject"], *trust)
    assert code == 0 and original["bundle_digest"] in {p["bundle_digest"] for p in via_image}

    other = fresh_cli(tmp_path, "other")
    code, out = other.json("rerun", ref, "--inputs", str(locked_example), *trust)
    assert code == 0, out
    assert out["original"] == original["run_id"] and out["verdict"] == "identical"


# --------------------------------------------------------------------------- diff + audit


def _variant(base: Path, dest: Path, seed: int, subset: int | None = None) -> Path:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("eval.lock.json"))
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    ref = json.loads((base / "eval.lock.json").read_text())["image"]["ref"]
    spec["image"] = {"ref": ref}
    spec["seed"] = seed
    if subset is not None:
        data = dest / "data" / "subset.jsonl"
        lines = (dest / "data" / "digits_test.jsonl").read_text().splitlines()[:subset]
        data.write_text("\n".join(lines) + "\n")
        import hashlib

        spec["datasets"][0]["uri"] = "data/subset.jsonl"
        spec["datasets"][0]["sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest / "eval.yaml"


@pytest.fixture(scope="module")
def three_runs(locked_example, tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("audit")
    home = fresh_cli(root)
    specs = [
        _variant(locked_example, root / "v1", seed=1),
        _variant(locked_example, root / "v2", seed=2),
        _variant(locked_example, root / "v3", seed=3, subset=300),
    ]
    outs = []
    for spec in specs:
        assert home("lock", str(spec)).returncode == 0
        code, out = home.json("run", str(spec))
        assert code in (0, 6), out
        outs.append(out)
    return home, specs, outs


def test_diff_of_two_runs_with_different_seeds(three_runs):
    home, _, outs = three_runs
    code, d = home.json("diff", outs[0]["run_id"], outs[1]["run_id"])
    assert code == 0, d
    assert {"field": "seeds.seed", "a": 1, "b": 2} in d["changes"]["config"]
    assert d["changes"]["environment"] == [] and d["changes"]["data"] == []
    assert {m["name"] for m in d["metrics"]} == {"accuracy", "macro-f1"}
    assert all(m["delta"] is not None for m in d["metrics"])
    text = home("diff", outs[0]["run_id"], outs[1]["run_id"]).stdout
    assert "seeds.seed: 1 → 2" in text and "delta" in text


def test_audit_reports_exactly_the_run_whose_artifact_was_deleted(three_runs, tmp_path):
    home, specs, outs = three_runs
    (specs[2].parent / "data" / "subset.jsonl").unlink()
    # the input's published artifact is deleted too, and this machine caches nothing
    lock = json.loads((specs[2].parent / "eval.lock.json").read_text())
    repo, digest = lock["datasets"][0]["artifact"].split("@")
    host, name = repo.split("/", 1)
    deleted = urllib.request.urlopen(  # noqa: S310
        urllib.request.Request(f"http://{host}/v2/{name}/manifests/{digest}", method="DELETE")
    )
    assert deleted.status == 202
    dirs = [arg for spec in specs for arg in ("--inputs", str(spec.parent))]
    code, report = home.json(
        "audit", "--sample", "3", "--seed", "7", *dirs,
        env={"EVALRUN_CACHE": str(tmp_path / "empty-cache")},
    )
    assert code == 3, report
    assert report["audited"] == 3 and report["failed"] == 1
    failed = [r for r in report["runs"] if not r["reproduced"]]
    assert [r["run_id"] for r in failed] == [outs[2]["run_id"]]
    assert failed[0]["category"] == "missing_artifact"
    assert "dataset digits-test" in failed[0]["detail"]
    assert {r["category"] for r in report["runs"] if r["reproduced"]} == {"identical"}
    # the audit report is a signed bundle in the store
    proc = home("verify", report["bundle"], "--key", str(home.pub))
    assert proc.returncode == 0, proc.stderr
    code, audits = home.json("runs", "ls", "--audits")
    assert [a["run_id"] for a in audits] == [report["audit_id"]]


def test_pull_refuses_a_bundle_blob_altered_in_the_registry(cli, original, tmp_path):
    code, pushed = cli.json("push", original["run_id"])
    assert code == 0, pushed
    manifest = json.loads(
        urllib.request.urlopen(  # noqa: S310
            urllib.request.Request(
                "http://" + pushed["reference"].replace("/", "/v2/", 1).replace("@", "/manifests/"),
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            )
        ).read()
    )
    assert manifest["subject"]["digest"] == pushed["subject"].split("@")[1]
    layer = manifest["layers"][0]["digest"].split(":")[1]
    root = Path(os.environ.get("EVALRUN_REGISTRY_DIR", "/var/lib/evalrun-registry"))
    blob = root / "docker/registry/v2/blobs/sha256" / layer[:2] / layer / "data"
    good = blob.read_bytes()
    try:
        bad = bytearray(good)
        bad[600] ^= 0x01  # inside the first member's content
        blob.write_bytes(bytes(bad))
        empty = fresh_cli(tmp_path, "tampered")
        proc = empty("pull", pushed["reference"], "--pub", str(cli.pub))
        assert proc.returncode == 3, proc.stderr
        assert "does not match its digest" in proc.stderr
        assert not (empty.home / "bundles").exists() or not any((empty.home / "bundles").iterdir())
    finally:
        blob.write_bytes(good)
