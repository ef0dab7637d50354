"""Signing with a key that lives in a real PKCS#11 token (Debian's SoftHSM), through the CLI.

A token is created in a temporary SOFTHSM2_CONF directory, an EC P-256 key pair (and an
Ed25519 one) is generated *in the token* through python-pkcs11, and `evalrun run --key
pkcs11:…` seals a bundle with it: the run is a real one that cannot reach a Docker
engine, so the bundle it signs says `infrastructure_failure` (failed runs are signed
too). The bundle verifies with the exported public key, with `evalrun verify` and with
securesystemslib's DSSE implementation. No network, no daemon: this is the unit tier,
and a missing softhsm2 is a failure here, never a skip (scripts/test-deps.sh installs it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from key_fixtures import locked_example

from runner.bundle.signing import pae

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LABEL = "evalrun ci"  # a space: percent-encoded in the URI
PIN = "246810"
SO_PIN = "13579111"

# Runs inside the token's environment: make the keys there (the private halves stay).
PROVISION = r"""
import json, sys
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

module, label, pin = sys.argv[1:4]
token = pkcs11.lib(module).get_token(token_label=label)
private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True}
facts = {"eddsa": Mechanism.EDDSA in token.slot.get_mechanisms()}
with token.open(rw=True, user_pin=pin) as session:
    for curve, name, key_id in (("secp256r1", "evalrun-p256", b"\x01"),
                                ("secp384r1", "evalrun-p384", b"\x03")):
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True)
        params.generate_keypair(store=True, label=name, id=key_id, private_template=private)
    if facts["eddsa"]:
        params = session.create_domain_parameters(
            KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: bytes.fromhex("06032b6570")}, local=True)
        params.generate_keypair(store=True, label="evalrun-ed25519", id=b"\x02",
                                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                                private_template=private)
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="evalrun-p256")
    facts["sensitive"] = bool(key[Attribute.SENSITIVE])
    facts["extractable"] = bool(key[Attribute.EXTRACTABLE])
    try:
        key[Attribute.VALUE]
        facts["value_readable"] = True
    except pkcs11.AttributeSensitive:
        facts["value_readable"] = False
