"""The two recorded tree-digest layouts: values pinned as the code before the merge gave them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner._internal.tree import TreeDigestFormat, digest_tree
from runner.build.context import tree_digest
from runner.build.preprocessing import code_digest
from runner.errors import InputError

pytestmark = pytest.mark.unit

FILES = {
    "a-c": b"dash",
    "a/b": b"slash",
    "a/c/d.py": b"print(1)\n",
    ".hidden": b"h",
    "run.sh": b"#!/bin/sh\n",
    "__pycache__/x.cpython-311.pyc": b"pyc",
    "pkg/__pycache__/y.pyc": b"pyc2",
    "pkg/mod.pyc": b"stray",
    "pkg/.pyc": b"dotpyc",
    "pkg/mod.py": b"x = 1\n",
    "Z": b"upper",
    "é/ü.txt": "ü".encode(),
    "sp ace": b"s",
    "a.b/c": b"dot",
    "a0": b"zero",
}

# Computed by image.tree_digest and provenance.code_digest as they were before both
# moved onto runner._internal.tree (commit db9e3c9); locks and bundles hold such values.
BUILD_CONTEXT = "a190bf285f987dec51abc37285b8b357079bc65fd6c984bac4749d41a9db3159"
CODE = "sha256:b1ac9f7f301721caeacfab120307f24b0deef8426274102a506b2f8cf1df35e1"
EMPTY = "785d0bdfcf140eab3e1ef0b9640666abc0f84289174c8dea5da7ce8dd4c924c8"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    for rel, data in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "run.sh").chmod(0o755)
    (root / "empty-dir").mkdir()
    os.mkfifo(root / "pkg" / "fifo")  # skipped unread, as before
    return root


def test_build_context_digest_keeps_its_recorded_value(tree: Path) -> None:
    assert tree_digest(tree) == BUILD_CONTEXT
    assert digest_tree(tree, TreeDigestFormat.BUILD_CONTEXT, what="x") == BUILD_CONTEXT
    assert tree_digest(tree / "empty-dir") == EMPTY


def test_code_digest_keeps_its_recorded_value(tree: Path) -> None:
    assert code_digest(tree) == CODE
    assert code_digest(tree / "empty-dir") == "sha256:" + EMPTY
    assert code_digest(tree / "a" / "c" / "d.py") == (
        "sha256:cc42155088fca5730758db72b2a5bca33112a941dfaa2d43098ec422ce4ea213"
    )


def test_build_context_digest_sees_the_executable_bit(tree: Path) -> None:
    (tree / "run.sh").chmod(0o644)
    assert tree_digest(tree) != BUILD_CONTEXT
    assert code_digest(tree) == CODE  # the code layout never recorded modes


def test_both_layouts_refuse_a_symlink_anywhere_below_the_root(tree: Path) -> None:
    (tree / "pkg" / "shared.py").symlink_to(tree / "a" / "c" / "d.py")
    with pytest.raises(InputError, match="build context contains a symlink: pkg/shared.py"):
        tree_digest(tree)
    with pytest.raises(InputError, match="preprocessing code contains a symlink: pkg/shared.py"):
        code_digest(tree)


def test_a_symlinked_directory_is_refused_not_walked(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    (tree / "linked").symlink_to(outside)
    with pytest.raises(InputError, match="symlink: linked"):
        tree_digest(tree)


def test_absurd_nesting_is_a_clean_input_error(tmp_path: Path) -> None:
    deep = tmp_path.joinpath("ctx", *["d"] * 70)
    deep.mkdir(parents=True)
    (deep / "f").write_text("x")
    with pytest.raises(InputError, match="nested deeper than 64 levels"):
        tree_digest(tmp_path / "ctx")
