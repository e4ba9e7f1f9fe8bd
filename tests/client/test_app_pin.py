"""The app pin's approval of a FAB (``client/app_pin.check_fab``), the app signing it checks, the device launcher.

The same checks run inside a real ClientApp process in ``tests/server/test_fleet_pin.py`` (refusal) and
``tests/server/test_fleet_secure.py`` (a signed app runs); here every way an approval can be wrong, each
named in its refusal, and the formats' agreement with Flower's own app verification.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab

from client.app_pin import AppNotPinnedError, check_fab
from client.device_cli import supernode_command
from server.config_args import config_arg
from shared.app_signing import APP_DIR, app_hash, build_app, generate_app_key, load_app_key, sign_app, write_pin_shim
from shared.cli import python_module

FAB = b"PK\x03\x04 the fleet's app"
OTHER = b"PK\x03\x04 another app"


def _task(content: bytes, signature: str | None) -> tuple[SimpleNamespace, SimpleNamespace]:
    digest = hashlib.sha256(content).hexdigest()
    overrides = {} if signature is None else {"app-signature": signature}
    run = SimpleNamespace(fab_id="fleetlora/fleetlora", fab_version="0.1.0", fab_hash=digest, override_config=overrides)
    return run, SimpleNamespace(hash_str=digest, content=content)


@pytest.fixture
def keys(tmp_path):
    """The fleet's app-signing key (trusted by the device) and another key (not)."""
    fleet = generate_app_key(tmp_path / "fleet.key", "fleet")
    other = generate_app_key(tmp_path / "other.key", "other")
    return SimpleNamespace(fleet=fleet, other=other, trust=tmp_path / "fleet.key.trust.yaml")


def _refusal(node: dict[str, str], content: bytes, signature: str | None) -> str:
    with pytest.raises(AppNotPinnedError) as e:
        check_fab(node, *_task(content, signature))
    return str(e.value)


def test_a_fab_signed_by_a_trusted_key_runs_and_every_other_signature_is_refused(keys):
    node = {"app-trust": str(keys.trust)}
    assert check_fab(node, *_task(FAB, sign_app(FAB, keys.fleet, "fleet"))) == "signed by 'fleet'"
    # the fleet key's signature over another FAB, replayed with this one (the key id alone proves nothing)
    assert "not over this FAB" in _refusal(node, OTHER, sign_app(FAB, keys.fleet, "fleet"))
    # a valid signature by a key the device does not trust, under its own id or under the trusted one
    assert "none of them a key" in _refusal(node, FAB, sign_app(FAB, keys.other, "other"))
    assert "not over this FAB" in _refusal(node, FAB, sign_app(FAB, keys.other, "fleet"))
    assert "carries no app-signature" in _refusal(node, FAB, None)
    # one trusted, valid signature among others is enough
    both = {**json.loads(sign_app(FAB, keys.other, "other")), **json.loads(sign_app(FAB, keys.fleet, "fleet"))}
    assert check_fab(node, *_task(FAB, json.dumps(both))) == "signed by 'fleet'"


