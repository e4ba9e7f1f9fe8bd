"""The fetch cache and its downloads: a second run downloads nothing, a cached folder must hold the manifest its
name says, a trickle is no progress."""

import pytest

from client.download import FetchPolicy
from client.fetch import FetchError, fetch_release
from server.distribute import ArtifactServicer
from shared.manifest import parse
from shared.release import make_release, read_release, verify_release, write_release
from tests.client.test_fetch import (  # noqa: F401 - root and base_root are fixtures
    BASE,
    KEY,
    PAYLOAD,
    TRUST,
    _fetch_counting,
    _serve_base,
    _Started,
    base_root,
    root,
)


def test_a_cached_folder_holding_another_signed_release_than_its_name_is_fetched_again(root, tmp_path):  # noqa: F811
    served = read_release(root / "base")
    other, _ = make_release({"adapter_config.json": b"{}"}, kind="base", run_id="base", round=0, base_digest=BASE,
                            method="int4", key=KEY)  # fmt: skip
    cache = tmp_path / "cache"
    planted = cache / parse(served.manifest_bytes).digest()
    write_release(other, planted)  # validly signed, but not the release the folder's name stands for
    with _Started(root, ArtifactServicer) as address:
        got = fetch_release(address, "base", cache, TRUST, BASE, sleep=lambda _: None)
    assert got.manifest.digest() == parse(served.manifest_bytes).digest()
    assert read_release(got.folder).manifest_bytes == served.manifest_bytes  # the served release, not the plant
    assert got.bytes_downloaded > 0


class TricklesOneBytePerStream(ArtifactServicer):
    calls = 0

    async def Download(self, request, context):  # noqa: N802
        type(self).calls += 1
        async for chunk in super().Download(request, context):
            yield self.chunk(chunk.offset, chunk.data[:1])  # a well-formed chunk of one byte, then the stream ends
            return


def test_a_service_trickling_a_byte_per_stream_is_given_up_on_after_the_retries(root, tmp_path):  # noqa: F811
    with _Started(root, TricklesOneBytePerStream) as address:
        with pytest.raises(FetchError, match=r"adapter_config\.json of base: download failed at byte 3: .*ended"):
            fetch_release(
                address, "base", tmp_path / "cache", TRUST, BASE, FetchPolicy(retries=2), sleep=lambda _: None
            )
    assert TricklesOneBytePerStream.calls == 3  # before: a reset on every byte, 1,206 streams for this 1.2 kB file


def test_first_run_downloads_once_and_second_run_downloads_nothing(base_root, tmp_path):  # noqa: F811
    server, address = _serve_base(base_root)
    try:
        first, _ = _fetch_counting(address, tmp_path / "cache")
        assert first.bytes_downloaded == len(PAYLOAD) + len(b'{"bits": 4}')
        assert (first.folder / "model.int4.safetensors").read_bytes() == PAYLOAD
        verify_release(read_release(first.folder), TRUST, BASE)
        second, _ = _fetch_counting(address, tmp_path / "cache")
        assert second.folder == first.folder and second.bytes_downloaded == 0
    finally:
        server.stop(None)


def test_a_fetch_for_another_base_is_refused_and_the_cached_release_stays(base_root, tmp_path):  # noqa: F811
    server, address = _serve_base(base_root)
    try:
        first, _ = _fetch_counting(address, tmp_path / "cache")
        with pytest.raises(FetchError, match="release is for base model"):
            fetch_release(address, "base", tmp_path / "cache", TRUST, "c" * 64, FetchPolicy(retries=0))
    finally:
        server.stop(None)
    assert verify_release(read_release(first.folder), TRUST, BASE)  # was deleted, then downloaded again to be refused
