"""What `evalrun run` of a locked spec loads, pinned in a fresh process.

A run of local inputs with no custom metrics and no CI report asked for needs none of:
the Docker SDK outside the Docker backend (the custom-metric sandbox), the registry client
(inputs published as OCI artifacts), the https and S3 sources, the JUnit renderer, the
lock and image builders, and it never builds the models only run sets, audits and remote
inputs use. The spec is read and validated once. Each of these cost every run its import
(or build) time; this test fails when one of them comes back into the path of a plain run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCE = HERE / "fixtures" / "legacy" / "source"

NOT_LOADED = (
    "docker",
    "kubernetes",
    "boto3",
    "runner.backends.custom_metric",
    "runner.adapters.input_artifacts",
    "runner.adapters.registry",
    "runner.adapters.sources.https",
    "runner.adapters.sources.s3",
    "runner.render.junit",
    "runner.render.junit_xml",
    "runner.build.lock",
    "runner.build.image",
)
NOT_BUILT = (
    "runner.model.predicate.RunSetPredicate",
    "runner.model.predicate.AuditPredicate",
    "runner.model.input_uri.HttpsUri",
    "runner.model.input_uri.S3Uri",
    "runner.model.input_uri.OciUri",
    "runner._internal.input_tree.InputTree",
    "runner.bundle.signing.pem.KeyInfo",
)

# The real `evalrun run` command; only the backend (the in-process stand-in for the agent)
# and the signing key (the fixture key) are given to it instead of made from the options.
PROBE = """
import importlib, sys
from unittest import mock
from inprocess_backend import KEY, InProcessBackend
evaluate = importlib.import_module("runner.cli.evaluate")
spec_module = importlib.import_module("runner.model.spec")
from runner.bundle.signing import load_signer

reads = []
real_read = spec_module.load_yaml_document
def counted(path, *a, **k):
    reads.append(str(path))
    return real_read(path, *a, **k)

with (
    mock.patch.object(evaluate, "backend_for", lambda args, output=None, early=None: InProcessBackend()),
    mock.patch.object(evaluate, "signer_for", lambda args, settings, term: load_signer(KEY)),
    mock.patch.object(spec_module, "load_yaml_document", counted),
):
    from runner.cli.main import main
    code = main(["run", sys.argv[1], "--rerun"])

def built(qualified):
    module, name = qualified.rsplit(".", 1)
    return getattr(sys.modules[module], name).__pydantic_complete__

loaded = [m for m in {not_loaded!r} if m in sys.modules]
built_models = [m for m in {not_built!r} if built(m)]
print("EXIT", code)
print("LOADED", loaded)
print("BUILT", built_models)
print("SPEC_READS", len(reads))
"""


def _probe_run(tmp_path: Path, probe: str, source: Path, **env_more: str) -> str:
    """What ``probe`` prints running ``source``'s spec in a fresh process; the run must have
    passed, been sealed and verified: the probe looked at a whole run."""
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env |= {
        "EVALRUN_HOME": str(tmp_path / "home"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
        **env_more,
    }
    result = subprocess.run(
        [sys.executable, "-c", probe, str(source / "eval.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert "outcome  passed" in out and "verify   valid (" in out, out[-2000:] + result.stderr
    assert "EXIT 0" in out
    return out


def test_a_locked_run_loads_only_what_it_uses(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(SOURCE, source)
    probe = PROBE.format(not_loaded=NOT_LOADED, not_built=NOT_BUILT)
    out = _probe_run(tmp_path, probe, source, PYDANTIC_DISABLE_PLUGINS="__all__")
    assert "LOADED []" in out, out[-1500:]
    assert "BUILT []" in out, out[-1500:]
    assert "SPEC_READS 1" in out, out[-1500:]


# What only sealing needs (the predicate's models, the bundle writer, the report) is loaded
# once the backend says its sandbox runs (on_start), while the evaluation goes on; before
# that, the whole run waits for every module loaded (runner.workflows.run.SEALING_MODULES).
STARTED_PROBE = """
import importlib, sys
from unittest import mock
from inprocess_backend import KEY, InProcessBackend
evaluate = importlib.import_module("runner.cli.evaluate")
from runner.bundle.signing import load_signer

WATCH = ("runner.model.predicate", *importlib.import_module("runner.workflows.run").SEALING_MODULES)
seen = {{}}

class Recording(InProcessBackend):
    def run(self, plan, results_dir, *, on_start=None):
        seen["before"] = [m for m in WATCH if m in sys.modules]
        def started():
            on_start()
            seen["after"] = [m for m in WATCH if m in sys.modules]
        return super().run(plan, results_dir, on_start=started)

with (
    mock.patch.object(evaluate, "backend_for", lambda args, output=None, early=None: Recording()),
    mock.patch.object(evaluate, "signer_for", lambda args, settings, term: load_signer(KEY)),
):
    from runner.cli.main import main
    code = main(["run", sys.argv[1], "--rerun"])
print("EXIT", code)
print("BEFORE", seen["before"])
print("MISSING_AFTER", [m for m in WATCH if m not in seen["after"]])
"""


def _plain_source(tmp_path: Path) -> Path:
    """The fixture spec without its preprocessing step and comparison group (both load the
    predicate's models before a run, as they must: a step's record is checked against the
    lock, a group's definitions against the stored runs), locked again."""
    import json

    import yaml

    from runner.model.spec import load_spec

    source = tmp_path / "source"
    shutil.copytree(SOURCE, source)
    doc = yaml.safe_load((source / "eval.yaml").read_text())
    del doc["preprocessing"], doc["metadata"]["comparison_group"]
    (source / "eval.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    lock = json.loads((source / "eval.lock.json").read_text())
    lock["preprocessing"] = []
    lock["spec_digest"] = load_spec(source / "eval.yaml").digest()
    (source / "eval.lock.json").write_text(json.dumps(lock, indent=2))
    return source


def test_what_only_sealing_needs_loads_while_the_sandbox_runs(tmp_path: Path) -> None:
    out = _probe_run(tmp_path, STARTED_PROBE.format(), _plain_source(tmp_path))
    assert "BEFORE []" in out, out[-1500:]
    assert "MISSING_AFTER []" in out, out[-1500:]
