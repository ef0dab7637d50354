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
    mock.patch.object(evaluate, "backend_for", lambda args, output=None: InProcessBackend()),
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


def test_a_locked_run_loads_only_what_it_uses(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(SOURCE, source)
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env |= {
        "EVALRUN_HOME": str(tmp_path / "home"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
        "PYDANTIC_DISABLE_PLUGINS": "__all__",
    }
    probe = PROBE.format(not_loaded=NOT_LOADED, not_built=NOT_BUILT)
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
    # the run really ran, was sealed and verified: the probe looked at a whole run
    assert "outcome  passed" in out and "verify   valid (" in out, out[-2000:] + result.stderr
    assert "EXIT 0" in out
    assert "LOADED []" in out, out[-1500:]
    assert "BUILT []" in out, out[-1500:]
    assert "SPEC_READS 1" in out, out[-1500:]
