"""The artifact service against calls that never send their request, malformed requests and one device's many calls.

A call's headers reach the service before its request. On gRPC's synchronous server each such
call took a handler thread (12 in all) until its request came: 12 calls that sent nothing stalled
every other device. A raw channel plays the hostile client; a stub on a connection of its own
plays the other device.
"""

import contextlib
import threading
import time

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.channel import device_credentials
from server.artifact_limits import ServiceLimits
from server.artifact_store import ArtifactStore
from server.distribute import SERVICE, ArtifactServicer, device_of, serve, server_credentials
from shared.certs import make_fleet_certs
from shared.manifest import parse
from shared.proto import artifact_pb2, artifact_pb2_grpc
from shared.release import make_release, write_release
from tests.server.http2 import WindowZeroClient

KEY = Ed25519PrivateKey.generate()
FILE = "model.int4.safetensors"


@pytest.fixture
def root(tmp_path):
    release, _ = make_release(
        {FILE: b"w" * 1000}, kind="base", run_id="base", round=0, base_digest="b" * 64, method="int4", key=KEY
    )
    write_release(release, tmp_path / "store" / "base")
    return tmp_path / "store"


@pytest.fixture
def service(root):
    """Start a service with given limits (and credentials); yield (servicer, address); stop them at the end."""
    with contextlib.ExitStack() as stack:

        def start(limits=None, credentials=None):
            servicer = ArtifactServicer(ArtifactStore(root), limits=limits)
            server, port = serve(root, "127.0.0.1:0", servicer=servicer, credentials=credentials)
            stack.callback(server.stop, None)
            return servicer, f"127.0.0.1:{port}"

        yield start


def _channel(stack, address, credentials=None):
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, as another device would have
    return stack.enter_context(
        grpc.secure_channel(address, credentials, options) if credentials else grpc.insecure_channel(address, options)
    )


def _silent_call(stack, address, credentials=None):
    """Open a GetManifest call that sends its headers and never its request (until the test ends); return it."""
    hold = threading.Event()

    def nothing():  # the request stream: blocks, then ends without a message
        hold.wait()
        yield from ()

    call = _channel(stack, address, credentials).stream_unary(f"/{SERVICE}/GetManifest")
    future = call.future(nothing(), timeout=300)
    stack.callback(future.cancel)
    stack.callback(hold.set)
    return future


def _credentials(certs, name):
    return device_credentials(certs.ca, certs.node_cert(name), certs.node_tls_key(name))


def _until(condition, what):
    deadline = time.monotonic() + 60  # wide: each step is milliseconds on a quiet machine
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _manifest(stack, address, credentials=None):
    stub = artifact_pb2_grpc.ArtifactServiceStub(_channel(stack, address, credentials))
    return stub.GetManifest(artifact_pb2.ManifestRequest(artifact="base"), timeout=60)


def test_calls_that_never_send_their_request_do_not_stall_another_devices_manifest(service):
    servicer, address = service(ServiceLimits(request_timeout=600))  # no timeout comes to the rescue here
    with contextlib.ExitStack() as stack:
        silent = [_silent_call(stack, address) for _ in range(24)]  # twice the threads the sync server had
        _until(lambda: servicer.calls.running == 24, "the silent calls did not reach the service")
        reply = _manifest(stack, address)  # the sync server: DEADLINE_EXCEEDED after 60 s, no thread was free
        assert parse(reply.manifest).files.keys() == {FILE}
        assert not any(call.done() for call in silent)  # they still wait; they cost no thread


def test_a_call_that_sends_no_request_is_ended_after_the_request_timeout(service):
    servicer, address = service(ServiceLimits(request_timeout=1.0))
    with contextlib.ExitStack() as stack:
        silent = _silent_call(stack, address)
        with pytest.raises(grpc.RpcError) as ended:
            silent.result(timeout=120)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ended.value.details() == "no request within 1 s"
    _until(lambda: servicer.calls.running == 0, "the silent call's slot was not given back")


