"""Device-side app pin: a ``flwr-clientapp`` that runs only a FAB its device's operator approved.

Flower's SuperExec starts ``flwr-clientapp`` by name from PATH for every task; a device puts this
script first on its SuperNode's PATH (``fleetlora device`` does; ``shared/app_signing.py`` writes the
shim), so every ClientApp process of the device runs it instead. It wraps two globals of
``flwr.supernode.runtime.run_clientapp`` (Flower 1.41) and then runs Flower's own ``flwr_clientapp()``:

* ``pull_task_input``: remembers the (message, context, run, fab) it pulled from the SuperNode;
* ``install_from_fab``: before anything of the FAB is written or imported, checks that the
  SuperLink's claimed hashes (``run.fab_hash``, ``fab.hash_str``) are sha256(FAB bytes), and that the
  device approved that FAB: its digest is a line of the file the node config names (``app-pins``),
  or the run's ``app-signature`` holds a valid signature over it by a key of the node config's
  ``app-trust`` file (Flower's trusted-entities YAML and signature scheme: ``shared/app_signing.py``),
  made no earlier than the node config's ``app-signed-after`` (Unix seconds, default 0);
  after installing, that the directory Flower will import from holds exactly the FAB's files.

A refusal raises inside Flower's ``run_clientapp`` try block, so Flower replies an ``Error`` to the
message (the ServerApp counts a failed reply) and the process exits; no code of the FAB runs.
A device with neither ``app-pins`` nor ``app-trust`` refuses every app (fail closed).

Run it as a script (``python -P app_pin.py``), never as ``client.app_pin``: importing the ``client``
package here would put the device's own ``client`` in ``sys.modules``, and Flower's loader would then
import the ClientApp from it instead of from the FAB. So: stdlib and flwr (with its own dependencies,
``cryptography`` and ``PyYAML``) only.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import json
import os
import re
import stat
import zipfile
from logging import INFO
from pathlib import Path
from typing import Any

import flwr.supernode.runtime.run_clientapp as rc
import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from flwr.common.config import get_project_dir
from flwr.supercore import log
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign, decode_base64url, verify_signature
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

PINNED_ENV = "FLEETLORA_APP_PINNED"  # = client.device.PINNED_ENV: the product's ClientApp refuses to run without it
PIN_KEY = "app-pins"  # node config key: a file of sha256 hex digests of approved FABs, one a line (# comments)
TRUST_KEY = "app-trust"  # node config key: Flower's trusted-entities YAML of the app-signing keys it trusts
SIGNATURE_KEY = "app-signature"  # run-config key: {key id: {"signature": base64url, "signed_at": int}} as JSON
SIGNED_AFTER_KEY = "app-signed-after"  # node config key: Unix seconds; a signature made before it is refused
MAX_PINS_BYTES = 1 << 16
MAX_TRUST_BYTES = 1 << 16
MAX_SIGNATURE_CHARS = 4096  # a record is ~130 characters
MAX_SIGNERS = 8
MAX_KEY_ID_CHARS = 128
SIGNATURE_BYTES = 64
HEX64 = re.compile(r"[0-9a-f]{64}")

_pulled: dict[str, Any] = {}
_runtime_installs: list[bool] = []  # main(): this process was told to `uv sync` the app's dependencies
_real_pull = rc.pull_task_input
_real_install = rc.install_from_fab


class AppNotPinnedError(Exception):
    """The FAB is not one the device's operator approved."""


