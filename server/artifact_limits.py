"""The artifact service's limits: what one device, or a crowd, can hold of it.

The service runs on gRPC's asyncio server (``grpc.aio``): a call that waits (for its request, or
for its reader to take the next chunk) costs a coroutine, not a thread. On the synchronous server
each call took a thread before its request had arrived, so 12 calls that sent their headers and
never their request stalled every other device. What still needs a bound, and where it is:

- calls of one device, and in all, from their headers until they have ended (including ones that
  wait for their request, or for their reader to take a queued reply): :class:`Budget`
  (``calls_per_device``, ``open_calls``), and ``request_timeout`` for the request to arrive;
- calls gRPC holds at all, the refused ones included: ``maximum_concurrent_rpcs`` (``grpc_calls``), a
  memory guard (a refused call whose client does not read its TCP socket stays open until the
  keepalive closes that connection, ~80 s);
- ``Download`` streams in all and per device: :class:`Budget`; a reader that takes no chunk for
  ``progress_timeout``, or a stream older than ``stream_deadline``, is cut off (``server/distribute.py``);
- keepalive, connection age, message and header sizes, HTTP/2 streams per connection: :func:`grpc_options`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.manifest import MAX_MANIFEST_BYTES

CHUNK_BYTES = 1 << 20  # a Download chunk


@dataclass(frozen=True)
class ServiceLimits:
    """How much of the service one client, or a crowd, can hold; every value bounds an abuse of issue 15."""

    download_streams: int = 8
    """Concurrent ``Download`` streams in all (each reads the disk and fills a network link); one
    more is refused with RESOURCE_EXHAUSTED at once, a status to retry with backoff."""
    streams_per_device: int = 2
    """Concurrent ``Download`` streams of one device (its client certificate's name, over mutual
    TLS): one device cannot take the whole budget. A fetcher downloads one file at a time."""
    calls_per_device: int = 8
    """Open calls of one device, of any method, counted from the moment their headers arrive (before
    their request) until the call has ended (its reply taken): one device cannot hold the service's
    calls by opening many and sending, or reading, nothing. One more is refused at once."""
    open_calls: int = 512
    """Open calls in all, counted as per device; one more is refused with RESOURCE_EXHAUSTED at once.
    A waiting call costs a few kilobytes, not a thread."""
    grpc_calls: int = 8192
    """Calls gRPC itself holds (``maximum_concurrent_rpcs``), refused ones included until their
    status is sent: a bound on memory, well above ``open_calls``; beyond it gRPC refuses new calls."""
    request_timeout: float = 10.0
    """Seconds a call may take to send its request (under 16 KiB: an artifact name, a file name, an
    offset) after its headers; a call that sends nothing is ended with DEADLINE_EXCEEDED."""
    progress_timeout: float = 60.0
    """Seconds a ``Download`` may wait for its reader to take the next chunk (1 MiB): slower than
    ~17 KiB/s, or not reading at all, and the stream is cut off (a fetcher can resume from its offset)."""
    stream_deadline: float = 1800.0
    """Seconds one ``Download`` stream may last however fast it reads (a 1 GB file at 1 MB/s takes
    1000 s); a reader trickling just above the progress rate is cut off here."""

    def __post_init__(self) -> None:
        for name in (
            "download_streams",
            "streams_per_device",
            "calls_per_device",
            "open_calls",
            "grpc_calls",
            "request_timeout",
            "progress_timeout",
            "stream_deadline",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServiceLimits.{name} must be > 0, got {getattr(self, name)!r}")


def grpc_options(limits: ServiceLimits, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[str, int]]:
    """Return the service's gRPC server options: message sizes, HTTP/2 streams, keepalive, connection age."""
    return [
        ("grpc.max_receive_message_length", 16 * 1024),  # a request is an artifact name, a file name, an offset
        ("grpc.max_send_message_length", max(chunk_bytes, MAX_MANIFEST_BYTES) + 64 * 1024),  # a chunk or a manifest
        ("grpc.max_metadata_size", 16 * 1024),  # headers: gRPC's own plus a little; no client needs more
        ("grpc.max_concurrent_streams", 16),  # HTTP/2 streams per connection: one socket cannot open thousands
        ("grpc.keepalive_time_ms", 60_000),  # ping a connection after 60 s without traffic...
        ("grpc.keepalive_timeout_ms", 20_000),  # ...and close it if unanswered in 20 s: a vanished device's streams end
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # a client may ping at most every 10 s...
        ("grpc.http2.max_ping_strikes", 2),  # ...and is disconnected after 2 pings more often than that (ping flood)
        ("grpc.max_connection_idle_ms", 300_000),  # a connection without an RPC for 5 min is closed
        ("grpc.max_connection_age_ms", 3_600_000),  # every connection is closed after 1 h (GOAWAY)...
        ("grpc.max_connection_age_grace_ms", int(limits.stream_deadline * 1000)),  # ...its streams may still end
        ("grpc.so_reuseport", 0),  # no second process may bind our port and take a share of the devices
    ]


class BusyError(RuntimeError):
    """No slot is free (in all, or for this device); the message says which."""


class Budget:
    """Slots in all (``total``; None: no bound of its own) and per device.

    A plaintext client on loopback (no name: ``server.distribute.device_of``) has no per-device
    bound. Used from the service's event loop only: no lock.
    """

    def __init__(self, what: str, per_device: int, total: int | None = None) -> None:
        self.what, self.per_device, self.total = what, per_device, total
        self.running = 0
        self._by_device: dict[str, int] = {}

    def take(self, device: str | None) -> None:
        """Take a slot of ``device`` (give it back with :meth:`give`); :class:`BusyError` if there is none."""
        if self.total is not None and self.running >= self.total:
            raise BusyError(f"the service is busy ({self.total} {self.what} running); retry later")
        if device is not None and self._by_device.get(device, 0) >= self.per_device:
            raise BusyError(f"device '{device:.64}' already has {self.per_device} {self.what} open")
        self.running += 1
        if device is not None:
            self._by_device[device] = self._by_device.get(device, 0) + 1

    def give(self, device: str | None) -> None:
        """Give back a slot :meth:`take` gave ``device``."""
        self.running -= 1
        if device is not None:
            self._by_device[device] -= 1
            if not self._by_device[device]:
                del self._by_device[device]
