"""End to end on the embedded default: real dockerd, registry, gVisor."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import pytest

ROOT = Path(__file__).resolve().parents[2]
EVALRUN = [sys.executable, "-m", "runner.cli"]


def predicate_of(bundle: Path) -> dict:
    return json.loads((bundle / "statement.json").read_text())["predicate"]

pytestmark = pytest.mark.docker


def _containers_for(run_id: str) -> list:
    client = docker.from_env()
    return client.containers.list(all=True, filters={"label": f"org.evalrun.run-id={run_id}"})


def test_run_passes_verifies_and_is_idempotent(cli, locked_example):
    spec = str(locked_example / "eval.yaml")
    code, out = cli.json("run", spec)
    assert code == 0, out
    assert out["outcome"] == "passed" and out["verified"].startswith("valid")
    bundle = Path(out["bundle"])
    pred = predicate_of(bundle)
    assert pred["sandbox"]["runtime_used"] == "runsc"
    assert pred["sandbox"]["details"]["network_mode"] == "none"
    assert pred["sandbox"]["details"]["read_only_rootfs"] is True
    assert pred["image"]["rootfs_found"] == pred["image"]["rootfs_expected"]
    assert pred["image"]["digest_confirmed_by_backend"] is True
    assert pred["environment"]["user"]["uid"] == 65532
    assert {m["name"] for m in pred["metrics"]} == {"accuracy", "macro-f1"}
    assert all(m["ci"]["low"] < m["value"] < m["ci"]["high"] for m in pred["metrics"])
    assert (bundle / "results" / "predictions.jsonl").is_file()
    assert (bundle / "report.md").read_text().count("| pass |") == 2
    events = [json.loads(x) for x in (bundle / "results/logs/events.jsonl").read_text().splitlines()]
    assert {"preflight_rootfs", "evaluation_end", "metrics_done"} <= {e["event"] for e in events}
    # the container's output as relayed while it ran: the evaluation's lines are in it
    last = (bundle / "results/logs/evaluation.stderr").read_text().splitlines()[-1]
    assert last in (bundle / "logs/container.log").read_text().splitlines()

    # offline verification with the CLI
    proc = cli("verify", str(bundle), "--key", str(cli.pub))
    assert proc.returncode == 0 and "valid" in proc.stdout

    # idempotent: the same locked spec finds the same run, without a container
    t0 = time.monotonic()
    code2, again = cli.json("run", spec)
    assert code2 == 0 and again["reused"] is True and again["run_id"] == out["run_id"]
    assert time.monotonic() - t0 < 10

    # --rerun is a new attempt with a new id and bundle
    code3, rerun = cli.json("run", spec, "--rerun")
    assert code3 == 0 and rerun["run_id"] != out["run_id"] and not rerun["reused"]
    assert predicate_of(Path(rerun["bundle"]))["attempt"] == 1
    # same inputs, same seed: the same metrics, bit for bit
    assert [m["value"] for m in rerun["metrics"]] == [m["value"] for m in out["metrics"]]


def test_tampered_bundle_fails_verify_naming_the_file(cli, locked_example, tmp_path):
    code, out = cli.json("run", str(locked_example / "eval.yaml"))
    assert code == 0
    copy = tmp_path / "bundle"
    shutil.copytree(out["bundle"], copy)
    for p in copy.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    target = copy / "results" / "predictions.jsonl"
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01
    target.write_bytes(bytes(data))
    proc = cli("verify", str(copy), "--key", str(cli.pub))
    assert proc.returncode == 3
    assert "results/predictions.jsonl" in proc.stderr


def test_lock_is_a_noop_when_nothing_changed(cli, locked_example):
    code, out = cli.json("lock", str(locked_example / "eval.yaml"))
    assert code == 0 and out["built"] is False
    assert out["seconds"] < 5


def test_wrong_checksum_dataset_stops_before_any_container(vcli, variant):
    spec = variant()
    data = spec.parent / "data" / "digits_test.jsonl"
    data.write_text(data.read_text().replace('"label":3', '"label":8', 1))
    code, out = vcli.json("run", str(spec))
    assert code == 3, out
    pred = predicate_of(Path(out["bundle"]))
    assert pred["outcome"] == "integrity_failure"
    assert "digits-test" in pred["reason"] and "expected" in pred["reason"]
    assert pred["sandbox"]["runtime_used"] is None  # no container was started
    assert _containers_for(out["run_id"]) == []


def test_changed_model_is_an_integrity_failure_and_a_missing_one_comes_by_digest(
    vcli, variant
):
    spec = variant()
    weights = spec.parent / "model" / "weights.json"
    weights.write_text(weights.read_text().replace("0", "1", 1))
    code, out = vcli.json("run", str(spec))
    assert code == 3
    assert "model" in predicate_of(Path(out["bundle"]))["reason"]
    # an input gone from the spec's directory is not a different input: the run takes
    # the locked bytes from the cache (or the registry), by digest
    other = variant(seed=4321)
    (other.parent / "model" / "weights.json").unlink()
    code, out = vcli.json("run", str(other))
    assert code == 0, out


def test_evaluation_crash_is_sealed_with_the_reason(vcli, variant):
    code, out = vcli.json("run", str(variant(params={"crash": True})))
    assert code == 6, out
    pred = predicate_of(Path(out["bundle"]))
    assert pred["outcome"] == "evaluation_failed"
    assert "exited 17" in pred["reason"] and "crash requested" in pred["reason"]
    proc = vcli("verify", out["bundle"], "--key", str(vcli.pub))
    assert proc.returncode == 0


def test_evaluation_timeout(vcli, variant):
    t0 = time.monotonic()
    code, out = vcli.json("run", str(variant(params={"sleep_s": 120}, timeout_s=3)))
    assert code == 6
    assert predicate_of(Path(out["bundle"]))["outcome"] == "timeout"
    assert time.monotonic() - t0 < 90


@pytest.mark.parametrize("runtime", ["gvisor", "runc"])
def test_evaluation_over_its_memory_limit_is_sealed_out_of_memory(vcli, variant, runtime):
    """gVisor: the whole sandbox is OOM-killed (exit 137); runc: only the evaluation process
    is, and the agent lives on. Either way the engine says OOMKilled and so does the bundle."""
    spec = variant(
        params={"hog_mib": 1024},
        resources={"cpus": 1, "memory_mib": 256, "pids": 128},
        sandbox={"runtime": runtime, "network": "none"},
    )
    code, out = vcli.json("run", str(spec))
    assert code == 6, out
    assert out["outcome"] == "out_of_memory"
    pred = predicate_of(Path(out["bundle"]))
    assert pred["outcome"] == "out_of_memory"
    assert "out of memory" in pred["reason"] and "256 MiB" in pred["reason"], pred["reason"]
    assert pred["sandbox"]["details"]["oom_killed"] is True
    assert not pred["metrics"]
    assert vcli("verify", out["bundle"], "--key", str(vcli.pub)).returncode == 0


def test_links_written_by_the_container_are_not_followed(vcli, variant):
    script = ("import os, subprocess, sys; "
              "out = os.environ['EVALRUN_OUTPUT']; "
              "os.symlink('/etc/passwd', os.path.join(os.path.dirname(out), 'stolen')); "
              "sys.exit(subprocess.call(['python3', '/app/evaluate.py']))")
    code, out = vcli.json("run", str(variant(command=["python3", "-c", script])))
    assert code == 3, out
    pred = predicate_of(Path(out["bundle"]))
    assert "'stolen': is a symlink" in pred["reason"]
    assert not (Path(out["bundle"]) / "results" / "stolen").exists()


def test_dishonest_aggregate_is_refused(vcli, variant):
    # The evaluation rewrites the agent's metrics after the fact (via a background process).
    script = (
        "import os, subprocess, sys, json; rc = subprocess.call(['python3', '/app/evaluate.py']);"
        "d = os.path.dirname(os.environ['EVALRUN_OUTPUT']);"
        "subprocess.Popen(['python3', '-c', "
        "'import time, json, sys; p = sys.argv[1]; time.sleep(1.5); "
        "m = json.load(open(p)); m[\"metrics\"][0][\"value\"] = 0.999; "
        "json.dump(m, open(p, \"w\"))', os.path.join(d, 'metrics.json')], start_new_session=True);"
        "sys.exit(rc)")
    # keep the container alive long enough for the rewrite: the agent waits for nothing, so
    # this documents that a late rewrite either misses or is caught; both must not pass silently
    code, out = vcli.json("run", str(variant(command=["python3", "-c", script])))
    pred = predicate_of(Path(out["bundle"]))
    if code == 0:
        ours = {m["name"]: m["value"] for m in pred["metrics"]}
        assert ours["accuracy"] != 0.999  # the runner's own numbers went into the bundle
    else:
        assert code == 3 and "recomputed" in pred["reason"]


def test_gvisor_missing_is_refused_never_downgraded(vcli, variant, tmp_path):
    """A second, real dockerd without runsc registered: the run must exit 4."""
    base = Path(tempfile.mkdtemp(prefix="evd-", dir="/tmp"))
    (base / "daemon.json").write_text("{}")
    sock = base / "docker.sock"
    log = (base / "dockerd.log").open("w")
    proc = subprocess.Popen(
        ["dockerd", "--host", f"unix://{sock}", "--data-root", str(base / "data"),
         "--exec-root", str(base / "exec"), "--pidfile", str(base / "pid"),
         "--config-file", str(base / "daemon.json"), "--bridge", "none", "--iptables=false",
         "--ip-masq=false", "--containerd-namespace", "evd", "--containerd-plugins-namespace",
         "evd-plugins"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        client = None
        for _ in range(120):
            try:
                client = docker.DockerClient(base_url=f"unix://{sock}")
                client.ping()
                break
            except Exception:
                time.sleep(0.25)
        assert client is not None, (base / "dockerd.log").read_text()[-2000:]
        assert "runsc" not in client.info().get("Runtimes", {})
        code, out = vcli.json("run", str(variant()), env={"DOCKER_HOST": f"unix://{sock}"})
        assert code == 4, out
        pred = predicate_of(Path(out["bundle"]))
        assert pred["outcome"] == "environment_mismatch"
        assert "runsc" in pred["reason"] and pred["sandbox"]["runtime_used"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        subprocess.run(["umount", "-R", str(base / "exec")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_dockerd_not_running_exits_5_after_bounded_retries(vcli, variant):
    spec = variant()
    t0 = time.monotonic()
    proc = vcli("run", str(spec), env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert proc.returncode == 5, proc.stderr
    assert "Docker engine unreachable" in proc.stdout and "make host-up" in proc.stdout
    assert time.monotonic() - t0 < 60
    # an infrastructure failure is sealed, but a plain re-run tries again (new attempt)
    code, out = vcli.json("run", str(spec))
    assert code == 0 and not out["reused"], out


def test_registry_down_exits_5(cli, locked_example, tmp_path):
    spec = tmp_path / "d" / "eval.yaml"
    shutil.copytree(locked_example, spec.parent, ignore=shutil.ignore_patterns("eval.lock.json"))
    proc = cli("lock", str(spec), env={"EVALRUN_REGISTRY": "127.0.0.1:5999"})
    assert proc.returncode == 5, proc.stderr
    assert "registry unreachable" in proc.stderr
    assert not (spec.parent / "eval.lock.json").exists()


def test_undefined_template_variable_fails_lock_with_exit_2(cli, locked_example, tmp_path):
    import yaml

    dest = tmp_path / "d"
    shutil.copytree(locked_example, dest, ignore=shutil.ignore_patterns("eval.lock.json"))
    template = dest / "bad.Dockerfile.j2"
    template.write_text("FROM {{ base_image }}\nLABEL x={{ no_such_variable | tojson }}\n")
    spec = yaml.safe_load((dest / "eval.yaml").read_text())
    spec["image"]["template"] = "bad.Dockerfile.j2"
    (dest / "eval.yaml").write_text(yaml.safe_dump(spec))
    proc = cli("lock", str(dest / "eval.yaml"))
    assert proc.returncode == 2
    assert "no_such_variable" in proc.stderr and "bad.Dockerfile.j2" in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stop_signal_mid_run_cleans_up_and_seals_an_interrupted_bundle(vcli, variant, signum):
    """Ctrl-C, or SIGTERM as a CI runner cancels a job: container gone, signed bundle."""
    spec = variant(params={"sleep_s": 60})
    # Ctrl-C as a terminal delivers it: the suite itself may run where SIGINT is ignored
    # (a shell's background job), which its children would inherit
    proc = subprocess.Popen([*EVALRUN, "run", str(spec), "--json"], cwd=ROOT, env=vcli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = docker.from_env()
    # this run's own container: other sessions on the same engine run digits-logreg too
    from runner.model.lock import load_lock

    lock_digest = load_lock(spec.with_name("eval.lock.json")).digest()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = client.containers.list(
            filters={"label": f"org.evalrun.lock-digest={lock_digest}", "status": "running"}
        )
        if running:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the container never started")
    run_id = running[0].labels["org.evalrun.run-id"]
    time.sleep(1)
    proc.send_signal(signum)
    # bounded, with room for a loaded CI machine to seal (hash, sign) after the signal
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stderr
    assert _containers_for(run_id) == []
    out = json.loads(stdout)
    pred = predicate_of(Path(out["bundle"]))
    assert pred["outcome"] == "interrupted"
    assert ("SIGTERM" in pred["reason"]) == (signum == signal.SIGTERM), pred["reason"]
    assert "was removed" in pred["reason"], pred["reason"]
    assert list((vcli.home / "tmp").iterdir()) == []  # nothing half-written
    assert vcli("verify", out["bundle"], "--key", str(vcli.pub)).returncode == 0


@pytest.mark.parametrize("tier", ["build-check"])
def test_build_check_reproduces_the_rootfs_digest(cli, locked_example, tier):
    code, out = cli.json("build", str(locked_example / "eval.yaml"), "--check")
    assert code == 0, out
    assert out["rootfs_identical"] is True


def test_sweep_runs_every_cell_with_its_own_bundle(vcli, locked_example, tmp_path):
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text("seed: [11, 12]\nparams.crash: [false, true]\n")
    code, out = vcli.json("sweep", str(locked_example / "eval.yaml"), "--matrix", str(matrix),
                          "--parallel", "2")
    assert code == 6, out  # the crashing cells fail, the sweep reports the worst
    cells = out["cells"]
    assert len(cells) == 4
    assert sorted(c["outcome"] for c in cells) == ["evaluation_failed", "evaluation_failed",
                                                   "passed", "passed"]
    assert len({c["run_id"] for c in cells}) == 4
    # a failed cell says why beside its outcome (the crash's exception), a passed one not
    for c in cells:
        if c["outcome"] == "passed":
            assert c["reason"] is None, c
        else:
            assert "crash" in c["reason"].lower(), c
    for c in cells:
        proc = vcli("verify", c["bundle"], "--key", str(vcli.pub))
        assert proc.returncode == 0


def test_multi_seed_run_set_reports_per_seed_and_across_seed_uncertainty(vcli, variant):
    import numpy as np

    spec = variant(params={"pixel_dropout": 0.3})
    import yaml

    data = yaml.safe_load(spec.read_text())
    data.pop("seed", None)
    data["seeds"] = [1, 2, 3]
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    assert vcli("lock", str(spec)).returncode == 0
    code, out = vcli.json("run", str(spec))
    assert out["run_set"].startswith("rs-"), out
    members = out["members"]
    assert [m["seed"] for m in members] == [1, 2, 3]
    acc = [next(x["value"] for x in m["metrics"] if x["name"] == "accuracy") for m in members]
    assert len(set(acc)) > 1  # the seeded perturbation moves the per-seed numbers
    stats = next(s for s in out["across_seeds"] if s["name"] == "accuracy")
    arr = np.asarray(acc)
    half = 4.302652729911275 * arr.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2)
    assert stats["mean"] == pytest.approx(arr.mean(), abs=1e-12)
    assert stats["sd"] == pytest.approx(arr.std(ddof=1), abs=1e-12)
    assert stats["ci"]["low"] == pytest.approx(arr.mean() - half, abs=1e-9)
    assert code == (0 if all(m["outcome"] == "passed" for m in members) else 6)
    # the run set is sealed and verifies; its members are linked by digest
    proc = vcli("verify", out["bundle"], "--key", str(vcli.pub))
    assert proc.returncode == 0, proc.stderr
    assert "Across seeds" in (Path(out["bundle"]) / "report.md").read_text()
    # idempotent
    code2, again = vcli.json("run", str(spec))
    assert again["reused"] is True and again["run_set"] == out["run_set"]


def test_perturbations_report_sensible_deltas(vcli, variant):
    spec = variant(perturbations=[
        {"name": "noise-0-3", "kind": "noise", "std": 0.3, "seed": 5},
        {"name": "drop-center", "kind": "drop_feature", "feature": "pixel_28"},
        {"name": "half", "kind": "subsample", "fraction": 0.5},
        {"name": "only-eights", "kind": "slice", "field": "label", "value": 8},
    ])
    code, out = vcli.json("run", str(spec))
    assert code == 0, out
    pred = predicate_of(Path(out["bundle"]))
    effects = {p["name"]: {m["name"]: m for m in p["metrics"]} for p in pred["perturbations"]}
    noise = effects["noise-0-3"]["accuracy"]
    assert noise["delta"] < -0.02 and noise["delta_ci"]["high"] < 0  # noise hurts, clearly
    assert -0.05 < effects["drop-center"]["accuracy"]["delta"] <= 0.0
    half = effects["half"]["accuracy"]
    assert half["delta_ci"]["low"] < 0 < half["delta_ci"]["high"]  # a subsample: no real change
    assert {p["n"] for p in pred["perturbations"] if p["name"] == "half"} == {225}
    assert "Sensitivity to data perturbations" in (Path(out["bundle"]) / "report.md").read_text()


def _fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of ``directory`` up to ``leave`` bytes free; returns the filler."""
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_disk_filling_while_the_bundle_is_written_fails_cleanly(vcli, variant, tmp_path):
    """A store on a small tmpfs: the bundle cannot be written. One line naming the store,
    exit 5, no staging left and no bundle that looks valid; the store still lists its runs."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        home = small / "home"
        cli = dataclasses.replace(vcli, home=home, env={**vcli.env, "EVALRUN_HOME": str(home)})
        assert cli("keys", "generate").returncode == 0
        spec = variant()
        code, first = cli.json("run", str(spec))
        assert code == 0, first
        size = sum(p.stat().st_size for p in Path(first["bundle"]).rglob("*") if p.is_file())
        filler = _fill(small, leave=size // 3)
        proc = cli("run", str(spec), "--rerun")
        assert proc.returncode == 5, proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("evalrun: error:")]
        assert len(errors) == 1, proc.stderr
        assert "no space left on device" in errors[0] and str(home) in errors[0], errors[0]
        assert "Traceback" not in proc.stderr
        assert list((home / "tmp").iterdir()) == []  # no staging left
        assert [p.name for p in (home / "bundles").iterdir()] == [Path(first["bundle"]).name]
        # the store and its index still read; with space again, the run goes through
        code, listing = cli.json("runs", "ls")
        assert code == 0, listing
        filler.unlink()
        code, again = cli.json("run", str(spec), "--rerun")
        assert code == 0, again
        assert cli("verify", again["bundle"], "--key", str(cli.pub)).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_an_error_while_the_sandbox_runs_removes_it_and_seals_nothing(vcli, variant, monkeypatch):
    """What the runner does while the sandbox runs (loading and building what sealing needs,
    ``on_start``) can fail like anything before the start: the container is removed at
    once, the error propagates, and no bundle is sealed from the run."""
    from runner._internal.settings import Settings
    from runner.backends.docker import DockerBackend
    from runner.bundle.signing import load_signer
    from runner.workflows import run as run_workflow

    spec_path = variant()
    calls = []

    def failing(sealing, preload=()):
        calls.append(sealing.run_id)
        raise RuntimeError("could not prepare the sealing")

    monkeypatch.setattr(run_workflow, "prepare_sealing", failing)
    engine = docker.from_env()
    before = {c.id for c in engine.containers.list(all=True)}
    signer = load_signer(ROOT / "tests" / "unit" / "fixtures" / "legacy" / "keys" / "legacy.key")
    with pytest.raises(RuntimeError, match="could not prepare the sealing"):
        run_workflow.run_evaluation(
            spec_path, DockerBackend(), signer, Settings(home=vcli.home), rerun=True
        )
    assert len(calls) == 1  # called once, with the sandbox running
    assert {c.id for c in engine.containers.list(all=True)} == before
    assert not list((vcli.home / "bundles").glob("sha256-*"))
