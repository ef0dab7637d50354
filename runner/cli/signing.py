"""``evalrun keys …`` (generate, list, describe, public-key) and ``evalrun verify``: the
signing keys and checking a bundle's signature with the keys the user trusts."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner._internal.settings import Settings
from runner.cli.common import (
    add_keyring_arg,
    add_unlock_args,
    key_access,
    verifier_for,
)
from runner.cli.output import Terminal, emit_json
from runner.errors import EvalrunError, InputError

if TYPE_CHECKING:
    from runner.bundle.keys import KeyDescription


def cmd_verify(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.verify import verify_bundle

    if args.key is None and args.keyring is None:
        raise InputError(
            "verify needs the key(s) to trust: --key PUB and/or --keyring PATH",
            hint="the .pub file of the signing key, or a keyring of every key you trust",
        )
    verifier = verifier_for(args, settings, args.key)
    from runner.bundle.oci_artifacts import fetch_bundle, is_registry_ref

    if is_registry_ref(str(args.bundle)) and not args.bundle.exists():
        # A bundle stored as an OCI artifact: fetch (every blob digest-checked), then verify.
        with tempfile.TemporaryDirectory(prefix="evalrun-verify-") as tmp:
            fetched = fetch_bundle(str(args.bundle), Path(tmp) / "bundle")
            vb = verify_bundle(fetched, verifier)
    else:
        vb = verify_bundle(args.bundle, verifier)
    if args.json:
        emit_json(
            {
                "valid": True,
                "bundle": str(args.bundle),
                "run_id": vb.run_id,
                "bundle_digest": vb.bundle_digest,
                "keyid": vb.keyid,
                "files": vb.file_count,
                "checks": [c.name for c in vb.checks],
            }
        )
    else:
        print(f"{args.bundle}: valid")
        print(f"  run id   {vb.run_id}")
        print(f"  digest   {vb.bundle_digest}")
        print(f"  signer   {vb.keyid}")
        print(f"  files    {vb.file_count} ({vb.total_size} bytes), all hashes match")
        print(f"  checks   {', '.join(c.name for c in vb.checks)}")
    return 0


def cmd_keys_generate(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import FileKey, describe_key
    from runner.bundle.signing import generate_keypair

    private: Path = args.out or settings.default_private_key
    public = private.with_suffix(".pub")
    if args.if_absent and (private.exists() or private.is_symlink()):
        ref = FileKey(public if public.is_file() else private)
        found = describe_key(ref, key_access(args))
        if args.json:
            emit_json(
                {
                    "private_key": str(private),
                    "public_key": str(public),
                    "keyid": found.keyid,
                    "algorithm": found.algorithm,
                    "created": False,
                }
            )
        else:
            print(f"signing key exists: {private} (keyid {found.keyid})")
        return 0
    password = None
    if args.encrypt:
        var = args.key_passphrase_env or "EVALRUN_KEY_PASSPHRASE"
        value = os.environ.get(var)
        if not value:
            raise InputError(
                f"--encrypt takes the passphrase from ${var}, which is not set",
                hint="set it, or name another variable with --key-passphrase-env",
            )
        password = value.encode("utf-8")
    if args.out is None:
        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = generate_keypair(private, public, args.algorithm, password=password)
    if args.json:
        emit_json(
            {
                "private_key": str(private),
                "public_key": str(public),
                "keyid": info.keyid,
                "algorithm": args.algorithm,
                "created": True,
            }
        )
    else:
        print(f"private key {private} (mode 0600; never leaves this machine)")
        print(f"public key  {public}")
        print(f"keyid       {info.keyid}")
    return 0


def _key_row(d: KeyDescription) -> str:
    return f"{d.keyid[:16]}  {d.algorithm:10}  {d.holds:19}  {d.source}"


def cmd_keys_list(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import (
        FileKey,
        KeyDescription,
        describe_key,
        key_ref_from_env,
        list_token_keys,
        load_keyring,
    )

    access = key_access(args)
    found: list[KeyDescription] = []
    unreadable: list[dict[str, str]] = []
    sources: list[Any] = []
    keys_dir = settings.default_private_key.parent
    if keys_dir.is_dir():
        sources.extend(
            FileKey(p)
            for p in sorted(keys_dir.iterdir())
            if p.suffix in (".key", ".pub", ".pem") and p.is_file()
        )
    from_env = key_ref_from_env(access.environ)
    if from_env is not None:
        sources.append(from_env)
    for ref in sources:
        try:
            found.append(describe_key(ref, access))
        except EvalrunError as err:
            unreadable.append({"source": str(ref), "problem": err.message})
    if args.keyring is not None:
        for verifier in load_keyring(args.keyring).verifiers:
            found.append(
                KeyDescription(
                    keyid=verifier.keyid,
                    algorithm=verifier.algorithm,
                    source=f"keyring {args.keyring}",
                    holds="public key",
                    public_pem=verifier.public_pem().decode("ascii"),
                )
            )
    if args.pkcs11 is not None:
        found.extend(list_token_keys(args.pkcs11, access))
    if args.json:
        emit_json(
            {
                "keys": [d.model_dump(mode="json", exclude={"public_pem"}) for d in found],
                "unreadable": unreadable,
            }
        )
        return 0
    if not found and not unreadable:
        print(f"no keys in {keys_dir} (create one with `evalrun keys generate`)")
        return 0
    print(f"{'KEYID':16}  {'ALGORITHM':10}  {'HOLDS':19}  SOURCE")
    for d in found:
        print(_key_row(d))
    for u in unreadable:
        print(f"{'?':16}  {'?':10}  {'(unreadable)':19}  {u['source']}: {u['problem']}")
    return 0


def cmd_keys_describe(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import describe_key, parse_key_ref

    d = describe_key(parse_key_ref(args.key), key_access(args))
    if args.json:
        emit_json(d.model_dump(mode="json"))
        return 0
    print(f"keyid       {d.keyid}")
    print(f"algorithm   {d.algorithm}")
    print(f"holds       {d.holds}")
    print(f"source      {d.source}")
    if d.encrypted is not None:
        print(f"encrypted   {'yes' if d.encrypted else 'no'}")
    if d.token is not None:
        print(
            f"token       {d.token.token} (serial {d.token.serial}, {d.token.manufacturer}, "
            f"{d.token.model})"
        )
        print(f"object      label {d.token.object or '—'}, id {d.token.id or '—'}")
        print(f"mechanisms  {', '.join(d.token.mechanisms) or 'none usable'}")
    return 0


def cmd_keys_public(args: argparse.Namespace, settings: Settings, term: Terminal) -> int:
    from runner.bundle.keys import describe_key, parse_key_ref

    d = describe_key(parse_key_ref(args.key), key_access(args))
    if args.out is None:
        if args.json:
            emit_json({"keyid": d.keyid, "algorithm": d.algorithm, "public_pem": d.public_pem})
        else:
            sys.stdout.write(d.public_pem)
        return 0
    try:
        with args.out.open("x", encoding="ascii") as f:
            f.write(d.public_pem)
    except FileExistsError as exc:
        raise InputError("refusing to overwrite an existing file", file=str(args.out)) from exc
    if args.json:
        emit_json({"public_key": str(args.out), "keyid": d.keyid, "algorithm": d.algorithm})
    else:
        print(f"public key {args.out} (keyid {d.keyid})")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = sub.add_parser("verify", parents=[common], help="verify a bundle offline")
    p.add_argument(
        "bundle", type=Path, help="bundle directory, .tar, or registry reference (repo@sha256:…)"
    )
    p.add_argument("--key", type=Path, help="the trusted public key (PEM)")
    add_keyring_arg(p)
    p.set_defaults(fn=cmd_verify)

    keys = sub.add_parser("keys", parents=[common], help="signing keys").add_subparsers(
        dest="keys_cmd", required=True, metavar="COMMAND"
    )
    p = keys.add_parser("generate", parents=[common], help="create a signing key pair")
    p.add_argument("--out", type=Path, help="private key path (public key: same name, .pub)")
    p.add_argument("--algorithm", choices=["ecdsa-p256", "ed25519"], default="ecdsa-p256")
    p.add_argument(
        "--if-absent",
        action="store_true",
        help="do nothing (and say so) if the private key file exists",
    )
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the private key with the passphrase in $EVALRUN_KEY_PASSPHRASE "
        "(or the variable --key-passphrase-env names)",
    )
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_generate)
    p = keys.add_parser(
        "list",
        parents=[common],
        help="keys in $EVALRUN_HOME/keys and $EVALRUN_KEY (plus a keyring or a token)",
    )
    add_keyring_arg(p)
    p.add_argument("--pkcs11", metavar="URI", help="also list the keys in this token")
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_list)
    p = keys.add_parser(
        "describe", parents=[common], help="keyid, algorithm and source of a key (no secrets)"
    )
    p.add_argument("key", help="a PEM file (private or public), env:VAR, -, k8s://… or pkcs11:…")
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_describe)
    p = keys.add_parser(
        "public-key", parents=[common], help="print (or --out) a key's public half as PEM"
    )
    p.add_argument("key", help="a PEM file, env:VAR, -, k8s://… or pkcs11:…")
    p.add_argument("--out", type=Path, help="write it to this new file")
    add_unlock_args(p)
    p.set_defaults(fn=cmd_keys_public)
