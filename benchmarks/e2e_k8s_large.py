"""Issue 12's "done when", end to end through the CLI on the local cluster under gVisor.

1. A copy of ``examples/sharded`` whose model directory is padded to ``--model-gib`` in
   ``--shards`` extra safetensors shards (seeded bytes; the real weights stay in the
   example's three shards), with the example's dataset directory.
2. ``evalrun digest`` gives the pins, ``evalrun lock`` verifies, caches and publishes every
   input by digest, ``evalrun run --backend kubernetes`` runs it in a restricted,
   default-deny namespace; the evaluation reads every shard and writes ``--results-mib``
   of per-sample results next to its JSON-lines output; ``evalrun verify`` checks the bundle.
3. ``evalrun rerun`` of that bundle from an empty store and an empty input cache (only the
   registry and the original signer's public key are shared) fetches every input by digest
   and must reproduce identical metrics.

Prints one JSON line per step with its wall time, and a final summary line; exits non-zero
when any step fails. Needs the cluster (``make cluster-up``) and a few GiB of disk:

    python benchmarks/e2e_k8s_large.py [--model-gib 2] [--shards 8] [--results-mib 112]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "cluster")]

import cluster as cluster_mod  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client, config  # noqa: E402

EVALRUN = [sys.executable, "-m", "runner.cli"]
MIB = 1 << 20

# Appended to the example's evaluate.py: per-sample result files of params.results_mib in
# all, one per sample, seeded by the run's seed and the sample id (so a rerun writes the
# same bytes), and a digest over every shard's bytes so the whole model is read.
PER_SAMPLE = r"""

