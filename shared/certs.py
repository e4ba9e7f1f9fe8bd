"""TLS certificates and SuperNode identity keys for a fleet (``fleetlora certs``), written with ``cryptography``.

One folder holds everything a fleet needs::

    ca.pem, ca.key           the fleet's own certificate authority (ca.key: 0600, stays with the operator)
    server.pem, server.key   the coordinator's TLS certificate and key (SuperLink and artifact service),
                             with a subjectAltName for every host or IP address devices dial
    nodes/<name>.key         a SuperNode's identity: EC P-384 private key, OpenSSH format, 0600
    nodes/<name>.pub         its public key (OpenSSH line), what the operator registers on the
                             SuperLink (``flwr supernode register``)

A device needs ``ca.pem`` (to trust the coordinator) and its own ``nodes/<name>.key``; the
coordinator needs ``server.pem``, ``server.key`` and the ``.pub`` of every device it admits.
On real devices each device makes its own key (:func:`make_node_key`) and sends only the
``.pub``; the private key never leaves the device. Flower's SuperNode authentication takes
NIST EC keys in OpenSSH format (``flwr supernode register`` loads them with
``load_ssh_public_key``), hence P-384 here rather than Ed25519.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class FleetCerts:
    """Paths of a fleet's certificate folder (see the module docstring)."""

    folder: Path

    @property
    def ca(self) -> Path:
        """The CA certificate every device trusts."""
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA private key (operator only)."""
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The coordinator's certificate (SuperLink, artifact service)."""
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        """The coordinator's TLS private key."""
        return self.folder / "server.key"

    def node_key(self, name: str) -> Path:
        """Return the path of a SuperNode's private identity key."""
        return self.folder / "nodes" / f"{name}.key"

    def node_pub(self, name: str) -> Path:
        """Return the path of a SuperNode's public key (registered on the SuperLink)."""
        return self.folder / "nodes" / f"{name}.pub"


def make_fleet_certs(
    folder: str | Path, nodes: list[str], sans: tuple[str, ...] = DEFAULT_SANS, force: bool = False
) -> FleetCerts:
    """Create the CA, the server certificate (for ``sans``) and one identity key per node name.

    Files that exist are kept unless ``force``, so re-running adds new nodes without changing
    the CA devices already trust. With ``force`` everything is made anew.
    """
    certs = FleetCerts(Path(folder))
    if force or not (certs.ca.is_file() and certs.ca_key.is_file()):
        ca_key = ec.generate_private_key(ec.SECP384R1())
        _write_key(certs.ca_key, _pem(ca_key))
        certs.ca.write_bytes(_ca_cert(ca_key).public_bytes(serialization.Encoding.PEM))
    ca_key_loaded = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    if force or not (certs.server_cert.is_file() and certs.server_key.is_file()) or _sans(certs) != set(sans):
        key = ec.generate_private_key(ec.SECP384R1())
        _write_key(certs.server_key, _pem(key))
        cert = _server_cert(key, ca_key_loaded, ca_cert, sans)
        certs.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for name in nodes:
        if force or not certs.node_key(name).is_file():
            make_node_key(certs.node_key(name))
    return certs


def make_node_key(path: str | Path) -> Path:
    """Write a SuperNode identity key (EC P-384, OpenSSH, 0600) and ``<name>.pub``; return the ``.pub`` path."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_key(path, private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub = path.with_suffix(".pub")
    pub.write_bytes(public + f" fleetlora-{path.stem}\n".encode())
    return pub


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_key(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600, never world-readable for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))


def _ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetlora fleet CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _validity(builder).sign(key, hashes.SHA384())


def _server_cert(
    key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, sans: tuple[str, ...]
) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    return _validity(builder).sign(ca_key, hashes.SHA384())


def _sans(certs: FleetCerts) -> set[str]:
    """Return the subjectAltNames of the existing server certificate (empty if there is none)."""
    if not certs.server_cert.is_file():
        return set()
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in ext}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``certs`` subcommand."""
    p = sub.add_parser("certs", help="make a fleet's TLS CA, server certificate and SuperNode identity keys")
    p.add_argument("--out", type=Path, default=Path(".fleetlora/certs"), help="folder (default .fleetlora/certs)")
    p.add_argument(
        "--san",
        action="append",
        help="host name or IP address devices dial (repeat; default: 127.0.0.1 and localhost)",
    )
    p.add_argument("--node", action="append", default=[], help="make an identity key for this SuperNode (repeat)")
    p.add_argument("--force", action="store_true", help="make everything anew (devices must get the new ca.pem)")
    p.set_defaults(func=_certs_cli)


def _certs_cli(args: argparse.Namespace) -> int:
    certs = make_fleet_certs(args.out, args.node, tuple(args.san or DEFAULT_SANS), args.force)
    print(f"CA (give to every device): {certs.ca}")
    print(f"server certificate and key (coordinator only): {certs.server_cert}, {certs.server_key}")
    for name in args.node:
        print(f"node {name}: {certs.node_key(name)} (device only), {certs.node_pub(name)} (register on the SuperLink)")
    return 0
