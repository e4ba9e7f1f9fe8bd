"""Fleet certificates: a CA, a server certificate for 127.0.0.1, node keys Flower loads, device client certificates.

The certificates in use (mutual TLS of the artifact service) are tested in tests/server/test_distribute.py.
"""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.certs import make_fleet_certs


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


def test_certificates_the_current_ca_did_not_sign_or_that_lost_their_key_are_issued_again(tmp_path):
    certs = make_fleet_certs(tmp_path, ["a", "b"])
    certs.ca.unlink()
    certs.ca_key.unlink()  # the operator makes a new CA: the old certificates would no longer be trusted
    certs.node_tls_key("b").write_bytes(certs.node_tls_key("a").read_bytes())  # a key that is not b's (a crash)
    make_fleet_certs(tmp_path, ["a"])
    make_fleet_certs(tmp_path, ["b"])
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    for path in (certs.server_cert, certs.node_cert("a"), certs.node_cert("b")):
        x509.load_pem_x509_certificate(path.read_bytes()).verify_directly_issued_by(ca)
    cert_b = x509.load_pem_x509_certificate(certs.node_cert("b").read_bytes())
    key_b = serialization.load_pem_private_key(certs.node_tls_key("b").read_bytes(), password=None)
    assert key_b.public_key() == cert_b.public_key()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_a_node_name_that_is_not_a_plain_name_is_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(ValueError, match="not a plain name"):
        make_fleet_certs(tmp_path / "certs", [name])
    assert not (tmp_path / "certs").exists() and not (tmp_path / "escape.key").exists()
