"""The path rules and the tar dialect shared by every tar evalrun writes or reads.

Standard library only: the in-container agent writes its results frame with
:func:`file_header` and skips what :func:`member_name_reason` refuses, and the
host's strict reader (``runner._internal.tar``) applies the very same rules, so
what one side writes the other accepts.

Two tiers of one rule:

* :func:`path_structure_reason` — the structure every member name and every
  walked path must have: relative, normalized, never leaving its root;
* :func:`unsafe_path_reason` — that structure plus portable characters (no
  backslash, no control character, valid UTF-8): the names a signed bundle may
  carry. Image layers (a rootfs has names like ``system-systemd\\x2dfsck.slice``)
  and results frames only need the structure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tarfile  # imported where a header is made: the agent frames results only on pods

# Longer names cannot be created on extraction (PATH_MAX, NAME_MAX on Linux).
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
# Deeper trees are refused rather than walked or written (each level holds a directory fd).
MAX_DEPTH = 64


def _structure(path: str) -> str | None:
    if not path:
        return "empty path"
    if path.startswith("/"):
        return "absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "path contains '..'"
    if "." in parts or "" in parts:
        return "path has an empty or '.' component"
    return None


def path_structure_reason(path: str) -> str | None:
    """Why ``path`` is not a relative, normalized '/'-separated path, or None if it is.

    Refused: empty, absolute, any ``..``, empty or ``.`` component, NUL. Any other
    character is allowed.
    """
    reason = _structure(path)
    if reason is None and "\0" in path:
        return "path contains a NUL character"
    return reason


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` is not a safe bundle-relative POSIX path, or None if it is.

    Safe means: relative, '/'-separated, no empty, '.' or '..' components, no
    backslashes, NULs or control characters, and encodable as UTF-8.
    """
    reason = _structure(path)
    if reason:
        return reason
    if "\\" in path:
        return "path contains a backslash"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        return "path contains a control character"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid UTF-8"
    return None


def member_name_reason(name: str, *, portable: bool) -> str | None:
    """Why ``name`` may not be a tar member name, or None.

    The structure rule (``portable=False``) or the bundle rule (``portable=True``),
    and in both cases at most :data:`MAX_NAME_BYTES` in all,
    :data:`MAX_COMPONENT_BYTES` per component and :data:`MAX_DEPTH` directories deep.
    """
    reason = unsafe_path_reason(name) if portable else path_structure_reason(name)
    if reason:
        return reason
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_NAME_BYTES:
        return f"path is longer than {MAX_NAME_BYTES} bytes"
    if any(len(part) > MAX_COMPONENT_BYTES for part in encoded.split(b"/")):
        return f"a path component is longer than {MAX_COMPONENT_BYTES} bytes"
    if name.count("/") > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    return None


def member_name(member: tarfile.TarInfo) -> str:
    """A member's name as the rules see it: leading ``./`` and a directory's trailing '/' dropped.

    The tar's root directory entry (``.`` or ``./``) becomes ``""``; nothing is
    checked here (see :func:`member_name_reason`).
    """
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    if member.isdir():
        name = name.rstrip("/")
        if name == ".":
            return ""
    return name


def file_header(name: str, size: int) -> tarfile.TarInfo:
    """The header of a regular file in every tar evalrun writes: a pure function of name and size.

    mtime 0, mode 0644, uid/gid 0 and empty owner names, so the same files always
    give the same bytes (write with ``format=tarfile.PAX_FORMAT``: pax records
    appear only where a long or non-ASCII name needs them).
    """
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
