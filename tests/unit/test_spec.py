import json
from pathlib import Path

import pytest
import yaml

from runner.errors import SpecError
from runner.model.spec import EvalSpec, load_spec, spec_json_schema
from runner.model.spec_yaml import MAX_SPEC_BYTES
from runner.model.base import parse_digest_ref

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def _problems(exc: pytest.ExceptionInfo[SpecError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_example_spec_is_valid():
    spec = load_spec(EXAMPLE)
    assert spec.metadata.name == "digits-logreg"
    assert spec.sandbox.runtime == "gvisor"
    assert spec.digest().startswith("sha256:")


def test_spec_digest_is_stable_and_sensitive(tmp_path):
    data = _example()
    a = load_spec(_write(tmp_path, data)).digest()
    assert load_spec(_write(tmp_path, data)).digest() == a
    data["seed"] = 99
    assert load_spec(_write(tmp_path, data)).digest() != a


def test_unknown_field_is_named_with_a_suggestion(tmp_path):
    data = _example()
    data["metrics"][0]["treshold"] = data["metrics"][0].pop("threshold")
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    problems = _problems(exc)
    assert "metrics[0].treshold" in problems
    assert "did you mean 'threshold'" in problems["metrics[0].treshold"]
    assert exc.value.fields["file"].endswith("eval.yaml")
    assert exc.value.exit_code == 2


def test_unknown_top_level_field_suggests(tmp_path):
    data = _example()
    data["dataset"] = data.pop("datasets")
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    assert "did you mean 'datasets'" in _problems(exc)["dataset"]


def test_image_ref_by_tag_is_refused(tmp_path):
    data = _example()
    data["image"] = {"ref": "127.0.0.1:5000/evalrun/digits:latest"}
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    assert "not pinned by digest" in _problems(exc)["image.ref"]


def test_base_by_tag_is_refused(tmp_path):
    data = _example()
    data["image"]["base"] = "127.0.0.1:5000/evalrun/base:bookworm"
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    assert "not pinned by digest" in _problems(exc)["image.base"]


def test_wrong_type_names_expected_and_found(tmp_path):
    data = _example()
    data["timeout_s"] = "ten minutes"
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    msg = _problems(exc)["timeout_s"]
    assert "integer" in msg and "ten minutes" in msg


def test_bad_sha256_is_refused(tmp_path):
    data = _example()
    data["model"]["sha256"] = "abc"
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    assert "model.sha256" in _problems(exc)


def test_unpinned_requirement_is_refused(tmp_path):
    data = _example()
    data["image"]["requirements"] = ["numpy>=2"]
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    assert "pinned exactly" in _problems(exc)["image.requirements"]


def test_missing_required_field(tmp_path):
    data = _example()
    del data["model"]
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    assert _problems(exc)["model"] == "required field is missing"


def test_malformed_yaml_names_line(tmp_path):
    path = _write(tmp_path, "apiVersion: evalrun/v1\nkind: [Evaluation\nmetadata: {}\n")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert exc.value.message == f"malformed YAML in {path}"
    assert any("line" in loc for loc, _ in exc.value.problems)


def test_duplicate_keys_are_refused(tmp_path):
    text = EXAMPLE.read_text() + "seed: 5\n"
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, text))
    assert "duplicate key 'seed'" in exc.value.diagnostics()


def test_custom_tags_are_refused(tmp_path):
    text = EXAMPLE.read_text().replace("seed: 1234", "seed: !!python/object:os.system 1")
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, text))
    assert "malformed YAML" in exc.value.message


def test_alias_expansion_is_bounded(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 30):
        lines.append(f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]")
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, "\n".join(lines) + "\n"))
    assert "aliases" in exc.value.diagnostics()


def test_oversized_file_is_refused(tmp_path):
    path = _write(tmp_path, "#" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert "limit" in exc.value.message


def test_not_a_mapping(tmp_path):
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, "- just\n- a list\n"))
    assert "mapping" in exc.value.message


def test_missing_file():
    with pytest.raises(SpecError) as exc:
        load_spec(Path("/nonexistent/eval.yaml"))
    assert "not found" in exc.value.message


def test_spec_is_frozen():
    spec = load_spec(EXAMPLE)
    with pytest.raises(Exception):
        spec.seed = 1  # type: ignore[misc]


def test_checked_in_schema_matches_models():
    checked_in = json.loads((ROOT / "runner" / "schema" / "evaluation-v1.json").read_text())
    assert checked_in == spec_json_schema(), "run `make schema` and commit the result"


def test_schema_rejects_unknown_keys_too():
    schema = spec_json_schema()
    assert schema["additionalProperties"] is False


def test_parse_digest_ref():
    repo, digest = parse_digest_ref("127.0.0.1:5000/a/b@sha256:" + "a" * 64)
    assert repo == "127.0.0.1:5000/a/b" and digest == "sha256:" + "a" * 64
    with pytest.raises(ValueError):
        parse_digest_ref("127.0.0.1:5000/a/b:tag")


def test_duplicate_metric_names_are_refused(tmp_path):
    data = _example()
    data["metrics"][1]["name"] = data["metrics"][0]["name"]
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    assert "duplicate names" in exc.value.diagnostics()


def test_model_is_evalspec_type():
    assert isinstance(load_spec(EXAMPLE), EvalSpec)


def test_params_too_large_for_the_evaluations_environment_are_refused_naming_the_field(
    tmp_path,
):
    """params reach the evaluation in one environment variable; the kernel caps one at
    128 KiB, so a larger one could never start the command: refused when the spec is read."""
    data = _example()
    data["params"] = {"padding": "x" * (70 * 1024)}
    with pytest.raises(SpecError) as exc:
        load_spec(_write(tmp_path, data))
    problems = _problems(exc)
    assert "params" in problems and "EVALRUN_PARAMS" in problems["params"]
    assert "put large data in a dataset or model input" in problems["params"]
    data["params"] = {"padding": "x" * (60 * 1024)}
    assert load_spec(_write(tmp_path, data)).params["padding"].startswith("x")