def _tampered(record: str, **entry: object) -> str:
    data = json.loads(record)
    data["fleet"].update(entry)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda r: "{not json", "not JSON"),
        (lambda r: "x" * 5000, "longer than"),
        (lambda r: "[1, 2]", "must map"),
        (lambda r: "{}", "must map"),
        (lambda r: json.dumps({f"k{i}": {} for i in range(9)}), "must map"),
        (lambda r: json.dumps({"fleet": "sig"}), "no signature string"),
        (lambda r: _tampered(r, signature=7), "no signature string"),
        (lambda r: _tampered(r, signed_at=-1), "no signed_at"),
        (lambda r: _tampered(r, signed_at=True), "no signed_at"),
        (lambda r: _tampered(r, signed_at=1.5), "no signed_at"),
        (lambda r: _tampered(r, signed_at=1 << 64), "no signed_at"),
        (lambda r: _tampered(r, signed_at=json.loads(r)["fleet"]["signed_at"] + 1), "not over this FAB"),
        (lambda r: _tampered(r, signature="%%%"), "not over this FAB"),
        (lambda r: _tampered(r, signature=json.loads(r)["fleet"]["signature"][:-4]), "not over this FAB"),
        (lambda r: _tampered(r, signature="A" * 200), "not over this FAB"),
        (lambda r: "[" * 2000 + "]" * 2000, "not JSON"),  # nesting that overflows the parser's recursion
        (lambda r: r.replace('"', ""), "a shell stripped its double quotes"),
    ],
)
def test_a_malformed_signature_record_is_a_refusal_that_says_what_is_wrong(keys, make, why):
    record = make(sign_app(FAB, keys.fleet, "fleet"))
    assert why in _refusal({"app-trust": str(keys.trust)}, FAB, record)


def test_a_malformed_trust_file_refuses_every_app(keys, tmp_path):
    record = sign_app(FAB, keys.fleet, "fleet")
    rsa_like = ec.generate_private_key(ec.SECP256R1()).public_key()
    ssh_ec = rsa_like.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    cases = {
        "[unclosed": "not YAML",
        "": "must map key ids",
        "- a list\n": "must map key ids",
        "fleet: not a key\n": "not an OpenSSH public key",
        f"fleet: {ssh_ec}\n": "is not Ed25519",
        "fleet: 7\n": "is not '<key id>: <public key>'",
        "x" * 70_000: "larger than",
        "[" * 20_000: "not YAML",  # nesting that overflows the parser's recursion
    }
    for i, (text, why) in enumerate(cases.items()):
        path = tmp_path / f"trust-{i}.yaml"
        path.write_text(text)
        assert why in _refusal({"app-trust": str(path)}, FAB, record), text[:40]


def test_pins_and_signatures_each_approve_and_neither_refuses(keys, tmp_path):
    pins = tmp_path / "app-pins"
    pins.write_text(f"# approved\n{hashlib.sha256(FAB).hexdigest()}\n")
    assert check_fab({"app-pins": str(pins)}, *_task(FAB, None)) == "pinned"
    assert "not in app-pins" in _refusal({"app-pins": str(pins)}, OTHER, sign_app(OTHER, keys.fleet, "fleet"))
    both = {"app-pins": str(pins), "app-trust": str(keys.trust)}
    assert check_fab(both, *_task(OTHER, sign_app(OTHER, keys.fleet, "fleet"))) == "signed by 'fleet'"
    assert "not in app-pins, signed by 'other'" in _refusal(both, OTHER, sign_app(OTHER, keys.other, "other"))
    assert "it runs no app" in _refusal({}, FAB, sign_app(FAB, keys.fleet, "fleet"))


def test_a_device_withdraws_every_app_signed_before_its_floor(keys):
    node = {"app-trust": str(keys.trust), "app-signed-after": 2_000_000_000}
    old, new = (sign_app(FAB, keys.fleet, "fleet", signed_at=t) for t in (1_999_999_999, 2_000_000_000))
    assert "signed it at 1999999999, before this device's app-signed-after" in _refusal(node, FAB, old)
    assert check_fab(node, *_task(FAB, new)) == "signed by 'fleet'"
    for floor in ("2000000000", -1, 1.5):  # a floor that does not parse withdraws every app
        assert "must be Unix seconds" in _refusal({**node, "app-signed-after": floor}, FAB, new)


def test_a_signed_fab_the_superlink_names_by_another_hash_is_refused(keys):
    run, fab = _task(FAB, sign_app(FAB, keys.fleet, "fleet"))
    run.fab_hash = hashlib.sha256(OTHER).hexdigest()
    with pytest.raises(AppNotPinnedError, match="the SuperLink names this FAB"):
        check_fab({"app-trust": str(keys.trust)}, run, fab)


