"""A userspace wide-area link on loopback: a TCP proxy with delay and a bandwidth cap.

netem is not available here, so this stands in for it, in front of any TCP service::

    with LatencyProxy(("127.0.0.1", sshd_port), rtt=0.050, bandwidth=125e6) as link:
        connect to ("127.0.0.1", link.port)

Model, per connection and per direction:

* one-way delay ``rtt / 2`` for every byte, order preserved;
* a bottleneck of ``bandwidth`` bytes/s: bytes leave the link no faster than that
  (serialisation delay), and the link holds at most ``queue`` bytes beyond what is in
  flight (bandwidth x delay); a sender that outruns it is stopped by TCP backpressure,
  as behind a router queue of that size (no drops, so no loss-recovery effects);
* the TCP handshake's round trip: the upstream connection opens one ``rtt`` after the
  client's connect returns, and nothing crosses before then. (The kernel completes the
  client's connect at once, so the whole connection is shifted by one rtt instead of
  1-1.5; what a protocol pays per round trip after that is exact.)

``flights`` counts, per connection, the client's flights: sends that follow an answer to
its previous flight. Each after the first is a round trip the client waited for, so two
clients' counts compare their round trips without a clock.

Listens on 127.0.0.1 only. Runs its own event loop in one thread; ``close()`` ends every
connection and joins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from types import TracebackType

__all__ = ["ChildServer", "LatencyProxy", "ProxyProcess"]

_CHUNK = 65536


def _check_link(rtt: float, bandwidth: float | None) -> None:
    if rtt < 0 or (bandwidth is not None and bandwidth <= 0):
        raise ValueError("rtt must be >= 0 and bandwidth > 0 (or None)")


class _Flights:
    """One connection's client flights, counted by cause, not by clock: a flight starts
    when the client sends after it was given server bytes that the server sent after
    it had the client's latest flight. So a flight split by a stall, a server's answer
    in several pieces, or the server's unprompted banner starts none."""

    def __init__(self, proxy: LatencyProxy, slot: int) -> None:
        self.proxy = proxy
        self.slot = slot
        self.current = 0  # the client's latest flight, as read from it
        self.written = 0  # the latest flight handed to the server
        self.answered = False  # the client was given an answer to its latest flight

    def client_sent(self) -> int:
        if self.current == 0 or self.answered:
            self.current += 1
            self.answered = False
            self.proxy.flights[self.slot] = self.current
        return self.current

    def given_to_client(self, tag: int) -> None:
        if tag and tag == self.current:
            self.answered = True


