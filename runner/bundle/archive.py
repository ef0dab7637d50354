"""A bundle's ``.tar`` form: deterministic to write, refused when unsafe to read.

The one strict tar implementation lives in :mod:`runner._internal.tar`; this module
holds the bundle's rules for it (how many members) and what to do with a bundle tar.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from runner._internal.tar import (
    MemberRules,
    TarMember,
    extract_members,
    file_under_file,
    open_tar,
    scan_members,
    write_tree_tar,
)
from runner._internal.tree import remove_tree
from runner.errors import IntegrityError, UnsafeBundleEntry

# A bundle holds its payload (at most MAX_FILES results plus logs) and three metadata
# files; a tar with more members than this is not one the runner wrote.
MAX_TAR_MEMBERS = 100_000
BUNDLE_TAR_RULES = MemberRules(max_members=MAX_TAR_MEMBERS)


def write_bundle_tar(bundle_dir: Path, tar_path: Path) -> Path:
    """Write ``bundle_dir`` as a deterministic tar at ``tar_path`` (which must not exist).

    Regular files only, sorted by path, with mtime 0, uid/gid 0, empty owner
    names and mode 0644 (PAX format only where a long name needs it): the same
    bundle always gives the same bytes. Links and special files raise
    UnsafeBundleEntry; the partial tar is removed on failure.
    """
    return write_tree_tar(bundle_dir, tar_path)


def scan_tar(tar: tarfile.TarFile) -> tuple[list[TarMember], list[str]]:
    """Sort a bundle tar's members into readable regular files and problems (one per bad member).

    Accepts regular files and directories at safe paths (a leading ``./`` is
    allowed); refuses symlinks, hard links, devices, FIFOs, unsafe paths and
    duplicate names, each named in a problem (see :func:`runner._internal.tar.scan_members`).
    """
    return scan_members(tar, BUNDLE_TAR_RULES)


def open_bundle_tar(tar_path: Path) -> tarfile.TarFile:
    """Open an uncompressed bundle tar for reading; the caller closes it.

    Raises InputError naming the file if it is missing or not a tar.
    """
    return open_tar(tar_path, what="bundle tar")


def extract_bundle_tar(tar_path: Path, dest: Path) -> Path:
    """Extract a bundle tar into the new directory ``dest``, refusing anything unsafe.

    Every member is checked before anything is written: links, devices, unsafe
    paths and duplicates raise UnsafeBundleEntry (naming the first, listing all).
    Files are written 0644 under ``dest`` regardless of the modes and owners in
    the tar. ``dest`` is removed again if extraction fails.
    """
    try:
        with open_bundle_tar(tar_path) as tar:
            members, problems = scan_tar(tar)
            if problems:
                shown = "; ".join(problems[:3]) + (
                    f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                )
                raise UnsafeBundleEntry(
                    f"refusing to extract {tar_path.name}: {shown}",
                    path=str(tar_path),
                    reason=problems[0],
                )
            clash = file_under_file(members)
            if clash:
                raise UnsafeBundleEntry(
                    f"tar member {clash[0]!r} lies under the file {clash[1]!r}",
                    path=str(tar_path),
                    reason="file used as directory",
                )
            dest.mkdir(parents=True, exist_ok=False)
            try:
                extract_members(tar, members, dest)
            except BaseException:
                remove_tree(dest)
                raise
    except (tarfile.TarError, EOFError) as exc:
        # a truncated or damaged tar: one line, exit 3, nothing left behind
        raise IntegrityError(
            f"bundle tar {tar_path.name} is truncated or corrupt: {exc}", path=str(tar_path)
        ) from exc
    return dest
