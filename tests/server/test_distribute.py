"""The artifact service and the device fetcher over a real gRPC server on loopback."""

import os
import socket

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.fetch import FetchError, FetchPolicy, fetch_release
from server.distribute import ArtifactServicer, ArtifactStore, serve
from shared.release import follow_latest, make_release, read_release, verify_release, write_release
from shared.sign import TrustList, key_id

KEY = Ed25519PrivateKey.generate()
TRUST = TrustList({key_id(KEY.public_key()): KEY.public_key()})
BASE = "b" * 64
CHUNK = 64 * 1024
PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # 3 MB + a partial last chunk: 49 chunks


@pytest.fixture
def root(tmp_path):
    files = {"model.int4.safetensors": PAYLOAD, "config.json": b'{"bits": 4}'}
    release, _ = make_release(files, kind="base", run_id="base", round=0, base_digest=BASE, method="int4", key=KEY)
    write_release(release, tmp_path / "store" / "base")
    return tmp_path / "store"


def _serve(root, servicer_cls=ArtifactServicer):
    server, port = serve(root, "127.0.0.1:0", servicer=servicer_cls(ArtifactStore(root), chunk_bytes=CHUNK))
    return server, f"127.0.0.1:{port}"


def _fetch(address, cache, **policy):
    waits = []
    result = fetch_release(address, "base", cache, TRUST, BASE, FetchPolicy(**policy), sleep=waits.append)
    return result, waits


def test_first_run_downloads_once_and_second_run_downloads_nothing(root, tmp_path):
    server, address = _serve(root)
    try:
        first, _ = _fetch(address, tmp_path / "cache")
        assert first.bytes_downloaded == len(PAYLOAD) + len(b'{"bits": 4}')
        assert (first.folder / "model.int4.safetensors").read_bytes() == PAYLOAD
        verify_release(read_release(first.folder), TRUST, BASE)
        second, _ = _fetch(address, tmp_path / "cache")
        assert second.folder == first.folder and second.bytes_downloaded == 0
    finally:
        server.stop(None)


class DropsTheConnectionOnce(ArtifactServicer):
    dropped = False

    def Download(self, request, context):  # noqa: N802
        for i, chunk in enumerate(super().Download(request, context)):
            if i == 20 and not DropsTheConnectionOnce.dropped:
                DropsTheConnectionOnce.dropped = True
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield chunk


