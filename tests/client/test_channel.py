"""A device's TLS files, parsed once: all three or none, each readable, the key its certificate's and private.

The credentials in use against a real service are tested in tests/server/test_distribute.py.
"""

import argparse
import os

import grpc
import pytest

from client.channel import ChannelConfigError, add_arguments, credentials_from_args, node_credentials
from shared.certs import make_fleet_certs
from tests.fifo import outcome_without_blocking


@pytest.fixture
def certs(tmp_path):
    return make_fleet_certs(tmp_path / "certs", ["dev-a", "dev-b"])


def _config(certs, name="dev-a", **change):
    config = {
        "ca-file": str(certs.ca),
        "cert-file": str(certs.node_cert(name)),
        "key-file": str(certs.node_tls_key(name)),
    }
    return {**config, **change}


def test_all_three_files_give_credentials_and_none_gives_plaintext(certs):
    assert isinstance(node_credentials(_config(certs)), grpc.ChannelCredentials)
    assert node_credentials({"name": "dev-a", "ca-file": ""}) is None


def test_a_ca_without_a_device_certificate_is_refused_naming_what_is_missing(certs):
    # a one-way TLS device would only fail later, in an opaque handshake with the mutual-TLS service
    with pytest.raises(ChannelConfigError, match="sets ca-file but not cert-file, key-file"):
        node_credentials({"ca-file": str(certs.ca)})


def test_a_key_that_is_not_the_certificates_is_refused(certs):
    with pytest.raises(ChannelConfigError, match="is not the key of cert-file"):
        node_credentials(_config(certs, **{"key-file": str(certs.node_tls_key("dev-b"))}))


def test_a_private_key_others_can_read_is_refused(certs):
    os.chmod(certs.node_tls_key("dev-a"), 0o644)
    with pytest.raises(ChannelConfigError, match="key-file .*: other users can read it; chmod 600 it"):
        node_credentials(_config(certs))


@pytest.mark.parametrize(
    ("key", "content", "message"),
    [
        ("ca-file", b"not a certificate", "ca-file .*: not a PEM certificate"),
        ("cert-file", b"x" * (64 * 1024 + 1), "cert-file .*: larger than 65,536 bytes"),
        ("key-file", None, "key-file .*: cannot read it"),
    ],
)
def test_a_bad_file_is_refused_naming_its_key(certs, tmp_path, key, content, message):
    path = tmp_path / "bad.pem"
    if content is not None:
        path.write_bytes(content)
        path.chmod(0o600)
    with pytest.raises(ChannelConfigError, match=message):
        node_credentials(_config(certs, **{key: str(path)}))


def test_a_value_that_is_not_a_path_is_refused(certs):
    with pytest.raises(ChannelConfigError, match="cert-file must be a file path"):
        node_credentials(_config(certs, **{"cert-file": 7}))


def test_a_fifo_in_place_of_a_file_is_refused_without_hanging(certs, tmp_path):
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    refused = outcome_without_blocking(lambda: node_credentials(_config(certs, **{"ca-file": str(fifo)})), fifo)
    assert isinstance(refused, ChannelConfigError) and "not a regular file" in str(refused)


def test_the_cli_flags_spell_the_same_keys(certs):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--ca-file",
            str(certs.ca),
            "--cert-file",
            str(certs.node_cert("dev-a")),
            "--key-file",
            str(certs.node_tls_key("dev-a")),
        ]
    )
    assert isinstance(credentials_from_args(args), grpc.ChannelCredentials)
    assert credentials_from_args(parser.parse_args([])) is None
    with pytest.raises(ChannelConfigError, match="sets ca-file but not cert-file, key-file"):
        credentials_from_args(parser.parse_args(["--ca-file", str(certs.ca)]))