def read_pins(path: str) -> set[str]:
    """Return the sha256 digests the pin file lists (one a line, ``#`` comments); refuse anything else in it."""
    data = _read(path, MAX_PINS_BYTES, "pin file")
    pins = set()
    for raw in data.decode(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip().lower()
        if line and not HEX64.fullmatch(line):
            raise AppNotPinnedError(f"pin file {path}: {line[:70]!r} is not a sha256 hex digest")
        if line:
            pins.add(line)
    return pins


def _read(path: str, limit: int, what: str) -> bytes:
    """Return a regular file's bytes, at most ``limit`` (non-blocking open: a FIFO in its place never hangs us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise AppNotPinnedError(f"{what} {path} is not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise AppNotPinnedError(f"{what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise AppNotPinnedError(f"{what} {path} is larger than {limit} bytes")
    return data


def read_trusted(path: str) -> dict[str, Ed25519PublicKey]:
    """Return the app-signing keys a trust file (Flower's trusted-entities YAML) names, by key id."""
    try:
        entries = yaml.safe_load(_read(path, MAX_TRUST_BYTES, "trust file"))
    except (yaml.YAMLError, RecursionError) as e:
        raise AppNotPinnedError(f"trust file {path} is not YAML: {str(e)[:200]}") from None
    if not isinstance(entries, dict) or not entries:
        raise AppNotPinnedError(f"trust file {path} must map key ids to OpenSSH Ed25519 public keys")
    trusted = {}
    for key_id, line in entries.items():
        if not isinstance(key_id, str) or not 0 < len(key_id) <= MAX_KEY_ID_CHARS or not isinstance(line, str):
            raise AppNotPinnedError(f"trust file {path}: entry {str(key_id)[:70]!r} is not '<key id>: <public key>'")
        try:
            public = load_ssh_public_key(line.encode())
        except (ValueError, UnsupportedAlgorithm) as e:
            raise AppNotPinnedError(f"trust file {path}: key {key_id!r} is not an OpenSSH public key ({e})") from None
        if not isinstance(public, Ed25519PublicKey):
            raise AppNotPinnedError(f"trust file {path}: key {key_id!r} is not Ed25519")
        trusted[key_id] = public
    return trusted


def signed_by(content: bytes, record: object, trusted: dict[str, Ed25519PublicKey], signed_after: int = 0) -> str:
    """Return the id of a trusted key whose signature in ``record`` (``app-signature``) is over this FAB.

    A signature made before ``signed_after`` (Unix seconds) does not count: the device's way to withdraw
    every app signed before a date (a version found unsafe) without replacing the key.

    Raises AppNotPinnedError naming what was wrong: no record, a malformed one, no trusted signer, a bad signature.
    """
    if record is None or record == "":
        raise AppNotPinnedError(f"the run carries no {SIGNATURE_KEY}")
    if not isinstance(record, str):
        raise AppNotPinnedError(f"{SIGNATURE_KEY} is a {type(record).__name__}, not a string")
    if len(record) > MAX_SIGNATURE_CHARS:
        raise AppNotPinnedError(f"{SIGNATURE_KEY} is longer than {MAX_SIGNATURE_CHARS} characters")
    try:
        signers = json.loads(record)
    except (ValueError, RecursionError):
        stripped = record.startswith("{") and '"' not in record
        hint = ' (a shell stripped its double quotes? pass it as --run-config "$(fleetlora app sign ...)")'
        raise AppNotPinnedError(f"{SIGNATURE_KEY} is not JSON{hint if stripped else ''}") from None
    if not isinstance(signers, dict) or not 0 < len(signers) <= MAX_SIGNERS:
        raise AppNotPinnedError(f"{SIGNATURE_KEY} must map 1 to {MAX_SIGNERS} key ids to signatures")
    digest = hashlib.sha256(content).digest()
    invalid: list[str] = []
    stale: list[tuple[str, int]] = []
    for key_id, entry in signers.items():
        if key_id not in trusted:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("signature"), str):
            raise AppNotPinnedError(f"{SIGNATURE_KEY}: {key_id!r} has no signature string")
        signed_at = entry.get("signed_at")
        if type(signed_at) is not int or not 0 <= signed_at < 1 << 63:
            raise AppNotPinnedError(f"{SIGNATURE_KEY}: {key_id!r} has no signed_at (Unix seconds)")
        try:
            signature = decode_base64url(entry["signature"][: 2 * SIGNATURE_BYTES])
        except (ValueError, binascii.Error):
            signature = b""
        message = create_message_to_sign(digest, signed_at)
        if len(signature) == SIGNATURE_BYTES and verify_signature(trusted[key_id], message, signature):
            if signed_at >= signed_after:
                return key_id
            stale.append((key_id, signed_at))
            continue
        invalid.append(key_id)
    if invalid:
        raise AppNotPinnedError(f"the signature of {invalid[0]!r} in {SIGNATURE_KEY} is not over this FAB")
    if stale:
        key_id, when = stale[0]
        raise AppNotPinnedError(
            f"{key_id!r} signed it at {when}, before this device's {SIGNED_AFTER_KEY} {signed_after}"
        )
    named = ", ".join(repr(k[:40]) for k in list(signers)[:MAX_SIGNERS])
    raise AppNotPinnedError(f"signed by {named}, none of them a key of this device's {TRUST_KEY}")


def check_fab(node_config: dict[str, Any], run: Any, fab: Any) -> str:
    """Return how this device approved the FAB (pinned, or signed by a key id); raise AppNotPinnedError otherwise."""
    digest = hashlib.sha256(fab.content).hexdigest()
    pins_file, trust_file = (v if isinstance(v := node_config.get(k), str) else "" for k in (PIN_KEY, TRUST_KEY))
    if not pins_file and not trust_file:
        raise AppNotPinnedError(f"no {PIN_KEY} and no {TRUST_KEY} in this device's node config: it runs no app")
    claimed = (run.fab_hash, fab.hash_str)
    if any(c != digest for c in claimed):
        names = "/".join(str(c)[:16] for c in claimed)
        raise AppNotPinnedError(f"the SuperLink names this FAB {names}, not {digest[:16]}")
    app = f"app {run.fab_id!r:.60} {run.fab_version!r:.20} (sha256 {digest})"
    if pins_file and digest in read_pins(pins_file):
        return "pinned"
    if not trust_file:
        raise AppNotPinnedError(f"{app} is not pinned: not in {PIN_KEY}")
    overrides = run.override_config if isinstance(run.override_config, dict) else {}
    signed_after = node_config.get(SIGNED_AFTER_KEY, 0)
    if type(signed_after) is not int or signed_after < 0:  # fail closed: a floor that does not parse withdraws all
        raise AppNotPinnedError(f"{SIGNED_AFTER_KEY} in the node config must be Unix seconds, got {signed_after!r:.40}")
    try:
        key_id = signed_by(fab.content, overrides.get(SIGNATURE_KEY), read_trusted(trust_file), signed_after)
    except AppNotPinnedError as e:
        raise AppNotPinnedError(f"{app} is not pinned: {'not in ' + PIN_KEY + ', ' if pins_file else ''}{e}") from None
    return f"signed by {key_id!r}"


def _fab_files(content: bytes) -> dict[str, bytes]:
    """Return the FAB's files by path (Flower removes ``.info/CONTENT`` when it installs)."""
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        return {i.filename: z.read(i) for i in z.infolist() if not i.is_dir() and i.filename != ".info/CONTENT"}


def _installed_files(folder: Path) -> dict[str, bytes]:
    """Return the files under an installed app's folder by path, ``__pycache__`` left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath) / name
            out[path.relative_to(folder).as_posix()] = path.read_bytes()
    return out


def pull_task_input(client: Any) -> Any:
    """Flower's ``pull_task_input``, remembering what it pulled for :func:`install_from_fab`."""
    pulled = _real_pull(client)
    _pulled["task"] = pulled
    return pulled


def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Path:
    """Check the pulled FAB against the device's pins, then Flower's ``install_from_fab``, then what it installed."""
    _message, context, run, fab = _pulled["task"]
    if any(_runtime_installs):  # Flower would `uv sync` from a package index and import that before the app
        raise AppNotPinnedError(
            "this SuperNode allows runtime dependency installation: the pin approves a FAB's bytes, not what a "
            "package index serves; start it without --allow-runtime-dependency-installation (fleetlora device)"
        )
    if fab_file is not fab.content:
        raise AppNotPinnedError("asked to install another FAB than the one pulled")
    approved = check_fab(context.node_config, run, fab)
    installed = Path(_real_install(fab_file, *args, **kwargs))
    # Flower skips the install if <FLWR_HOME>/apps/<publisher>.<name>.<version>.<hash[:8]> exists and imports
    # from the folder it derives from run.fab_id/fab_version: both must be exactly this FAB's files.
    if installed != get_project_dir(run.fab_id, run.fab_version, fab.hash_str):
        raise AppNotPinnedError(f"run names app {run.fab_id!r:.60} {run.fab_version!r:.20}, the FAB another")
    if _installed_files(installed) != _fab_files(fab.content):
        raise AppNotPinnedError(f"{installed} does not hold exactly the pinned FAB's files")
    log(INFO, "[app pin] FAB sha256 %s is %s; loading it from %s", fab.hash_str, approved, installed)
    return installed


def main() -> None:
    """Run Flower's ``flwr-clientapp`` with the two hooks in place."""
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    _runtime_installs.append(bool(_parse_args_run_flwr_clientapp().parse_known_args()[0].runtime_dependency_install))
    rc.pull_task_input = pull_task_input  # run_clientapp() looks both up in its module's globals
    rc.install_from_fab = install_from_fab
    os.environ[PINNED_ENV] = "1"
    flwr_clientapp()


if __name__ == "__main__":
    main()
