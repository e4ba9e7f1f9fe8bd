"""The device fetcher against artifact services that lie, over a real gRPC server on loopback.

The signed manifest is the only source of truth: what the service announces or streams beyond
it never reaches the disk (TUF's "endless data" attack).
"""

import os
import socket

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.fetch import FetchError, FetchPolicy, fetch_release
from client.objects import OBJECTS
from server.artifact_store import ArtifactStore
from server.distribute import ArtifactServicer, serve
from shared.proto import artifact_pb2
from shared.release import make_release, read_release, verify_release, write_release
from shared.sign import TrustList

KEY = Ed25519PrivateKey.generate()
TRUST = TrustList.of(KEY.public_key())
BASE = "b" * 64
CHUNK = 64 * 1024
CONFIG = os.urandom(1206)  # the size of the adapter_config.json of the original report
WEIGHTS = os.urandom(3 * CHUNK + 17)
LIE = 64 << 20  # what the lying service announces (and streams) per file: 64 MiB


@pytest.fixture
def root(tmp_path):
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}
    release, _ = make_release(files, kind="base", run_id="base", round=0, base_digest=BASE, method="int4", key=KEY)
    write_release(release, tmp_path / "store" / "base")
    return tmp_path / "store"


class _Started:
    def __init__(self, root, servicer_cls):
        self.server, port = serve(root, "127.0.0.1:0", servicer=servicer_cls(ArtifactStore(root), chunk_bytes=CHUNK))
        self.address = f"127.0.0.1:{port}"

    def __enter__(self):
        return self.address

    def __exit__(self, *_):
        self.server.stop(None)


def _fetch(address, cache, **policy):
    return fetch_release(address, "base", cache, TRUST, BASE, FetchPolicy(**policy), sleep=lambda _: None)


def _bytes_on_disk(cache):
    """Bytes of release files the fetcher wrote (the manifest and signature aside)."""
    files = (p for p in cache.rglob("*") if p.is_file() and OBJECTS not in p.relative_to(cache).parts)
    return sum(p.stat().st_size for p in files if not p.name.startswith("manifest."))  # the store: links to them


class ReplaysARealManifestButAnnouncesHugeFiles(ArtifactServicer):
    """Replays the real signed manifest, announces 64 MiB per file, streams 16 MiB of it, then drops the stream."""

    async def GetManifest(self, request, context):  # noqa: N802
        reply = await super().GetManifest(request, context)
        return artifact_pb2.ManifestReply(
            artifact=reply.artifact,
            manifest=reply.manifest,
            signature=reply.signature,
            sizes={name: LIE for name in reply.sizes},
        )

    async def Download(self, request, context):  # noqa: N802
        real = self.store.path(request.artifact, request.file).read_bytes()
        offset = request.offset
        while offset < LIE // 4:  # the real bytes, then junk, in well-formed chunks with correct hashes
            data = (real[offset : offset + CHUNK] + bytes(CHUNK))[:CHUNK]
            yield self.chunk(offset, data)
            offset += len(data)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")  # the device gives up: what stays on disk?


def test_a_service_announcing_and_streaming_more_than_the_signed_sizes_is_cut_off(root, tmp_path):
    with _Started(root, ReplaysARealManifestButAnnouncesHugeFiles) as address:
        with pytest.raises(FetchError) as refused:
            _fetch(address, tmp_path / "cache", retries=0)
    assert _bytes_on_disk(tmp_path / "cache") <= len(CONFIG) + len(WEIGHTS)  # was 16 MiB of junk
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    assert "adapter_config.json: the service sent 65,536 bytes at offset 0" in str(refused.value)
    assert "cut off" in str(refused.value)


class StreamsPastTheEndOfTheFile(ArtifactServicer):
    async def Download(self, request, context):  # noqa: N802
        last = None
        async for chunk in super().Download(request, context):
            last = chunk
            yield chunk
        end = (last.offset + len(last.data)) if last is not None else request.offset
        yield self.chunk(end, b"\0" * CHUNK)  # one more chunk than the file has


