"""The fetch cache: a folder named by a manifest's digest is used only if it holds that very manifest."""

from client.fetch import fetch_release
from server.distribute import ArtifactServicer
from shared.manifest import parse
from shared.release import make_release, read_release, write_release
from tests.client.test_fetch import BASE, KEY, TRUST, _Started, root  # noqa: F401 - root is a fixture


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
