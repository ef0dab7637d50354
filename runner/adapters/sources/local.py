"""Local inputs: a file or directory next to the spec, always re-hashed.

A local input is hashed where it lies (a file by its sha256, a directory by its
``evalrun-input-tree/v1`` digest) and checked against the pinned digest before any byte
is copied into the cache; only the bytes the cache lacks are copied, verified by content,
so an edited file is reported instead of silently replaced by its cached old bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from runner._internal.cas import ContentStore
from runner._internal.input_tree import (
    hash_file,
    scan_tree,
)
from runner.adapters.sources.transfer import (
    AcquiredInput,
    Meter,
    digest_mismatch,
    file_result,
    tree_result,
)
from runner.errors import (
    InputError,
)
from runner.model.input_uri import (
    LocalUri,
)


def acquire_local(
    uri: LocalUri, want: str, *, field: str, spec_dir: Path, store: ContentStore, meter: Meter
) -> AcquiredInput:
    """The local file or directory, re-hashed and checked against ``want``, then cached."""
    path = uri.resolve(spec_dir)
    source = Path(os.path.relpath(path, spec_dir)).as_posix()
    hint = "the input changed since its digest was pinned; check its origin"
    if path.is_dir():
        tree = scan_tree(path, what=field)
        meter.grow(tree.size)
        meter.advance(tree.size)
        if tree.digest != want:
            raise digest_mismatch(
                field,
                want,
                tree.digest,
                str(path),
                hint + " (a directory is pinned by its evalrun-input-tree/v1 digest)",
            )
        if store.tree_files(want) is None:
            unique = {f.sha256: f for f in tree.files if not store.has_blob(f.sha256)}
            meter.grow(sum(f.size for f in unique.values()))
            for f in unique.values():
                # Verified by content, so a path swapped since the scan cannot smuggle bytes in.
                store.put_file(
                    path.joinpath(*f.path.split("/")),
                    what=f"{field}: {f.path}",
                    expected=f.sha256,
                    on_bytes=meter.advance,
                )
            store.materialize_tree(tree.files, what=field)
        return tree_result(store, want, tree.files, source=source)
    if path.is_file():
        try:
            found, size = hash_file(path)
        except OSError as exc:
            raise InputError(f"{field}: cannot read input file ({exc})", path=str(path)) from None
        meter.grow(size)
        meter.advance(size)
        if f"sha256:{found}" != want:
            raise digest_mismatch(field, want, f"sha256:{found}", str(path), hint)
        if not store.has_blob(want):
            meter.grow(size)
            store.put_file(path, what=field, expected=want, on_bytes=meter.advance)
        return file_result(store, want, name=Path(uri.path).name, source=source)
    if path.exists():
        raise InputError(f"{field}: not a regular file or directory", path=str(path))
    raise InputError(f"{field}: input not found", path=str(path), uri=uri.path)
