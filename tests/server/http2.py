"""A gRPC client that takes no reply: an HTTP/2 connection (``h2``) whose stream window is 0.

No gRPC client can be told to read nothing (its transport takes a unary reply whatever the
application does), so the tests of the artifact service against a reader that reads nothing speak
HTTP/2 themselves. One thread owns the socket: it sends what ``h2`` has queued and feeds it what
arrives (``h2`` answers the server's SETTINGS and PINGs, so the connection stays healthy) and
records the gRPC status of each stream that ends.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading

import h2.config
import h2.connection
import h2.events
import h2.settings


class WindowZeroClient:
    """One mutual-TLS HTTP/2 connection to ``127.0.0.1:port`` as device ``cert``/``key``, reading no DATA."""

    def __init__(self, port: int, ca, cert, key) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        context.set_alpn_protocols(["h2"])
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})  # the server may send no DATA
        self.status: dict[int, str] = {}  # stream -> grpc-status of the streams that ended
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._flush()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def call(self, path: str, message: bytes) -> int:
        """Send one gRPC request (headers, the message, end of stream) on a new stream; return its id."""
        with self._lock:
            stream = self.conn.get_next_available_stream_id()
            headers = [(":method", "POST"), (":scheme", "https"), (":path", path), (":authority", "localhost")]
            headers += [("content-type", "application/grpc"), ("te", "trailers")]
            self.conn.send_headers(stream, headers)
            self.conn.send_data(stream, b"\0" + struct.pack(">I", len(message)) + message, end_stream=True)
            self._flush()
        return stream

    def _flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def _read(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with self._lock:
                for event in self.conn.receive_data(data):
                    if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                        status = dict(event.headers).get("grpc-status")
                        if status is not None:  # trailers, or a trailers-only refusal
                            self.status[event.stream_id] = status
                self._flush()

    def close(self) -> None:
        """Stop reading and close the connection."""
        self._stop.set()
        self._thread.join(10)
        self.sock.close()
