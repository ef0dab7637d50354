"""Measure which OCI manifest shapes the cluster's kubelet + containerd accept as image volumes.

Run against the running local cluster (root; it reads the registry's log and, for the
corrupt-blob case, alters a blob of its own in the registry's storage)::

    PYTHONPATH=. .venv/bin/python tests/cluster/imagevol_matrix.py [--out results.json]

For every shape in ``imagevol.SHAPES`` and runtime (runc, gVisor) it pushes a fresh
artifact and starts a pod that mounts it at /inputs as an image volume: one container
lists the tree (path, mode, owner, sha256) and the mount options, one tries to write,
one lists it as uid 65534. A pod that does not start is reported with its waiting
reason, message and events. Then: a second pod of an accepted artifact (registry log:
new blob GETs?), a manifest digest that is not in the registry, and a blob corrupted in
the registry's storage. The findings are written up in docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as cluster_mod
import imagevol
from kubernetes import client, config

REGISTRY_LOG = Path(os.environ.get("EVALRUN_HOST_STATE", "/var/lib/evalrun-host")) / "registry.log"
REGISTRY_DIR = Path(os.environ.get("EVALRUN_REGISTRY_DIR", "/var/lib/evalrun-registry"))
STUCK = {"ErrImagePull", "ImagePullBackOff", "CreateContainerError", "CreateContainerConfigError"}


def sample_files() -> dict[str, bytes]:
    return {
        "hello.txt": b"hello, image volume\n",
        "model/shard-00001-of-00002.safetensors": secrets.token_bytes(1 << 20),
        "model/shard-00002-of-00002.safetensors": secrets.token_bytes(300_000),
        "data/test.jsonl": b'{"x": 1}\n{"x": 2}\n',
    }


def pod_spec(name: str, ref: str, probe: str, runtime_class: str | None) -> client.V1Pod:
    mount = [client.V1VolumeMount(name="inputs", mount_path="/inputs", read_only=True)]

    def c(cname: str, args: list[str], uid: int | None = None) -> client.V1Container:
        sec = client.V1SecurityContext(run_as_user=uid, run_as_non_root=True) if uid else None
        return client.V1Container(
            name=cname, image=probe, args=args, volume_mounts=mount, security_context=sec
        )

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            restart_policy="Never",
            runtime_class_name=runtime_class,
            automount_service_account_token=False,
            termination_grace_period_seconds=0,
            containers=[
                c("tree", ["tree", "/inputs"]),
                c("write", ["write", "/inputs/new-file"]),
                c("nonroot", ["tree", "/inputs"], uid=65534),
            ],
            volumes=[
                client.V1Volume(
                    name="inputs",
                    image=client.V1ImageVolumeSource(reference=ref, pull_policy="IfNotPresent"),
                )
            ],
        ),
    )


def events(core: client.CoreV1Api, ns: str, name: str) -> list[str]:
    evs = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    evs.sort(key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
    return [f"{e.type} {e.reason}: {e.message}" for e in evs]


def run_pod(
    core: client.CoreV1Api, ns: str, name: str, ref: str, probe: str, rc: str | None
) -> dict[str, Any]:
    start = time.monotonic()
    core.create_namespaced_pod(ns, pod_spec(name, ref, probe, rc))
    result: dict[str, Any] = {"ref": ref, "runtime": rc or "runc"}
    first_stuck = None
    while time.monotonic() - start < 150:
        pod = core.read_namespaced_pod(name, ns)
        phase = pod.status.phase
        if phase in ("Succeeded", "Failed"):
            result["phase"] = phase
            result["seconds"] = round(time.monotonic() - start, 1)
            for cname in ("tree", "write", "nonroot"):
                log = core.read_namespaced_pod_log(name, ns, container=cname)
                result[cname] = [
                    json.loads(line) if line.startswith("{") else line for line in log.splitlines()
                ]
            break
        waiting = [
            (cs.name, cs.state.waiting.reason, cs.state.waiting.message)
            for cs in pod.status.container_statuses or []
            if cs.state and cs.state.waiting and cs.state.waiting.reason in STUCK
        ]
        if waiting:
            first_stuck = first_stuck or time.monotonic()
            result["phase"] = phase
            result["waiting"] = sorted(set(waiting))
            if time.monotonic() - first_stuck > 25:  # let back-off and events accumulate
                break
        time.sleep(1)
    else:
        result["phase"] = "timeout"
    result["events"] = events(core, ns, name)
    return result


def blob_gets(repository: str) -> list[str]:
    if not REGISTRY_LOG.is_file():
        return []
    needle = f"GET /v2/{repository}/blobs/"
    return [
        line for line in REGISTRY_LOG.read_text(errors="replace").splitlines() if needle in line
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shapes", nargs="*", default=list(imagevol.SHAPES))
    args = ap.parse_args()
    info = cluster_mod.ensure_cluster()
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    core = client.CoreV1Api(api)
    ns = f"imagevol-matrix-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    while not core.list_namespaced_service_account(
        ns, field_selector="metadata.name=default"
    ).items:
        time.sleep(0.3)
    results: dict[str, Any] = {"shapes": {}}
    try:
        accepted = None
        for shape in args.shapes:
            files = sample_files()
            expected = {p: hashlib.sha256(b).hexdigest() for p, b in files.items()}
            for rc in (None, "gvisor"):
                repo = f"evalrun/imagevol-{shape}"
                ref = imagevol.push(info.registry, repo, secrets.token_hex(4), shape, files)
                name = f"{shape}-{rc or 'runc'}"
                res = run_pod(core, ns, name, ref, info.probe_image, rc)
                res["expected_sha256"] = expected
                got = {e["path"]: e.get("sha256") for e in res.get("tree", []) if "path" in e}
                res["contents_match"] = all(got.get(p) == h for p, h in expected.items())
                results["shapes"][name] = res
                print(json.dumps({name: res}, indent=1, default=str), flush=True)
                if res.get("phase") == "Succeeded" and res["contents_match"] and not accepted:
                    accepted = (shape, repo, ref, rc)
        if accepted:
            shape, repo, ref, rc = accepted
            before = len(blob_gets(repo))
            res = run_pod(core, ns, "cache-second-pod", ref, info.probe_image, rc)
            after = blob_gets(repo)
            results["cache"] = {
                "shape": shape,
                "runtime": rc or "runc",
                "phase": res.get("phase"),
                "seconds": res.get("seconds"),
                "blob_gets_first_pull": before,
                "new_blob_gets_second_pod": after[before:],
                "registry_log": str(REGISTRY_LOG),
            }
            print(json.dumps({"cache": results["cache"]}, indent=1), flush=True)

            # A manifest digest the registry does not have.
            missing = f"{info.registry}/{repo}@sha256:{secrets.token_hex(32)}"
            results["missing_manifest"] = run_pod(
                core, ns, "missing-manifest", missing, info.probe_image, rc
            )
            print(json.dumps({"missing_manifest": results["missing_manifest"]}, indent=1))

            # A layer blob altered in the registry's storage (same size, other bytes).
            files = sample_files()
            ref = imagevol.push(info.registry, repo, secrets.token_hex(4), shape, files)
            _, blobs = imagevol.build(shape, files)
            victim = next(d for d, b in blobs.items() if len(b) > 100_000)
            data = (
                REGISTRY_DIR / "docker/registry/v2/blobs/sha256" / victim[7:9] / victim[7:] / "data"
            )
            original = data.read_bytes()
            data.write_bytes(bytes(b ^ 0xFF for b in original[:64]) + original[64:])
            try:
                results["corrupt_blob"] = run_pod(
                    core, ns, "corrupt-blob", ref, info.probe_image, rc
                )
                results["corrupt_blob"]["corrupted_blob"] = victim
            finally:
                data.write_bytes(original)
            print(json.dumps({"corrupt_blob": results["corrupt_blob"]}, indent=1))
    finally:
        core.delete_namespace(ns, body=client.V1DeleteOptions(grace_period_seconds=0))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
