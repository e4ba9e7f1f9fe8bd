"""The artifact service's limits: a Download budget that leaves room for manifests, and a stall watchdog.

gRPC's synchronous server gives each RPC a thread and blocks it while the reader's flow-control
window is full, so a handful of slow readers could hold every thread (issue 15: 8 slow ``Download``
streams starved a 9th device's ``GetManifest``). :class:`Streams` bounds the downloads in all and
per device below the thread count, and cancels a stream whose reader stalls or that outlives its
deadline; :func:`grpc_options` sets the keepalive, connection-age and message-size limits.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from shared.manifest import MAX_MANIFEST_BYTES

log = logging.getLogger("server.distribute")
CHUNK_BYTES = 1 << 20  # a Download chunk


@dataclass(frozen=True)
class ServiceLimits:
    """How much of the service one client, or a crowd, can hold; every value bounds an abuse of issue 15."""

    download_streams: int = 8
    """Concurrent ``Download`` streams in all. Each holds a handler thread while its reader reads;
    one more is refused with RESOURCE_EXHAUSTED at once, a status to retry with backoff."""
    streams_per_device: int = 2
    """Concurrent ``Download`` streams of one device (its client certificate's name, over mutual
    TLS): one device cannot take the whole budget. A fetcher downloads one file at a time."""
    spare_workers: int = 4
    """Handler threads beyond ``download_streams``: kept for ``GetManifest`` and for refusing a
    ``Download`` fast, so slow readers never starve a device asking for the manifest."""
    queued_rpcs: int = 32
    """RPCs that may wait for a free thread; beyond that gRPC answers RESOURCE_EXHAUSTED at once
    (``maximum_concurrent_rpcs`` = threads + this) rather than queueing without bound."""
    progress_timeout: float = 60.0
    """Seconds a ``Download`` may wait for its reader to take the next chunk (1 MiB): slower than
    ~17 KiB/s, or not reading at all, and the stream is cancelled (a fetcher can resume from its offset)."""
    stream_deadline: float = 1800.0
    """Seconds one ``Download`` stream may last however fast it reads (a 1 GB file at 1 MB/s takes
    1000 s); a reader trickling just above the progress rate is cut off here."""

    def __post_init__(self) -> None:
        for name in ("download_streams", "streams_per_device", "spare_workers", "progress_timeout", "stream_deadline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServiceLimits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.queued_rpcs < 0:
            raise ValueError(f"ServiceLimits.queued_rpcs must be >= 0, got {self.queued_rpcs!r}")

    @property
    def workers(self) -> int:
        """Handler threads: the Download budget plus the spare ones."""
        return self.download_streams + self.spare_workers


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
    """No Download slot is free (in all, or for this device); the message says which."""


@dataclass
class Stream:
    """One running ``Download``: when it started, when its reader last took a chunk."""

    context: Any
    device: str | None
    what: str
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    released: bool = False
    cut: bool = False


class Streams:
    """The Download budget (in all, per device) and the watchdog that cancels stalled or overlong streams.

    The watchdog is one thread that lives while streams run (it ends when the last one does), so
    a stopped service leaves no thread behind. Cancelling a stream fails its blocked send, which
    frees the handler thread: the only way to free it, as gRPC's sync server blocks the thread
    while the reader's flow-control window is full.
    """

    def __init__(self, limits: ServiceLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._running: dict[int, Stream] = {}
        self._by_device: dict[str, int] = {}
        self._watchdog: threading.Thread | None = None

    def open(self, context: Any, device: str | None, what: str) -> Stream:
        """Take a slot for a stream of ``device`` (None: plaintext, no name); :class:`BusyError` if there is none."""
        with self._lock:
            if len(self._running) >= self.limits.download_streams:
                raise BusyError(f"the service is busy ({self.limits.download_streams} downloads running); retry later")
            if device is not None and self._by_device.get(device, 0) >= self.limits.streams_per_device:
                raise BusyError(f"device '{device:.64}' already runs {self.limits.streams_per_device} downloads")
            stream = Stream(context, device, what)
            self._running[id(stream)] = stream
            if device is not None:
                self._by_device[device] = self._by_device.get(device, 0) + 1
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="artifact-watchdog", daemon=True)
                self._watchdog.start()
        context.add_callback(lambda: self.close(stream))  # however the RPC ends: done, cancelled, cut off
        return stream

    def close(self, stream: Stream) -> None:
        """Give the stream's slot back (idempotent: the generator's end and the RPC's end both call it)."""
        with self._lock:
            if stream.released:
                return
            stream.released = True
            self._running.pop(id(stream), None)
            if stream.device is not None:
                self._by_device[stream.device] -= 1
                if not self._by_device[stream.device]:
                    del self._by_device[stream.device]

    def _watch(self) -> None:
        interval = min(self.limits.progress_timeout, self.limits.stream_deadline) / 4
        while True:
            time.sleep(interval)
            now = time.monotonic()
            with self._lock:
                if not self._running:
                    self._watchdog = None
                    return
                late = [
                    s
                    for s in self._running.values()
                    if not s.cut
                    and (now - s.last > self.limits.progress_timeout or now - s.started > self.limits.stream_deadline)
                ]
            for s in late:
                s.cut = True  # once: its slot comes back when the RPC ends (add_callback in open)
                stalled = now - s.last > self.limits.progress_timeout
                log.warning(
                    "artifact service: cut off %s after %.0f s: %s",
                    s.what,
                    now - s.started,
                    f"its reader took no chunk for {now - s.last:.0f} s (limit {self.limits.progress_timeout:.0f} s)"
                    if stalled
                    else f"the stream outlived its deadline of {self.limits.stream_deadline:.0f} s",
                )
                s.context.cancel()  # fails the blocked send: the handler thread returns, the slot is given back
