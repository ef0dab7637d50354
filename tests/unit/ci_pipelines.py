"""Run the CI examples of examples/ci/ the way their CI systems would, on this machine.

The YAML is parsed, each step's commands are taken as written, the variables the CI
system provides (``${{ secrets.X }}``, ``$CI_PROJECT_DIR``, ``$GITHUB_OUTPUT``, …) get
test values, and the commands run in order in a bash like the CI system's, in a copy of
the checkout. What only the CI system itself can do is mapped to a local equivalent
that says so (:data:`LOCAL_EQUIVALENTS`): checking out is the copy the job runs in,
uploading artifacts copies them to a directory, GitLab's JUnit report is the file the
test validates. ``rules:`` and ``runs-on``/``tags`` (where a job runs) are the CI
system's and are not emulated.

Used by tests/unit/test_ci_examples.py (parsing, and the whole job against a run already
in the store) and tests/k8s/test_ci_examples.py (the whole job against the test cluster).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
GITHUB_WORKFLOW = ROOT / "examples" / "ci" / "github" / "evalrun.yml"
GITLAB_CI = ROOT / "examples" / "ci" / "gitlab" / ".gitlab-ci.yml"

# `uses:` actions → what stands in for them here, said in the step's result
LOCAL_EQUIVALENTS = {
    "actions/checkout": "checkout: the job already runs in a fresh copy of the checkout",
    "actions/upload-artifact": "upload-artifact: the paths are copied to the artifacts directory",
}
# Shell lines the examples may hold besides evalrun command lines (bookkeeping only).
SHELL_LINES = [
    re.compile(r"mkdir -p [\w./-]+"),
    re.compile(r"code=0"),
    re.compile(r"umask 077"),
    re.compile(r"""printf '%s\\n' "\$\w+" > "\$RUNNER_TEMP/\w+\""""),
    re.compile(r'echo "\w+=[^"]*" >> "\$(GITHUB_ENV|GITHUB_OUTPUT)"'),
    re.compile(r'exit "(\$code|\$\{\{ steps\.\w+\.outputs\.\w+ \}\})"'),
]
_EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_OPERATORS = {">", ">>", "<", "|", "||", "&&", ";", "&", "2>"}


# --------------------------------------------------------------------------- parsing


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    return data


def script_lines(script: str) -> list[str]:
    """The command lines of a ``run:`` script: continuations joined, blanks and comments out."""
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = [line.strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def evalrun_argv(line: str) -> list[str] | None:
    """The evalrun arguments of a command line (up to its first shell operator), else None."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word in _OPERATORS:
            break
        words.append(word)
    if not words or words[0] != "evalrun":
        return None
    return words[1:]


def is_bookkeeping(line: str) -> bool:
    """Whether a non-evalrun line is one of the shell lines the examples may hold."""
    return any(p.fullmatch(line) for p in SHELL_LINES)


@dataclass
class Step:
    """One step of a GitHub Actions job, as written (expressions not yet resolved)."""

    name: str
    id: str | None
    run: str | None
    uses: str | None
    with_: dict[str, Any]
    env: dict[str, str]
    condition: str | None


def github_job(path: Path = GITHUB_WORKFLOW, job: str = "evaluate") -> tuple[dict, list[Step]]:
    """The job's ``env`` and its steps."""
    data = load_yaml(path)
    spec = data["jobs"][job]
    steps = [
        Step(
            name=s.get("name", s.get("uses", "?")),
            id=s.get("id"),
            run=s.get("run"),
            uses=s.get("uses"),
            with_=dict(s.get("with") or {}),
            env={k: str(v) for k, v in (s.get("env") or {}).items()},
            condition=s.get("if"),
        )
        for s in spec["steps"]
    ]
    return {k: str(v) for k, v in (spec.get("env") or {}).items()}, steps


def gitlab_job(path: Path = GITLAB_CI, job: str = "evaluate") -> dict[str, Any]:
    """The job's definition (variables, script, artifacts, …)."""
    data = load_yaml(path)
    spec = data[job]
    assert isinstance(spec, dict)
    return spec


# --------------------------------------------------------------------------- expressions


def resolve(text: str, contexts: dict[str, Any]) -> str:
    """Replace each ``${{ a.b.c }}`` by its value in ``contexts`` (KeyError when unknown)."""

    def value(match: re.Match[str]) -> str:
        node: Any = contexts
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"no test value for ${{{{ {match.group(1)} }}}}")
            node = node[part]
        return str(node)

    return _EXPRESSION.sub(value, text)


