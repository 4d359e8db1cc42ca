"""A TCP proxy on 127.0.0.1 for the broker-failure tests (``tests/test_broker_failures.py``):
one thread per connection forwards bytes both ways; the test can cut every connection (a
FIN to both sides), refuse new ones for a while (the client's network is down), or make the
existing ones go silent (a NAT that dropped the mapping: no FIN, no RST, nothing read, the
kernel buffers fill) while new connections forward as usual."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class TcpProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self.accepting = True
        """False: a new connection is closed at once (the client's network is down)."""
        self.connections = 0
        """Connections forwarded so far."""
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._silent: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.accepting:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if client in self._silent:  # packets vanish: nothing read, nothing closed
                    time.sleep(0.1)
                    continue
                readable, _, _ = select.select([client, upstream], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))
            for sock in (client, upstream):
                sock.close()

    def silence(self) -> None:
        """Every connection open now stops carrying bytes, without a FIN or RST to either side."""
        with self._lock:
            self._silent = {client for client, _ in self._pairs}

    def cut(self) -> None:
        """Close every connection open now (both sides see the close at once)."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.cut()
