"""Build hook: the wheel carries the top-level images/ as package data runner/_images.

images/ stays the source of truth (the project layout is fixed); an installed evalrun
finds the copy through importlib.resources (runner.build.package_files.IMAGES_DIR).
Everything else about the package is declared in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

IMAGES = Path(__file__).resolve().parent / "images"


class BuildPyWithImages(build_py):
    """build_py that also copies images/ into the built package as runner/_images."""

    def run(self) -> None:
        super().run()
        # An editable install imports from the checkout, which reads images/ directly.
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "runner" / "_images"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(IMAGES, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithImages})
