"""Fleet certificates: a CA, a server certificate that TLS clients accept for 127.0.0.1, node keys Flower loads."""

import stat

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.fetch import FetchError, FetchPolicy, fetch_release
from server.distribute import serve, server_credentials
from shared.certs import make_fleet_certs
from shared.release import make_release, write_release
from shared.sign import TrustList, key_id


def test_keys_are_private_and_the_server_certificate_names_loopback(tmp_path):
    certs = make_fleet_certs(tmp_path / "certs", ["dev-a", "dev-b"])
    for key in (certs.ca_key, certs.server_key, certs.node_key("dev-a"), certs.node_key("dev-b")):
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


def test_rerun_keeps_the_ca_and_adds_nodes(tmp_path):
    first = make_fleet_certs(tmp_path, ["a"])
    ca, key_a = first.ca.read_bytes(), first.node_key("a").read_bytes()
    again = make_fleet_certs(tmp_path, ["a", "b"])
    assert again.ca.read_bytes() == ca and again.node_key("a").read_bytes() == key_a
    assert again.node_key("b").is_file()


def test_artifact_service_over_tls_serves_devices_with_the_ca_and_refuses_plaintext(tmp_path):
    certs = make_fleet_certs(tmp_path / "certs", [])
    signer = Ed25519PrivateKey.generate()
    trust = TrustList({key_id(signer.public_key()): signer.public_key()})
    release, _ = make_release(
        {"w.bin": b"x" * 1000}, kind="base", run_id="base", round=0, base_digest="b" * 64, method="int4", key=signer
    )
    write_release(release, tmp_path / "store" / "base")
    server, port = serve(
        tmp_path / "store", "127.0.0.1:0", credentials=server_credentials(certs.server_cert, certs.server_key)
    )
    try:
        tls = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        got = fetch_release(f"127.0.0.1:{port}", "base", tmp_path / "cache", trust, credentials=tls)
        assert got.bytes_downloaded == 1000
        with pytest.raises(FetchError):
            fetch_release(
                f"127.0.0.1:{port}", "base", tmp_path / "plain", trust, policy=FetchPolicy(retries=0, rpc_timeout=5)
            )
    finally:
        server.stop(None)
