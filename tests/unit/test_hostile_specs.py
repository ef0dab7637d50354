"""Spec and lock files someone else wrote: every one ends in exit 2 and one line naming the file.

The rule (runner/model/spec.py, runner/_internal/files.py): a spec or lock is opened
with O_NONBLOCK, checked with fstat on the descriptor that is read (regular file only),
read to a bound, decoded as strict UTF-8, parsed by the strict YAML loader (scalar keys,
bounded depth, no non-finite numbers, JSON types only) or the strict JSON reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner.cli.main import main
from runner.errors import SpecError
from runner.model.spec import load_spec, load_spec_bytes, parse_spec
from runner.model.spec_yaml import MAX_SPEC_BYTES
from runner.model.lock import MAX_LOCK_BYTES, load_lock, parse_lock_bytes
from runner._internal.strict_json import load_json_strict

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits" / "eval.yaml"


def _one_line_error(exc: pytest.ExceptionInfo[SpecError], path: object) -> None:
    assert exc.value.exit_code == 2
    assert "\n" not in exc.value.message
    assert str(path) in exc.value.message


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "eval.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_spec(fifo)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock it before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("load_spec blocked on a FIFO")
    assert isinstance(outcome[0], SpecError)
    assert "FIFO" in outcome[0].message and str(fifo) in outcome[0].message


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_device_is_refused_without_reading_it(path: str) -> None:
    with pytest.raises(SpecError) as exc:
        load_spec(Path(path))
    _one_line_error(exc, path)
    assert "device" in exc.value.message


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as exc:
        load_spec(tmp_path)
    _one_line_error(exc, tmp_path)
    assert "directory" in exc.value.message


def test_a_huge_file_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "eval.yaml"
    with path.open("wb") as f:  # sparse: nothing is written, and nothing should be read
        f.truncate(10 * 1024**3)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    _one_line_error(exc, path)
    assert str(MAX_SPEC_BYTES) in exc.value.message


def test_a_lock_that_is_a_device_or_too_large_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as exc:
        load_lock(Path("/dev/zero"))
    _one_line_error(exc, "/dev/zero")
    big = tmp_path / "eval.lock.json"
    with big.open("wb") as f:
        f.truncate(MAX_LOCK_BYTES + 1)
    with pytest.raises(SpecError) as exc:
        load_lock(big)
    _one_line_error(exc, big)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"apiVersion: evalrun/v1\nkind: \xff\xfe\n", "not UTF-8"),
        (b"\xef\xbb\xbf\xff", "not UTF-8"),
        (b"? [a, b]\n: 1\n", "mapping key must be a plain scalar"),
        (b"? {a: 1}\n: 1\n", "mapping key must be a plain scalar"),
        (b"{[1, 2]: x}\n", "mapping key must be a plain scalar"),
        (b"a: " + b"[" * 200 + b"]" * 200 + b"\n", "nested deeper"),
        (b"a:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 120)), "nested deeper"),
        (b"x: .nan\n", "non-finite"),
        (b"x: [1.0, -.inf]\n", "non-finite"),
        (b"x: {y: .Inf}\n", "non-finite"),
        (b"x: 1.0e+999\n", "non-finite"),
        (b"x: 1" + b"9" * 5000 + b"\n", "malformed YAML"),
        (b"x: !!binary /w==\n", "not allowed"),
        (b"x: !!set {a}\n", "not allowed"),
        (b"x: !!python/name:os.system\n", "custom YAML tags"),
        (b"\x00\x01\x02", "malformed YAML"),
        (b"a: 1\n---\nb: 2\n", "exactly one YAML document"),
    ],
)
def test_hostile_spec_text_ends_in_one_named_spec_error(
    tmp_path: Path, data: bytes, expected: str
) -> None:
    path = tmp_path / "eval.yaml"
    path.write_bytes(data)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    _one_line_error(exc, path)
    assert expected in exc.value.diagnostics()


def test_dates_stay_text_and_a_valid_spec_still_loads() -> None:
    import yaml

    data = yaml.safe_load(EXAMPLE.read_text())
    data.setdefault("params", {})["released"] = "WHEN"
    text = yaml.safe_dump(data).replace("released: WHEN", "released: 2020-01-02")
    spec = load_spec_bytes(text.encode(), source="eval.yaml")
    assert spec.params["released"] == "2020-01-02"
    json.loads(spec.canonical_json())  # canonical JSON is plain JSON


def test_non_finite_numbers_given_as_data_are_refused_and_never_emitted() -> None:
    import yaml

    data = yaml.safe_load(EXAMPLE.read_text())
    data["params"] = {"alpha": float("nan"), "deep": [{"x": float("-inf")}]}
    with pytest.raises(SpecError) as exc:
        parse_spec(data, source="matrix cell")
    assert [loc for loc, _ in exc.value.problems] == ["params.alpha", "params.deep[0].x"]
    data["params"] = {}
    data["metrics"][0]["threshold"] = float("inf")
    with pytest.raises(SpecError):
        parse_spec(data, source="matrix cell")


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1E400",
        "1.0e+999",
        '{"a": [1, {"b": Infinity}]}',
        '{"a": 1, "a": 2}',
    ],
)
def test_strict_json_refuses_every_spelling_of_non_finite_and_duplicates(text: str) -> None:
    with pytest.raises(ValueError):
        load_json_strict(text)


def test_strict_json_refuses_deep_nesting_as_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        load_json_strict("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"schema": "evalrun/lock/v1", "x": NaN}',
        b'{"schema": "evalrun/lock/v1", "schema": "evalrun/lock/v1"}',
        b"[" * 50_000,
        b"\xff\xfe",
        b"1e999",
    ],
)
def test_hostile_lock_bytes_end_in_a_spec_error(raw: bytes) -> None:
    with pytest.raises(SpecError) as exc:
        parse_lock_bytes(raw, source="eval.lock.json")
    _one_line_error(exc, "eval.lock.json")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "dir", "bad-utf8"])
def test_cli_validate_exits_2_with_one_line(tmp_path: Path, target: str, capsys) -> None:
    if target == "fifo":
        path = tmp_path / "eval.yaml"
        os.mkfifo(path)
    elif target == "dir":
        path = tmp_path
    elif target == "bad-utf8":
        path = tmp_path / "eval.yaml"
        path.write_bytes(b"\xff")
    else:
        path = Path(target)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evalrun: error: ") and str(path) in err.splitlines()[0]
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # the file is named once, in the line


def test_cli_validate_of_dev_zero_does_not_hang_in_a_fresh_process() -> None:
    # the real command line, bounded by a timeout: a hang fails instead of stalling CI
    result = subprocess.run(
        [sys.executable, "-m", "runner.cli", "validate", "/dev/zero"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "device" in result.stderr
