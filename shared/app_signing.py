"""The app a device runs: the FAB ``flwr run`` sends, its digest, and an app-signing key's signature over it.

A device runs only a FAB its operator approved (``client/app_pin.py``): one whose SHA-256 its
``app-pins`` file lists, or one signed by a key its ``app-trust`` file lists. Signing is the
day-to-day way: a new release of the app needs a new signature, not a new pin file on every device.

The scheme and the files are Flower's own app verification (``flower-supernode --trusted-entities``,
``flwr app review``), which checks only what Flower's hub attaches to an app and nothing for a FAB
sent from a folder; so the same key and trust file serve both:

* an app-signing key is an OpenSSH Ed25519 private key (``ssh-keygen -t ed25519`` makes one too);
* it signs ``signed_at`` (8 bytes, big-endian Unix seconds) followed by SHA-256 of the FAB bytes
  (``flwr.supercore.primitives.asymmetric_ed25519.create_message_to_sign``, as ``flwr app review``);
* a device's ``app-trust`` file is Flower's trusted-entities YAML: ``<key id>: ssh-ed25519 AAAA...``;
* the signature travels as the run-config value ``app-signature``, a JSON object in the form of
  Flower's verification records: ``{"<key id>": {"signature": "<base64url>", "signed_at": <int>}}``.

Flower builds a FAB reproducibly (fixed dates, sorted entries), and ``fab-include`` in
``pyproject.toml`` limits it to ``client/``, ``server/``, ``shared/`` and the processed
``pyproject.toml``: the digest changes when code a device runs changes, not with docs or tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from shared.atomic import write_atomic
from shared.files import MAX_PEM_BYTES, read_bounded

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

APP_DIR = Path(__file__).resolve().parents[1]  # this checkout: the Flower app (pyproject.toml)
SIGNATURE_KEY = "app-signature"  # the run-config key (shared/config.py) the device's pin reads
PIN_SCRIPT = APP_DIR / "client" / "app_pin.py"


def build_app(app_dir: Path = APP_DIR) -> bytes:
    """Return the FAB ``flwr run <app_dir>`` sends (Flower's own build: same files, same bytes)."""
    from flwr.cli.build import build_fab_from_disk

    with warnings.catch_warnings():  # Flower's build matches .gitignore with pathspec's deprecated 'gitwildmatch'
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return build_fab_from_disk(app_dir)


def app_hash(app_dir: Path = APP_DIR) -> str:
    """Return the SHA-256 (hex) of the FAB ``flwr run <app_dir>`` sends: what an ``app-pins`` line holds."""
    return hashlib.sha256(build_app(app_dir)).hexdigest()


def generate_app_key(path: Path, key_id: str) -> Ed25519PrivateKey:
    """Make an app-signing key at ``path`` (OpenSSH, 0600) and ``<path>.trust.yaml``, a trust file naming it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pem, mode=0o600)
    write_trust_file(Path(f"{path}.trust.yaml"), {key_id: key})
    return key


def trusted_key_id(path: Path, key: Ed25519PrivateKey) -> str | None:
    """Return the id ``<key>.trust.yaml`` (what ``generate_app_key`` wrote beside it) gives ``key``, if it names it."""
    import yaml
    from cryptography.hazmat.primitives import serialization

    trust = Path(f"{path}.trust.yaml")
    if not trust.is_file():
        return None
    entries = yaml.safe_load(read_bounded(trust, MAX_PEM_BYTES * 16))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    named = [k for k, v in (entries or {}).items() if isinstance(v, str) and v.split()[:2] == public.decode().split()]
    return str(named[0]) if named else None


def load_app_key(path: Path) -> Ed25519PrivateKey:
    """Load an OpenSSH Ed25519 private key (refused if others can read it, or if it is another kind of key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_ssh_private_key(read_bounded(path, MAX_PEM_BYTES, private=True), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key (an app-signing key is one: ssh-keygen -t ed25519)")
    return key


def write_trust_file(path: Path, keys: dict[str, Ed25519PrivateKey]) -> None:
    """Write a device's ``app-trust`` file (Flower's trusted-entities YAML) naming ``keys``' public halves."""
    from cryptography.hazmat.primitives import serialization

    lines = ["# fleetlora app-signing keys a device trusts: <key id>: <OpenSSH public key>"]
    for key_id, key in keys.items():
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        lines.append(f"{json.dumps(key_id)}: {json.dumps(public.decode())}")
    write_atomic(path, ("\n".join(lines) + "\n").encode())


def sign_app(fab: bytes, key: Ed25519PrivateKey, key_id: str, signed_at: int | None = None) -> str:
    """Return the ``app-signature`` run-config value: ``key``'s signature over ``fab``, as Flower's records."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    when = int(time.time()) if signed_at is None else signed_at
    signature = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), when))
    record = {"signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode(), "signed_at": when}
    return json.dumps({key_id: record}, separators=(",", ":"))


def write_pin_shim(folder: Path) -> Path:
    """Write ``folder/flwr-clientapp``, which runs ``client/app_pin.py``; return ``folder``, to go first on PATH.

    A SuperNode whose PATH starts with it runs only the FABs its node config's ``app-pins`` lists or
    a key of its ``app-trust`` signed, and only as ClientApps (every other process Flower starts for a
    task refuses); the script is this checkout's, the device's own, never the FAB's.
    """
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "flwr-clientapp"
    run = f"exec {shlex.quote(sys.executable)} -P {shlex.quote(str(PIN_SCRIPT))}"  # a `$` in a path stays a `$`
    write_atomic(shim, f'#!/bin/sh\n{run} "$@"\n'.encode(), mode=0o755)
    # SuperExec starts the process of each task type by name: a run whose FAB declares another component (an
    # AgentApp: any submitter's) would run Flower's own flwr-agentapp, unchecked. A device runs ClientApps only.
    for command in sorted(set(TASK_TYPE_TO_COMMAND.values()) - {shim.name}):
        refuse = f'#!/bin/sh\necho "[app pin] this device runs ClientApps only: refused {command}" >&2\nexit 1\n'
        write_atomic(folder / command, refuse.encode(), mode=0o755)
    return folder
