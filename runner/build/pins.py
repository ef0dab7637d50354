"""``evalrun lock --refresh-pins``: the declared sha256 pins of local inputs, from the files.

Editing a model means a new digest; pasting it by hand is error-prone. This recomputes the
digest of each local input (a file's sha256, a directory's tree digest: what ``evalrun
lock`` checks) and rewrites only the pin's scalar in the spec, in place: comments, order,
quoting and every other byte of the file stay as they were. Remote inputs (https, s3,
oci) are never fetched here; their pins stay as declared.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from runner._internal.input_tree import scan_tree
from runner._internal.tree import sha256_file
from runner.errors import InputError, SpecError
from runner.model.base import decoded_text, read_input_file
from runner.model.input_uri import LocalUri, parse_input_uri
from runner.model.spec import ArtifactSpec, DatasetSpec, load_spec_bytes
from runner.model.spec_yaml import MAX_SPEC_BYTES


@dataclass(frozen=True)
class PinChange:
    """One declared pin and what its input is now (``old == new``: already right).

    ``field`` is where the pin is (``model``, ``datasets[0]``); ``label`` adds the name.
    """

    field: str
    label: str
    path: Path
    old: str
    new: str

    @property
    def changed(self) -> bool:
        return _bare(self.old) != _bare(self.new)


@dataclass(frozen=True)
class PinRefresh:
    """What ``--refresh-pins`` found: each local pin, and the inputs it left alone."""

    pins: tuple[PinChange, ...]
    skipped: tuple[str, ...]

    @property
    def changes(self) -> tuple[PinChange, ...]:
        return tuple(p for p in self.pins if p.changed)


def _bare(digest: str) -> str:
    return digest.removeprefix("sha256:")


def local_digest(path: Path, field: str) -> str:
    """What ``evalrun lock`` checks a local input against: ``sha256:<hex>``."""
    if path.is_dir():
        return scan_tree(path, what=field).digest
    if path.is_file():
        return "sha256:" + sha256_file(path)
    raise InputError(f"{field}: input not found", path=str(path))


def _value_node(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next(
        (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None
    )


def _pin_nodes(root: yaml.Node | None) -> list[tuple[str, yaml.ScalarNode]]:
    """The scalar node of each input's ``sha256``, by field (``model``, ``datasets[i]``)."""
    found: list[tuple[str, yaml.ScalarNode]] = []
    model = _value_node(_value_node(root, "model"), "sha256")
    if isinstance(model, yaml.ScalarNode):
        found.append(("model", model))
    datasets = _value_node(root, "datasets")
    if isinstance(datasets, yaml.SequenceNode):
        for i, item in enumerate(datasets.value):
            pin = _value_node(item, "sha256")
            if isinstance(pin, yaml.ScalarNode):
                found.append((f"datasets[{i}]", pin))
    return found


def _spelled(node: yaml.ScalarNode, new: str) -> str:
    """``new`` written as the old pin was: same prefix convention, same quotes."""
    value = new if node.value.startswith("sha256:") else _bare(new)
    quote = node.style if node.style in ("'", '"') else ""
    return f"{quote}{value}{quote}"


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(mode)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refresh_pins(spec_path: Path, *, write: bool = True) -> PinRefresh:
    """Recompute each local input's digest and rewrite its ``sha256`` in ``spec_path``.

    Only the pin scalars change (a line-level edit; comments and formatting kept); the
    result must still be a valid spec holding the new pins, or nothing is written
    (SpecError). An input that is missing is an InputError naming it (exit 2).
    """
    source = str(spec_path)
    data = read_input_file(spec_path, what="spec file", max_bytes=MAX_SPEC_BYTES)
    spec = load_spec_bytes(data, source=source)
    text = decoded_text(data, what="spec file", source=source)
    spec_dir = spec_path.resolve().parent
    artifacts: dict[str, ArtifactSpec] = {"model": spec.model}
    artifacts |= {f"datasets[{i}]": d for i, d in enumerate(spec.datasets)}
    nodes = dict(_pin_nodes(yaml.compose(text, Loader=yaml.SafeLoader)))
    pins: list[PinChange] = []
    skipped: list[str] = []
    edits: list[tuple[int, int, str]] = []
    for field, artifact in artifacts.items():
        named = f"{field} ({artifact.name})" if isinstance(artifact, DatasetSpec) else field
        parsed = parse_input_uri(artifact.uri, field=f"{field}.uri")
        node = nodes.get(field)
        if not isinstance(parsed, LocalUri) or node is None:
            skipped.append(f"{named}: {artifact.uri} (remote: its pin is kept as declared)")
            continue
        path = parsed.resolve(spec_dir)
        pin = PinChange(field, named, path, artifact.sha256, local_digest(path, named))
        pins.append(pin)
        if pin.changed:
            edits.append((node.start_mark.index, node.end_mark.index, _spelled(node, pin.new)))
    result = PinRefresh(tuple(pins), tuple(skipped))
    if not edits or not write:
        return result
    for start, end, value in sorted(edits, reverse=True):
        text = text[:start] + value + text[end:]
    # the edited file must be the same spec with the new pins, or nothing is written
    edited = load_spec_bytes(text.encode("utf-8"), source=source)
    want = {p.field: _bare(p.new) for p in pins}
    have = {"model": _bare(edited.model.sha256)}
    have |= {f"datasets[{i}]": _bare(d.sha256) for i, d in enumerate(edited.datasets)}
    if any(have[f] != digest for f, digest in want.items()):
        raise SpecError(f"{source}: refreshing the pins would not leave the new digests in place")
    _write_atomically(spec_path, text)
    return result


def describe(refresh: PinRefresh) -> Sequence[str]:
    """One line per pin: changed (old → new), up to date, or left alone (remote)."""
    lines = [
        f"{p.label}: sha256 {_bare(p.old)[:12]}… → {_bare(p.new)} ({p.path})"
        if p.changed
        else f"{p.label}: sha256 {_bare(p.new)[:12]}… up to date"
        for p in refresh.pins
    ]
    return lines + [f"{s}" for s in refresh.skipped]


__all__ = ["PinChange", "PinRefresh", "describe", "local_digest", "refresh_pins"]