def test_a_download_interrupted_mid_file_resumes_where_it_stopped(root, tmp_path):
    server, address = _serve(root, DropsTheConnectionOnce)
    try:
        result, waits = _fetch(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert DropsTheConnectionOnce.dropped and waits == [0.5]
    assert result.bytes_downloaded == len(PAYLOAD) + 11  # nothing fetched twice
    assert (result.folder / "model.int4.safetensors").read_bytes() == PAYLOAD


def test_a_partial_file_left_by_a_crash_is_resumed_by_the_next_run(root, tmp_path):
    DropsTheConnectionOnce.dropped = False
    server, address = _serve(root, DropsTheConnectionOnce)
    try:
        with pytest.raises(FetchError, match=r"model\.int4\.safetensors of base: download failed at byte 1310720"):
            _fetch(address, tmp_path / "cache", retries=0)
        assert not any(p.is_dir() and not p.name.endswith(".partial") for p in (tmp_path / "cache").iterdir())
        result, _ = _fetch(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert result.resumed_from == {"model.int4.safetensors": 20 * CHUNK}
    assert result.bytes_downloaded == len(PAYLOAD) - 20 * CHUNK
    assert (result.folder / "model.int4.safetensors").read_bytes() == PAYLOAD


class DamagesOneChunk(ArtifactServicer):
    damaged = 0

    def chunk(self, offset, data):
        msg = super().chunk(offset, data)
        if offset == 5 * CHUNK and DamagesOneChunk.damaged == 0:
            DamagesOneChunk.damaged += 1
            msg.data = bytes([msg.data[0] ^ 0xFF]) + msg.data[1:]  # damaged after its hash was taken
        return msg


def test_a_corrupted_chunk_is_detected_and_fetched_again(root, tmp_path):
    server, address = _serve(root, DamagesOneChunk)
    try:
        result, waits = _fetch(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert DamagesOneChunk.damaged == 1 and result.chunks_refetched == 1 and len(waits) == 1
    assert (result.folder / "model.int4.safetensors").read_bytes() == PAYLOAD


def test_a_file_that_does_not_match_its_manifest_is_refused_by_name(root, tmp_path):
    (root / "base" / "model.int4.safetensors").write_bytes(PAYLOAD[:-1] + b"\x00")  # same size, other bytes
    server, address = _serve(root)
    try:
        with pytest.raises(FetchError, match=r"model\.int4\.safetensors of base: SHA-256 .* does not match"):
            _fetch(address, tmp_path / "cache")
    finally:
        server.stop(None)
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".partial")]  # nothing loadable
    assert not list(cache.glob("*.partial/model.int4.safetensors"))


def test_a_manifest_signed_by_an_untrusted_key_costs_no_download(root, tmp_path):
    other = Ed25519PrivateKey.generate()
    release, _ = make_release(
        {"f": b"x"}, kind="base", run_id="base", round=0, base_digest=BASE, method="int4", key=other
    )
    write_release(release, root / "base")
    server, address = _serve(root)
    try:
        with pytest.raises(FetchError, match="manifest refused: signed by key .* not in the trust list"):
            _fetch(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]  # nothing downloaded


def test_an_unreachable_server_is_retried_with_backoff_then_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(FetchError, match=rf"127\.0\.0\.1:{port} unreachable after 4 attempts: UNAVAILABLE"):
        _fetch(f"127.0.0.1:{port}", tmp_path / "cache", retries=3, rpc_timeout=5)


def test_unknown_artifacts_and_escaping_names_are_not_found(root, tmp_path):
    server, address = _serve(root)
    try:
        for name in ("nope", "../store/base", "base/../base"):
            with pytest.raises(FetchError, match="NOT_FOUND"):
                fetch_release(address, name, tmp_path / "cache", TRUST, BASE, FetchPolicy(retries=0))
    finally:
        server.stop(None)


def test_latest_resolves_through_the_latest_file(root, tmp_path):
    for n in (1, 2):
        release, _ = make_release(
            {"adapter_model.safetensors": bytes([n]) * 10},
            kind="adapter",
            run_id="r",
            round=n,
            base_digest=BASE,
            method="fedavg",
            key=KEY,
        )
        write_release(release, root / "adapter" / "r" / f"round-{n:04d}")
    (root / "adapter" / "r" / "LATEST").write_text("round-0002\n")
    server, address = _serve(root)
    cache = tmp_path / "cache"
    try:
        result = fetch_release(address, "adapter/r/latest", cache, TRUST, BASE)
        older = fetch_release(address, "adapter/r/round-0001", cache, TRUST, BASE)
        (root / "adapter" / "r" / "LATEST").write_text("../../base\n")  # a pointer out of the run folder
        with pytest.raises(FetchError, match="LATEST names an invalid release"):
            fetch_release(address, "adapter/r/latest", cache, TRUST, BASE, FetchPolicy(retries=0))
    finally:
        server.stop(None)
    assert result.manifest.round == 2
    # the device's cache mirrors the server's run folder: LATEST names the newest round fetched, and
    # fetching an older round afterwards does not move it back
    assert result.run_folder == older.run_folder == cache / "adapter" / "r"
    assert (result.run_folder / "LATEST").read_text() == "round-0002\n"
    newest = read_release(follow_latest(result.run_folder))
    assert newest.files["adapter_model.safetensors"] == bytes([2]) * 10
    assert verify_release(newest, TRUST, BASE).round == 2
    assert read_release(result.run_folder / "round-0001").files["adapter_model.safetensors"] == bytes([1]) * 10


def test_a_base_is_not_indexed_by_run(root, tmp_path):
    server, address = _serve(root)
    try:
        result, _ = _fetch(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert result.run_folder is None and not (tmp_path / "cache" / "adapter").exists()
