#!/usr/bin/env python3
# tools/loopback-rtt.py [N]: the floor under a mirrored write's extra latency. Two processes on
# loopback TCP (TCP_NODELAY) exchange the shape of a RECORD (4120 bytes) and its ACK (28 bytes)
# N times (default 5000); prints the round trip p50 / p90 / p99 in microseconds. Run it next to
# tools/bench-mirror (see docs/BENCHMARKS.md, "Mirror cost").
import socket, sys, time, os, statistics
N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
port = ls.getsockname()[1]
if os.fork() == 0:
    c, _ = ls.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    while True:
        d = c.recv(65536)
        if not d: os._exit(0)
        buf += d
        while len(buf) >= 4120:
            del buf[:4120]; c.sendall(b"a" * 28)
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"r" * 4120; lat = []
for i in range(N):
    t = time.perf_counter_ns(); s.sendall(msg); got = 0
    while got < 28: got += len(s.recv(28 - got))
    lat.append((time.perf_counter_ns() - t) / 1000)
s.close(); lat.sort()
print("loopback round trip, 4120 B out / 28 B back, %d samples: p50 %.0f us, p90 %.0f us, p99 %.0f us" % (N, lat[N//2], lat[N*9//10], lat[N*99//100]))
