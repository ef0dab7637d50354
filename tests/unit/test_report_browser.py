"""The HTML report in a real headless browser (chromium; installed by scripts/test-deps.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.cli.main import main
from runner.bundle.signing import generate_keypair, load_signer
from runner.bundle.store import Store

pytestmark = pytest.mark.unit

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: run scripts/test-deps.sh")
    profile = tmp_path / "profile"
    return subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_report_renders_in_a_headless_browser_without_fetching_anything(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub")
    stored = store_run(Store(home), load_signer(home / "keys" / "evalrun.key"), predicate())
    report = tmp_path / "report.html"
    assert main(["report", stored.run_id, "-o", str(report)]) == 0

    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the browser parsed the whole document, plots included
    assert "evalrun report — digits-logreg" in dom.stdout
    assert dom.stdout.count("<svg") == 2 and dom.stdout.count("<circle") == 2
    assert "Per-slice breakdown" in dom.stdout and "</html>" in dom.stdout

    shot = tmp_path / "shot.png"
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1000,1400", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a rendered page, not blank
    # no request leaves the page: the document's CSP forbids every fetch
    assert "default-src 'none'" in report.read_text()
