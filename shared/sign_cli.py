"""``fleetlora keys generate|show|enrol`` and ``fleetlora verify <release-folder>``."""

from __future__ import annotations

import argparse
from pathlib import Path

from shared.enrolment import enrol, write_enrolment
from shared.release import ReleaseError, read_release, verify_release
from shared.sign import TrustList, generate_key, key_id, load_private_key, public_line, raw_key_id

DEFAULT_KEY = Path(".fleetlora/keys/server.key")


def register_keys(sub: argparse._SubParsersAction) -> None:
    """Add the ``keys`` subcommand."""
    p = sub.add_parser("keys", help="create or show the server's Ed25519 signing key")
    verbs = p.add_subparsers(dest="verb", required=True)
    gen = verbs.add_parser("generate", help="create a signing key (mode 0600) and <key>.pub, its trust-list line")
    gen.add_argument("path", nargs="?", type=Path, default=DEFAULT_KEY)
    gen.add_argument("--force", action="store_true", help="replace an existing key (devices must trust the new one)")
    gen.set_defaults(func=_generate)
    show = verbs.add_parser("show", help="print the key id and the trust-list line devices need")
    show.add_argument("path", nargs="?", type=Path, default=DEFAULT_KEY)
    show.set_defaults(func=_show)
    enrol = verbs.add_parser(
        "enrol",
        help="as an enrolment authority, vouch for a device's SecAgg+ identity (its <key>.pub): write its enrolment",
    )
    enrol.add_argument("identity", type=Path, help="the device's identity, the .pub of `fleetlora keys generate`")
    enrol.add_argument("--authority", type=Path, required=True, help="the enrolment authority's key (not the server's)")
    enrol.add_argument("--out", type=Path, required=True, help="the enrolment file (node config secagg-enrolment)")
    enrol.set_defaults(func=_enrol)


def register_verify(sub: argparse._SubParsersAction) -> None:
    """Add the ``verify`` subcommand."""
    p = sub.add_parser("verify", help="check a signed release folder: signature, file hashes, base")
    p.add_argument("folder", type=Path)
    p.add_argument("--trust", type=Path, required=True, help="trust-list file (lines of `fleetlora keys show`)")
    p.add_argument("--base", help="expected base-model digest (fleetlora model digest); checked if given")
    p.set_defaults(func=_verify)


def _generate(args: argparse.Namespace) -> int:
    key = generate_key(args.path, force=args.force)
    print(f"wrote {args.path} (keep it private) and {args.path}.pub (give it to devices)")
    print(f"key id {key_id(key.public_key())}")
    return 0


def _show(args: argparse.Namespace) -> int:
    public = load_private_key(args.path).public_key()
    print(f"key id {key_id(public)}")
    print(public_line(public, f"fleetlora {key_id(public)}"))
    return 0


def _enrol(args: argparse.Namespace) -> int:
    listed = TrustList.load(args.identity)
    if len(listed.trusted) != 1 or listed.revoked:
        print(f"{args.identity}: expected one identity's line (the .pub of `fleetlora keys generate`)")
        return 1
    identity = next(iter(listed.trusted.values()))
    authority = load_private_key(args.authority)
    write_enrolment(args.out, identity, enrol(authority, identity))
    print(f"wrote {args.out}: identity {raw_key_id(identity)}, enrolled by {key_id(authority.public_key())}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    trust = TrustList.load(args.trust)
    try:
        manifest = verify_release(read_release(args.folder, trust), trust, args.base)
    except ReleaseError as exc:
        print(f"REJECTED {args.folder}: {exc}")
        return 1
    print(f"OK {args.folder}: {manifest.kind} of run {manifest.run_id}, round {manifest.round}, {manifest.method}")
    print(f"  signed by key {manifest.key_id} at {manifest.created}; manifest {manifest.digest()}")
    print(f"  base {manifest.base_digest}; previous {manifest.previous or '(first of the run)'}")
    for name, digest in sorted(manifest.files.items()):
        print(f"  {digest}  {name}")
    return 0
