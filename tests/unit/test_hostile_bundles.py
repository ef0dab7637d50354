"""Every command that reads a bundle verifies it first and then reads only the bytes it verified.

The rule (runner/bundle/reader.py ``open_bundle``, runner/bundle/verify/
``VerifiedBundle.read_file``, runner/bundle/contents.py): a consumer gets the predicate
of the statement that was verified, and payload files only as their signed bytes (read
again link-free and bounded, then checked against the signed manifest). Not verifying
is asked for by name (``--no-verify``) and said on stderr and in every output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from history_fixtures import predicate, store_run

from runner.bundle.reader import UNVERIFIED, open_bundle
from runner.bundle.signing import Signer, Verifier, generate_keypair, load_signer, load_verifier
from runner.bundle.store import Store, StoredBundle
from runner.bundle.verify import verify_bundle
from runner.cli.main import main
from runner.errors import IntegrityError, UnsafeBundleEntry, VerificationFailed
from runner.workflows.rerun import load_original

pytestmark = pytest.mark.unit

A, B = "r-" + "a" * 24, "r-" + "b" * 24


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EVALRUN_HOME", str(home))
    (home / "keys").mkdir(parents=True)
    generate_keypair(home / "keys" / "evalrun.key", home / "keys" / "evalrun.pub", "ed25519")
    return home


def _signer(home: Path) -> Signer:
    return load_signer(home / "keys" / "evalrun.key")


def _verifier(home: Path) -> Verifier:
    return load_verifier(home / "keys" / "evalrun.pub")


def _writable(bundle: Path) -> None:
    for dirpath, _, filenames in os.walk(bundle):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            (Path(dirpath) / name).chmod(0o644)


@pytest.fixture
def two_runs(home: Path) -> tuple[StoredBundle, StoredBundle]:
    store = Store(home)
    a = store_run(store, _signer(home), predicate(run_id=A))
    b = store_run(store, _signer(home), predicate(run_id=B, **{"seeds.seed": 7}))
    return a, b


def _tamper_report(bundle: Path) -> None:
    _writable(bundle)
    data = json.loads((bundle / "eval.lock.json").read_text())
    data["base"]["ref"] = "evil"
    (bundle / "eval.lock.json").write_text(json.dumps(data))


# --- every consumer verifies first -------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "show", A],
        ["runs", "show", A, "--json"],
        ["report", A, "--format", "md"],
        ["report", A, "--format", "html"],
        ["diff", A, B],
        ["diff", B, A, "--json"],
        ["rerun", A, "--check"],
    ],
)
def test_a_tampered_bundle_is_refused_by_every_consumer_with_exit_3(
    two_runs: tuple[StoredBundle, StoredBundle], argv: list[str], capsys
) -> None:
    _tamper_report(two_runs[0].path)
    assert main(argv) == 3
    out, err = capsys.readouterr()
    if "--json" in argv:
        assert json.loads(out)["exit_code"] == 3
    else:
        assert out == ""  # nothing of the bundle was shown
        assert err.startswith("evalrun: error: bundle failed verification")
    assert "eval.lock.json" in out + err


def test_compare_refuses_a_group_with_a_run_that_does_not_verify(
    home: Path, capsys
) -> None:
    store = Store(home)
    a = store_run(store, _signer(home), predicate(run_id=A, comparison_group="g"))
    store_run(store, _signer(home), predicate(run_id=B, comparison_group="g"))
    _tamper_report(a.path)
    assert main(["compare", "g"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and A in err and "do not verify" in err


def test_no_verify_is_loud_on_stderr_and_in_the_output(
    two_runs: tuple[StoredBundle, StoredBundle], capsys
) -> None:
    _tamper_report(two_runs[0].path)
    assert main(["runs", "show", A, "--no-verify", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING: --no-verify" in err
    shown = json.loads(out)
    assert shown["verified"] is False and shown["verification"].startswith("NOT VERIFIED")
    assert main(["report", A, "--format", "md", "--no-verify"]) == 0
    out, err = capsys.readouterr()
    assert "verification: NOT VERIFIED (--no-verify)" in out and "WARNING" in err


def test_no_public_key_is_exit_2_naming_both_ways_out(home: Path, two_runs, capsys) -> None:
    (home / "keys" / "evalrun.pub").unlink()
    assert main(["runs", "show", A]) == 2
    err = capsys.readouterr().err
    assert "--pub" in err and "--no-verify" in err


# --- links and special files are never followed or read -----------------------------------


def test_a_link_to_an_outside_file_is_never_rendered(
    home: Path, two_runs, tmp_path: Path, capsys
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    bundle = two_runs[0].path
    _writable(bundle)
    (bundle / "eval.lock.json").unlink()
    (bundle / "eval.lock.json").symlink_to(secret)
    for argv in (["report", A, "--format", "md"], ["report", A, "--format", "md", "--no-verify"]):
        assert main(argv) == 3
        out, err = capsys.readouterr()
        assert "TOP-SECRET-CONTENT" not in out + err
        assert "symlink" in err


def test_a_fifo_in_a_bundle_is_never_opened_for_reading(home: Path, two_runs, capsys) -> None:
    bundle = two_runs[0].path
    _writable(bundle)
    (bundle / "results" / "predictions.jsonl").unlink()
    os.mkfifo(bundle / "results" / "predictions.jsonl")
    assert main(["report", A, "--format", "md"]) == 3  # verification: not a regular file
    assert main(["report", A, "--format", "md", "--no-verify"]) == 3  # never blocks either
    assert "not a regular file" in capsys.readouterr().err


def test_a_file_swapped_after_verification_is_not_used(home: Path, two_runs) -> None:
    bundle = two_runs[0].path
    verified = verify_bundle(bundle, _verifier(home))
    _writable(bundle)
    (bundle / "eval.lock.json").write_text('{"swapped": true}')
    with pytest.raises(IntegrityError, match="changed after the bundle was verified"):
        verified.read_file("eval.lock.json", max_bytes=1 << 20)
    (bundle / "eval.lock.json").unlink()
    (bundle / "eval.lock.json").symlink_to("/etc/hostname")
    with pytest.raises(UnsafeBundleEntry):
        verified.read_file("eval.lock.json", max_bytes=1 << 20)


def test_rerun_reads_spec_and_lock_only_as_their_signed_bytes(home: Path, two_runs) -> None:
    bundle = two_runs[0].path
    _writable(bundle)
    (bundle / "spec.yaml").unlink()
    (bundle / "spec.yaml").symlink_to("/dev/zero")
    with pytest.raises(VerificationFailed):
        load_original(bundle, _verifier(home))


def test_reads_are_bounded_by_what_the_caller_allows(home: Path, two_runs) -> None:
    opened = open_bundle(two_runs[0].path, _verifier(home))
    assert opened.read_optional("results/predictions.jsonl", max_bytes=10) is None
    assert opened.read_optional("results/absent.jsonl", max_bytes=10) is None
    assert opened.read_file("results/predictions.jsonl", max_bytes=1 << 20)


def test_an_opened_tar_reads_its_members_the_same_way(home: Path, two_runs, tmp_path) -> None:
    from runner.bundle.archive import write_bundle_tar

    tar = write_bundle_tar(two_runs[0].path, tmp_path / "a.tar")
    for trust in (_verifier(home), UNVERIFIED):
        opened = open_bundle(tar, trust)
        assert opened.predicate.run_id == A
        assert opened.read_file("eval.lock.json", max_bytes=1 << 20) == (
            two_runs[0].path / "eval.lock.json"
        ).read_bytes()


# --- very long references ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "show", "x" * 5000],
        ["runs", "show", "a/" * 2000],
        ["report", "y" * 300],
        ["diff", "z" * 100_000, "z"],
        ["rerun", "w" * 5000, "--check"],
        ["push", "v" * 5000],
        ["verify", "u" * 5000, "--key", "KEY"],
        ["verify", "127.0.0.1:5000/" + "r" * 5000 + "@sha256:" + "0" * 64, "--key", "KEY"],
        ["pull", "127.0.0.1:5000/" + "r/" * 3000 + "x@sha256:" + "0" * 64],
    ],
)
def test_very_long_references_are_exit_2_in_one_line(home: Path, argv: list[str], capsys) -> None:
    argv = [str(home / "keys" / "evalrun.pub") if a == "KEY" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "File name too long" not in err
    first = err.splitlines()[0]
    assert len(first) < 400


def test_a_copied_bundle_tar_of_another_run_still_verifies(home: Path, two_runs, tmp_path) -> None:
    # sanity: the rule does not refuse what it should accept
    copy = tmp_path / "copy"
    shutil.copytree(two_runs[1].path, copy)
    assert open_bundle(copy, _verifier(home)).predicate.run_id == B
