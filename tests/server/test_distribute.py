"""The artifact service and the device fetcher over a real gRPC server on loopback.

The first part tests the fetcher against the service; the second (below the rule) the service under abuse.
"""

import contextlib
import logging
import os
import shutil
import threading
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.channel import device_credentials, node_credentials
from client.fetch import FetchError, FetchPolicy, fetch_release
from server.artifact_limits import ServiceLimits
from server.artifact_store import ArtifactStore
from server.distribute import ArtifactServicer, serve, server_credentials
from server.fleet import Device, LocalFleet
from shared.certs import make_fleet_certs
from shared.files import FileRefusedError
from shared.manifest import parse
from shared.proto import artifact_pb2, artifact_pb2_grpc
from shared.release import make_release, write_release
from shared.sign import TrustList
from tests.fifo import outcome_without_blocking

KEY = Ed25519PrivateKey.generate()
TRUST = TrustList.of(KEY.public_key())
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


def test_unknown_artifacts_and_escaping_names_are_not_found(root, tmp_path):
    server, address = _serve(root)
    try:
        for name in ("nope", "../store/base", "base/../base"):
            with pytest.raises(FetchError, match="NOT_FOUND"):
                fetch_release(address, name, tmp_path / "cache", TRUST, BASE, FetchPolicy(retries=0))
    finally:
        server.stop(None)


# ------------------------------------------------------------------------------------------------------
# The service under abuse (issue 15): Download budget and stalled readers cut off, no path out of the root, mutual TLS.
# A raw stub plays the hostile client; the real fetcher plays the device.


BIG = bytes(64 << 20)  # 64 MiB: far more than gRPC's flow-control window and the loopback socket buffers hold
BIG_FILE = "model.int4.safetensors"


@pytest.fixture
def big_root(tmp_path):
    release, _ = make_release(
        {BIG_FILE: BIG}, kind="base", run_id="base", round=0, base_digest=BASE, method="int4", key=KEY
    )
    write_release(release, tmp_path / "store" / "base")
    return tmp_path / "store"


def _serve_limited(root, limits=None, credentials=None):
    servicer = ArtifactServicer(ArtifactStore(root), chunk_bytes=CHUNK, limits=limits)
    server, port = serve(root, "127.0.0.1:0", servicer=servicer, credentials=credentials)
    return server, f"127.0.0.1:{port}"


