"""Property tests over hostile input (hypothesis; the coverage-guided targets are tests/fuzz/).

The property everywhere: any input ends in a result or in an evalrun error whose exit code
is 2 or 3 and whose message is one line — never another exception, never a hang.
"""

from __future__ import annotations

import copy
import io
import json
import math
import sqlite3
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
from history_fixtures import BASE_PREDICATE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner._internal.sanitize import markdown_text, one_line, terminal_text
from runner._internal.strict_json import load_json_strict
from runner.backends.collect import extract_results_frame
from runner.bundle.run_records import record_from_predicate
from runner.errors import EvalrunError, SpecError
from runner.model.predicate import RunPredicate, parse_predicate
from runner.model.spec import parse_spec
from runner.model.spec_yaml import load_yaml_bytes
from runner.model.lock import parse_lock_bytes
from runner.render.html import render_html
from runner.render.markdown import metric_table, render_markdown
from runner.render.run_list import format_table
from runner.render.run_report import ReportData, render_markdown_full
from runner.shared.protocol import FrameError, decode_frame, encode_frame
from runner.workflows.diff import diff_runs, format_diff

pytestmark = pytest.mark.unit

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def one_line_error(exc: EvalrunError, codes: tuple[int, ...] = (2, 3)) -> None:
    assert exc.exit_code in codes, exc
    assert exc.message and "\n" not in exc.message, exc.message


# --- JSON values, including the odd ones --------------------------------------------------

ODD_NUMBERS = st.sampled_from(
    [0, -1, 2**63, -(2**63) - 1, 2**1023, 2**1100, 1e308, -1e308, 5e-324, 1.7976931348623157e308]
)
ODD_TEXT = st.sampled_from(
    ["", "\x1b[2J", "\r\n", "<script>", "\udcff", "x" * 10_000, "\u202e", "|", "NaN", "1e999"]
)
# the odd values first: hypothesis draws from the first alternatives more often
scalars = ODD_NUMBERS | ODD_TEXT | st.none() | st.booleans() | st.integers() | st.text(max_size=20)
scalars |= st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


PATHS = [p for p in _paths(BASE_PREDICATE) if p and p != ("run_id",)]


