"""The HTTP scaffolding the fakes share: a threaded server on a free 127.0.0.1 port.

``tests/fake_anthropic.py`` and ``tests/fake_rtdb.py`` each subclass :class:`LoopbackServer`
(start/stop, ``with``, ``port``/``url``) and :class:`LoopbackHandler` (HTTP/1.1 keep-alive,
connection tracking, no request log), and supply only what their service says.
:class:`SilentServer` is the service that accepts connections and never answers (or trickles).
Standard library only.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

__all__ = ["LoopbackHandler", "LoopbackServer", "SilentServer"]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    fake: Any  # the LoopbackServer subclass serving through this server


class LoopbackHandler(BaseHTTPRequestHandler):
    """Keep-alive handler that registers its connection with the fake and logs nothing."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the real services
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean


class _Served:
    """``with server: ...`` and ``url`` for a loopback server with ``start``, ``stop`` and ``port``."""

    port: int

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"


class LoopbackServer(_Served):
    """Serve ``handler`` on a free 127.0.0.1 port from a daemon thread.

    Subclasses set ``handler`` (a :class:`LoopbackHandler` subclass, which reaches the
    fake as ``self.server.fake``) and may change ``poll_interval``.
    """

    handler: ClassVar[type[LoopbackHandler]]
    poll_interval: ClassVar[float] = 0.05

    def __init__(self) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Start serving on a free 127.0.0.1 port (no-op when already started)."""
        if self._server is not None:
            return self
        server = _HTTPServer(("127.0.0.1", 0), self.handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": self.poll_interval}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._server.server_address[1]


    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)


class SilentServer(_Served):
    """A 127.0.0.1 listener that accepts connections, reads each request's head and never answers.

    For timeouts: ``connections`` counts accepted connections and ``requests`` holds the request heads
    read (bytes up to the blank line).  With ``trickle=True`` it answers each request head with a valid
    status line and headers, one byte every ``interval`` seconds, and never finishes them, so a per-read
    socket timeout never fires.  ``with SilentServer() as silent: ... silent.url``.
    """

    TRICKLE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: "

    def __init__(self, *, trickle: bool = False, interval: float = 0.3) -> None:
        self.trickle = trickle
        self.interval = interval
        self.connections = 0
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()

    def start(self) -> Self:
        """Listen on a free 127.0.0.1 port (no-op when already started)."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.05)
        self._listener = listener
        self._stopped.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and close every held connection."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopped.set()
        listener.close()
        with self._lock:
            held, self._open = self._open, []
        for conn in held:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("SilentServer is not started")
        return self._listener.getsockname()[1]


    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._stopped.is_set():
                    conn.close()
                    return
                self.connections += 1
                self._open.append(conn)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        head = b""
        try:
            while not self._stopped.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return  # the client gave up
                head += chunk
                if b"\r\n\r\n" in head:
                    break
            with self._lock:
                self.requests.append(head.split(b"\r\n\r\n", 1)[0])
            sent = 0
            while not self._stopped.wait(self.interval):
                if self.trickle:
                    byte = self.TRICKLE_HEAD[sent:sent + 1] or b"a"
                    conn.sendall(byte)
                    sent += 1
        except OSError:
            return