def test_a_service_streaming_past_the_end_of_a_file_never_gets_it_written(root, tmp_path):
    with _Started(root, StreamsPastTheEndOfTheFile) as address:
        with pytest.raises(FetchError) as refused:
            _fetch(address, tmp_path / "cache")
    (partial,) = (tmp_path / "cache").glob("*.partial")
    assert (partial / "adapter_config.json").read_bytes() == CONFIG  # what a resume may use, and nothing more
    assert "adapter_config.json: the service sent 65,536 bytes at offset 1,206" in str(refused.value)


class EndsEveryStreamAtOnce(ArtifactServicer):
    async def Download(self, request, context):  # noqa: N802
        return
        yield


def test_a_service_whose_streams_end_early_is_given_up_on_after_the_retries(root, tmp_path):
    with _Started(root, EndsEveryStreamAtOnce) as address:
        with pytest.raises(FetchError, match=r"adapter_config\.json of base: download failed at byte 0: .*ended"):
            _fetch(address, tmp_path / "cache", retries=2)  # before: re-asked forever


def test_leftovers_in_the_partial_folder_are_bounded_by_the_signed_sizes_and_cleaned(root, tmp_path):
    with _Started(root, ArtifactServicer) as address:
        _fetch(address, tmp_path / "probe")  # learn the release's digest
        digest = next(p.name for p in (tmp_path / "probe").iterdir() if p.is_dir() and len(p.name) == 64)
        partial = tmp_path / "cache" / f"{digest}.partial"
        partial.mkdir(parents=True)
        (partial / "junk.bin").write_bytes(b"x" * 1000)  # not a file of the release (another version, a crash)
        (partial / "adapter_config.json").write_bytes(b"y" * (len(CONFIG) + 1))  # longer than its signed size
        (partial / "adapter_model.safetensors").write_bytes(WEIGHTS[:CHUNK])  # a resumable prefix
        result = _fetch(address, tmp_path / "cache")
    assert result.resumed_from == {"adapter_model.safetensors": CHUNK}
    assert result.bytes_downloaded == len(CONFIG) + len(WEIGHTS) - CHUNK
    assert sorted(p.name for p in result.folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "manifest.sig",
    ]
    assert verify_release(read_release(result.folder), TRUST, BASE).sizes["adapter_config.json"] == len(CONFIG)


def test_the_signed_size_not_the_announced_one_bounds_an_honest_looking_file(root, tmp_path):
    (root / "base" / "adapter_config.json").write_bytes(CONFIG + b"tail")  # the service's copy grew on disk
    with _Started(root, ArtifactServicer) as address:
        with pytest.raises(FetchError) as refused:
            _fetch(address, tmp_path / "cache", retries=0)
    (partial,) = (tmp_path / "cache").glob("*.partial")
    assert not (partial / "adapter_config.json").exists() or (partial / "adapter_config.json").stat().st_size <= 1206
    assert "cut off" in str(refused.value)


def test_grpc_status_of_a_refusing_service_is_named(root, tmp_path):
    class Refuses(ArtifactServicer):
        async def Download(self, request, context):  # noqa: N802
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
            yield

    with _Started(root, Refuses) as address:
        with pytest.raises(FetchError, match="PERMISSION_DENIED: no"):
            _fetch(address, tmp_path / "cache")

    class RewritesTheScreen(ArtifactServicer):  # a hostile host's status details: erase the line, print a verdict
        async def GetManifest(self, request, context):  # noqa: N802
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "\x1b[2K\rfleetlora fetch: ok, all verified\n")

    with _Started(root, RewritesTheScreen) as address:
        with pytest.raises(FetchError) as refused:
            _fetch(address, tmp_path / "cache", retries=0)
    assert "PERMISSION_DENIED: \\x1b[2K\\rfleetlora fetch: ok, all verified\\n" in str(refused.value)
    assert str(refused.value).isprintable()


# ---------------------------------------------------------------- resume, retry, verify: an honest service
PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # 3 MB + a partial last chunk: 49 chunks


@pytest.fixture
def base_root(tmp_path):
    """A base release of 3 MB + 123 bytes (49 chunks) and a small config."""
    files = {"model.int4.safetensors": PAYLOAD, "config.json": b'{"bits": 4}'}
    release, _ = make_release(files, kind="base", run_id="base", round=0, base_digest=BASE, method="int4", key=KEY)
    write_release(release, tmp_path / "store" / "base")
    return tmp_path / "store"


