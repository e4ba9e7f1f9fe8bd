"""A signed release and its chain manifests in a Flower message, through Flower's own wire encoding."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto

from shared.chain import MAX_LINKS, SignedManifest
from shared.release import make_release
from shared.release_records import (
    LINK_MANIFESTS,
    LINK_SIGNATURES,
    links_config,
    links_from_config,
    release_config,
    release_from_records,
    release_to_records,
)
from shared.wire import WireError

KEY = Ed25519PrivateKey.generate()


def _release(round, previous=""):
    files = {"adapter_model.safetensors": bytes([round]) * 16, "adapter_config.json": b"{}"}
    return make_release(
        files,
        kind="adapter",
        run_id="r",
        round=round,
        base_digest="b" * 64,
        method="fedavg",
        key=KEY,
        previous=previous,
    )


def _over_the_wire(entries):
    return config_record_from_proto(config_record_to_proto(ConfigRecord(entries)))


def test_a_release_and_its_links_survive_flowers_encoding():
    r1, m1 = _release(1)
    r2, _ = _release(2, m1.digest())
    arrays, signed = release_to_records(r2)
    links = [SignedManifest(r1.manifest_bytes, r1.signature)]
    config = _over_the_wire({"server-round": 3, **signed, **links_config(links)})
    assert release_from_records(arrays, config) == r2
    assert links_from_config(config) == links
    assert links_from_config(_over_the_wire({"server-round": 3, **release_config(r2)})) == []  # none sent
    assert links_from_config(_over_the_wire({**links_config([])})) == []


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ({LINK_MANIFESTS: [b"m"], LINK_SIGNATURES: []}, "not two lists of one length"),
        ({LINK_MANIFESTS: "m", LINK_SIGNATURES: "s"}, "not two lists of one length"),
        ({LINK_MANIFESTS: [b"m"] * (MAX_LINKS + 1), LINK_SIGNATURES: [bytes(64)] * (MAX_LINKS + 1)}, "more than 64"),
        ({LINK_MANIFESTS: [b"m" * 70_000], LINK_SIGNATURES: [bytes(64)]}, "not bytes of at most 65,536"),
        ({LINK_MANIFESTS: ["m"], LINK_SIGNATURES: [bytes(64)]}, "not bytes"),
        ({LINK_MANIFESTS: [b"m"], LINK_SIGNATURES: [bytes(63)]}, "not 64 bytes"),
    ],
)
def test_malformed_links_are_a_wire_error(entries, reason):
    with pytest.raises(WireError, match=reason):
        links_from_config(_over_the_wire(entries))
