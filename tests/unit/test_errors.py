"""One error tree: every host-side error class in runner/errors/, rendered by one mechanism."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import runner
import runner.errors as errors
from runner.errors import (
    EvalrunError,
    InfrastructureError,
    InputError,
    Problem,
    SpecError,
    TransientInfrastructureError,
)

pytestmark = pytest.mark.unit

# runner.agent and runner.shared run in the container and keep their own stdlib errors.
_INDEPENDENT = ("runner.agent", "runner.shared")


def _host_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(runner.__path__, "runner."):
        if info.name.startswith(_INDEPENDENT) or info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def test_every_host_side_exception_class_is_defined_in_runner_errors() -> None:
    strays = []
    for name in _host_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and name != "runner.errors"
                and not name.startswith("runner.errors.")
            ):
                strays.append(f"{name}.{attr}")
    assert strays == []


def _tree() -> list[type[EvalrunError]]:
    return [
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, EvalrunError)
    ]


def test_no_subclass_renders_itself() -> None:
    for cls in _tree():
        if cls is not EvalrunError:
            assert "diagnostics" not in vars(cls), cls
            assert "as_dict" not in vars(cls), cls


@pytest.mark.parametrize(
    ("name", "exit_code"),
    [
        ("InputError", 2),
        ("SpecError", 2),
        ("BundleNotFound", 2),
        ("NotComparable", 2),
        ("KubernetesRejected", 2),
        ("DockerImageNotFound", 2),
        ("IntegrityError", 3),
        ("DigestMismatch", 3),
        ("VerificationFailed", 3),
        ("UnsafeBundleEntry", 3),
        ("StoreConflict", 3),
        ("InputsUnavailable", 3),
        ("ImageUnavailable", 3),
        ("EnvironmentMismatch", 4),
        ("InfrastructureError", 5),
        ("TransientInfrastructureError", 5),
        ("KubernetesAPIError", 5),
        ("APIConflict", 5),
        ("APIForbidden", 5),
        ("APINotFound", 5),
        ("APIGone", 5),
        ("TransientKubernetesError", 5),
        ("RegistryAPIError", 5),
        ("TransientRegistryError", 5),
        ("DockerAPIError", 5),
        ("TransientDockerError", 5),
        ("ThresholdsFailed", 6),
        ("Interrupted", 130),
    ],
)
def test_each_error_maps_to_its_exit_code(name: str, exit_code: int) -> None:
    assert getattr(errors, name).exit_code == exit_code


def test_transient_sdk_errors_are_what_the_retry_policy_retries() -> None:
    for name in ("APIGone", "TransientKubernetesError", "TransientRegistryError"):
        assert issubclass(getattr(errors, name), TransientInfrastructureError)
    assert issubclass(errors.TransientDockerError, TransientInfrastructureError)
    for name in ("APIConflict", "APIForbidden", "APINotFound", "KubernetesAPIError"):
        assert not issubclass(getattr(errors, name), TransientInfrastructureError)
    # A request the API server rejects is the spec's fault, not the cluster's.
    assert issubclass(errors.KubernetesRejected, InputError)
    assert not issubclass(errors.KubernetesRejected, InfrastructureError)


def test_kubernetes_errors_carry_namespace_name_status_reason() -> None:
    err = errors.APIConflict(
        "create Job j: conflict: exists",
        namespace="evals",
        name="j",
        status=409,
        reason="AlreadyExists",
    )
    assert (err.namespace, err.name, err.status, err.reason) == ("evals", "j", 409, "AlreadyExists")
    assert err.kind == "k8s_conflict"
    assert err.diagnostics() == (
        "create Job j: conflict: exists\n"
        "  namespace: evals\n  name: j\n  status: 409\n  reason: AlreadyExists"
    )
    assert err.as_dict() == {
        "error": "k8s_conflict",
        "exit_code": 5,
        "message": "create Job j: conflict: exists",
        "namespace": "evals",
        "name": "j",
        "status": "409",
        "reason": "AlreadyExists",
    }


def test_base_renders_message_fields_listing_and_hint() -> None:
    err = SpecError(
        "invalid evaluation spec",
        file="eval.yaml",
        problems=[("metrics[0].name", "field required")],
        hint="see `evalrun schema`",
    )
    assert err.diagnostics() == (
        "invalid evaluation spec\n"
        "  file: eval.yaml\n"
        "  - metrics[0].name: field required\n"
        "hint: see `evalrun schema`"
    )
    assert err.as_dict() == {
        "error": "invalid_spec",
        "exit_code": 2,
        "message": "invalid evaluation spec",
        "file": "eval.yaml",
        "problems": [{"field": "metrics[0].name", "message": "field required"}],
        "hint": "see `evalrun schema`",
    }
    assert SpecError("empty").as_dict()["problems"] == []  # its key is always there


def test_listing_without_a_declared_key_appears_as_problems_only_when_present() -> None:
    class Listed(EvalrunError):
        pass

    err = Listed("two things", where="here")
    assert "problems" not in err.as_dict()
    err.listing = (Problem("first", {"n": 1}), Problem("second\n    detail", {"n": 2}))
    assert err.diagnostics() == "two things\n  where: here\n  - first\n  - second\n    detail"
    assert err.as_dict()["problems"] == [{"n": 1}, {"n": 2}]


def test_stated_fields_stay_in_json_but_are_not_repeated_in_the_text() -> None:
    class Named(EvalrunError):
        stated_fields = frozenset({"group"})

    err = Named("group 'g' differs", group="g", other=None)
    assert err.diagnostics() == "group 'g' differs"
    assert err.as_dict()["group"] == "g" and "other" not in err.as_dict()


def test_thresholds_failed_lists_each_metric() -> None:
    err = errors.ThresholdsFailed("2 thresholds missed", failed={"acc": "0.8 < 0.9"})
    assert err.diagnostics() == "2 thresholds missed\n  - acc: 0.8 < 0.9"
    assert err.as_dict()["failed"] == [{"metric": "acc", "reason": "0.8 < 0.9"}]