def _serve_base(base_root, servicer_cls=ArtifactServicer):
    server, port = serve(base_root, "127.0.0.1:0", servicer=servicer_cls(ArtifactStore(base_root), chunk_bytes=CHUNK))
    return server, f"127.0.0.1:{port}"


def _fetch_counting(address, cache, **policy):
    waits = []
    result = fetch_release(address, "base", cache, TRUST, BASE, FetchPolicy(**policy), sleep=waits.append)
    return result, waits


class DropsTheConnectionOnce(ArtifactServicer):
    dropped = False

    async def Download(self, request, context):  # noqa: N802
        i = 0
        async for chunk in super().Download(request, context):
            if i == 20 and not DropsTheConnectionOnce.dropped:
                DropsTheConnectionOnce.dropped = True
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield chunk
            i += 1


def test_a_download_interrupted_mid_file_resumes_where_it_stopped(base_root, tmp_path):
    server, address = _serve_base(base_root, DropsTheConnectionOnce)
    try:
        result, waits = _fetch_counting(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert DropsTheConnectionOnce.dropped and waits == [0.5]
    assert result.bytes_downloaded == len(PAYLOAD) + 11  # nothing fetched twice
    assert (result.folder / "model.int4.safetensors").read_bytes() == PAYLOAD


def test_a_partial_file_left_by_a_crash_is_resumed_by_the_next_run(base_root, tmp_path):
    DropsTheConnectionOnce.dropped = False
    server, address = _serve_base(base_root, DropsTheConnectionOnce)
    try:
        with pytest.raises(FetchError, match=r"model\.int4\.safetensors of base: download failed at byte 1310720"):
            _fetch_counting(address, tmp_path / "cache", retries=0)
        assert not any(p.is_dir() and not p.name.endswith(".partial") for p in (tmp_path / "cache").iterdir())
        result, _ = _fetch_counting(address, tmp_path / "cache")
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


def test_a_corrupted_chunk_is_detected_and_fetched_again(base_root, tmp_path):
    server, address = _serve_base(base_root, DamagesOneChunk)
    try:
        result, waits = _fetch_counting(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert DamagesOneChunk.damaged == 1 and result.chunks_refetched == 1 and len(waits) == 1
    assert (result.folder / "model.int4.safetensors").read_bytes() == PAYLOAD


def test_a_file_that_does_not_match_its_manifest_is_refused_by_name(base_root, tmp_path):
    (base_root / "base" / "model.int4.safetensors").write_bytes(PAYLOAD[:-1] + b"\x00")  # same size, other bytes
    server, address = _serve_base(base_root)
    try:
        with pytest.raises(FetchError, match=r"model\.int4\.safetensors of base: SHA-256 .* does not match"):
            _fetch_counting(address, tmp_path / "cache")
    finally:
        server.stop(None)
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".partial")]  # nothing loadable
    assert not list(cache.glob("*.partial/model.int4.safetensors"))


def test_a_manifest_signed_by_an_untrusted_key_costs_no_download(base_root, tmp_path):
    other = Ed25519PrivateKey.generate()
    release, _ = make_release(
        {"f": b"x"}, kind="base", run_id="base", round=0, base_digest=BASE, method="int4", key=other
    )
    write_release(release, base_root / "base")
    server, address = _serve_base(base_root)
    try:
        with pytest.raises(FetchError, match="manifest refused: signed by key .* not in the trust list"):
            _fetch_counting(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]  # nothing downloaded


def test_an_unreachable_server_is_retried_with_backoff_then_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(FetchError, match=rf"127\.0\.0\.1:{port} unreachable after 4 attempts: UNAVAILABLE"):
        _fetch_counting(f"127.0.0.1:{port}", tmp_path / "cache", retries=3, rpc_timeout=5)


def test_a_base_is_not_indexed_by_run(base_root, tmp_path):
    server, address = _serve_base(base_root)
    try:
        result, _ = _fetch_counting(address, tmp_path / "cache")
    finally:
        server.stop(None)
    assert result.run_folder is None and not (tmp_path / "cache" / "adapter").exists()
