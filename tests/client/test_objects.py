"""The device cache's content store: a release of bytes the cache holds is neither downloaded nor stored again."""

import os

from client.objects import OBJECTS
from shared.release import make_release, read_release, verify_release, write_release
from tests.client.test_fetch import BASE, KEY, PAYLOAD, TRUST, _fetch_counting, _serve_base
from tests.client.test_fetch import base_root as base_root  # the fixture: a 3 MB base release

FILES = {"model.int4.safetensors": PAYLOAD, "config.json": b'{"bits": 4}'}


def _republish(root, run_id):
    """The coordinator quantizes the same source again: the same bytes under a new signed manifest."""
    release, manifest = make_release(
        FILES, kind="base", run_id=run_id, round=0, base_digest=BASE, method="int4", key=KEY
    )
    write_release(release, root / "base")
    return manifest


def test_a_re_created_base_of_the_same_bytes_is_linked_not_downloaded_or_stored_twice(base_root, tmp_path):
    cache = tmp_path / "cache"
    server, address = _serve_base(base_root)
    try:
        first, _ = _fetch_counting(address, cache)
        manifest = _republish(base_root, "base-again")
        second, _ = _fetch_counting(address, cache)
    finally:
        server.stop(None)
    assert second.folder != first.folder and second.manifest.digest() == manifest.digest()  # another release
    assert second.bytes_downloaded == 0  # every file was in the cache already, by its content
    verify_release(read_release(second.folder), TRUST, BASE)  # and verified like any download
    a, b = (f / "model.int4.safetensors" for f in (first.folder, second.folder))
    assert os.path.samefile(a, b) and a.stat().st_nlink == 3  # one file on disk: two releases and the store


def test_a_damaged_object_is_never_used_the_file_is_downloaded(base_root, tmp_path):
    cache = tmp_path / "cache"
    server, address = _serve_base(base_root)
    try:
        first, _ = _fetch_counting(address, cache)
        obj = cache / OBJECTS / first.manifest.files["model.int4.safetensors"]
        obj.unlink()  # the store's copy is damaged (same size, other bytes); the release folder keeps its own
        obj.write_bytes(b"\0" * len(PAYLOAD))
        _republish(base_root, "base-again")
        second, _ = _fetch_counting(address, cache)
    finally:
        server.stop(None)
    assert second.bytes_downloaded == len(PAYLOAD)  # fetched, not linked to the damaged object
    assert (second.folder / "model.int4.safetensors").read_bytes() == PAYLOAD
    assert obj.read_bytes() == PAYLOAD  # the store holds the good bytes again
