"""The checks of bundle verification: small pure functions of :class:`BundleFacts`.

Each check returns how many things it compared and every problem it found; a check whose
inputs could not be read reports that as a problem, so none passes without having
checked something. :data:`CHECKS` is the fixed list :func:`verify_bundle` runs, in order;
there is no option to skip one.
"""

from __future__ import annotations

from collections.abc import Callable

from runner._internal.sanitize import one_line
from runner.bundle.metadata import (
    ENVELOPE_NAME,
    MANIFEST_NAME,
    METADATA_NAMES,
    SIGSTORE_BUNDLE_NAME,
    STATEMENT_NAME,
    Statement,
    load_json_strict,
)
from runner.bundle.signing import (
    TrustedKeys,
    b64_decode_canonical,
    sigstore_bundle,
)
from runner.bundle.verify.facts import BundleFacts, pinned_sizes, sha256_hex


def _decoded_sigstore(bundle: object, problems: list[str]) -> object:
    """The Sigstore bundle with its base64 fields decoded (either DSSE alphabet says the same);
    a field that does not decode is kept as text and named in ``problems``."""
    if not isinstance(bundle, dict) or not isinstance(bundle.get("dsseEnvelope"), dict):
        return bundle
    envelope = dict(bundle["dsseEnvelope"])

    def decode(text: object, where: str) -> object:
        if not isinstance(text, str):
            return text
        try:
            return b64_decode_canonical(text)
        except ValueError as exc:
            problems.append(f"dsseEnvelope.{where} is {exc}")
            return text

    envelope["payload"] = decode(envelope.get("payload"), "payload")
    if isinstance(envelope.get("signatures"), list):
        envelope["signatures"] = [
            {**sig, "sig": decode(sig.get("sig"), f"signatures[{i}].sig")}
            if isinstance(sig, dict)
            else sig
            for i, sig in enumerate(envelope["signatures"])
        ]
    return {**bundle, "dsseEnvelope": envelope}


# --- the checks ---------------------------------------------------------------------

_Check = Callable[[BundleFacts, TrustedKeys], tuple[int, list[str]]]


