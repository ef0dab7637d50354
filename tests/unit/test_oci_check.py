"""`build --check` reports: rendering, the lock record, what a bundle learns of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.build.image import image_reproducibility
from runner.build.reproducibility import format_check_report, record_reproducibility
from runner.model.lock import load_lock

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMG = "127.0.0.1:5000/evalrun/digits-logreg@sha256:" + "a" * 64
REBUILT = "127.0.0.1:5000/evalrun/digits-logreg@sha256:" + "b" * 64


def _report(**over) -> dict:
    report = {
        "result": "differs", "image_identical": False, "locked_image": IMG,
        "rebuilt_image": REBUILT, "base_identical": False, "from_scratch": True,
        "package_drift": [{"package": "libc6:amd64", "expected": "2.36-9+deb12u9",
                           "found": "2.36-9+deb12u14"}],
        "inputs_changed": [], "rootfs_identical": False, "rebuilt_rootfs": "sha256:" + "c" * 64,
        "layers": [{"index": 1, "expected": "sha256:1", "found": "sha256:2"}],
        "files": [{"path": "/usr/lib/x.so", "change": "changed", "fields": ["sha256", "size"],
                   "expected": {"sha256": "1", "size": 1}, "found": {"sha256": "2", "size": 2}},
                  {"path": "/opt/new", "change": "added", "found": {}}],
        "config": [{"field": "config.Env", "expected": ["A=1"], "found": ["A=2"]}],
        "seconds": 12.5, "checked_at": "2026-11-26T13:00:00+00:00",
    }
    report.update(over)
    return report


def test_report_names_files_fields_packages_and_config():
    text = "\n".join(format_check_report(_report()))
    assert "image   DIFFERS" in text and "base    DIFFERS (fresh mmdebstrap)" in text
    assert "libc6:amd64: 2.36-9+deb12u9 → 2.36-9+deb12u14" in text
    assert "changed  /usr/lib/x.so" in text and "size: 1 → 2" in text
    assert "added    /opt/new" in text
    assert "config  config.Env: ['A=1'] → ['A=2']" in text


def test_report_is_short_when_identical():
    text = format_check_report(_report(result="identical", image_identical=True,
                                       base_identical=True, package_drift=[],
                                       rootfs_identical=True, layers=[], files=[], config=[]))
    assert text[0] == "image   identical" and not any("files" in line for line in text)


def _lock_file(tmp_path: Path) -> Path:
    lock = {
        "schema": "evalrun/lock/v1", "spec_name": "digits-logreg",
        "spec_digest": "sha256:" + "0" * 64, "base": None, "wheels": [],
        "image": {"ref": IMG, "rootfs_digest": "sha256:" + "d" * 64},
        "model": {"path": "m", "sha256": "1" * 64, "size": 1}, "datasets": [],
        "source": {"commit": None, "dirty": False, "tree_sha256": "2" * 64},
    }
    (tmp_path / "eval.lock.json").write_text(json.dumps(lock))
    return tmp_path / "eval.yaml"


def test_check_result_is_recorded_in_the_lock_for_the_bundle(tmp_path):
    spec = _lock_file(tmp_path)
    assert image_reproducibility(load_lock(tmp_path / "eval.lock.json")).to_json() == {
        "checked": False, "assembly": None}
    updated = record_reproducibility(spec, _report())
    assert load_lock(tmp_path / "eval.lock.json") == updated
    info = image_reproducibility(updated).to_json()  # the JSON a bundle signs
    assert info["checked"] is True and info["result"] == "differs"
    assert info["checked_at"] == "2026-11-26T13:00:00+00:00"
    assert info["rebuilt_ref"] == REBUILT and info["differences"] == 3
    assert info["from_scratch"] is True and info["base_identical"] is False


def test_a_report_for_another_image_is_not_recorded(tmp_path):
    spec = _lock_file(tmp_path)
    with pytest.raises(Exception, match="changed while it was being checked"):
        record_reproducibility(spec, _report(locked_image=REBUILT))
