"""The files of the evalrun package that images are made from, in a checkout or installed.

``images/`` (Dockerfile templates, base-image recipes) is read from the checkout, or from
``runner/_images`` inside an installed wheel (setup.py copies it there), or from
``$EVALRUN_IMAGES_DIR``. The agent files that go into every image are read from the
package itself, so an installed evalrun builds the same images as a checkout.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from pathlib import Path

import runner
from runner._internal.tree import sha256_file

# The runner package on disk: runner/ in a checkout, site-packages/runner when installed.
PACKAGE_DIR = Path(str(importlib.resources.files(runner))).resolve()
REPO_ROOT = PACKAGE_DIR.parent
# A wheel carries the top-level images/ as runner/_images (setup.py); a checkout reads images/.
_PACKAGED_IMAGES = PACKAGE_DIR / "_images"
IMAGES_DIR = Path(
    os.environ.get(
        "EVALRUN_IMAGES_DIR",
        _PACKAGED_IMAGES if _PACKAGED_IMAGES.is_dir() else REPO_ROOT / "images",
    )
)
# What goes into the image: the agent package (every module of it) and what it imports.
AGENT_FILES = (
    "__init__.py",
    *sorted(
        f"{package}/{p.name}"
        for package in ("agent", "shared")
        for p in (PACKAGE_DIR / package).glob("*.py")
        if p.is_file()
    ),
)


def agent_digest() -> str:
    """sha256 over the agent files that go into every image (path and content)."""
    h = hashlib.sha256(b"evalrun-agent/v1\n")
    for rel in AGENT_FILES:
        h.update(f"{rel} {sha256_file(PACKAGE_DIR / rel)}\n".encode())
    return h.hexdigest()
