"""Offline verification of evalrun bundles.

:func:`verify_bundle` reads a bundle (directory or ``.tar``) without following any
link, then runs a fixed list of small checks over what it read. Each check
reports how many things it compared and every problem it found; a check whose
inputs could not be read reports that as a problem, so no check passes without
having checked something. The bundle is valid only if every check ran and found
nothing. There is no option to skip a check.

The chain of trust: the DSSE signature (by the given key, or by the keyring key
its keyid selects) covers statement.json; its subjects pin manifest.json and
every payload file by sha256; the manifest must list exactly the files present,
with the digests the runner recomputes. ``envelope.sigstore.json``, where present,
must restate exactly that envelope (bundles sealed before it existed have none).

The package, by responsibility: :mod:`~runner.bundle.verify.facts` (reading a bundle,
link-free and bounded), :mod:`~runner.bundle.verify.checks` (the checks) and
:mod:`~runner.bundle.verify.verdict` (:func:`verify_bundle` and its result). Import
from here.
"""

from runner.bundle.verify.checks import CHECKS
from runner.bundle.verify.verdict import CheckReport, VerifiedBundle, verify_bundle

__all__ = ["CHECKS", "CheckReport", "VerifiedBundle", "verify_bundle"]
