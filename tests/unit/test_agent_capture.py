"""The agent's package capture: importlib.metadata's answer, without importlib.metadata."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from runner.agent.capture import packages

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _importlib_packages(path: list[str]) -> list[dict[str, str]]:
    out = []
    for dist in importlib.metadata.distributions(path=path):
        record = dist.read_text("RECORD")
        out.append(
            {
                "name": dist.metadata["Name"] or "?",
                "version": dist.version or "",  # the capture says "" where importlib says None
                "record_sha256": hashlib.sha256(record.encode()).hexdigest() if record else "",
            }
        )
    return sorted(out, key=lambda p: (p["name"].lower(), p["version"]))


def test_the_capture_lists_what_importlib_metadata_lists_for_this_environment():
    found = packages()
    assert len(found) > 10
    assert found == _importlib_packages(sys.path)


def test_dist_info_egg_info_crlf_records_and_odd_entries(tmp_path):
    site = tmp_path / "site"
    crlf = site / "Alpha_Pkg-1.0.dist-info"
    crlf.mkdir(parents=True)
    # pip writes RECORD with csv's \r\n; importlib reads it with universal newlines
    (crlf / "METADATA").write_bytes(
        b"Metadata-Version: 2.1\r\nName: alpha-pkg\r\nVersion: 1.0\r\nSummary: x\r\n\r\n"
        b"Name: not-this\r\n"
    )
    (crlf / "RECORD").write_bytes(
        b"alpha/__init__.py,sha256=abc,10\r\nalpha-1.0.dist-info/RECORD,,\r\n"
    )
    egg = site / "beta.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.0\nname: Beta\nversion: 2.0b1\n")
    (site / "gamma.egg-info").write_text("Name: gamma\nVersion: 3\n")  # a single-file egg
    (site / "empty.dist-info").mkdir()  # no metadata at all
    fallback = site / "delta-4.dist-info"  # an empty METADATA: PKG-INFO is read instead
    fallback.mkdir()
    (fallback / "METADATA").write_text("")
    (fallback / "PKG-INFO").write_text("Name: delta\nVersion: 4\n\n" + "x" * 100_000)
    (site / "README.dist-info.txt").write_text("not a distribution")
    paths = [str(site), str(tmp_path / "missing"), str(tmp_path / "a.zip")]

    found = packages(paths)

    assert found == _importlib_packages(paths)
    assert [p["name"] for p in found] == ["?", "alpha-pkg", "Beta", "delta", "gamma"]
    assert (
        found[1]["record_sha256"]
        == hashlib.sha256(
            b"alpha/__init__.py,sha256=abc,10\nalpha-1.0.dist-info/RECORD,,\n"
        ).hexdigest()
    )


def test_the_agent_and_its_capture_do_not_import_importlib_metadata_or_the_email_parser():
    # (this environment has no torch: only torch's static view reads importlib.metadata)
    code = (
        "import sys, runner.agent.__main__ as agent; agent.capture_environment('x'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('email', 'zipfile', 'importlib') and m != 'importlib' and "
        "not m.startswith(('importlib._', 'importlib.machinery', 'importlib.util'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert proc.stdout.strip() == "[]"
