"""The device's side of the artifact service's mutual TLS: gRPC channel credentials from the device's own files.

Three keys of the device's *node* config (its own, never the run config, which whoever submits a
run controls) name them::

    ca-file    the fleet CA (PEM): the device talks only to a service whose certificate it signed
    cert-file  the device's TLS client certificate (PEM; ``fleetlora certs --node <name>`` makes
               ``nodes/<name>.crt``): the service serves only devices presenting one the CA signed
    key-file   that certificate's private key (PEM, ``nodes/<name>.tls.key``, readable by its owner only)

All three: mutual TLS. None: plaintext (a simulation on loopback). Any other mix is refused here,
with the missing key named, rather than as an opaque handshake failure later: the artifact
service over TLS admits no device without a certificate. ``fleetlora fetch`` takes the same three
as ``--ca-file``, ``--cert-file``, ``--key-file`` (:func:`add_arguments`, :func:`credentials_from_args`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.files import MAX_PEM_BYTES, FileRefusedError, read_bounded

KEYS = ("ca-file", "cert-file", "key-file")


class ChannelConfigError(ValueError):
    """The device's TLS files are missing, unreadable or inconsistent; the message names the key and file."""


def device_credentials(ca_file: str | Path, cert_file: str | Path, key_file: str | Path) -> grpc.ChannelCredentials:
    """Mutual-TLS credentials: trust ``ca_file``, present ``cert_file`` signed in by ``key_file``.

    Raises
    ------
    ChannelConfigError
        A file is missing, too large, not PEM of the right kind, a key others can read, or a key
        that does not belong to the certificate.
    """
    ca = _read(ca_file, "ca-file")
    cert_pem = _read(cert_file, "cert-file")
    key_pem = _read(key_file, "key-file", private=True)
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError as exc:
        raise ChannelConfigError(f"ca-file {ca_file}: not a PEM certificate ({exc})") from None
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]  # the device's own first, then any intermediates
    except ValueError as exc:
        raise ChannelConfigError(f"cert-file {cert_file}: not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ChannelConfigError(f"key-file {key_file}: not an unencrypted PEM private key ({exc})") from None
    if cert.public_key() != key.public_key():
        raise ChannelConfigError(f"key-file {key_file} is not the key of cert-file {cert_file}")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key_pem, certificate_chain=cert_pem)


def node_credentials(node_config: Mapping[str, object]) -> grpc.ChannelCredentials | None:
    """Credentials from the node config's ``ca-file``, ``cert-file``, ``key-file``: all three or none (plaintext).

    Raises
    ------
    ChannelConfigError
        Some but not all of the three keys are set, one is not a non-empty string, or
        :func:`device_credentials` refuses the files.
    """
    given = {k: node_config[k] for k in KEYS if node_config.get(k) not in (None, "")}
    if not given:
        return None
    for k, v in given.items():
        if not isinstance(v, str):
            raise ChannelConfigError(f"node config {k} must be a file path (a string), got {type(v).__name__}")
    missing = [k for k in KEYS if k not in given]
    if missing:
        raise ChannelConfigError(
            f"node config sets {', '.join(given)} but not {', '.join(missing)}: the artifact service speaks "
            "mutual TLS and needs the fleet CA, this device's certificate and its key "
            "(`fleetlora certs --node <name>` makes nodes/<name>.crt and nodes/<name>.tls.key)"
        )
    return device_credentials(*(Path(str(given[k])).expanduser() for k in KEYS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--ca-file``, ``--cert-file``, ``--key-file`` (a CLI's spelling of the node-config keys)."""
    parser.add_argument("--ca-file", type=Path, help="fleet CA (PEM): speak mutual TLS (with --cert-file, --key-file)")
    parser.add_argument("--cert-file", type=Path, help="this device's TLS client certificate (PEM)")
    parser.add_argument("--key-file", type=Path, help="the private key of --cert-file (PEM, mode 0600)")


def credentials_from_args(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """Credentials from the arguments :func:`add_arguments` added (None: plaintext)."""
    values = {"ca-file": args.ca_file, "cert-file": args.cert_file, "key-file": args.key_file}
    return node_credentials({k: str(v) for k, v in values.items() if v is not None})


def _read(path: str | Path, key: str, private: bool = False) -> bytes:
    """Read a PEM file of at most ``MAX_PEM_BYTES`` (``private``: refuse one that others can read)."""
    try:
        return read_bounded(path, MAX_PEM_BYTES, private=private)  # a FIFO in its place cannot hang the device
    except FileRefusedError as exc:
        raise ChannelConfigError(f"{key} {exc}") from None
    except OSError as exc:
        raise ChannelConfigError(f"{key} {path}: cannot read it ({exc.strerror})") from None
