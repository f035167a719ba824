#!/usr/bin/env python3
"""A userspace WAN emulator: a TCP proxy on 127.0.0.1 adding delay and a rate limit.

    python3 tools/wanproxy.py --target 127.0.0.1:2222 [--listen 127.0.0.1:0]
        [--delay-ms 10] [--rate-mbit 200] [--queue-kib 1024]

For machines whose kernel has no netem. Put it in front of an sshd and point ssh at the
port it prints (``listening on 127.0.0.1:PORT``); every connection accepted there is
relayed to ``--target`` through two emulated one-way paths:

* client -> target ("up") and target -> client ("down"), each a link of ``--rate-mbit``
  (a serializer: a chunk occupies the link for len/rate, so the rate is a token bucket
  with no burst allowance), followed by ``--delay-ms`` of propagation delay. The two
  links are shared by all connections, as one physical link would be;
* each chunk read from a socket is stamped when it is read, scheduled on its link, and
  written out at (link free + its transmission time + delay); chunks leave in order;
* memory is bounded: when a connection's direction holds ``--queue-kib`` not yet
  delivered, the proxy stops reading from that socket (its kernel receive buffer, kept
  small, fills and TCP pushes back on the sender), like a router queue of that size;
* the TCP handshake is emulated as one round trip spent before the proxy connects to
  the target (the client's connect itself completes at once, locally);
  ``--no-handshake`` skips it.

Per-direction values: ``--up-delay-ms``, ``--down-delay-ms``, ``--up-rate-mbit``,
``--down-rate-mbit`` (``0`` = unlimited). Timer resolution is about 1 ms (epoll), so
delays are accurate to about a millisecond. Slow start and losses are not emulated: the
link is always at its rate. ``--log-interval S`` prints the rate put on each link every
S seconds, to see where a transfer leaves the link idle.

Only loopback addresses are accepted, for listening and as the target. Runs until
SIGINT/SIGTERM, then prints one JSON line of counters on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import signal
import socket
import sys

CHUNK = 64 << 10
SOCK_BUF = 128 << 10  # kernel buffers of the proxy's own sockets: keep hidden queues small


class Link:
    """One direction of the emulated path, shared by every connection."""

    def __init__(self, rate_bytes: float, delay: float) -> None:
        self.rate = rate_bytes  # bytes per second; 0: unlimited
        self.delay = delay
        self.free_at = 0.0
        self.bytes = 0

    def schedule(self, n: int, now: float) -> float:
        """Put ``n`` bytes on the link at ``now``: when they arrive at the far end."""
        start = max(now, self.free_at)
        self.free_at = start + (n / self.rate if self.rate else 0.0)
        self.bytes += n
        return self.free_at + self.delay


class Pipe:
    """One direction of one connection: read, stamp, queue (bounded), release in order."""

    def __init__(self, src: socket.socket, dst: socket.socket, link: Link, limit: int) -> None:
        self.src = src
        self.dst = dst
        self.link = link
        self.limit = limit
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.room = asyncio.Event()
        self.ready = asyncio.Event()
        self.peak = 0

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.queued >= self.limit:
                    self.room.clear()
                    await self.room.wait()
                data = await loop.sock_recv(self.src, CHUNK)
                if not data:
                    break
                release = self.link.schedule(len(data), loop.time())
                self.queue.append((release, data))
                self.queued += len(data)
                self.peak = max(self.peak, self.queued)
                self.ready.set()
        except OSError:
            pass
        finally:
            self.queue.append((0.0, None))  # end of stream, after everything queued
            self.ready.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            release, data = self.queue[0]
            if data is None:
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                return
            wait = release - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            batch = []
            while self.queue and self.queue[0][1] is not None and self.queue[0][0] <= now:
                batch.append(self.queue.popleft()[1])
            buf = b"".join(batch)  # type: ignore[arg-type]
            await loop.sock_sendall(self.dst, buf)
            self.queued -= len(buf)
            self.room.set()


class Proxy:
    def __init__(self, args: argparse.Namespace) -> None:
        self.target = parse_addr(args.target)
        self.up = Link(mbit(args.up_rate_mbit, args.rate_mbit), ms(args.up_delay_ms, args.delay_ms))
        self.down = Link(
            mbit(args.down_rate_mbit, args.rate_mbit), ms(args.down_delay_ms, args.delay_ms)
        )
        self.limit = max(args.queue_kib << 10, CHUNK)
        self.handshake = not args.no_handshake
        self.log_interval = args.log_interval
        self.connections = 0
        self.active = 0
        self.peak_queue = 0

    async def serve(self, listen: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(listen)
        lsock.listen(64)
        lsock.setblocking(False)
        host, port = lsock.getsockname()
        print(f"listening on {host}:{port}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks: set[asyncio.Task] = set()

        async def accept_loop() -> None:
            while True:
                conn, _ = await loop.sock_accept(lsock)
                t = asyncio.create_task(self.relay(conn))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        acceptor = asyncio.create_task(accept_loop())
        ticker = asyncio.create_task(self.log_rates()) if self.log_interval else None
        await stop.wait()
        acceptor.cancel()
        if ticker is not None:
            ticker.cancel()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        lsock.close()

    async def relay(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.connections += 1
        self.active += 1
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            for s in (client, upstream):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            if self.handshake:
                await asyncio.sleep(self.up.delay + self.down.delay)
            await loop.sock_connect(upstream, self.target)
            pipes = [
                Pipe(client, upstream, self.up, self.limit),
                Pipe(upstream, client, self.down, self.limit),
            ]
            tasks = [asyncio.create_task(f()) for p in pipes for f in (p.read, p.write)]
            try:  # all four end normally, or the first failure ends the connection
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            self.peak_queue = max([self.peak_queue, *(p.peak for p in pipes)])
        except OSError:
            pass
        finally:
            self.active -= 1
            client.close()
            upstream.close()

    async def log_rates(self) -> None:
        """Every ``--log-interval`` s, one line on stderr: the monotonic clock (the same
        clock as Python's time.monotonic() in any process on this machine), bytes put on
        each link so far, and the rate of the last interval in MB/s."""
        loop = asyncio.get_running_loop()
        last = (self.up.bytes, self.down.bytes)
        while True:
            await asyncio.sleep(self.log_interval)
            now = (self.up.bytes, self.down.bytes)
            up, down = ((a - b) / self.log_interval / 1e6 for a, b in zip(now, last, strict=True))
            print(
                f"t={loop.time():.3f} up_bytes={now[0]} down_bytes={now[1]} "
                f"up={up:.2f}MB/s down={down:.2f}MB/s",
                file=sys.stderr,
                flush=True,
            )
            last = now

    def counters(self) -> dict:
        return {
            "connections": self.connections,
            "bytes_up": self.up.bytes,
            "bytes_down": self.down.bytes,
            "peak_queue_bytes": self.peak_queue,
        }


def mbit(specific: float | None, default: float) -> float:
    v = default if specific is None else specific
    return v * 1e6 / 8


def ms(specific: float | None, default: float) -> float:
    return (default if specific is None else specific) / 1000


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host or "127.0.0.1"
    if not ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).version != 4:
        raise SystemExit(f"wanproxy: {text}: only IPv4 loopback addresses (127.0.0.0/8)")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to relay to (loopback)")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: a free port)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="per direction (default 200)")
    ap.add_argument("--up-delay-ms", type=float, default=None)
    ap.add_argument("--down-delay-ms", type=float, default=None)
    ap.add_argument("--up-rate-mbit", type=float, default=None)
    ap.add_argument("--down-rate-mbit", type=float, default=None)
    ap.add_argument(
        "--queue-kib",
        type=int,
        default=1024,
        help="undelivered bytes per connection and direction before reading stops (default 1024)",
    )
    ap.add_argument("--no-handshake", action="store_true", help="no round trip before connecting")
    ap.add_argument(
        "--log-interval",
        type=float,
        default=0,
        metavar="S",
        help="every S seconds print the rate scheduled on each link (stderr)",
    )
    args = ap.parse_args(argv)
    proxy = Proxy(args)
    listen = parse_addr(args.listen)
    try:
        asyncio.run(proxy.serve(listen))
    except KeyboardInterrupt:
        pass
    print(json.dumps(proxy.counters()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
