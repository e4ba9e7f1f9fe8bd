"""TLS certificates and SuperNode identity keys for a fleet (``fleetlora certs``), written with ``cryptography``.

One folder holds everything a fleet needs::

    ca.pem, ca.key           the fleet's own certificate authority (ca.key: 0600, stays with the operator)
    server.pem, server.key   the coordinator's TLS certificate and key (SuperLink and artifact service),
                             with a subjectAltName for every host or IP address devices dial
    nodes/<name>.key         a SuperNode's identity: EC P-384 private key, OpenSSH format, 0600
    nodes/<name>.pub         its public key (OpenSSH line), what the operator registers on the
                             SuperLink (``flwr supernode register``)
    nodes/<name>.crt         the device's TLS client certificate (CN = name, clientAuth), signed by the CA:
                             what it presents to the artifact service (mutual TLS)
    nodes/<name>.tls.key     that certificate's private key: EC P-384, PEM (PKCS#8), 0600

A device needs ``ca.pem`` (to trust the coordinator), its own ``nodes/<name>.key`` and its
``nodes/<name>.crt`` + ``.tls.key``; the coordinator needs ``server.pem``, ``server.key``,
``ca.pem`` (to check device certificates) and the ``.pub`` of every device it admits.
On real devices each device makes its own identity key (:func:`make_node_key`) and sends only
the ``.pub``; the private key never leaves the device. Flower's SuperNode authentication takes
NIST EC keys in OpenSSH format (``flwr supernode register`` loads them with
``load_ssh_public_key``), hence P-384 here rather than Ed25519. The TLS client key is a second
key: gRPC's TLS reads PEM, and one key per purpose means a leaked TLS key does not admit a
SuperNode.

Every file is written to a temporary file, fsynced and renamed (then the folder is fsynced): a
crash never leaves half a key. A re-run keeps what is valid and re-issues a certificate that the
current CA did not sign, whose key does not match, or that expires within ``RENEW_DAYS``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.files import MAX_PEM_BYTES, read_bounded
from shared.release import FOLDER_NAME

DEFAULT_SANS = ("127.0.0.1", "localhost")
VALID_DAYS = 365
RENEW_DAYS = 30  # a re-run re-issues a certificate this close to its end, before devices start failing


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

    def node_cert(self, name: str) -> Path:
        """Return the path of a device's TLS client certificate (presented to the artifact service)."""
        return self.folder / "nodes" / f"{name}.crt"

    def node_tls_key(self, name: str) -> Path:
        """Return the path of the private key of :meth:`node_cert`."""
        return self.folder / "nodes" / f"{name}.tls.key"


