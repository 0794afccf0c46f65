"""Client load for bench_gateway: many WebSocket clients in one process, one epoll loop.

No task, no object per message: one ``select.epoll`` loop over non-blocking
sockets, each with a byte buffer, so what a message costs the clients is
small next to what it costs the server being measured. Each client does the
opening handshake, sends one masked ``subscribe`` frame (servers that need
none ignore it) and counts as ready when a text frame containing
``"subscribed"`` arrives. It answers pings, and reads every text frame
looking for the marker ``n=<number>;`` of a benchmark notification.

Usage: ``python _fanout_load.py N PORT SOURCE_ADDRESS``. Lines on stdout:

* ``ready <seconds>``: all N clients are subscribed (connecting took that long);
* ``got <n> <monotonic time>``: every client of this process has notification n;
* ``lost <count>``: connections the server closed (printed when it happens).

It stops on ``quit`` (or end of file) on stdin. Everything is on loopback;
every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import select
import socket
import sys
import time

CHANNEL = "bench_gateway"
CONNECT_TIMEOUT = 300.0
IN_FLIGHT = 256
_KEY = b"\x12\x34\x56\x78"


def masked(opcode: int, data: bytes) -> bytes:
    """A masked client frame (short: at most 65535 bytes)."""
    n = len(data)
    head = bytes([0x80 | opcode]) + (
        bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + _KEY + bytes(b ^ _KEY[i % 4] for i, b in enumerate(data))


def frames(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete server frames at the start of *buf*, and what is left."""
    out = []
    pos, size = 0, len(buf)
    while size - pos >= 2:
        length = buf[pos + 1] & 0x7F
        start = pos + 2
        if length == 126:
            if size - pos < 4:
                break
            length, start = int.from_bytes(buf[pos + 2: pos + 4], "big"), pos + 4
        elif length == 127:
            if size - pos < 10:
                break
            length, start = int.from_bytes(buf[pos + 2: pos + 10], "big"), pos + 10
        if start + length > size:
            break
        out.append((buf[pos] & 0x0F, buf[start: start + length]))
        pos = start + length
    return out, buf[pos:]


def marker(payload: bytes) -> int | None:
    at = payload.find(b"n=")
    if at < 0:
        return None
    end = payload.find(b";", at)
    return int(payload[at + 2: end]) if end > at else None


def main(n: int, port: int, source: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    state: dict[int, int] = {}  # 0 connecting, 1 upgrading, 2 subscribing, 3 live
    bufs: dict[int, bytes] = {}
    counts: dict[int, int] = {}
    subscribe = masked(1, json.dumps({"type": "subscribe", "channels": [CHANNEL]}).encode())
    stdin = sys.stdin.fileno()
    ep.register(stdin, select.EPOLLIN)
    made = ready = lost = 0
    announced = False
    started = time.monotonic()

    def request() -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        return (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()

    def on_frames(fd: int, sock: socket.socket, got: list[tuple[int, bytes]]) -> int:
        became_ready = 0
        for opcode, payload in got:
            if opcode == 1:
                if state[fd] == 3:
                    number = marker(payload)
                    if number is not None:
                        c = counts[number] = counts.get(number, 0) + 1
                        if c == n:
                            print(f"got {number} {time.monotonic()!r}", flush=True)
                elif b'"subscribed"' in payload:
                    state[fd] = 3
                    became_ready += 1
            elif opcode == 9:
                sock.send(masked(0xA, payload))
        return became_ready

    while True:
        if ready < n:
            if time.monotonic() - started > CONNECT_TIMEOUT:
                raise SystemExit(f"only {ready} of {n} clients subscribed in {CONNECT_TIMEOUT} s")
            while made < n and made - ready - lost < IN_FLIGHT:
                sock = socket.socket()
                sock.setblocking(False)
                sock.bind((source, 0))
                sock.connect_ex(("127.0.0.1", port))
                fd = sock.fileno()
                socks[fd], state[fd], bufs[fd] = sock, 0, b""
                ep.register(fd, select.EPOLLOUT | select.EPOLLIN)
                made += 1
        for fd, ev in ep.poll(1.0):
            if fd == stdin:
                line = sys.stdin.readline()
                if not line or line.strip() == "quit":
                    for sock in socks.values():
                        sock.close()
                    return
                continue
            sock = socks[fd]
            if state[fd] == 0:
                if ev & (select.EPOLLERR | select.EPOLLHUP):
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    raise SystemExit(f"connecting failed: {os.strerror(error)}")
                sock.send(request())
                state[fd] = 1
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                sock.close()
                del socks[fd]
                lost += 1
                print(f"lost {lost}", flush=True)
                continue
            buf = bufs[fd] + data if bufs[fd] else data
            if state[fd] == 1:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    bufs[fd] = buf
                    continue
                if not buf.startswith(b"HTTP/1.1 101"):
                    raise SystemExit(f"handshake refused: {buf[:200]!r}")
                buf = buf[end + 4:]
                sock.send(subscribe)
                state[fd] = 2
            got, bufs[fd] = frames(buf)
            ready += on_frames(fd, sock, got)
            if ready == n and not announced:
                print(f"ready {time.monotonic() - started!r}", flush=True)
                announced = True


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