@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x05abc"])  # not protobuf; a string field cut short
def test_a_malformed_request_is_an_invalid_argument_naming_the_message(service, raw):
    _, address = service()
    with contextlib.ExitStack() as stack:
        call = _channel(stack, address).unary_unary(f"/{SERVICE}/GetManifest")  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as refused:
            call(raw, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # was INTERNAL (gRPC's own parse failed)
    assert refused.value.details() == "the request is not a ManifestRequest"


def test_one_device_cannot_hold_every_call_with_silent_ones(service, tmp_path):
    certs = make_fleet_certs(tmp_path / "certs", ["dev-a", "dev-b"])
    credentials = server_credentials(certs.server_cert, certs.server_key, certs.ca)
    limits = ServiceLimits(request_timeout=600)
    servicer, address = service(limits, credentials)

    with contextlib.ExitStack() as stack:
        for _ in range(limits.calls_per_device):
            _silent_call(stack, address, _credentials(certs, "dev-a"))
        _until(lambda: servicer.calls.running == limits.calls_per_device, "dev-a's calls did not reach the service")
        with pytest.raises(grpc.RpcError) as refused:
            _manifest(stack, address, _credentials(certs, "dev-a"))  # one call more of the same device: refused at once
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"device 'dev-a' already has {limits.calls_per_device} calls open" in refused.value.details()
        assert parse(_manifest(stack, address, _credentials(certs, "dev-b")).manifest).files.keys() == {FILE}


def test_replies_a_device_never_reads_count_against_it_until_their_calls_end(service, tmp_path):
    """A GetManifest whose handler is done but whose reply waits for the reader still holds its device's slot."""
    certs = make_fleet_certs(tmp_path / "certs", ["dev-a", "dev-b"])
    servicer, address = service(credentials=server_credentials(certs.server_cert, certs.server_key, certs.ca))
    per_device = servicer.limits.calls_per_device
    port = int(address.rpartition(":")[2])
    hostile = WindowZeroClient(port, certs.ca, certs.node_cert("dev-a"), certs.node_tls_key("dev-a"))
    try:
        request = artifact_pb2.ManifestRequest(artifact="base").SerializeToString()
        streams = [hostile.call(f"/{SERVICE}/GetManifest", request) for _ in range(2 * per_device)]
        _until(lambda: len(hostile.status) == per_device, "the calls beyond the device's bound were not refused")
        assert len(set(streams) - set(hostile.status)) == per_device  # those wait to send their replies
        assert set(hostile.status.values()) == {str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])}
        assert servicer.calls.running == per_device  # was 0: handlers done, replies queued, nothing counted
        with contextlib.ExitStack() as stack:
            with pytest.raises(grpc.RpcError) as refused:
                _manifest(stack, address, _credentials(certs, "dev-a"))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert parse(_manifest(stack, address, _credentials(certs, "dev-b")).manifest).files.keys() == {FILE}
    finally:
        hostile.close()
    _until(lambda: servicer.calls.running == 0, "the slots were not given back when the connection closed")


class _Peer:  # what the service reads of a call to know who makes it
    def __init__(self, peer, names=()):
        self._peer, self._names = peer, list(names)

    def peer(self):
        return self._peer

    def auth_context(self):
        return {"x509_common_name": self._names} if self._names else {}


@pytest.mark.parametrize(
    ("peer", "names", "device"),
    [
        ("ipv4:10.0.0.7:50123", [b"dev-a"], "dev-a"),  # mutual TLS: the certificate's name
        ("ipv4:10.0.0.7:50123", [], "ip:10.0.0.7"),  # plaintext (--insecure): one address, one device
        ("ipv4:10.0.0.7:61000", [], "ip:10.0.0.7"),  # another connection from it: the same
        ("ipv6:[2001:db8::1]:50123", [], "ip:2001:db8::1"),
        ("ipv4:127.0.0.1:50123", [], None),  # loopback: a simulation's devices, no name to count by
        ("ipv6:[::1]:50123", [], None),
        ("ipv6:[::ffff:127.0.0.1]:50123", [], None),
        ("unix:/tmp/socket", [], None),
    ],
)
def test_who_calls_is_the_certificates_name_else_a_non_loopback_address(peer, names, device):
    assert device_of(_Peer(peer, names)) == device
