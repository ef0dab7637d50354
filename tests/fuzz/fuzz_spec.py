"""Fuzz target: the spec and lock loaders (``eval.yaml``, ``eval.lock.json``), from a file.

The first byte picks the loader (``L``: the lock, anything else: the spec); the rest is
the file. Property: a spec or lock, or SpecError (exit 2) in one line; a spec that loads
has canonical JSON that the strict reader accepts (no NaN/Infinity ever emitted).
"""

from __future__ import annotations

from harness import check, scratch

from runner._internal.strict_json import load_json_strict
from runner.model.spec import load_spec
from runner.model.lock import load_lock

NAME = "spec"
_DIR = scratch(NAME)
_FILE = _DIR / "eval.yaml"


def test_one_input(data: bytes) -> None:
    which, body = data[:1], data[1:]
    _FILE.write_bytes(body)
    if which == b"L":
        lock = check(load_lock, _FILE, allowed=(2,))
        if lock is not None:
            load_json_strict(lock.canonical_json())
        return
    spec = check(load_spec, _FILE, allowed=(2,))
    if spec is not None:
        load_json_strict(spec.canonical_json())
        spec.digest()


def seeds() -> dict[str, bytes]:
    from seeds import SPEC

    lock = b'{"schema": "evalrun/lock/v1", "spec_name": "x", "wheels": [], "base": null}'
    return {"example-spec": b"S" + SPEC, "lock": b"L" + lock, "flow": b"S{a: [1, 2.5, .nan]}"}
