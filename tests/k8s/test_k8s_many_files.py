"""A dataset directory of a thousand files on the real cluster, through the CLI.

`evalrun lock` publishes it packed (a node mounts each artifact layer as an overlay
lower directory and fails past a few hundred, see docs/data.md); the node mounts the
image volume, the agent checks every file's sha256 under gVisor, and the run's metrics
equal the example's, which reads the same samples from three parts. The plan lists
every file, so it is too large to travel inside the Job: it takes the ConfigMap path
(owned by the Job), and the agent read exactly the plan evalrun sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from k8s.test_backend_kubernetes import ROOT, _config, _evalrun, _run_args

pytestmark = pytest.mark.k8s

RESTRICTED = [{"pod-security": "restricted", "default-deny": True}]
PARTS = 1200  # the plan lists ~140 bytes per file: over the 128 KiB the Job carries


def _many_parts(dest: Path) -> Path:
    shutil.copytree(
        ROOT / "examples" / "sharded",
        dest,
        ignore=shutil.ignore_patterns("eval.lock.json", "__pycache__"),
    )
    lines = []
    for part in sorted((dest / "data").glob("*.jsonl")):
        lines += part.read_text().splitlines(keepends=True)
        part.unlink()
    per = -(-len(lines) // PARTS)
    for p in range(PARTS):
        (dest / "data" / f"part-{p:05d}.jsonl").write_text("".join(lines[p * per : (p + 1) * per]))
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    spec["metadata"]["name"] = "sharded-many-parts"
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest / "eval.yaml"


@pytest.mark.parametrize("namespace", RESTRICTED, indirect=True)
def test_a_dataset_of_hundreds_of_files_is_packed_mounted_and_verified(
    cluster, namespace, tmp_path
):
    spec_path = _many_parts(tmp_path / "many")
    home = tmp_path / "home"
    pins = _evalrun(home, "digest", str(spec_path.parent / "data"), "--json")
    assert pins.returncode == 0, pins.stderr
    spec = yaml.safe_load(spec_path.read_text())
    spec["datasets"][0]["sha256"] = json.loads(pins.stdout)["sha256"]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    locked = _evalrun(home, "lock", str(spec_path), "--json")
    assert locked.returncode == 0, locked.stdout + locked.stderr
    artifact = json.loads(spec_path.with_name("eval.lock.json").read_text())["datasets"][0][
        "artifact"
    ]
    proc = _evalrun(home, *_run_args(cluster, namespace, spec_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    pred = json.loads((Path(out["bundle"]) / "statement.json").read_text())["predicate"]
    accuracy = next(m for m in pred["metrics"] if m["name"] == "accuracy")
    assert accuracy["value"] == pytest.approx(0.9244444444444444)
    # the artifact the node mounted is packed: far fewer layers than files
    import urllib.request

    repo, digest = artifact.split("@")
    host, name = repo.split("/", 1)
    req = urllib.request.Request(
        f"http://{host}/v2/{name}/manifests/{digest}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        layers = json.loads(resp.read())["layers"]
    assert len(layers) < 128 < PARTS
    assert any("org.evalrun.pack.files" in (x.get("annotations") or {}) for x in layers)
    # the plan: too large for the Job, in the ConfigMap it owns, read exactly as sent
    from kubernetes import client

    api = client.ApiClient(_config(cluster))
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    name = pred["sandbox"]["details"]["job"]
    job = batch.read_namespaced_job(name, namespace)
    assert not (job.spec.template.metadata.annotations or {}).get("evalrun.dev/plan")
    configmap = core.read_namespaced_config_map(name, namespace)
    (owner,) = configmap.metadata.owner_references
    assert (owner.kind, owner.uid) == ("Job", job.metadata.uid)
    plan = base64.b64decode(configmap.binary_data["plan.json"])
    assert len(plan) > 128 * 1024
    summary = json.loads((Path(out["bundle"]) / "results" / "summary.json").read_text())
    sent = hashlib.sha256(plan).hexdigest()
    assert summary["plan_sha256"] == sent == pred["sandbox"]["details"]["plan_sha256"]