def _check_layout(facts: BundleFacts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """Every entry is a regular file or directory at a safe relative path."""
    problems = list(facts.layout_problems)
    for name in METADATA_NAMES:
        if name not in facts.raw and name in facts.raw_problems:
            problems.append(facts.raw_problems[name])
    return facts.entry_count, problems


def _check_signature(facts: BundleFacts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """The envelope carries exactly one signature, by a trusted key, over the in-toto payload;
    the Sigstore bundle, if there is one, restates exactly that envelope."""
    if facts.envelope is None:
        if ENVELOPE_NAME not in facts.raw:
            return 0, [facts.raw_problems.get(ENVELOPE_NAME, f"{ENVELOPE_NAME}: missing")]
        return 0, [facts.envelope_problem or f"{ENVELOPE_NAME}: not readable"]
    problems = list(facts.signature_problems)
    signatures = facts.envelope.get("signatures")
    if isinstance(signatures, list) and len(signatures) != 1:
        problems.append(
            f"{ENVELOPE_NAME}: carries {len(signatures)} signatures; "
            "an evalrun bundle carries exactly one"
        )
    problems.extend(_sigstore_problems(facts))
    return 1, problems


def _sigstore_problems(facts: BundleFacts) -> list[str]:
    if SIGSTORE_BUNDLE_NAME in facts.raw_problems:
        return [facts.raw_problems[SIGSTORE_BUNDLE_NAME]]
    raw = facts.raw.get(SIGSTORE_BUNDLE_NAME)
    if raw is None or facts.envelope is None:
        return []
    envelope_problems_: list[str] = []
    try:
        expected = _decoded_sigstore(sigstore_bundle(facts.envelope), envelope_problems_)
    except ValueError:
        return []  # the envelope's own problems are reported already
    if envelope_problems_:
        return []  # likewise
    try:
        loaded = load_json_strict(raw)
    except ValueError as exc:
        return [f"{SIGSTORE_BUNDLE_NAME} is not JSON: {exc}"]
    problems: list[str] = []
    found = _decoded_sigstore(loaded, problems)
    if problems:
        return [f"{SIGSTORE_BUNDLE_NAME}: {p}" for p in problems]
    if found != expected:
        differing = (
            sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            if isinstance(found, dict) and isinstance(expected, dict)
            else ["(root)"]
        )
        return [
            f"{SIGSTORE_BUNDLE_NAME} does not restate {ENVELOPE_NAME} "
            f"({', '.join(differing)} differ{'s' * (len(differing) == 1)})"
        ]
    return []


def _check_statement(facts: BundleFacts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """statement.json is byte-for-byte the signed payload, and that is an evalrun Statement."""
    if facts.payload is None:
        return 0, [f"statement not checked: no readable payload in {ENVELOPE_NAME}"]
    problems = list(facts.statement_problems)
    statement_bytes = facts.raw.get(STATEMENT_NAME)
    if statement_bytes is None:
        problems.append(facts.raw_problems.get(STATEMENT_NAME, f"{STATEMENT_NAME}: missing"))
    elif statement_bytes != facts.payload:
        problems.append(
            f"{STATEMENT_NAME} differs from the payload signed in {ENVELOPE_NAME} "
            f"(sha256 {sha256_hex(statement_bytes)} vs signed {sha256_hex(facts.payload)})"
        )
    return 1, problems


def _check_manifest(facts: BundleFacts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """manifest.json is a well-formed evalrun manifest (safe, sorted, unique paths)."""
    if MANIFEST_NAME not in facts.raw:
        return 0, [facts.raw_problems.get(MANIFEST_NAME, f"{MANIFEST_NAME}: missing")]
    return 1, list(facts.manifest_problems)


def _check_subjects(facts: BundleFacts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """The signed subjects are exactly the manifest files plus manifest.json, same digests."""
    if facts.statement is None or facts.manifest is None:
        return 0, ["subjects not checked: statement or manifest unreadable"]
    problems: list[str] = []
    subjects = facts.statement.subject_digests()
    if len(subjects) != len(facts.statement.subject):
        problems.append("statement lists a subject name more than once")
    expected = {f.path: f.sha256 for f in facts.manifest.files}
    expected[MANIFEST_NAME] = sha256_hex(facts.raw[MANIFEST_NAME])
    for name in sorted(expected.keys() | subjects.keys()):
        want, have = subjects.get(name), expected.get(name)
        if want is None:
            problems.append(f"statement subjects do not match manifest: no subject for {name!r}")
        elif have is None:
            problems.append(
                f"statement subjects do not match manifest: subject {name!r} is not in the manifest"
            )
        elif want != have:
            what = "manifest.json" if name == MANIFEST_NAME else f"manifest entry {name!r}"
            problems.append(
                f"statement subjects do not match manifest: signed sha256 of {name!r} is "
                f"{want}, {what} has {have}"
            )
    return len(expected), problems


def _check_run_identity(facts: BundleFacts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """The signed statement is about the run this bundle's manifest belongs to, and the
    launcher it names (self-asserted) is bound to the key that signed it."""
    if facts.statement is None or facts.manifest is None:
        return 0, ["run identity not checked: statement or manifest unreadable"]
    checked, problems = 1, []
    if facts.statement.run_id != facts.manifest.run_id:
        problems.append(
            f"envelope of another run: the signed statement is for run "
            f"{facts.statement.run_id!r}, this bundle's manifest is for run "
            f"{facts.manifest.run_id!r}"
        )
    bound = _launcher_keyid(facts.statement)
    if bound is not None:
        checked += 1
        signed_by = envelope_keyids(facts)
        if bound not in signed_by:
            problems.append(
                f"provenance.launched_by is bound to keyid {one_line(bound, limit=80)}, "
                f"but the bundle is signed by keyid {', '.join(signed_by) or '(none)'}"
            )
    return checked, problems


def _launcher_keyid(statement: Statement) -> str | None:
    """``provenance.launched_by.signer_keyid`` of the signed predicate, if it names one."""
    node: object = statement.predicate
    for key in ("provenance", "launched_by", "signer_keyid"):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, str) else None


def envelope_keyids(facts: BundleFacts) -> list[str]:
    """The keyids the envelope's signatures name (well-formed ones only)."""
    signatures = facts.envelope.get("signatures") if facts.envelope is not None else None
    if not isinstance(signatures, list):
        return []
    return [
        s["keyid"] for s in signatures if isinstance(s, dict) and isinstance(s.get("keyid"), str)
    ]


def _check_files(facts: BundleFacts, verifier: TrustedKeys) -> tuple[int, list[str]]:
    """Exactly the manifest's files are present, each with its sha256 and size."""
    if facts.manifest is None:
        return 0, ["files not checked: manifest unreadable"]
    if pinned_sizes(facts) is not None:
        return 0, []  # the signature or subjects check names why
    problems: list[str] = []
    listed = {f.path: f for f in facts.manifest.files}
    for path in sorted(facts.payload_files - listed.keys()):
        problems.append(f"extra file not in manifest: {path!r}")
    compared = 1  # the set of files present against the set listed
    for path, entry in listed.items():
        if path not in facts.payload_files:
            problems.append(f"missing file {path!r} (listed in manifest)")
            continue
        found = facts.digests.get(path)
        if found is None:
            problems.append(f"file {path!r}: {facts.hash_errors.get(path, 'not hashed')}")
            continue
        compared += 1
        if found.sha256 != entry.sha256:
            problems.append(f"file {path!r}: expected sha256 {entry.sha256}, found {found.sha256}")
        if found.size != entry.size:
            problems.append(f"file {path!r}: expected {entry.size} bytes, found {found.size}")
    return compared, problems


CHECKS: tuple[tuple[str, _Check], ...] = (
    ("layout", _check_layout),
    ("signature", _check_signature),
    ("statement", _check_statement),
    ("manifest", _check_manifest),
    ("subjects", _check_subjects),
    ("run_identity", _check_run_identity),
    ("files", _check_files),
)