def _stub(stack, address, credentials=None):
    """A stub on a connection of its own (as another device would have), closed with ``stack``."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = stack.enter_context(
        grpc.secure_channel(address, credentials, options) if credentials else grpc.insecure_channel(address, options)
    )
    return artifact_pb2_grpc.ArtifactServiceStub(channel)


def _stalled_download(stack, address, credentials=None):
    """Start a Download of the big file, take one chunk, then stop reading (a slow or hostile reader)."""
    call = _stub(stack, address, credentials).Download(
        artifact_pb2.DownloadRequest(artifact="base", file=BIG_FILE), timeout=300
    )
    next(call)  # the handler runs: it holds a Download slot from now on
    stack.callback(call.cancel)
    return call


def _first_chunk_code(stub):
    """The status of a new Download of the big file: OK once its first chunk arrives (the stream is then cancelled)."""
    call = stub.Download(artifact_pb2.DownloadRequest(artifact="base", file=BIG_FILE), timeout=60)
    try:
        next(call)
    except grpc.RpcError as exc:
        return exc.code()
    call.cancel()
    return grpc.StatusCode.OK


def test_eight_slow_readers_leave_room_for_a_ninth_devices_manifest(big_root):
    server, address = _serve_limited(big_root)
    try:
        with contextlib.ExitStack() as stack:
            for _ in range(ServiceLimits().download_streams):
                _stalled_download(stack, address)
            ninth = _stub(stack, address)
            reply = ninth.GetManifest(artifact_pb2.ManifestRequest(artifact="base"), timeout=30)
            assert parse(reply.manifest).files.keys() == {BIG_FILE} and reply.sizes[BIG_FILE] == len(BIG)
            # its Download is refused at once with a status the device can retry, not left to time out
            assert _first_chunk_code(ninth) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(None)


def test_a_reader_that_stops_reading_is_cut_off_and_its_slot_freed(big_root, caplog):
    caplog.set_level(logging.WARNING, logger="server.distribute")
    server, address = _serve_limited(big_root, ServiceLimits(download_streams=1, progress_timeout=1.0))
    try:
        with contextlib.ExitStack() as stack:
            stalled = _stalled_download(stack, address)  # takes the only slot, then never reads again
            other = _stub(stack, address)
            deadline = time.monotonic() + 120  # wide: the cut-off comes ~1 s after the reader stopped
            while (code := _first_chunk_code(other)) != grpc.StatusCode.OK and time.monotonic() < deadline:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.2)
            assert code == grpc.StatusCode.OK, "the stalled reader still holds the only Download slot"
            received = CHUNK  # the chunk _stalled_download took
            with pytest.raises(grpc.RpcError) as cut:
                for chunk in stalled:  # what was in flight arrives, then the stream's end
                    received += len(chunk.data)
            assert cut.value.code() == grpc.StatusCode.CANCELLED and received < len(BIG)
    finally:
        server.stop(None)
    assert any(
        "cut off download of base/" in r.getMessage() and "took no chunk" in r.getMessage() for r in caplog.records
    )


def _outside_release(tmp_path, round_, files):
    release, _ = make_release(
        files, kind="adapter", run_id="r", round=round_, base_digest=BASE, method="fedavg", key=KEY
    )
    return write_release(release, tmp_path / "outside" / f"round-{round_:04d}")


def _link_file_out(root, tmp_path):
    """A file of a signed release replaced by a link to a file outside the store (same bytes: it would verify)."""
    secret = tmp_path / "outside" / "hostname"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"secret-host\n")
    release, _ = make_release(
        {"hostname": secret.read_bytes()},
        kind="adapter",
        run_id="r",
        round=1,
        base_digest=BASE,
        method="fedavg",
        key=KEY,
    )
    folder = write_release(release, root / "adapter" / "r" / "round-0001")
    (folder / "hostname").unlink()
    (folder / "hostname").symlink_to(secret)
    return "adapter/r/round-0001"


def _link_folder_out(root, tmp_path):
    """A release folder in the store that is a link to a signed release outside it."""
    (root / "adapter" / "r").mkdir(parents=True)
    (root / "adapter" / "r" / "round-0001").symlink_to(_outside_release(tmp_path, 1, {"w": b"outside"}))
    return "adapter/r/round-0001"


def _link_latest_out(root, tmp_path):
    """A LATEST that is a link to a file outside the store (which names a real release)."""
    release, _ = make_release(
        {"w": b"2"}, kind="adapter", run_id="r", round=2, base_digest=BASE, method="fedavg", key=KEY
    )
    write_release(release, root / "adapter" / "r" / "round-0002")
    pointer = tmp_path / "outside" / "LATEST"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text("round-0002\n")
    (root / "adapter" / "r" / "LATEST").symlink_to(pointer)
    return "adapter/r/latest"


@pytest.mark.parametrize("link_out", [_link_file_out, _link_folder_out, _link_latest_out])
def test_a_symlink_out_of_the_store_is_not_found_and_logged(root, tmp_path, caplog, link_out):
    caplog.set_level(logging.WARNING, logger="server.distribute")
    artifact = link_out(root, tmp_path)
    server, address = _serve(root)
    try:
        with contextlib.ExitStack() as stack:
            stub = _stub(stack, address)
            try:
                reply = stub.GetManifest(artifact_pb2.ManifestRequest(artifact=artifact), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            else:  # only the linked file is out: the manifest is served, the file is not, nor its size
                assert "hostname" not in reply.sizes
                call = stub.Download(artifact_pb2.DownloadRequest(artifact=artifact, file="hostname"), timeout=30)
                with pytest.raises(grpc.RpcError) as exc:
                    list(call)
                assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(None)
    assert any("leads out of the store" in r.getMessage() for r in caplog.records)


def test_a_symlink_that_stays_inside_the_store_is_served(root, tmp_path):
    (root / "alias").symlink_to("base")  # an operator's alias within the store
    server, address = _serve(root)
    try:
        result = fetch_release(address, "alias", tmp_path / "cache", TRUST, BASE)
    finally:
        server.stop(None)
    assert (result.folder / "model.int4.safetensors").read_bytes() == PAYLOAD


def test_plaintext_is_refused_on_an_address_that_is_not_loopback(root):
    with pytest.raises(ValueError, match="in plaintext: every run's adapters to anyone"):
        serve(root, "192.0.2.1:0")  # TEST-NET-1: never reached, the check comes first


def test_a_port_in_use_is_refused_naming_the_address(root):
    server, address = _serve(root)
    try:
        with pytest.raises(OSError, match=f"cannot listen on {address} \\(in use"):
            serve(root, address)
    finally:
        server.stop(None)


def test_stop_returns_while_a_store_read_hangs(root):
    class HangingStore(ArtifactStore):
        def manifest(self, artifact):
            reading.set()
            released.wait(60)  # a read stuck on a hung disk (an NFS mount gone away)
            return super().manifest(artifact)

    reading, released = threading.Event(), threading.Event()
    server, port = serve(root, "127.0.0.1:0", servicer=ArtifactServicer(HangingStore(root)))
    try:
        with contextlib.ExitStack() as stack:
            call = _stub(stack, f"127.0.0.1:{port}").GetManifest.future(
                artifact_pb2.ManifestRequest(artifact="base"), timeout=60
            )
            assert reading.wait(30)
            stopped = threading.Thread(target=server.stop, args=(None,))
            stopped.start()
            stopped.join(30)  # wide: stopping takes milliseconds; the read would hold it for 60 s
            assert not stopped.is_alive(), "stop() waited for the hung read"
            with pytest.raises(grpc.RpcError):
                call.result(timeout=30)
    finally:
        released.set()


@pytest.fixture
def fleet_certs(tmp_path):
    return make_fleet_certs(tmp_path / "certs", ["dev-a", "dev-b"])


def _device(certs, name="dev-a"):
    return device_credentials(certs.ca, certs.node_cert(name), certs.node_tls_key(name))


@pytest.fixture
def tls_service(root, fleet_certs):
    credentials = server_credentials(fleet_certs.server_cert, fleet_certs.server_key, fleet_certs.ca)
    server, address = _serve_limited(root, credentials=credentials)
    yield address
    server.stop(None)


def _refused(address, cache, credentials):
    with pytest.raises(FetchError, match="UNAVAILABLE"):
        fetch_release(address, "base", cache, TRUST, BASE, FetchPolicy(retries=0, rpc_timeout=30), credentials)
    assert not any(p.is_dir() for p in cache.iterdir())  # not even a manifest came


def test_over_tls_a_device_certificate_of_the_fleet_ca_is_served(tls_service, fleet_certs, tmp_path):
    got = fetch_release(tls_service, "base", tmp_path / "cache", TRUST, BASE, credentials=_device(fleet_certs))
    assert (got.folder / "model.int4.safetensors").read_bytes() == PAYLOAD


def test_over_tls_a_client_without_a_certificate_is_refused_at_the_handshake(tls_service, fleet_certs, tmp_path):
    _refused(tls_service, tmp_path / "cache", grpc.ssl_channel_credentials(fleet_certs.ca.read_bytes()))


def test_over_tls_a_certificate_of_another_ca_is_refused(tls_service, fleet_certs, tmp_path):
    other = make_fleet_certs(tmp_path / "other", ["dev-a"])  # same device name, someone else's CA
    stranger = device_credentials(fleet_certs.ca, other.node_cert("dev-a"), other.node_tls_key("dev-a"))
    _refused(tls_service, tmp_path / "cache", stranger)


def test_over_tls_a_plaintext_client_is_refused(tls_service, tmp_path):
    _refused(tls_service, tmp_path / "cache", None)


def test_tls_without_a_ca_to_check_devices_is_refused(tmp_path):
    certs = make_fleet_certs(tmp_path / "certs", [])
    certs.ca.rename(tmp_path / "elsewhere.pem")
    with pytest.raises(ValueError, match="no fleet CA at .* to check device certificates"):
        server_credentials(certs.server_cert, certs.server_key)


def test_one_device_cannot_take_every_download_slot(big_root, fleet_certs):
    credentials = server_credentials(fleet_certs.server_cert, fleet_certs.server_key, fleet_certs.ca)
    server, address = _serve_limited(big_root, credentials=credentials)
    try:
        with contextlib.ExitStack() as stack:
            for _ in range(ServiceLimits().streams_per_device):
                _stalled_download(stack, address, _device(fleet_certs, "dev-a"))
            assert _first_chunk_code(_stub(stack, address, _device(fleet_certs, "dev-a"))) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            assert _first_chunk_code(_stub(stack, address, _device(fleet_certs, "dev-b"))) == grpc.StatusCode.OK
    finally:
        server.stop(None)


def test_the_fleets_artifact_service_serves_its_devices_node_config_and_no_one_else(root, tmp_path):
    fleet = LocalFleet(tmp_path / "fleet", [Device("dev-a", tmp_path / "t.jsonl", tmp_path / "h.jsonl")])
    fleet.make_keys()
    shutil.copytree(root, fleet.folder / "store")
    try:
        fleet.start_artifacts()  # the `fleetlora serve-artifacts` process `make fleet` runs
        credentials = node_credentials(fleet.node_config("dev-a"))
        got = fetch_release(fleet.artifact_address, "base", tmp_path / "cache", TRUST, BASE, credentials=credentials)
        assert got.bytes_downloaded == len(PAYLOAD) + len(b'{"bits": 4}')
        _refused(fleet.artifact_address, tmp_path / "anon", grpc.ssl_channel_credentials(fleet.certs.ca.read_bytes()))
    finally:
        fleet.down()


def test_a_latest_that_is_not_a_regular_file_is_not_found_without_hanging_a_thread(root):
    run = root / "adapter" / "r"
    run.mkdir(parents=True)
    os.mkfifo(run / "LATEST")  # reading it would block a reader thread until someone writes
    server, address = _serve(root)
    try:
        with contextlib.ExitStack() as stack, pytest.raises(grpc.RpcError) as exc:
            _stub(stack, address).GetManifest(artifact_pb2.ManifestRequest(artifact="adapter/r/latest"), timeout=30)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        with contextlib.suppress(OSError):  # release a reader stuck on the FIFO, if any, so the test can end
            os.close(os.open(run / "LATEST", os.O_WRONLY | os.O_NONBLOCK))
        server.stop(None)


def test_a_fifo_in_place_of_the_tls_key_is_refused_not_waited_on(tmp_path):
    certs = make_fleet_certs(tmp_path / "certs", [])
    certs.server_key.unlink()
    os.mkfifo(certs.server_key, 0o600)
    key = certs.server_key
    refused = outcome_without_blocking(lambda: server_credentials(certs.server_cert, key), key)
    assert isinstance(refused, FileRefusedError) and "not a regular file" in str(refused)