def expand(text: str, variables: dict[str, str]) -> str:
    """GitLab's expansion of ``$VAR``/``${VAR}`` in a variable's value (unknown: empty)."""
    return _VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), ""), text)


# --------------------------------------------------------------------------- running


@dataclass
class StepResult:
    name: str
    returncode: int | None  # None: skipped
    output: str = ""
    local_equivalent: str | None = None


@dataclass
class JobResult:
    succeeded: bool
    steps: list[StepResult] = field(default_factory=list)
    artifacts: Path | None = None
    junit: Path | None = None
    summary: str = ""

    def log(self) -> str:
        return "\n".join(
            f"--- {s.name}: {s.returncode}"
            + (f" ({s.local_equivalent})" if s.local_equivalent else "")
            + f"\n{s.output}"
            for s in self.steps
        )


def _bash(script: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``script`` as GitHub runs a ``run:`` step: bash -e -o pipefail, from a file."""
    path = Path(env["RUNNER_TEMP"]) / f"step-{os.urandom(4).hex()}.sh"
    path.write_text(script)
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(path)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _key_values(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    elif src.exists():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / src.name)


def run_github_job(
    *,
    workspace: Path,
    runner_temp: Path,
    base_env: dict[str, str],
    secrets: dict[str, str],
    variables: dict[str, str],
    artifacts: Path,
    run_id: str = "4242",
    timeout: float = 900,
    workflow: Path = GITHUB_WORKFLOW,
) -> JobResult:
    """Run the workflow's job as a GitHub runner would, in ``workspace`` (a checkout copy)."""
    job_env, steps = github_job(workflow)
    runner_temp.mkdir(parents=True, exist_ok=True)
    files = {
        name: runner_temp / f"{name.lower()}.txt"
        for name in ("GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")
    }
    for path in files.values():
        path.write_text("")
    contexts: dict[str, Any] = {
        "secrets": secrets,
        "vars": variables,
        "github": {"workspace": str(workspace), "run_id": run_id},
        "runner": {"temp": str(runner_temp)},
        "steps": {},
    }
    provided = {
        **base_env,
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_WORKSPACE": str(workspace),
        "GITHUB_RUN_ID": run_id,
        "GITHUB_RUN_ATTEMPT": "1",
        "GITHUB_WORKFLOW": "evaluation",
        "GITHUB_JOB": "evaluate",
        "GITHUB_REPOSITORY": "example/evals",
        "RUNNER_TEMP": str(runner_temp),
        **{k: str(v) for k, v in files.items()},
    }
    env_from_job = {k: resolve(v, contexts) for k, v in job_env.items()}
    result = JobResult(succeeded=True, artifacts=artifacts)
    for step in steps:
        always = step.condition is not None and resolve_condition(step.condition)
        if not result.succeeded and not always:
            result.steps.append(StepResult(step.name, None, "skipped: an earlier step failed"))
            continue
        if step.uses is not None:
            result.steps.append(_mapped_action(step, contexts, workspace, artifacts))
            continue
        assert step.run is not None, step.name
        files["GITHUB_OUTPUT"].write_text("")
        env = {
            **provided,
            **env_from_job,
            **_key_values(files["GITHUB_ENV"]),
            **{k: resolve(v, contexts) for k, v in step.env.items()},
        }
        code, output = _bash(resolve(step.run, contexts), workspace, env, timeout)
        result.steps.append(StepResult(step.name, code, output))
        if step.id:
            contexts["steps"][step.id] = {"outputs": _key_values(files["GITHUB_OUTPUT"])}
        if code != 0:
            result.succeeded = False
    result.summary = files["GITHUB_STEP_SUMMARY"].read_text()
    return result


def resolve_condition(condition: str) -> bool:
    """The ``if:`` forms the examples use: ``always()`` (and nothing else)."""
    text = _EXPRESSION.sub(lambda m: m.group(1), condition).strip()
    if text == "always()":
        return True
    raise AssertionError(f"if: {condition!r} is not emulated here")


def _mapped_action(
    step: Step, contexts: dict[str, Any], workspace: Path, artifacts: Path
) -> StepResult:
    action = (step.uses or "").split("@", 1)[0]
    said = LOCAL_EQUIVALENTS.get(action)
    if said is None:
        raise AssertionError(f"step {step.name!r}: no local equivalent for {step.uses}")
    if action == "actions/upload-artifact":
        name = resolve(str(step.with_["name"]), contexts)
        for entry in str(step.with_["path"]).split():
            _copy(workspace / entry.rstrip("/"), artifacts / name / Path(entry).name)
    return StepResult(step.name, 0, "", local_equivalent=said)


def run_gitlab_job(
    *,
    workspace: Path,
    base_env: dict[str, str],
    ci_variables: dict[str, str],
    artifacts: Path,
    timeout: float = 900,
    path: Path = GITLAB_CI,
    job: str = "evaluate",
) -> JobResult:
    """Run the job's ``script`` as a GitLab shell runner would (bash, -e -o pipefail), in
    ``workspace``; then keep its artifacts (``when: always`` or on success)."""
    spec = gitlab_job(path, job)
    predefined = {
        "CI": "true",
        "GITLAB_CI": "true",
        "CI_PROJECT_DIR": str(workspace),
        "CI_JOB_ID": "4242",
        "CI_JOB_NAME": job,
        "CI_PIPELINE_ID": "77",
        "CI_PROJECT_PATH": "example/evals",
    }
    variables = dict(predefined)
    for key, value in (spec.get("variables") or {}).items():
        variables[key] = expand(str(value), variables)
    # project and pipeline variables (the CI/CD settings) win over the job's own
    variables.update(ci_variables)
    env = {**base_env, **variables, "RUNNER_TEMP": str(workspace.parent / "gitlab-tmp")}
    Path(env["RUNNER_TEMP"]).mkdir(exist_ok=True)
    script = "\n".join(str(line) for line in spec["script"])
    code, output = _bash(script, workspace, env, timeout)
    result = JobResult(succeeded=code == 0, steps=[StepResult("script", code, output)])
    keep = spec.get("artifacts") or {}
    if keep.get("when", "on_success") == "always" or code == 0:
        result.artifacts = artifacts
        for entry in keep.get("paths", []):
            _copy(workspace / entry.rstrip("/"), artifacts / Path(entry).name)
        junit = (keep.get("reports") or {}).get("junit")
        if junit:
            result.junit = workspace / junit
            result.steps.append(
                StepResult(
                    "artifacts:reports:junit",
                    0,
                    local_equivalent="GitLab parses this file as the test report; the test "
                    "validates it against the JUnit XSD instead",
                )
            )
    return result


# --------------------------------------------------------------------------- the job's machine


def checkout_copy(dest: Path) -> Path:
    """A fresh copy of this checkout's files (tracked, and new ones git does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = ROOT / os.fsdecode(name)
        if src.is_file() and not src.is_symlink():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def evalrun_on_path(bin_dir: Path, python: str) -> Path:
    """A bin directory whose ``evalrun`` is this checkout's (as a CI runner has it installed)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "evalrun"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(python)} "
        '-m runner.cli "$@"\n'
    )
    wrapper.chmod(0o755)
    return bin_dir


