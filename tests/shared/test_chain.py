"""A newer release must lead back to the accepted one through signed manifests; time never goes back."""

import dataclasses
import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.chain import MAX_CLOCK_SKEW, ChainGapError, SignedManifest
from shared.errors import ReleaseError
from shared.release import make_release, verify_release
from shared.replay import AcceptedReleases
from shared.sign import TrustList

BASE = "b" * 64
KEY = Ed25519PrivateKey.generate()
TRUST = TrustList.of(KEY.public_key())


def _signed(round, previous="", run_id="run-1", kind="adapter", created=None, key=KEY, salt=b""):
    release, manifest = make_release(
        {"adapter_model.safetensors": bytes([round % 256]) * 8 + salt},
        kind=kind,
        run_id=run_id,
        round=round,
        base_digest=BASE,
        method="fedavg",
        key=key,
        previous=previous,
    )
    if created is not None:  # re-signed with another creation time
        manifest = dataclasses.replace(manifest, created=created)
        release = dataclasses.replace(
            release, manifest_bytes=manifest.canonical(), signature=key.sign(manifest.canonical())
        )
    return release, manifest


def _link(release):
    return SignedManifest(release.manifest_bytes, release.signature)


def _history(rounds, salt=b""):
    """The releases a coordinator published, chained: ``{round: (release, manifest)}``."""
    out, previous = {}, ""
    for n in rounds:
        out[n] = _signed(n, previous, salt=salt)
        previous = out[n][1].digest()
    return out


@pytest.fixture
def device(tmp_path):
    return AcceptedReleases(tmp_path / "accepted.json")


def _accept(device, release, links=()):
    device.accept(verify_release(release, TRUST, BASE, device, links))


def test_a_round_that_published_nothing_leaves_no_gap_in_the_chain(device):
    published = _history([1, 3])  # round 2 published nothing: round 3 names round 1
    _accept(device, published[1][0])
    _accept(device, published[3][0])
    assert device.runs["adapter:run-1"]["round"] == 3


def test_an_off_chain_release_after_a_gap_is_refused(device):
    published = _history([1, 3])
    _accept(device, published[1][0])
    other = _history([1, 2, 3], salt=b"other")  # another history, validly signed (a second coordinator, an old backup)
    with pytest.raises(ChainGapError, match="round 3 of run run-1 does not lead back to the accepted round 1"):
        verify_release(other[3][0], TRUST, BASE, device, [_link(other[2][0]), _link(other[1][0])])
    assert device.runs["adapter:run-1"]["round"] == 1


def test_a_device_that_missed_rounds_follows_the_links_it_is_given(device):
    published = _history([0, 1, 2, 3, 4])
    _accept(device, published[1][0])
    with pytest.raises(ChainGapError, match="this device missed more rounds than it was sent manifests for"):
        verify_release(published[4][0], TRUST, BASE, device)  # no links: it cannot tell
    with pytest.raises(ChainGapError, match=r"followed back to round 3"):
        verify_release(published[4][0], TRUST, BASE, device, [_link(published[3][0])])  # round 2's is missing
    links = [_link(published[n][0]) for n in (3, 2, 0)]  # in any order, with an extra one
    _accept(device, published[4][0], links)
    assert device.runs["adapter:run-1"]["round"] == 4


def test_every_link_is_verified(device):
    published = _history([1, 2, 3])
    _accept(device, published[1][0])
    forged = _link(published[2][0])._replace(signature=bytes(64))
    with pytest.raises(ReleaseError, match="chain manifest 1 refused: signature does not match"):
        verify_release(published[3][0], TRUST, BASE, device, [forged])
    rogue_key = Ed25519PrivateKey.generate()
    rogue = _signed(2, published[1][1].digest(), key=rogue_key)[0]
    with pytest.raises(ReleaseError, match="chain manifest 1 refused: .*not in the trust list"):
        verify_release(published[3][0], TRUST, BASE, device, [_link(rogue)])
    with pytest.raises(ReleaseError, match="chain manifest 1 refused: manifest is not UTF-8 JSON"):
        verify_release(published[3][0], TRUST, BASE, device, [SignedManifest(b"{", bytes(64))])


def test_links_of_another_run_or_outside_the_gap_do_not_count(device):
    published = _history([1, 2, 3])
    _accept(device, published[1][0])
    elsewhere = _signed(2, published[1][1].digest(), run_id="run-2")[0]  # signed, chained, but of another run
    with pytest.raises(ChainGapError):
        verify_release(published[3][0], TRUST, BASE, device, [_link(elsewhere)])


def _stamp(delta):
    return (dt.datetime.now(dt.UTC) + delta).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_release_from_the_future_is_refused_even_as_the_first(device):
    future = _signed(1, created=_stamp(MAX_CLOCK_SKEW + dt.timedelta(hours=1)))[0]
    with pytest.raises(ReleaseError, match="more than 1 day, 0:00:00 after this device's clock"):
        verify_release(future, TRUST, BASE, device)
    _accept(device, _signed(1, created=_stamp(dt.timedelta(hours=1)))[0])  # a clock a little off is fine


def test_the_releases_of_a_run_never_go_back_in_time(device):
    r1 = _signed(1, created="2026-11-24T05:00:00Z")
    _accept(device, r1[0])
    older = _signed(2, r1[1].digest(), created="2026-11-24T04:59:59Z")[0]
    with pytest.raises(ReleaseError, match="created 2026-11-24T04:59:59Z, before the release this device accepted"):
        verify_release(older, TRUST, BASE, device)
    _accept(device, _signed(2, r1[1].digest(), created="2026-11-24T05:00:00Z")[0])


def test_the_base_is_pinned_against_older_ones(device):
    def base(created, salt=b""):
        return _signed(0, run_id="base", kind="base", created=created, salt=salt)[0]

    _accept(device, base("2026-11-24T05:00:00Z"))
    _accept(device, base("2026-11-24T05:00:00Z"))  # the same base, fetched again
    for refused in (base("2026-11-01T00:00:00Z", b"old"), base("2026-11-24T05:00:00Z", b"twin")):
        with pytest.raises(ReleaseError, match="base is pinned to manifest .* is not newer: refused"):
            verify_release(refused, TRUST, BASE, device)
    _accept(device, base("2026-12-01T00:00:00Z", b"new"))  # a base the operator published later replaces it
    assert device.runs["base:base"]["created"] == "2026-12-01T00:00:00Z"