def test_our_signature_and_trust_file_are_what_flowers_own_app_verification_checks(keys):
    """The key, the trust file and the record serve Flower's ``--trusted-entities`` too (a Hub-verified app)."""
    trusted = yaml.safe_load(keys.trust.read_text())  # what flower-supernode --trusted-entities loads
    record = json.loads(sign_app(FAB, keys.fleet, "fleet"))
    verifications = {k: json.dumps(v) for k, v in record.items()} | {"valid_license": "Valid"}
    assert _verify_fab(Fab(hashlib.sha256(FAB).hexdigest(), FAB, verifications), trusted)
    assert not _verify_fab(Fab(hashlib.sha256(OTHER).hexdigest(), OTHER, verifications), trusted)


def test_the_signing_key_is_private_and_never_overwritten_by_the_cli(keys, tmp_path):
    path = tmp_path / "fleet.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_app_key(path).public_key().public_bytes_raw() == keys.fleet.public_key().public_bytes_raw()
    path.chmod(0o644)
    with pytest.raises(Exception, match="other users can read it"):
        load_app_key(path)
    path.chmod(0o600)
    before = path.read_bytes()
    out = subprocess.run(
        python_module("shared.cli", "app", "key", str(path)), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "never overwritten" in out.stderr and path.read_bytes() == before


def _app_copy(dest: Path) -> Path:
    for package in ("client", "server", "shared"):
        shutil.copytree(APP_DIR / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(APP_DIR / name, dest / name)
    (dest / "tests").mkdir()
    (dest / "tests" / "test_x.py").write_text("x = 1\n")
    return dest


def test_the_fab_devices_run_holds_the_apps_code_only_so_docs_and_tests_leave_its_digest_alone(tmp_path):
    app = _app_copy(tmp_path / "app")
    names = {n.split("/")[0] for n in zipfile.ZipFile(io.BytesIO(build_app(app))).namelist()}
    assert names == {"client", "server", "shared", "pyproject.toml", ".info"}
    before = app_hash(app)
    (app / "README.md").write_text("# changed\n")
    (app / "tests" / "test_x.py").write_text("x = 2\n")
    assert app_hash(app) == before
    (app / "client" / "partition.py").write_text((app / "client" / "partition.py").read_text() + "\n# changed\n")
    assert app_hash(app) != before


def test_the_cli_signs_the_fab_flwr_run_sends_as_one_run_config_pair(keys, tmp_path):
    app = _app_copy(tmp_path / "app")
    out = subprocess.run(
        python_module("shared.cli", "app", "sign", str(app), "--key", str(tmp_path / "fleet.key"), "--id", "fleet"),
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    pair = out.stdout.strip()
    assert " " not in pair and pair.startswith("app-signature=")
    record = parse_config_args([f"num-server-rounds=2 {pair}"])["app-signature"]  # Flower's own --run-config parser
    fab = build_app(app)
    assert check_fab({"app-trust": str(keys.trust)}, *_task(fab, record)) == "signed by 'fleet'"
    # the fleet's processes pass it the same way (server.config_args.config_arg)
    assert parse_config_args([config_arg({"app-signature": record, "run-name": "a b"})])["app-signature"] == record


def test_the_device_launcher_starts_the_supernode_with_the_pin_first_on_path_or_not_at_all(keys, tmp_path, monkeypatch):
    state = tmp_path / "state"
    args = ["--", "--insecure", "--node-config", f"app-trust='{keys.trust}' state-dir='{state}'"]
    monkeypatch.setenv("FLEETLORA_APP_PINNED", "1")  # set by hand on the device: not passed on (only the pin sets it)
    cmd, env = supernode_command(args, None)
    assert "FLEETLORA_APP_PINNED" not in env
    assert Path(cmd[0]).name == "flower-supernode" and cmd[1 : len(args)] == args[1:]
    # the Runtime API over TLS, a certificate for loopback only (a DNS-rebinding page gets a certificate error)
    tls = dict(zip(cmd[len(args) :: 2], cmd[len(args) + 1 :: 2], strict=True))
    assert set(tls) == {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"}
    cert = x509.load_pem_x509_certificate(Path(tls["--ssl-certfile"]).read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(Path(tls["--ssl-ca-certfile"]).read_bytes()))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in sans} == {"127.0.0.1", "localhost", "::1"}
    own = [*args, "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-ca-certfile", "ca.pem"]
    assert supernode_command(own, None)[0][1:] == own[1:]  # an operator's own certificates are kept
    first = Path(env["PATH"].split(os.pathsep)[0])
    assert first == (state / "pin-bin").resolve() and "app_pin.py" in (first / "flwr-clientapp").read_text()
    assert os.access(first / "flwr-clientapp", os.X_OK)
    refused = {
        "neither app-pins nor app-trust": ["--node-config", f"state-dir='{state}'"],
        "No such file": ["--node-config", f"app-trust='{tmp_path / 'missing.yaml'}' state-dir='{state}'"],
        "give --pin-dir": ["--node-config", f"app-trust='{keys.trust}'"],
        # the SuperNode would start no ClientApp process of its own: nothing for the pin to check
        "--isolation process": ["--iso", "process", "--node-config", f"app-trust='{keys.trust}' state-dir='{state}'"],
        # read as flower-supernode reads them: the last --node-config (here by a prefix of its name) is the one used
        "neither": ["--node-config", f"app-trust='{keys.trust}' state-dir='{state}'", "--node-conf", "x=1"],
        "--host 0.0.0.0": ["--host", "0.0.0.0", "--node-config", f"app-trust='{keys.trust}' state-dir='{state}'"],
        "--allow-runtime-dependency-installation": [
            "--allow-runtime",  # a prefix argparse takes for the flag
            "--node-config",
            f"app-trust='{keys.trust}' state-dir='{state}'",
        ],
        "unrecognized arguments": ["--node-config", f"app-trust='{keys.trust}' state-dir='{state}'", "--bogus"],
    }
    for why, bad in refused.items():
        with pytest.raises((ValueError, OSError), match=why):
            supernode_command(bad, None)


def test_the_pin_folder_refuses_every_other_process_flower_starts_for_a_task(tmp_path):
    """An AgentApp run (any submitter's FAB may declare one) would start Flower's own flwr-agentapp, unchecked."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder = write_pin_shim(tmp_path / "pin-bin")
    others = set(TASK_TYPE_TO_COMMAND.values()) - {"flwr-clientapp"}
    assert "flwr-agentapp" in others and {p.name for p in folder.iterdir()} == {*others, "flwr-clientapp"}
    for command in others:
        out = subprocess.run([str(folder / command), "--any"], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "runs ClientApps only" in out.stderr, command


def test_the_pin_refuses_every_app_when_its_supernode_would_install_dependencies_at_run_time(keys, monkeypatch):
    """A SuperNode started by hand with --allow-runtime-dependency-installation: `uv sync` from an index, unpinned."""
    from client import app_pin

    run, fab = _task(FAB, sign_app(FAB, keys.fleet, "fleet"))
    context = SimpleNamespace(node_config={"app-trust": str(keys.trust)})
    monkeypatch.setitem(app_pin._pulled, "task", (None, context, run, fab))
    monkeypatch.setattr(app_pin, "_runtime_installs", [True])
    with pytest.raises(AppNotPinnedError, match="allows runtime dependency installation"):
        app_pin.install_from_fab(fab.content)


def test_the_launcher_refuses_approvals_the_pin_would_refuse_every_app_for(keys, tmp_path):
    state = tmp_path / "state"
    bad_pins = tmp_path / "pins"
    bad_pins.write_text("not a digest\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        "is not a sha256 hex digest": f"app-pins='{bad_pins}'",
        "must map key ids": f"app-trust='{bad_pins}'",
        "not a regular file": f"app-pins='{fifo}'",  # refused at once, not read forever
        "No such file": f"app-trust='{tmp_path / 'missing.yaml'}'",
        "app-signed-after must be Unix seconds": f"app-trust='{keys.trust}' app-signed-after='1700000000'",
    }
    for why, approval in cases.items():
        with pytest.raises(ValueError, match=why):
            supernode_command(["--node-config", f"{approval} state-dir='{state}'"], None)


def test_the_runtime_api_certificates_are_made_anew_at_each_start_in_a_folder_of_this_users_alone(keys, tmp_path):
    args = ["--node-config", f"app-trust='{keys.trust}' state-dir='{tmp_path / 'state'}'"]
    cas = [dict(zip(c[len(args) + 1 :: 2], c[len(args) + 2 :: 2], strict=True))["--ssl-ca-certfile"] for c in
           (supernode_command(args, None)[0] for _ in range(2))]  # fmt: skip
    assert cas[0] == cas[1] and stat.S_IMODE(Path(cas[0]).parent.stat().st_mode) == 0o700
    first = Path(cas[0]).read_bytes()
    supernode_command(args, None)
    assert Path(cas[0]).read_bytes() != first  # a new CA: nothing stale, planted or expiring is trusted
    Path(cas[0]).parent.chmod(0o777)
    with pytest.raises(ValueError, match="no one else can write to"):
        supernode_command(args, None)


def test_the_pin_refuses_files_it_cannot_read_and_odd_run_values_by_name_and_never_hangs(keys, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    record = sign_app(FAB, keys.fleet, "fleet")
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(_refusal({"app-pins": str(fifo)}, FAB, record)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert result and "not a regular file" in result[0]
    assert "No such file" in _refusal({"app-trust": str(tmp_path / "missing.yaml")}, FAB, record)
    run, fab = _task(FAB, None)
    run.override_config = None  # not a mapping: no signature
    with pytest.raises(AppNotPinnedError, match="carries no app-signature"):
        check_fab({"app-trust": str(keys.trust)}, run, fab)
    assert "is a bytes, not a string" in _refusal({"app-trust": str(keys.trust)}, FAB, record.encode())  # type: ignore[arg-type]


def test_app_sign_files_the_signature_under_the_id_the_keys_trust_file_gives_it(keys, tmp_path):
    app = _app_copy(tmp_path / "app")

    def sign(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = python_module("shared.cli", "app", "sign", str(app), "--key", str(tmp_path / "fleet.key"), *extra)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    out = sign()
    record = parse_config_args([out.stdout.strip()])["app-signature"]
    assert list(json.loads(record)) == ["fleet"]  # from fleet.key.trust.yaml, no --id needed
    mismatch = sign("--id", "fleetlora")
    assert mismatch.returncode == 2 and "names this key 'fleet'" in mismatch.stderr
    again = subprocess.run(python_module("shared.cli", "app", "key", str(tmp_path / "new.key")), timeout=120)
    assert again.returncode == 0
    (tmp_path / "other2.key.trust.yaml").write_text("# an operator's own list\n")
    kept = subprocess.run(
        python_module("shared.cli", "app", "key", str(tmp_path / "other2.key")), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert kept.returncode == 2 and "never overwritten" in kept.stderr
    assert (tmp_path / "other2.key.trust.yaml").read_text() == "# an operator's own list\n"


def test_the_pin_shim_runs_the_pin_from_a_path_the_shell_would_expand(tmp_path, monkeypatch):
    from shared import app_signing

    script = tmp_path / "q$HOME`x`" / "app_pin.py"
    script.parent.mkdir()
    script.write_text("print('the pin ran')\n")
    monkeypatch.setattr(app_signing, "PIN_SCRIPT", script)
    folder = write_pin_shim(tmp_path / "pin-bin")
    out = subprocess.run([str(folder / "flwr-clientapp")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "the pin ran", out.stderr