def clean_env(bin_dir: Path, home: Path, **extra: str) -> dict[str, str]:
    """A runner's environment: nothing from this process but what a shell needs."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        **extra,
    }


# --------------------------------------------------------------------------- predicates and runs

CI_95 = {"level": 0.95, "method": "bootstrap_percentile", "resamples": 1000}
EXIT_CODES = {
    "passed": 0,
    "completed": 0,
    "thresholds_failed": 6,
    "evaluation_failed": 6,
    "environment_mismatch": 4,
    "infrastructure_failure": 5,
}


def metric(name: str, value: float, threshold: float | None = 0.9, **extra: object) -> dict:
    """A recorded gating metric (higher is better) with a CI of ±0.02."""
    return {
        "name": name,
        "value": value,
        "n": 450,
        "ci": {**CI_95, "low": value - 0.02, "high": value + 0.02},
        "threshold": threshold,
        "direction": "higher_is_better",
        "role": "primary",
        "gating": True,
        "passed": None if threshold is None else value >= threshold,
        **extra,
    }


def run_predicate_json(outcome: str, metrics: list[dict], **extra: object) -> dict:
    """A run predicate as a bundle holds it."""
    return {
        "run_id": "r-0123456789abcdef012345",
        "spec": {"name": "digits-logreg", "digest": "sha256:" + "1" * 64},
        "lock_digest": "sha256:" + "2" * 64,
        "image": {"ref": "127.0.0.1:5000/evalrun/digits@sha256:" + "3" * 64},
        "backend": "kubernetes",
        "metrics": metrics,
        "outcome": outcome,
        "exit_code": EXIT_CODES[outcome],
        "timestamps": {"started": "2025-03-01T10:00:00Z", "finished": "2025-03-01T10:01:30.5Z"},
        "provenance": {"launched_by": {"host": "ci-runner-7"}},
        **extra,
    }


# What the job's cluster credentials hold here: a server nobody listens on. Nothing is
# sent to it: the run is already in the store, found by its id, which includes this
# API server and the namespace (a run's identity), read from the kubeconfig alone.
KUBECONFIG_TEXT = """apiVersion: v1
kind: Config
clusters:
- name: ci
  cluster: {server: "https://127.0.0.1:1"}
