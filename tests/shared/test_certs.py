"""Fleet certificates: a CA, a server certificate for 127.0.0.1, node keys Flower loads, device client certificates.

The certificates in use (mutual TLS of the artifact service) are tested in tests/server/test_distribute.py.
"""

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import shared.certs
from shared.certs import make_fleet_certs
from tests.fifo import outcome_without_blocking


def test_keys_are_private_and_the_server_certificate_names_loopback(tmp_path):
    certs = make_fleet_certs(tmp_path / "certs", ["dev-a", "dev-b"])
    keys = [certs.ca_key, certs.server_key]
    keys += [p for n in ("dev-a", "dev-b") for p in (certs.node_key(n), certs.node_tls_key(n))]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v) for v in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    # what `flwr supernode register` and `flower-supernode --auth-supernode-private-key` load
    public = serialization.load_ssh_public_key(certs.node_pub("dev-a").read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    private = serialization.load_ssh_private_key(certs.node_key("dev-a").read_bytes(), password=None)
    assert private.public_key() == public


def test_each_device_gets_a_client_certificate_of_the_fleet_ca_for_its_own_key(tmp_path):
    certs = make_fleet_certs(tmp_path, ["dev-a"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.node_cert("dev-a").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-a"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a client certificate, not a server's
    key = serialization.load_pem_private_key(certs.node_tls_key("dev-a").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    identity = serialization.load_ssh_private_key(certs.node_key("dev-a").read_bytes(), password=None)
    assert identity.public_key() != cert.public_key()  # one key per purpose


def test_rerun_keeps_the_ca_and_adds_nodes(tmp_path):
    first = make_fleet_certs(tmp_path, ["a"])
    kept = [first.ca, first.node_key("a"), first.node_cert("a"), first.node_tls_key("a"), first.server_cert]
    before = [p.read_bytes() for p in kept]
    again = make_fleet_certs(tmp_path, ["a", "b"])
    assert [p.read_bytes() for p in kept] == before
    assert again.node_key("b").is_file() and again.node_cert("b").is_file()


def _issued_by(ca_path, *paths):
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    for path in paths:
        x509.load_pem_x509_certificate(path.read_bytes()).verify_directly_issued_by(ca)


def test_certificates_the_current_ca_did_not_sign_are_issued_again(tmp_path):
    certs = make_fleet_certs(tmp_path, ["a"])
    certs.ca.unlink()
    certs.ca_key.unlink()  # the operator makes a new CA: the old certificates would no longer be trusted
    make_fleet_certs(tmp_path, ["a"])
    _issued_by(certs.ca, certs.server_cert, certs.node_cert("a"))


def test_a_certificate_whose_key_is_not_its_own_is_issued_again(tmp_path):
    certs = make_fleet_certs(tmp_path, ["a", "b"])
    certs.node_tls_key("b").write_bytes(certs.node_tls_key("a").read_bytes())  # e.g. a crash between the two writes
    make_fleet_certs(tmp_path, ["b"])
    cert_b = x509.load_pem_x509_certificate(certs.node_cert("b").read_bytes())
    key_b = serialization.load_pem_private_key(certs.node_tls_key("b").read_bytes(), password=None)
    assert key_b.public_key() == cert_b.public_key()
    _issued_by(certs.ca, certs.node_cert("b"))


def test_a_certificate_close_to_its_end_is_issued_again(tmp_path, monkeypatch):
    monkeypatch.setattr(shared.certs, "VALID_DAYS", shared.certs.RENEW_DAYS - 1)
    certs = make_fleet_certs(tmp_path, ["a"])
    short = certs.node_cert("a").read_bytes()
    monkeypatch.setattr(shared.certs, "VALID_DAYS", 365)
    make_fleet_certs(tmp_path, ["a"])
    renewed = x509.load_pem_x509_certificate(certs.node_cert("a").read_bytes())
    assert certs.node_cert("a").read_bytes() != short
    assert renewed.not_valid_after_utc - renewed.not_valid_before_utc > dt.timedelta(days=300)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_a_node_name_that_is_not_a_plain_name_is_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(ValueError, match="not a plain name"):
        make_fleet_certs(tmp_path / "certs", [name])
    assert not (tmp_path / "certs").exists() and not (tmp_path / "escape.key").exists()


def test_a_link_planted_where_a_key_is_written_does_not_receive_the_key(tmp_path):
    bait = tmp_path / "bait"
    bait.write_bytes(b"")
    (tmp_path / "certs" / "nodes").mkdir(parents=True)
    (tmp_path / "certs" / "nodes" / ".a.tls.key.tmp").symlink_to(bait)  # where the key is first written
    certs = make_fleet_certs(tmp_path / "certs", ["a"])
    assert bait.read_bytes() == b"" and certs.node_tls_key("a").is_file() and not certs.node_tls_key("a").is_symlink()


def test_a_fifo_where_a_devices_certificate_was_is_replaced_not_waited_on(tmp_path):
    certs = make_fleet_certs(tmp_path, ["dev-a"])
    cert = certs.node_cert("dev-a")
    cert.unlink()
    os.mkfifo(cert, 0o600)
    outcome = outcome_without_blocking(lambda: make_fleet_certs(tmp_path, ["dev-a"]), cert)
    assert not isinstance(outcome, BaseException)
    issued = x509.load_pem_x509_certificate(cert.read_bytes())  # a regular file again, issued anew
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate(certs.ca.read_bytes()))
