"""Fuzz target: bundle verification (tar and directory form) and the unverified reader.

The input is a bundle ``.tar``. It is verified as a tar; if the strict extractor takes
it, the directory is verified too, then opened unverified (``--no-verify``) and its
report rendered in Markdown and HTML — the paths every consumer takes. Property: a
verified bundle or an evalrun error with exit 2 or 3 in one line.
"""

from __future__ import annotations

from harness import check, fuzz_verifier, scratch

from runner._internal.tree import remove_tree
from runner.bundle.archive import extract_bundle_tar
from runner.bundle.reader import UNVERIFIED, open_bundle
from runner.bundle.verify import verify_bundle
from runner.model.predicate import RunPredicate
from runner.render.html import render_html
from runner.render.run_report import load_report_data, render_markdown_full

NAME = "bundle"
_DIR = scratch(NAME)
_TAR = _DIR / "bundle.tar"
_OUT = _DIR / "extracted"
_VERIFIER = fuzz_verifier()


def _show(path: object) -> None:
    opened = open_bundle(_OUT, UNVERIFIED)
    if isinstance(opened.predicate, RunPredicate):
        data = load_report_data(opened)
        render_markdown_full(data)
        render_html(data)


def test_one_input(data: bytes) -> None:
    _TAR.write_bytes(data)
    check(verify_bundle, _TAR, _VERIFIER)
    if _OUT.exists():
        remove_tree(_OUT)
    if check(extract_bundle_tar, _TAR, _OUT) is None:
        return
    check(verify_bundle, _OUT, _VERIFIER)
    check(_show, _OUT)


def seeds() -> dict[str, bytes]:
    from seeds import bundle_tar

    return {"signed-bundle": bundle_tar()}