users:
- name: ci
  user: {token: not-used}
contexts:
- name: ci
  context: {cluster: ci, user: ci}
current-context: ci
"""
CLUSTER_TARGET = "kubernetes https://127.0.0.1:1 namespace evals"


def store_run(
    home: Path,
    spec: Path,
    key: Path,
    outcome: str,
    metrics: list[dict],
    *,
    backend: str = "kubernetes",
) -> str:
    """The spec's run, already sealed in the store at ``home`` as an earlier ``evalrun run``
    left it: on the cluster of :data:`KUBECONFIG_TEXT` (namespace ``evals``), so that the
    job's ``evalrun run --backend kubernetes -n evals`` returns it without a cluster; or,
    with ``backend="docker"``, on the local engine (what a plain ``evalrun run`` finds)."""
    from runner.bundle.build import build_bundle
    from runner.bundle.signing import load_signer
    from runner.bundle.store import Store
    from runner.model.lock import load_lock
    from runner.workflows.run import run_id_for

    lock_digest = load_lock(spec.with_name("eval.lock.json")).digest()
    target = CLUSTER_TARGET if backend == "kubernetes" else None
    run_id = run_id_for(lock_digest, 0, target)
    store = Store(home)
    with store.staging_dir() as stage:
        (stage / "report.md").write_text("# report\n")
        body = run_predicate_json(
            outcome,
            metrics,
            run_id=run_id,
            backend=backend,
            **({"backend_target": target} if target else {}),
        )
        build_bundle(stage, body, load_signer(key), stage)
        store.put(stage)
    return run_id
