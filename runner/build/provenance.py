"""Who launched a run, from where, and why (the predicate's ``provenance`` block).

Pure functions over an environment mapping (``os.environ`` in the runner, a dict
in tests): the identity comes from what the machine and the CI system say, never
from anything the evaluation container reports.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping, Sequence

from pydantic import JsonValue

from runner.model.predicate import (
    SELF_ASSERTED,
    CiIdentity,
    JsonObject,
    Launcher,
    PreprocessingRecord,
    Provenance,
    Rationale,
)
from runner.model.spec import EvalSpec

PROVENANCE_SCHEMA = "evalrun/provenance/v1"


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def _github(env: Mapping[str, str]) -> CiIdentity:
    server = env.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
    repo = env.get("GITHUB_REPOSITORY")
    run_id = env.get("GITHUB_RUN_ID")
    url = f"{server}/{repo}/actions/runs/{run_id}" if repo and run_id else None
    return CiIdentity(
        system="github_actions",
        pipeline=env.get("GITHUB_WORKFLOW"),
        run_id=run_id,
        run_attempt=env.get("GITHUB_RUN_ATTEMPT"),
        job=env.get("GITHUB_JOB"),
        job_url=url,
        actor=env.get("GITHUB_ACTOR"),
        repository=repo,
        ref=env.get("GITHUB_REF"),
        commit=env.get("GITHUB_SHA"),
    )


def _gitlab(env: Mapping[str, str]) -> CiIdentity:
    return CiIdentity(
        system="gitlab_ci",
        pipeline=env.get("CI_PIPELINE_ID"),
        run_id=env.get("CI_JOB_ID"),
        job=env.get("CI_JOB_NAME"),
        job_url=env.get("CI_JOB_URL"),
        pipeline_url=env.get("CI_PIPELINE_URL"),
        actor=env.get("GITLAB_USER_LOGIN"),
        repository=env.get("CI_PROJECT_PATH"),
        ref=env.get("CI_COMMIT_REF_NAME"),
        commit=env.get("CI_COMMIT_SHA"),
    )


def _jenkins(env: Mapping[str, str]) -> CiIdentity:
    return CiIdentity(
        system="jenkins",
        pipeline=env.get("JOB_NAME"),
        run_id=env.get("BUILD_NUMBER"),
        job=env.get("JOB_NAME"),
        job_url=env.get("BUILD_URL"),
        actor=env.get("BUILD_USER_ID"),
        repository=env.get("GIT_URL"),
        ref=env.get("GIT_BRANCH"),
        commit=env.get("GIT_COMMIT"),
    )


def _buildkite(env: Mapping[str, str]) -> CiIdentity:
    build_url = env.get("BUILDKITE_BUILD_URL")
    job_id = env.get("BUILDKITE_JOB_ID")
    return CiIdentity(
        system="buildkite",
        pipeline=env.get("BUILDKITE_PIPELINE_SLUG"),
        run_id=env.get("BUILDKITE_BUILD_NUMBER") or env.get("BUILDKITE_BUILD_ID"),
        job=env.get("BUILDKITE_LABEL") or job_id,
        job_url=f"{build_url}#{job_id}" if build_url and job_id else build_url,
        actor=env.get("BUILDKITE_BUILD_CREATOR") or env.get("BUILDKITE_BUILD_AUTHOR"),
        repository=env.get("BUILDKITE_REPO"),
        ref=env.get("BUILDKITE_BRANCH"),
        commit=env.get("BUILDKITE_COMMIT"),
    )


def ci_identity(env: Mapping[str, str]) -> CiIdentity | None:
    """The CI system, pipeline, run id and job URL the environment names; None outside CI.

    Specific systems are recognised by their own variables first; a bare ``CI=true``
    (or ``1``) is recorded as ``generic``. Fields the system does not provide are None.
    """
    if env.get("GITHUB_ACTIONS") == "true":
        return _github(env)
    if env.get("GITLAB_CI"):
        return _gitlab(env)
    if env.get("JENKINS_URL") or env.get("JENKINS_HOME"):
        return _jenkins(env)
    if env.get("BUILDKITE") == "true":
        return _buildkite(env)
    if env.get("CI", "").lower() in ("true", "1", "yes"):
        return CiIdentity(
            system="generic",
            pipeline=None,
            run_id=_first(env, "CI_RUN_ID", "BUILD_ID", "BUILD_NUMBER"),
            job=None,
            job_url=_first(env, "CI_JOB_URL", "BUILD_URL"),
        )
    return None


def local_user(env: Mapping[str, str]) -> str | None:
    """The launching user: $USER/$LOGNAME, else the password database, else None."""
    name = _first(env, "USER", "LOGNAME")
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry for this uid (containers): record "unknown" honestly
        return None


def launcher(env: Mapping[str, str], *, signer_keyid: str | None = None) -> Launcher:
    """Who launched the run: user, host, uid and CI identity (None outside CI).

    All of it is what the environment says (marked :data:`SELF_ASSERTED`); with
    ``signer_keyid`` the claims are bound to the key that signs the bundle.
    """
    found = Launcher(
        user=local_user(env),
        uid=os.getuid() if hasattr(os, "getuid") else None,
        host=socket.gethostname() or None,
        ci=ci_identity(env),
    )
    if signer_keyid is None:
        return found
    # environment text may hold undecodable bytes (surrogates): recorded escaped
    claims = _encodable(found.to_json())
    assert isinstance(claims, dict)
    return Launcher.model_validate(
        {**claims, "evidence": SELF_ASSERTED, "signer_keyid": signer_keyid}
    )


def _encodable(value: JsonValue) -> JsonValue:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {str(_encodable(k)): _encodable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    return value


def rationale(spec_text: str | None, cli_text: str | None) -> Rationale:
    """The run's free-text rationale: ``--reason`` wins over ``metadata.rationale``; both kept."""
    spec_value = spec_text.strip() if spec_text and spec_text.strip() else None
    cli_value = cli_text.strip() if cli_text and cli_text.strip() else None
    text = cli_value or spec_value
    source = "cli" if cli_value else ("spec" if spec_value else None)
    return Rationale(text=text, source=source, cli=cli_value, spec=spec_value)


def provenance(
    spec: EvalSpec,
    *,
    env: Mapping[str, str],
    launched_at: str,
    evalrun_version: str,
    reason: str | None,
    preprocessing: Sequence[JsonObject],
    signer_keyid: str | None = None,
) -> JsonObject:
    """The ``provenance`` block of a run's predicate, as the JSON it is signed as.

    ``signer_keyid``: the key that will sign the run, to which the (self-asserted)
    launcher claims are bound.
    """
    return Provenance(
        schema_=PROVENANCE_SCHEMA,
        launched_by=launcher(env, signer_keyid=signer_keyid),
        launched_at=launched_at,
        evalrun_version=evalrun_version,
        rationale=rationale(spec.metadata.rationale, reason),
        comparison_group=spec.metadata.comparison_group,
        preprocessing=tuple(PreprocessingRecord.model_validate(p) for p in preprocessing),
    ).to_json()