def per_sample_results() -> None:
    import hashlib
    params = json.loads(os.environ.get("EVALRUN_PARAMS") or "{}")
    total = int(params.get("results_mib", 0)) << 20
    model_dir = Path(os.environ["EVALRUN_MODEL"])
    seen = hashlib.sha256()
    for shard in sorted(model_dir.glob("*.safetensors")):
        with shard.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                seen.update(chunk)
    ids = [json.loads(line)["id"] for line in open(os.environ["EVALRUN_OUTPUT"], encoding="utf-8")]
    out = Path(os.environ["EVALRUN_OUTPUT"]).parent / "per_sample"
    out.mkdir(exist_ok=True)
    each = total // max(1, len(ids))
    for sample_id in ids:
        rng = np.random.default_rng([int(os.environ["EVALRUN_SEED"]), len(str(sample_id))]
                                    + [ord(c) for c in str(sample_id)])
        (out / f"{sample_id}.f32").write_bytes(rng.random(each // 4, dtype=np.float32).tobytes())
    print(f"per-sample results: {len(ids)} files, {each * len(ids) >> 20} MiB; "
          f"model bytes sha256 {seen.hexdigest()[:16]}", file=sys.stderr)


if __name__ == "__main__":
    code = main()
    per_sample_results()
    sys.exit(code)
"""


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def padding_shard(path: Path, name: str, mib: int, seed: int) -> None:
    """A safetensors file holding one F64 tensor of ``mib`` MiB of seeded bytes."""
    size = mib * MIB
    header = {
        "__metadata__": {"format": "evalrun-padding"},
        name: {"dtype": "F64", "shape": [size // 8], "data_offsets": [0, size]},
    }
    encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = random.Random(seed)  # noqa: S311 (seeded padding, not secrets)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)) + encoded)
        for _ in range(mib):
            fh.write(rng.randbytes(MIB))


def make_example(work: Path, model_gib: float, shards: int, results_mib: int) -> Path:
    dest = work / "sharded"
    shutil.copytree(
        ROOT / "examples" / "sharded",
        dest,
        ignore=shutil.ignore_patterns("eval.lock.json", "__pycache__"),
    )
    model = dest / "model"
    per = int(model_gib * 1024) // shards
    for s in range(shards):
        # not in the index: the evaluation streams them (hashing), it does not load them
        name = f"padding-{s + 1:05d}-of-{shards:05d}.safetensors"
        padding_shard(model / name, f"padding.{s}", per, seed=s)
    app = dest / "app" / "evaluate.py"
    source = app.read_text()
    head, _, _ = source.rpartition('if __name__ == "__main__":')
    app.write_text(head.rstrip() + "\n" + PER_SAMPLE)
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["metadata"]["name"] = "sharded-large"
    spec["image"]["template"] = str(ROOT / "images" / "python-eval.Dockerfile.j2")
    spec["params"] = {"results_mib": results_mib}
    spec["resources"] = {
        "cpus": 1,
        "memory_mib": 2048,
        "pids": 128,
        "results_mib": results_mib + 256,
    }
    spec["timeout_s"] = 1800
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest / "eval.yaml"


def evalrun(env: dict[str, str], *args: str, timeout: float = 3600) -> tuple[int, Any, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [*EVALRUN, *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    took = time.monotonic() - t0
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out = {"stdout": proc.stdout[-2000:], "stderr": proc.stderr[-2000:]}
    return proc.returncode, out, took


def namespace(api: client.ApiClient) -> str:
    name = f"e2e-large-{os.getpid()}"
    labels = {"evalrun.dev/test": "true"} | {
        f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn", "audit")
    }
    core = client.CoreV1Api(api)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
    )
    client.NetworkingV1Api(api).create_namespaced_network_policy(
        name,
        client.V1NetworkPolicy(
            metadata=client.V1ObjectMeta(name="default-deny-all"),
            spec=client.V1NetworkPolicySpec(
                pod_selector=client.V1LabelSelector(), policy_types=["Ingress", "Egress"]
            ),
        ),
    )
    deadline = time.monotonic() + 60
    while not core.list_namespaced_service_account(
        name, field_selector="metadata.name=default"
    ).items:
        if time.monotonic() > deadline:
            raise SystemExit(f"no default ServiceAccount in {name}")
        time.sleep(0.2)
    return name


def results_digest(bundle: Path) -> dict[str, str]:
    """sha256 of what the evaluation wrote: per-sample outputs and files, and metrics.

    (summary.json and preflight.json carry the run's id and timings: they differ.)
    """
    import hashlib

    results = bundle / "results"
    paths = [results / "predictions.jsonl", results / "metrics.json"]
    paths += sorted((results / "per_sample").iterdir())
    return {str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def metrics_of(bundle: Path) -> Any:
    return json.loads((bundle / "statement.json").read_text())["predicate"]["metrics"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-gib", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--results-mib", type=int, default=112)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    info = cluster_mod.ensure_cluster()
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    work = Path(tempfile.mkdtemp(prefix="evalrun-e2e-large-", dir="/var/tmp"))
    ns = namespace(api)
    ok = False
    try:
        t0 = time.monotonic()
        spec = make_example(work, args.model_gib, args.shards, args.results_mib)
        emit(
            {
                "step": "make_inputs",
                "s": round(time.monotonic() - t0, 1),
                "model_bytes": sum(f.stat().st_size for f in (spec.parent / "model").iterdir()),
            }
        )
        homes = {}
        for side in ("first", "rerun"):
            home, cache = work / side / "home", work / side / "cache"
            homes[side] = {
                **os.environ,
                "EVALRUN_HOME": str(home),
                "EVALRUN_CACHE": str(cache),
                "EVALRUN_REGISTRY": info.registry,
                "PYTHONPATH": str(ROOT),
            }
            code, out, took = evalrun(homes[side], "keys", "generate")
            assert code == 0, out
        env = homes["first"]
        cluster_args = ["--backend", "kubernetes", "--kubeconfig", str(info.kubeconfig), "-n", ns]
        code, pins, took = evalrun(
            env, "digest", str(spec.parent / "model"), str(spec.parent / "data")
        )
        assert code == 0, pins
        doc = yaml.safe_load(spec.read_text())
        doc["model"]["sha256"], doc["datasets"][0]["sha256"] = (p["sha256"] for p in pins)
        spec.write_text(yaml.safe_dump(doc, sort_keys=False))
        emit(
            {
                "step": "digest",
                "s": round(took, 1),
                "model": pins[0]["sha256"],
                "files": pins[0]["files"],
            }
        )
        code, out, took = evalrun(env, "lock", str(spec))
        emit({"step": "lock", "exit": code, "s": round(took, 1)})
        assert code == 0, out
        code, out, took = evalrun(env, "run", str(spec), *cluster_args)
        emit({"step": "run", "exit": code, "s": round(took, 1), "run_id": out.get("run_id")})
        assert code == 0, out
        bundle = Path(out["bundle"])
        results = sum(f.stat().st_size for f in (bundle / "results").rglob("*") if f.is_file())
        emit({"step": "results", "bytes": results, "mib": round(results / MIB, 1)})
        assert results >= args.results_mib * MIB * 0.95, results
        pub = Path(env["EVALRUN_HOME"]) / "keys" / "evalrun.pub"
        code, out, took = evalrun(env, "verify", str(bundle), "--key", str(pub))
        emit({"step": "verify", "exit": code, "s": round(took, 1)})
        assert code == 0, out
        code, out, took = evalrun(
            homes["rerun"], "rerun", str(bundle), "--pub", str(pub), *cluster_args
        )
        emit({"step": "rerun_empty_store_and_cache", "exit": code, "s": round(took, 1)})
        assert code == 0, out
        rerun_bundle = Path(out["bundle"])
        first, again = metrics_of(bundle), metrics_of(rerun_bundle)
        emit({"step": "metrics", "first": first, "rerun": again, "identical": first == again})
        assert first == again
        same = results_digest(bundle) == results_digest(rerun_bundle)
        emit({"step": "per_sample_results", "identical": same})
        assert same
        ok = True
    except AssertionError as exc:
        emit({"step": "failed", "detail": str(exc)[-3000:]})
    finally:
        client.CoreV1Api(api).delete_namespace(
            ns, body=client.V1DeleteOptions(propagation_policy="Background")
        )
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    emit({"e2e_k8s_large": "passed" if ok else "failed", "work": str(work)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
