"""Fuzz target: the results frame and what the runner reads of the container's results.

The first byte picks the mode: ``F`` — the rest is a tar, sent as a well-formed frame
(so the fuzzer reaches the tar reader past the checksum); anything else — the rest is
pod log text, decoded as it is. A frame that unpacks is then read as the runner does:
metrics recomputed from ``predictions.jsonl``, the container's reports read. Property:
problems are reported as lists of one-line strings; nothing raises.
"""

from __future__ import annotations

from harness import scratch

from runner._internal.tree import remove_tree
from runner.backends.collect import extract_results_frame, recompute_metrics
from runner.model.spec_metrics import MetricSpec, PerturbationSpec
from runner.shared.protocol import encode_frame
from runner.workflows.judge import read_container_report

NAME = "frame"
_DIR = scratch(NAME)
_OUT = _DIR / "results"
# the definitions as the runner passes them: the spec's models, dumped
_DEFINITIONS = [
    MetricSpec.model_validate(m).model_dump(mode="json")
    for m in (
        {"name": "accuracy", "compute": "accuracy", "ci": {"method": "wilson"}},
        {"name": "f1", "compute": "macro_f1", "ci": {"resamples": 100}},
        {"name": "score", "compute": "mean", "field": "score", "ci": {"resamples": 100}},
    )
]
_PERTURBATIONS = [
    PerturbationSpec.model_validate(p).model_dump(mode="json")
    for p in (
        {"name": "half", "kind": "subsample", "fraction": 0.5, "seed": 1},
        {"name": "ones", "kind": "slice", "field": "label", "value": 1},
        {"name": "noisy", "kind": "noise", "std": 0.1},
    )
]


def test_one_input(data: bytes) -> None:
    mode, body = data[:1], data[1:]
    text = encode_frame(body) if mode == b"F" else body.decode("utf-8", "replace")
    if _OUT.exists():
        remove_tree(_OUT)
    collected = extract_results_frame(text, _OUT)
    for problem in collected.problems:
        assert isinstance(problem, str) and "\n" not in problem, problem
    if not collected.files:
        return
    check = recompute_metrics(_OUT, _DEFINITIONS, seed=1, perturbations=_PERTURBATIONS)
    for problem in check.problems:
        assert isinstance(problem, str), problem
    read_container_report(_OUT)


def seeds() -> dict[str, bytes]:
    from seeds import results_tar

    tar = results_tar()
    return {
        "results-tar": b"F" + tar,
        "framed-log": b"L" + ("log line\n" + encode_frame(tar)).encode(),
    }
