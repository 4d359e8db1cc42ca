"""A shaped link for tests: a TCP proxy (threads, no tc/netem) between a client and the broker
that limits bytes/s in each direction, adds a one-way delay, and can stall or cut.

    link = SlowLink(broker.port, up_bps=32_000, down_bps=32_000, delay_s=0.25)
    client = EdgeClient(broker=link.url, ...)
    link.stall(30)      # nothing moves for 30 s (the sockets stay open)
    link.cut()          # every connection reset at once, as a radio dropping mid-transfer

Backpressure is real: each direction reads from its source only as fast as its rate allows,
through small socket buffers (``BUFFER``), so a sender's ``send`` blocks as it would on the slow
link (the sender's own kernel send buffer still takes what the OS lets it, as on a phone).
Loss is not dropped bytes here: TCP turns loss into retransmissions, i.e. a lower rate and
bursts of delay, which ``up_bps`` / ``stall`` model. ``sent_up`` / ``sent_down`` count bytes
forwarded, over every connection the link carried.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque

BUFFER = 16 * 1024
"""SO_RCVBUF / SO_SNDBUF of the proxy's sockets: little hidden buffering in the link itself."""
CHUNK = 4096


class _Direction:
    """One direction of one connection: a reader paced by a token bucket, a writer that
    releases each chunk ``delay_s`` after it was read."""

    def __init__(self, link: SlowLink, src: socket.socket, dst: socket.socket, bps: float, up: bool) -> None:
        self.link, self.src, self.dst, self.bps, self.up = link, src, dst, bps, up
        self.queue: deque[tuple[float, bytes]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True, name="slowlink-read")
        self.writer = threading.Thread(target=self._write, daemon=True, name="slowlink-write")

    def start(self) -> None:
        self.reader.start()
        self.writer.start()

    def _read(self) -> None:
        budget, last = 0.0, time.monotonic()
        try:
            while not self.closed:
                self.link._wait_unstalled()
                now = time.monotonic()
                budget = min(budget + (now - last) * self.bps, float(CHUNK))
                last = now
                if budget < 1:
                    time.sleep(min(0.05, (1 - budget) / self.bps))
                    continue
                data = self.src.recv(int(budget))
                if not data:
                    break
                budget -= len(data)
                with self.cond:
                    self.queue.append((time.monotonic() + self.link.delay_s, data))
                    self.cond.notify()
        except OSError:
            pass
        self.close()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait(0.1)
                    if not self.queue:
                        break
                    at, data = self.queue[0]
                wait = at - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.link._wait_unstalled()
                self.dst.sendall(data)
                with self.cond:
                    self.queue.popleft()
                self.link._count(self.up, len(data))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
        for s in (self.src, self.dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class SlowLink:
    """Listens on 127.0.0.1 (``port``, ``url``) and forwards every connection to the broker on
    ``broker_port`` through the shaped link; ``up_bps`` is client → broker, ``down_bps`` back."""

    def __init__(self, broker_port: int, *, up_bps: float, down_bps: float, delay_s: float = 0.0) -> None:
        self.broker_port = broker_port
        self.up_bps, self.down_bps, self.delay_s = float(up_bps), float(down_bps), float(delay_s)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket, _Direction, _Direction]] = []
        self._running = threading.Event()
        self._running.set()
        self._stall_until = 0.0
        self.sent_up = self.sent_down = 0
        self.connections = 0
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="slowlink-accept")
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.broker_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up = _Direction(self, client, upstream, self.up_bps, True)
            down = _Direction(self, upstream, client, self.down_bps, False)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream, up, down))
                self.connections += 1
            up.start()
            down.start()

    def _count(self, up: bool, n: int) -> None:
        with self._lock:
            if up:
                self.sent_up += n
            else:
                self.sent_down += n

    def _wait_unstalled(self) -> None:
        while (left := self._stall_until - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))

    def stall(self, seconds: float) -> None:
        """Nothing crosses the link for ``seconds`` (connections stay open, bytes wait)."""
        self._stall_until = time.monotonic() + seconds

    def cut(self) -> None:
        """Reset every open connection now (bytes in the link are lost); new ones are carried."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream, up, down in pairs:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            up.close()
            down.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def __enter__(self) -> SlowLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