def make_fleet_certs(
    folder: str | Path, nodes: list[str], sans: tuple[str, ...] = DEFAULT_SANS, force: bool = False
) -> FleetCerts:
    """Create the CA, the server certificate (for ``sans``), and per node an identity key and a client certificate.

    Files that are valid are kept unless ``force``, so re-running adds new nodes without changing
    the CA devices already trust. With ``force`` everything is made anew.

    Raises
    ------
    ValueError
        A node name is not one plain name (``[A-Za-z0-9][A-Za-z0-9._-]*``, it names files).
    """
    for name in nodes:
        if not FOLDER_NAME.fullmatch(name):
            raise ValueError(f"node name {name!r:.80} is not a plain name of [A-Za-z0-9._-] (it names files)")
    certs = FleetCerts(Path(folder))
    if force or not (certs.ca.is_file() and certs.ca_key.is_file()):
        ca_key = ec.generate_private_key(ec.SECP384R1())
        _write_file(certs.ca_key, _pem(ca_key), private=True)
        _write_file(certs.ca, _ca_cert(ca_key).public_bytes(serialization.Encoding.PEM))
    ca_key_loaded = serialization.load_pem_private_key(read_bounded(certs.ca_key, MAX_PEM_BYTES), password=None)
    if not isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{certs.ca_key} is not an EC private key; remake the fleet's certificates with --force")
    ca = _Issuer(ca_key_loaded, x509.load_pem_x509_certificate(read_bounded(certs.ca, MAX_PEM_BYTES)))
    if force or not ca.issued(certs.server_cert, certs.server_key) or _sans(certs) != set(sans):
        ca.issue(certs.server_cert, certs.server_key, sans[0], ExtendedKeyUsageOID.SERVER_AUTH, _general_names(sans))
    for name in nodes:
        if force or not certs.node_key(name).is_file():
            make_node_key(certs.node_key(name))
        if force or not ca.issued(certs.node_cert(name), certs.node_tls_key(name)):
            ca.issue(certs.node_cert(name), certs.node_tls_key(name), name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return certs


def make_node_key(path: str | Path) -> Path:
    """Write a SuperNode identity key (EC P-384, OpenSSH, 0600) and ``<name>.pub``; return the ``.pub`` path."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_file(path, private, private=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub = path.with_suffix(".pub")
    _write_file(pub, public + f" fleetlora-{path.stem}\n".encode())
    return pub


@dataclass(frozen=True)
class _Issuer:
    """The fleet CA: issues leaf certificates and tells whether an existing one is still good."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def issued(self, cert_path: Path, key_path: Path) -> bool:
        """Whether ``cert_path`` is signed by this CA, valid for ``RENEW_DAYS`` more and matches ``key_path``."""
        try:
            cert = x509.load_pem_x509_certificate(read_bounded(cert_path, MAX_PEM_BYTES))
            key = serialization.load_pem_private_key(read_bounded(key_path, MAX_PEM_BYTES), password=None)
            cert.verify_directly_issued_by(self.cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            return False
        renew = dt.datetime.now(dt.UTC) + dt.timedelta(days=RENEW_DAYS)
        return cert.not_valid_after_utc > renew and cert.public_key() == key.public_key()

    def issue(
        self,
        cert_path: Path,
        key_path: Path,
        common_name: str,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> None:
        """Make a key and a leaf certificate for ``common_name`` with extended key usage ``usage``; write both."""
        key = ec.generate_private_key(ec.SECP384R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = _validity(builder).sign(self.key, hashes.SHA384())
        _write_file(key_path, _pem(key), private=True)  # the key first: a crash between leaves a mismatch,
        _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM))  # which the next run re-issues


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_file(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``path`` crash-safely: a fresh temp file (0600 for a key: never readable by others), fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crash; O_EXCL below then refuses anything planted meanwhile
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def _general_names(sans: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return names


def _sans(certs: FleetCerts) -> set[str]:
    """Return the subjectAltNames of the existing server certificate (empty if there is none)."""
    if not certs.server_cert.is_file():
        return set()
    cert = x509.load_pem_x509_certificate(read_bounded(certs.server_cert, MAX_PEM_BYTES))
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in ext}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``certs`` subcommand."""
    p = sub.add_parser(
        "certs", help="make a fleet's TLS CA, server certificate, SuperNode identity keys and device certificates"
    )
    p.add_argument("--out", type=Path, default=Path(".fleetlora/certs"), help="folder (default .fleetlora/certs)")
    p.add_argument(
        "--san",
        action="append",
        help="host name or IP address devices dial (repeat; default: 127.0.0.1 and localhost)",
    )
    p.add_argument(
        "--node",
        action="append",
        default=[],
        help="make an identity key and a TLS client certificate for this device (repeat)",
    )
    p.add_argument("--force", action="store_true", help="make everything anew (devices must get the new ca.pem)")
    p.set_defaults(func=_certs_cli)


def _certs_cli(args: argparse.Namespace) -> int:
    certs = make_fleet_certs(args.out, args.node, tuple(args.san or DEFAULT_SANS), args.force)
    print(f"CA (give to every device): {certs.ca}")
    print(f"server certificate and key (coordinator only): {certs.server_cert}, {certs.server_key}")
    for name in args.node:
        print(
            f"node {name}: {certs.node_key(name)} (device only), {certs.node_pub(name)} (register on the SuperLink), "
            f"{certs.node_cert(name)} + {certs.node_tls_key(name)} (device only: node config cert-file, key-file)"
        )
    return 0
