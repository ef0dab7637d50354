"""Every crash the fuzzers (tests/fuzz/) and property tests found, pinned as a unit test.

Each case is the smallest input that crashed, with the rule that now holds for it:
an evalrun error with exit code 2 or 3 and a one-line message.
"""

from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from history_fixtures import BASE_PREDICATE

from runner.backends.collect import extract_results_frame
from runner.bundle.archive import extract_bundle_tar
from runner.bundle.signing import Signer
from runner.bundle.verify import verify_bundle
from runner.errors import EvalrunError
from runner.model.predicate import RunPredicate, parse_predicate
from runner.render.markdown import metric_table, render_markdown
from runner.shared.protocol import FrameError, decode_frame, encode_frame

pytestmark = pytest.mark.unit


def _pax_tar(headers: dict[str, str], data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size = len(data)
        info.pax_headers = headers
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SPARSE_1_0 = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "f"}

# tar headers that made tarfile raise ValueError (not TarError) from inside its iteration
ODD_TARS = {
    "gnu-sparse-1.0-map-cut-short": _pax_tar(
        {**SPARSE_1_0, "GNU.sparse.realsize": "100000000000"}, b"99999999999\n1\n"
    ),
    "gnu-sparse-1.0-map-not-numbers": _pax_tar(
        {**SPARSE_1_0, "GNU.sparse.realsize": "10"}, b"zz\n"
    ),
    "gnu-sparse-0.0-map-not-numbers": _pax_tar({"GNU.sparse.map": "a,b,c"}),
    "pax-size-beyond-any-offset": _pax_tar({"size": "9" * 30}),
}


def _one_line(exc: EvalrunError) -> None:
    assert exc.exit_code in (2, 3) and "\n" not in exc.message


@pytest.mark.parametrize("name", sorted(ODD_TARS))
def test_odd_tar_headers_end_in_one_line_errors(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.tar"
    path.write_bytes(ODD_TARS[name])
    verifier = Signer.from_private_key(ed25519.Ed25519PrivateKey.generate()).verifier()
    with pytest.raises(EvalrunError) as exc:
        verify_bundle(path, verifier)
    _one_line(exc.value)
    with pytest.raises(EvalrunError) as exc:
        extract_bundle_tar(path, tmp_path / "out")
    _one_line(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(ODD_TARS))
def test_odd_tar_headers_in_a_results_frame_are_collection_problems(
    tmp_path: Path, name: str
) -> None:
    collected = extract_results_frame(encode_frame(ODD_TARS[name]), tmp_path / "out")
    assert collected.problems and not collected.files


def test_a_confidence_level_beyond_any_percent_renders_as_unknown() -> None:
    data = copy.deepcopy(BASE_PREDICATE)
    data["metrics"][0]["ci"]["level"] = 1e308  # int(level * 100) overflowed
    predicate = parse_predicate(data)
    assert isinstance(predicate, RunPredicate)
    assert "[0.9000, 0.9467] (?% bootstrap_percentile)" in metric_table(predicate.metrics)
    render_markdown(predicate)


@pytest.mark.parametrize("value", [2**1100, -(2**1100)])
def test_numbers_no_float_can_hold_do_not_fit_the_predicate(value: int) -> None:
    data = copy.deepcopy(BASE_PREDICATE)
    data["metrics"][0]["value"] = value  # float(value) overflowed in the index and renderers
    with pytest.raises(EvalrunError) as exc:
        parse_predicate(data)
    assert exc.value.exit_code == 3 and "metrics.0.value" in exc.value.message


def test_counts_beyond_64_bits_do_not_fit_the_predicate() -> None:
    data = copy.deepcopy(BASE_PREDICATE)
    data["attempt"] = 2**70  # SQLite cannot store it: the index sync crashed
    with pytest.raises(EvalrunError, match="attempt"):
        parse_predicate(data)


@pytest.mark.parametrize(
    "header",
    [
        "-----BEGIN EVALRUN RESULTS sha256=" + "0" * 64 + " bytes=" + "9" * 5000 + "-----",
        "-----BEGIN EVALRUN RESULTS sha256=" + "0" * 64 + " bytes=99999999999999999999-----",
    ],
)
def test_a_frame_header_with_an_absurd_size_is_a_frame_error(header: str) -> None:
    with pytest.raises(FrameError) as exc:
        decode_frame(f"{header}\nAAAA\n-----END EVALRUN RESULTS-----\n")
    assert "\n" not in str(exc.value)


def test_a_statement_that_does_not_fit_is_one_line_when_read_unverified(tmp_path: Path) -> None:
    # fuzz_bundle: "unreadable bundle: 1 validation error for Statement\npredicateType\n  …"
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
    from seeds import bundle_dir

    from runner.bundle.reader import UNVERIFIED, open_bundle

    bundle = bundle_dir(tmp_path)
    statement = (bundle / "statement.json").read_text()
    (bundle / "statement.json").write_text(statement.replace("EvalRun/v1", "EvlauRn/v1"))
    with pytest.raises(EvalrunError) as exc:
        open_bundle(bundle, UNVERIFIED)
    _one_line(exc.value)
    assert "predicateType" in exc.value.message


def test_every_evalrun_error_message_is_one_line() -> None:
    # the rule behind the case above, for any text (an SDK's, a bundle's) put in a message
    error = EvalrunError("first\nsecond\r\nthird")
    assert error.message == "first\\nsecond\\r\\nthird"
