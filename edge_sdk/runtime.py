"""Drivers' plumbing: an injectable clock and the actor that owns a sans-IO core.

The actor is the only thread that touches its core. Network callbacks, app threads and the
trainer hand it work through a queue (:meth:`Actor.submit`); the core's single timer is
the queue's ``get`` timeout, so there is no polling loop and no timer thread.

Batches: after waking, the actor drains what has already arrived (up to ``max_batch``
items), handles each in order, and then calls ``on_batch_end`` once. A driver that holds
back some actions until they are durable (the coordinator's group commit) flushes there.
Without ``on_batch_end`` every action is performed as soon as its event is handled, as before.

One thread for the network too (``io``): an actor given an :class:`ActorIO` (the coordinator
passes its :class:`~edge_sdk.mqtt.MqttTransport` in ``own_loop`` mode) waits in ``select`` (``poll`` for descriptors above its limit) on
the IO's sockets and a wake-up socket instead of on a queue, and services the IO itself.
Messages read there reach the inbox on this very thread: no hand-off to and from a network
thread (a queue put, a condition notify, a GIL switch and a socketpair wake-up per message).
Other threads still submit work; the first item submitted while the actor sleeps wakes it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from edge_sdk.core.events import ScheduleTimer, TimerFired

log = logging.getLogger("edgeci.runtime")


def iso_utc_ms(t: float) -> str:
    """``2026-12-02T11:20:03.123Z``: ISO 8601, UTC, milliseconds, of the Unix time ``t`` (what
    every log line and JSON progress line carries as its timestamp)."""
    d = datetime.fromtimestamp(t, tz=UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


class Clock(Protocol):
    def now(self) -> float: ...


FORWARD_STEP_S = 1.0
"""A system clock this far ahead of :class:`WallClock`'s own is followed (less: NTP's slewing, which
moves the monotonic clock too)."""


class WallClock:
    """Seconds since the epoch (they survive restarts, so checkpointed times stay meaningful)
    that never go back: ``time.time()`` when started, then advanced by ``time.monotonic()``.
    A system clock set forward is followed at once (a deadline comes early, as it would); one
    set back is not, or every timer a core armed — request retries, SPIN's π, canary and
    conversion deadlines — would wait that much longer (an edge device without a real-time
    clock whose time NTP corrects back, a server stepped at run time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall0, self._mono0 = time.time(), time.monotonic()

    def now(self) -> float:
        with self._lock:
            mono, wall = time.monotonic(), time.time()
            steady = self._wall0 + (mono - self._mono0)
            if wall > steady + FORWARD_STEP_S:  # set forward: follow
                self._wall0, self._mono0 = wall, mono
                return wall
            return steady

    def wall(self) -> float:
        """The system clock itself (it may go back): for comparisons with another machine's times."""
        return time.time()


class ActorIO(Protocol):
    """Network IO that an :class:`Actor` drives from its own thread."""

    def bind(self, wake: Callable[[], None]) -> None:
        """Called once by the actor: ``wake()`` (any thread) makes it look at the IO again."""

    def wait_sockets(self) -> tuple[list[Any], list[Any], float | None]:
        """(sockets to read, sockets to write, the longest wait in seconds before
        :meth:`service` is due anyway; None: no limit)."""

    def service(self, readable: list[Any], writable: list[Any]) -> None:
        """Actor thread: read, write and keep the connection alive; callbacks may submit."""


def wait_io(rlist: list[Any], wlist: list[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
    """``select.select(rlist, wlist, [], timeout)`` for descriptors of any number: ``select``
    raises ValueError for a descriptor >= FD_SETSIZE (1024 on Linux), which a process with
    many open files reaches; then ``poll`` answers instead (where the platform has it), as
    ``select`` would: hang-up and error count as readable (and as writable for a socket
    waiting to write), so the next read or write sees what happened. A closed socket
    (``fileno()`` -1) still raises ValueError, as with ``select``."""
    try:
        ready = select.select(rlist, wlist, [], timeout)
        return ready[0], ready[1]
    except ValueError:
        fds = [obj if isinstance(obj, int) else obj.fileno() for obj in (*rlist, *wlist)]
        if _poll is None or min(fds, default=0) < 0:
            raise
    by_fd: dict[int, Any] = {}
    masks: dict[int, int] = {}
    for objs, mask in ((rlist, _POLL_READ), (wlist, select.POLLOUT)):
        for obj in objs:
            fd = obj if isinstance(obj, int) else obj.fileno()
            by_fd[fd] = obj
            masks[fd] = masks.get(fd, 0) | mask
    poller = _poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    readable: list[Any] = []
    writable: list[Any] = []
    for fd, got in poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0):
        asked = masks[fd]
        if asked & _POLL_READ and got & (_POLL_READ | _POLL_FAIL):
            readable.append(by_fd[fd])
        if asked & select.POLLOUT and got & (select.POLLOUT | _POLL_FAIL):
            writable.append(by_fd[fd])
    return readable, writable


_poll = getattr(select, "poll", None)
_POLL_READ = getattr(select, "POLLIN", 0) | getattr(select, "POLLPRI", 0)
_POLL_FAIL = getattr(select, "POLLHUP", 0) | getattr(select, "POLLERR", 0) | getattr(select, "POLLNVAL", 0)

_STOP = object()
MAX_KEPT_ERRORS = 100
"""Exceptions an :class:`Actor` keeps in ``errors`` (it counts all of them)."""


class Actor:
    """Runs ``handle(event) -> actions`` on one thread; ``perform(action)`` does the IO.

    Work is submitted as a factory ``now -> event`` so that the event is stamped with the
    time it is *handled*, keeping the core's notion of time monotonic.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[Any], list[Any]],
        perform: Callable[[Any], None],
        *,
        clock: Clock | None = None,
        on_batch_end: Callable[[], None] | None = None,
        max_batch: int = 256,
        io: ActorIO | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.name = name
        self._handle = handle
        self._perform = perform
        self._on_batch_end = on_batch_end
        self.max_batch = max_batch
        self.clock: Clock = clock or WallClock()
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._abandon = threading.Event()
        self.errors: list[BaseException] = []
        """The first ``MAX_KEPT_ERRORS`` exceptions the actor survived (for tests and
        diagnosis); ``error_count`` counts them all, so a fault that repeats on every loop
        turn cannot grow memory."""
        self.error_count = 0
        self.batches = 0
        """Batches handled so far (for tests and metrics)."""
        self._io = io
        self._pending: deque[Any] = deque()  # the inbox with io (appends are atomic)
        self._asleep = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        if io is not None:
            io.bind(self.wake)

    def start(self) -> None:
        if self._io is not None:  # the wake-up socket; closed when the thread ends
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        self._thread.start()

    def submit(self, make_event: Callable[[float], Any]) -> None:
        self._put(make_event)

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the actor thread (e.g. to read core state consistently)."""
        self._put(("call", fn))

    def _put(self, item: Any) -> None:
        if self._io is None:
            self._inbox.put(item)
            return
        self._pending.append(item)
        if self._asleep:  # set before the actor's last look at the inbox: it may be in select
            self.wake()

    def wake(self) -> None:
        """Make an actor with ``io`` leave its wait (any thread; a no-op without io)."""
        wake_w = self._wake_w
        if wake_w is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
                wake_w.send(b"\0")

    def stop(self, timeout: float = 10.0, *, drain: bool = True) -> None:
        """Stop after the queued work (``drain``) or after the batch in hand (``drain=False``:
        queued events are abandoned, e.g. on SIGTERM under a backlog; the batch being handled
        still ends with ``on_batch_end``)."""
        if not drain:
            self._abandon.set()
        self._put(_STOP)
        self.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def on_thread(self) -> bool:
        """The caller runs on the actor's own thread (it must not wait for the actor)."""
        return threading.current_thread() is self._thread

    @property
    def backlog(self) -> int:
        """Items waiting in the inbox (approximate)."""
        return len(self._pending) if self._io is not None else self._inbox.qsize()

    def run_actions(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, ScheduleTimer):
                self._deadline = action.at
            else:
                self._perform(action)

    def _next_batch(self) -> list[Any]:
        if self._io is not None:
            return self._next_batch_io(self._io)
        timeout = None if self._deadline is None else max(0.0, self._deadline - self.clock.now())
        try:
            first = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self._deadline = None
            first = TimerFired
        batch = [first]
        while len(batch) < self.max_batch and first is not _STOP and batch[-1] is not _STOP:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _next_batch_io(self, io: ActorIO) -> list[Any]:
        """Wait for the inbox, the IO's sockets, the wake-up socket or the timer; service
        the IO (its callbacks fill the inbox on this thread); return what the inbox holds."""
        pending = self._pending
        while not pending:
            rlist, wlist, timeout = io.wait_sockets()
            if self._deadline is not None:
                left = max(0.0, self._deadline - self.clock.now())
                if left == 0.0:
                    self._deadline = None
                    return [TimerFired]
                timeout = left if timeout is None else min(timeout, left)
            self._asleep = True
            try:
                if pending:  # submitted before _asleep was visible: no wake-up was sent
                    break
                readable, writable = wait_io([self._wake_r, *rlist], wlist, timeout)
            except (OSError, ValueError):  # a socket closed by another thread (stop): look again
                readable, writable = [], []
            finally:
                self._asleep = False
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)  # type: ignore[union-attr]
            try:
                io.service(readable, writable)
            except Exception as exc:  # the loop must survive; the IO reconnects by itself
                log.exception("%s: error in the network loop", self.name)
                self._record_error(exc)
        batch: list[Any] = []
        while pending and len(batch) < self.max_batch:
            item = pending.popleft()
            batch.append(item)
            if item is _STOP:
                break
        return batch

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, None, None
            for s in (wake_r, wake_w):
                if s is not None:
                    s.close()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            stop = False
            handled = 0
            try:
                for item in batch:
                    if item is _STOP or self._abandon.is_set():
                        stop = True
                        break
                    handled += 1
                    self._run_one(item)
            finally:
                self.batches += 1 if handled else 0
                if self._on_batch_end is not None and handled:
                    try:
                        self._on_batch_end()
                    except Exception as exc:
                        log.exception("%s: error at the end of a batch", self.name)
                        self._record_error(exc)
            if stop:
                return

    def _record_error(self, exc: BaseException) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(exc)

    def _run_one(self, item: Any) -> None:
        try:
            if isinstance(item, tuple) and item and item[0] == "call":
                item[1]()
                return
            event = TimerFired(now=self.clock.now()) if item is TimerFired else item(self.clock.now())
            self.run_actions(self._handle(event))
        except Exception as exc:  # a driver must survive one bad event; record it loudly
            log.exception("%s: error while handling an event", self.name)
            self._record_error(exc)