@st.composite
def mutated_predicates(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(BASE_PREDICATE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        node: Any = data
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    return data


def _render_everything(p: RunPredicate) -> list[str]:
    data = ReportData(
        predicate=p, lock={}, slice_field=None, slices=(), verification="v", bundle_digest=None
    )
    record = record_from_predicate("sha256:" + "0" * 64, Path("/nonexistent"), p)
    diff = diff_runs(p, p)
    base = RunPredicate.model_validate(BASE_PREDICATE)
    against = [diff_runs(base, p), diff_runs(p, base)]
    return [
        *(format_diff(d) for d in against),
        render_markdown(p),
        render_markdown_full(data),
        render_html(data),
        metric_table(p.metrics),
        format_table([record]),
        format_diff(diff),
        json.dumps(diff.as_dict(), default=str),
    ]


@FAST
@given(mutated_predicates())
def test_any_predicate_either_fits_the_model_or_is_one_integrity_error(data: dict) -> None:
    try:
        parsed = parse_predicate(data)
    except EvalrunError as exc:
        one_line_error(exc, (3,))
        return
    assert isinstance(parsed, RunPredicate)
    for text in _render_everything(parsed):
        assert "\x1b" not in terminal_text(text)


@FAST
@given(mutated_predicates())
def test_any_predicate_that_fits_can_be_indexed(data: dict) -> None:
    from runner.bundle.index import History
    from runner.bundle.store import Store

    try:
        parsed = parse_predicate(data)
    except EvalrunError:
        return
    with tempfile.TemporaryDirectory() as tmp:
        history = History(Store(Path(tmp)))
        record = record_from_predicate("sha256:" + "1" * 64, Path(tmp), parsed)
        with history._connect() as conn:
            conn.execute("SAVEPOINT x")
            try:
                history._insert(conn, record)
            except (sqlite3.InterfaceError, sqlite3.DataError, OverflowError, ValueError):
                pytest.fail(f"the index cannot store {record}")


# --- spec and lock bytes ---------------------------------------------------------------------

YAML_TOKENS = st.sampled_from(
    ["a", "b", ":", " ", "\n", "- ", "[", "]", "{", "}", ",", "?", "&x", "*x", "!!", "!!binary",
     ".nan", ".inf", "-.Inf", "1.0e+999", "9" * 50, "'", '"', "#", "---", "\t", "<<", "\xff",
     "apiVersion", "evalrun/v1", "params", "metrics", "2020-01-01", "~", "null", "true"]
)


@FAST
@given(st.lists(YAML_TOKENS, max_size=60).map("".join) | st.binary(max_size=300))
def test_any_spec_text_ends_in_a_spec_or_one_spec_error(text: str | bytes) -> None:
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    try:
        data = load_yaml_bytes(raw, source="eval.yaml")
        spec = parse_spec(data, source="eval.yaml")
    except SpecError as exc:
        one_line_error(exc, (2,))
        return
    # canonical JSON never holds a non-finite number
    load_json_strict(spec.canonical_json())


@FAST
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_lock_bytes_end_in_a_lock_or_one_spec_error(raw: bytes) -> None:
    try:
        lock = parse_lock_bytes(raw, source="eval.lock.json")
    except SpecError as exc:
        one_line_error(exc, (2,))
        return
    load_json_strict(lock.canonical_json())


@FAST
@given(st.text(max_size=80) | st.sampled_from(["1e400", "-1E+400", "[NaN]", '{"a":-Infinity}']))
def test_strict_json_returns_only_finite_numbers(text: str) -> None:
    try:
        value = load_json_strict(text)
    except ValueError:
        return

    def finite(v: Any) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, list):
            return all(finite(x) for x in v)
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        return True

    assert finite(value)


# --- the results frame -----------------------------------------------------------------------


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


names = st.sampled_from(["a", "b/c", "../x", "/abs", "a/../b", ".", "x" * 300, "ok.json", ""])


@FAST
@given(
    st.lists(st.tuples(names, st.binary(max_size=40)), max_size=4),
    st.integers(0, 64),
    st.sampled_from(["", "garbage\n", "-----END EVALRUN RESULTS-----\n"]),
)
def test_any_results_frame_is_unpacked_or_refused_with_problems(
    members: list[tuple[str, bytes]], cut: int, noise: str
) -> None:
    try:
        data = _tar(members)
    except (ValueError, tarfile.TarError):
        return
    text = noise + encode_frame(data)
    if cut:
        text = text[: max(0, len(text) - cut)]
    with tempfile.TemporaryDirectory() as tmp:
        collected = extract_results_frame(text, Path(tmp) / "out")
    assert collected.files or collected.problems or not members


@FAST
@given(st.text(max_size=400))
def test_decode_frame_raises_only_frame_errors(text: str) -> None:
    try:
        decode_frame(text)
    except FrameError as exc:
        assert "\n" not in str(exc)


# --- the sanitisers --------------------------------------------------------------------------


REORDERING = set("\u061c\u200e\u200f\u2028\u2029") | {chr(c) for c in range(0x202A, 0x202F)}
REORDERING |= {chr(c) for c in range(0x2066, 0x206A)}


@FAST
@given(st.text())
def test_sanitised_text_holds_no_control_character_and_is_stable(text: str) -> None:
    import unicodedata

    for shown in (terminal_text(text), one_line(text, limit=None), markdown_text(text, limit=None)):
        for c in shown:
            if c in "\n\t":
                continue
            assert unicodedata.category(c) not in ("Cc", "Cs") and c not in REORDERING, repr(c)
        shown.encode("utf-8")  # no lone surrogate left
    assert "\n" not in one_line(text)
    assert "<" not in markdown_text(text) and "\n" not in markdown_text(text)
    assert terminal_text(terminal_text(text)) == terminal_text(text)
