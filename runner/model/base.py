"""What the spec and lock models share: the frozen base, field types, digest references,
the one way a validation error becomes ``(field, message)`` lines, and the bounded,
strict reading of the files a user names (spec, lock, matrix)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, GetPydanticSchema, StringConstraints, ValidationError
from pydantic_core import core_schema

from runner._internal.files import RefusedFile, read_regular_file
from runner.errors import SpecError

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")]
# A field typed by a shared TypedDict (runner.shared.definitions) that a model carries as
# the plain JSON object it is: pydantic checks and writes it exactly as ``dict[str, Any]``
# (every key kept, no value converted, so plans keep their bytes), mypy sees its fields.
AS_JSON_OBJECT = GetPydanticSchema(
    lambda _source, _handler: core_schema.dict_schema(
        core_schema.str_schema(), core_schema.any_schema()
    )
)
DIGEST_REF_RE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._:/-][a-z0-9]+)*)@(?P<digest>sha256:[0-9a-f]{64})$"
)


def parse_digest_ref(ref: str) -> tuple[str, str]:
    """Split ``repo@sha256:…`` into (repo, digest); raise ValueError for anything else."""
    match = DIGEST_REF_RE.match(ref)
    if not match:
        if "@" not in ref:
            raise ValueError(
                f"image reference {ref!r} is not pinned by digest; expected repo@sha256:<64 hex>"
            )
        raise ValueError(f"image reference {ref!r} is not of the form repo@sha256:<64 hex>")
    return match["repo"], match["digest"]


class FrozenModel(BaseModel):
    """Frozen, and unknown keys are errors: once built, a model is well-formed."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Walk ``loc`` through nested pydantic models; None when it leaves models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = info.annotation
        args = getattr(current, "__args__", ())
        for arg in (current, *args):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_errors(model: type[BaseModel], exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        where = where or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            key = str(loc[-1])
            msg = f"unknown field {key!r}"
            if parent is not None:
                close = difflib.get_close_matches(key, _field_names(parent), n=1, cutoff=0.5)
                if close:
                    msg += f"; did you mean {close[0]!r}?"
                else:
                    msg += f"; expected one of {sorted(_field_names(parent))}"
            problems.append((where, msg))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("missing",):
            found = err["input"]
            shown = repr(found)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            msg = f"{msg} (found {type(found).__name__} {shown})"
        problems.append((where, msg))
    return problems


def read_input_file(path: Path, *, what: str, max_bytes: int) -> bytes:
    """The bytes of a spec, lock or matrix file the user named, bounded and never blocking.

    SpecError (exit 2) naming the file when it is missing, not a regular file (a
    directory, FIFO or device), larger than ``max_bytes`` or unreadable.
    """
    try:
        return read_regular_file(path, max_bytes=max_bytes)
    except FileNotFoundError:
        raise SpecError(f"{what} not found: {path}", file=str(path)) from None
    except NotADirectoryError:
        raise SpecError(f"{what} not found: {path}", file=str(path)) from None
    except RefusedFile as exc:
        if "limit" in exc.reason:
            raise SpecError(f"{what} {path} {exc.reason}", file=str(path)) from None
        raise SpecError(f"cannot read {what} {path}: {exc.reason}", file=str(path)) from None


def decoded_text(data: bytes, *, what: str, source: str) -> str:
    """``data`` as UTF-8 text; SpecError naming ``source`` and the first bad byte."""
    try:
        return data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{what} {source} is not UTF-8 text "
            f"(byte 0x{data[exc.start]:02x} at offset {exc.start})",
            file=source,
        ) from None