print(json.dumps(facts))
"""


@dataclass
class Token:
    env: dict[str, str]
    facts: dict[str, bool]
    home: Path

    def uri(self, obj: str, **extra: str) -> str:
        path = ";".join([f"token={LABEL.replace(' ', '%20')}", f"object={obj}"])
        query = "&".join(f"{k}={v}" for k, v in extra.items())
        return f"pkcs11:{path}" + (f"?{query}" if query else "")

    def evalrun(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runner.cli", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            env={**self.env, **env},
            timeout=180,
            check=False,
        )


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    util = shutil.which("softhsm2-util")
    if util is None or not Path(MODULE).is_file():
        pytest.fail(
            f"softhsm2 is not installed (softhsm2-util, {MODULE}): run scripts/test-deps.sh "
            "(apt-get install softhsm2)",
            pytrace=False,
        )
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("EVALRUN_") and k != "CI"}
    env = {
        **base,
        "SOFTHSM2_CONF": str(conf),
        "PYTHONPATH": str(ROOT),
        "EVALRUN_HOME": str(root / "home"),
        "DOCKER_HOST": f"unix://{root}/no-docker.sock",  # the run fails, and is signed
    }
    init = subprocess.run(
        [util, "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", SO_PIN],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert init.returncode == 0, init.stderr + init.stdout
    made = subprocess.run(
        [sys.executable, "-c", PROVISION, MODULE, LABEL, PIN],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return Token(env=env, facts=json.loads(made.stdout), home=root / "home")


@pytest.fixture(scope="module")
def locked_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return locked_example(tmp_path_factory.mktemp("spec") / "digits")


def test_the_private_key_cannot_leave_the_token(token: Token) -> None:
    assert token.facts["sensitive"] is True
    assert token.facts["extractable"] is False
    assert token.facts["value_readable"] is False


def test_keys_describe_shows_the_token_key_without_a_pin(token: Token, tmp_path: Path) -> None:
    proc = token.evalrun("keys", "describe", token.uri("evalrun-p256"), "--json")
    assert proc.returncode == 0, proc.stderr
    described = json.loads(proc.stdout)
    assert described["algorithm"] == "ecdsa-p256"
    assert described["holds"] == "key pair in a token"
    assert described["token"]["token"] == LABEL
    assert described["token"]["object"] == "evalrun-p256" and described["token"]["id"] == "01"
    assert "ECDSA" in described["token"]["mechanisms"]
    exported = tmp_path / "p256.pub"
    proc = token.evalrun("keys", "public-key", token.uri("evalrun-p256"), "--out", str(exported))
    assert proc.returncode == 0, proc.stderr
    public = serialization.load_pem_public_key(exported.read_bytes())
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert described["keyid"] == hashlib.sha256(der).hexdigest()


def test_keys_list_shows_the_keys_evalrun_can_sign_with(token: Token) -> None:
    proc = token.evalrun("keys", "list", "--pkcs11", f"pkcs11:token={LABEL}", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {k["token"]["object"]: k for k in json.loads(proc.stdout)["keys"]}
    expected = {"evalrun-p256"} | ({"evalrun-ed25519"} if token.facts["eddsa"] else set())
    assert set(listed) == expected  # the P-384 key is not one evalrun signs with
    assert all(k["source"].startswith("pkcs11:token=") for k in listed.values())


def _run_with_token_key(token: Token, spec: Path, uri: str) -> dict:
    proc = token.evalrun(
        "run",
        str(spec),
        "--rerun",
        "--key",
        uri,
        "--pin-env",
        "CI_TOKEN_PIN",
        "--json",
        CI="true",  # as a pipeline would: no key is created behind anyone's back
        CI_TOKEN_PIN=PIN,
    )
    assert proc.returncode == 5, proc.stderr  # no Docker engine: a signed failed run
    out = json.loads(proc.stdout)
    assert out["outcome"] == "infrastructure_failure"
    assert out["verified"].startswith("valid")
    assert PIN not in proc.stdout + proc.stderr
    return out


def _verify_everywhere(token: Token, bundle: Path, public_pem: Path, algorithm: str) -> str:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    proc = token.evalrun("verify", str(bundle), "--key", str(public_pem), "--json")
    assert proc.returncode == 0, proc.stderr
    keyid = json.loads(proc.stdout)["keyid"]
    public = serialization.load_pem_public_key(public_pem.read_bytes())
    envelope_json = json.loads((bundle / "envelope.dsse.json").read_bytes())
    envelope = Envelope.from_dict(json.loads(json.dumps(envelope_json)))  # it consumes its dict
    assert set(envelope.verify([SSlibKey.from_crypto(public, keyid)], 1)) == {keyid}  # type: ignore[arg-type]
    sigstore = json.loads((bundle / "envelope.sigstore.json").read_bytes())
    assert sigstore["verificationMaterial"]["publicKey"]["hint"] == keyid
    if algorithm == "ecdsa-p256":
        # CKM_ECDSA over the SHA-256 digest, r||s re-encoded as DER: plain ECDSA-SHA256
        sig = base64.b64decode(envelope_json["signatures"][0]["sig"])
        r, s = decode_dss_signature(sig)
        assert r > 0 and s > 0
        message = pae(envelope_json["payloadType"], base64.b64decode(envelope_json["payload"]))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(sig, message, ec.ECDSA(hashes.SHA256()))
    return keyid


def test_run_signs_its_bundle_in_the_token_ecdsa_p256(
    token: Token, locked_spec: Path, tmp_path: Path
) -> None:
    uri = token.uri("evalrun-p256", **{"module-path": MODULE})
    out = _run_with_token_key(token, locked_spec, uri)
    exported = tmp_path / "p256.pub"
    assert token.evalrun("keys", "public-key", uri, "--out", str(exported)).returncode == 0
    keyid = _verify_everywhere(token, Path(out["bundle"]), exported, "ecdsa-p256")
    described = json.loads(token.evalrun("keys", "describe", uri, "--json").stdout)
    assert keyid == described["keyid"]


def test_run_signs_its_bundle_in_the_token_ed25519_or_says_why_not(
    token: Token, locked_spec: Path, tmp_path: Path
) -> None:
    uri = token.uri("evalrun-ed25519")
    if not token.facts["eddsa"]:  # a token without CKM_EDDSA: a clear refusal, exit 2
        proc = token.evalrun("run", str(locked_spec), "--key", uri, EVALRUN_PKCS11_PIN=PIN)
        assert proc.returncode == 2 and "CKM_EDDSA" in proc.stderr
        return
    out = _run_with_token_key(token, locked_spec, uri)
    exported = tmp_path / "ed.pub"
    assert token.evalrun("keys", "public-key", uri, "--out", str(exported)).returncode == 0
    _verify_everywhere(token, Path(out["bundle"]), exported, "ed25519")


@pytest.mark.parametrize(
    ("obj", "env", "message"),
    [
        ("evalrun-p256", {}, "needs the token's PIN, and $EVALRUN_PKCS11_PIN is not set"),
        ("evalrun-p256", {"EVALRUN_PKCS11_PIN": "000000"}, "the token refused the PIN"),
        ("no-such-key", {"EVALRUN_PKCS11_PIN": PIN}, "no EC or EdDSA public key object"),
        ("evalrun-p384", {"EVALRUN_PKCS11_PIN": PIN}, "neither ECDSA P-256 nor Ed25519"),
        (
            "evalrun-p256",
            {"EVALRUN_PKCS11_PIN": PIN, "EVALRUN_PKCS11_MODULE": "/nonexistent/libp11.so"},
            "PKCS#11 module not found",
        ),
    ],
)
def test_token_problems_are_exit_2_with_one_message_and_no_pin(
    token: Token, locked_spec: Path, obj: str, env: dict[str, str], message: str
) -> None:
    proc = token.evalrun("run", str(locked_spec), "--key", token.uri(obj), **env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    for secret in (PIN, "000000"):
        assert secret not in proc.stderr + proc.stdout