class _Direction:
    """One way of one connection: timed delivery through a capped, delayed pipe."""

    def __init__(
        self,
        proxy: LatencyProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        start_at: float,
        flights: _Flights,
        upstream: bool,
    ) -> None:
        self.proxy = proxy
        self.flights = flights
        self.upstream = upstream
        self.reader = reader
        self.writer = writer
        # (due, bytes, tag): upstream the client's flight, downstream the latest client
        # flight the server had when it sent the bytes.
        self.queue: deque[tuple[float, bytes, int]] = deque()
        self.queued = 0
        self.tx_free = start_at  # when the bottleneck is free to send the next byte
        self.start_at = start_at
        self.more = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.eof = False

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        bw = self.proxy.bandwidth
        half = self.proxy.rtt / 2
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(_CHUNK)
                if not data:
                    break
                now = loop.time()
                tag = self.flights.client_sent() if self.upstream else self.flights.written
                begin = max(now, self.tx_free, self.start_at)
                self.tx_free = begin + (len(data) / bw if bw else 0.0)
                self.queue.append((self.tx_free + half, data, tag))
                self.queued += len(data)
                if self.queued > self.proxy.capacity:
                    self.room.clear()
                self.more.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof = True
            self.more.set()

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self.more.clear()
                    await self.more.wait()
                    continue
                due, data, tag = self.queue[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.queue.popleft()
                if self.upstream:
                    self.flights.written = max(self.flights.written, tag)
                else:
                    self.flights.given_to_client(tag)
                self.queued -= len(data)
                if self.queued <= self.proxy.capacity:
                    self.room.set()
                self.writer.write(data)
                await self.writer.drain()
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (ConnectionError, OSError):
            pass


class LatencyProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` through an emulated wide-area link."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rtt: float = 0.050,
        bandwidth: float | None = 125e6,
        queue: int = 4 * 1024 * 1024,
    ) -> None:
        _check_link(rtt, bandwidth)
        self.target = target
        self.rtt = rtt
        self.bandwidth = bandwidth
        # In flight (bandwidth x one-way delay) plus the bottleneck's queue.
        self.capacity = int((bandwidth or 1e9) * rtt / 2) + queue
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0
        # Per connection, in accept order: the client's flights (see _Flights), so how
        # many times it waited for an answer, plus one.
        self.flights: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="latency-proxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError("latency proxy did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()
        self._loop.close()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(c_writer)
        self.connections += 1
        slot = len(self.flights)
        self.flights.append(0)
        loop = asyncio.get_running_loop()
        opened_at = loop.time() + self.rtt
        try:
            with contextlib.suppress(OSError):
                sock = c_writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            flights = _Flights(self, slot)
            # The writer is fixed below.
            up = _Direction(self, c_reader, c_writer, opened_at, flights, upstream=True)
            await asyncio.sleep(self.rtt)
            try:
                s_reader, s_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(s_writer)
            with contextlib.suppress(OSError):
                s_writer.get_extra_info("socket").setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                )
            up.writer = s_writer
            down = _Direction(self, s_reader, c_writer, opened_at, flights, upstream=False)
            await asyncio.gather(up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())
            s_writer.close()
        except asyncio.CancelledError:
            pass  # close(): the link goes down with everything on it
        finally:
            c_writer.close()
            self._tasks.discard(task)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ChildServer:
    """A loopback server in a process of its own: ``argv`` starts it, it prints
    ``port N`` once listening and exits when its stdin closes (so it never outlives
    the parent). ``host``, ``port``, ``close()``, and a context manager."""

    def __init__(self, argv: list[str], what: str) -> None:
        self.host = "127.0.0.1"
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "port":
            self.close()
            raise RuntimeError(f"{what} did not start")
        self.port = int(line[1])

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProxyProcess(ChildServer):
    """A :class:`LatencyProxy` (same arguments) in a process of its own.

    The link then takes no CPU time (and no GIL) from the client being measured, as a
    real network would not.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rtt: float = 0.050,
        bandwidth: float | None = 125e6,
        queue: int = 4 * 1024 * 1024,
    ) -> None:
        _check_link(rtt, bandwidth)
        super().__init__(
            [
                sys.executable,
                __file__,
                "--serve",
                f"{target[0]}:{target[1]}",
                str(rtt),
                str(bandwidth or 0),
                str(queue),
            ],
            "latency proxy process",
        )


def _serve(target: str, rtt: str, bandwidth: str, queue: str) -> None:
    host, port = target.rsplit(":", 1)
    bw = float(bandwidth)
    with LatencyProxy(
        (host, int(port)), rtt=float(rtt), bandwidth=bw or None, queue=int(queue)
    ) as link:
        print(f"port {link.port}", flush=True)
        sys.stdin.buffer.read()  # until the parent closes it (or dies)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(*sys.argv[2:6])
elif __name__ == "__main__":  # a quick self-check: one round trip through a 50 ms link
    echo = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    with LatencyProxy(echo.getsockname(), rtt=0.05) as link:
        s = socket.create_connection((link.host, link.port))
        t = time.perf_counter()
        s.sendall(b"x")
        s.recv(1)
        first = time.perf_counter() - t
        t = time.perf_counter()
        s.sendall(b"y")
        s.recv(1)
        again = time.perf_counter() - t
        print(f"first exchange {first * 1000:.1f} ms, then {again * 1000:.1f} ms")
        s.close()
