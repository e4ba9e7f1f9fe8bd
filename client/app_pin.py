"""Device-side app pin: a ``flwr-clientapp`` that runs only a FAB its device's operator approved.

Flower's SuperExec starts ``flwr-clientapp`` by name from PATH for every task; a device puts this
script first on its SuperNode's PATH (``server/fleet.py`` writes the shim), so every ClientApp
process of the device runs it instead. It wraps two globals of
``flwr.supernode.runtime.run_clientapp`` (Flower 1.41) and then runs Flower's own ``flwr_clientapp()``:

* ``pull_task_input``: remembers the (message, context, run, fab) it pulled from the SuperNode;
* ``install_from_fab``: before anything of the FAB is written or imported, checks that
  sha256(FAB bytes) is one line of the file the device's own node config names (``app-pins``),
  that the SuperLink's claimed hashes (``run.fab_hash``, ``fab.hash_str``) are that digest, and,
  after installing, that the directory Flower will import from holds exactly the FAB's files.

A refusal raises inside Flower's ``run_clientapp`` try block, so Flower replies an ``Error`` to the
message (the ServerApp counts a failed reply) and the process exits; no code of the FAB runs.
A device without ``app-pins`` refuses every app (fail closed).

Run it as a script (``python -P app_pin.py``), never as ``client.app_pin``: importing the ``client``
package here would put the device's own ``client`` in ``sys.modules``, and Flower's loader would then
import the ClientApp from it instead of from the FAB. So: stdlib and flwr only.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from logging import INFO
from pathlib import Path
from typing import Any

import flwr.supernode.runtime.run_clientapp as rc
from flwr.common.config import get_project_dir
from flwr.supercore import log
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

PINNED_ENV = "FLEETLORA_APP_PINNED"  # = client.device.PINNED_ENV: the product's ClientApp refuses to run without it
PIN_KEY = "app-pins"  # node config key: a file of sha256 hex digests of approved FABs, one a line (# comments)
MAX_PINS_BYTES = 1 << 16
HEX64 = re.compile(r"[0-9a-f]{64}")

_pulled: dict[str, Any] = {}
_real_pull = rc.pull_task_input
_real_install = rc.install_from_fab


class AppNotPinnedError(Exception):
    """The FAB is not one the device's operator approved."""


def read_pins(path: str) -> set[str]:
    """Return the sha256 digests the pin file lists (one a line, ``#`` comments); refuse anything else in it."""
    with open(path, "rb") as f:  # noqa: PTH123 (bounded read: a pin file is a few lines)
        data = f.read(MAX_PINS_BYTES + 1)
    if len(data) > MAX_PINS_BYTES:
        raise AppNotPinnedError(f"pin file {path} is larger than {MAX_PINS_BYTES} bytes")
    pins = set()
    for raw in data.decode(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip().lower()
        if line and not HEX64.fullmatch(line):
            raise AppNotPinnedError(f"pin file {path}: {line[:70]!r} is not a sha256 hex digest")
        if line:
            pins.add(line)
    return pins


def check_fab(node_config: dict[str, Any], run: Any, fab: Any) -> str:
    """Return sha256(FAB) if the device pins it; raise AppNotPinnedError otherwise."""
    digest = hashlib.sha256(fab.content).hexdigest()
    pins_file = node_config.get(PIN_KEY)
    if not isinstance(pins_file, str) or not pins_file:
        raise AppNotPinnedError(f"no {PIN_KEY} in this device's node config: it runs no app")
    if digest not in read_pins(pins_file):
        raise AppNotPinnedError(f"app {run.fab_id!r:.60} {run.fab_version!r:.20} (sha256 {digest}) is not pinned")
    if fab.hash_str != digest or run.fab_hash != digest:
        raise AppNotPinnedError(
            f"the SuperLink names this FAB {run.fab_hash[:16]}/{fab.hash_str[:16]}, not {digest[:16]}"
        )
    return digest


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
    if fab_file is not fab.content:
        raise AppNotPinnedError("asked to install another FAB than the one pulled")
    check_fab(context.node_config, run, fab)
    installed = Path(_real_install(fab_file, *args, **kwargs))
    # Flower skips the install if <FLWR_HOME>/apps/<publisher>.<name>.<version>.<hash[:8]> exists and imports
    # from the folder it derives from run.fab_id/fab_version: both must be exactly this FAB's files.
    if installed != get_project_dir(run.fab_id, run.fab_version, fab.hash_str):
        raise AppNotPinnedError(f"run names app {run.fab_id!r:.60} {run.fab_version!r:.20}, the FAB another")
    if _installed_files(installed) != _fab_files(fab.content):
        raise AppNotPinnedError(f"{installed} does not hold exactly the pinned FAB's files")
    log(INFO, "[app pin] FAB sha256 %s is pinned; loading it from %s", fab.hash_str, installed)
    return installed


def main() -> None:
    """Run Flower's ``flwr-clientapp`` with the two hooks in place."""
    rc.pull_task_input = pull_task_input  # run_clientapp() looks both up in its module's globals
    rc.install_from_fab = install_from_fab
    os.environ[PINNED_ENV] = "1"
    flwr_clientapp()


if __name__ == "__main__":
    main()
