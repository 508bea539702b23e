"""Many requests in flight on one connection (asynchronous API); replies may come in any order
and every one matches its request."""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd
from twb import MIB, check, connect, pattern

REQUESTS = 64
CHUNK = 64 * 1024

h = connect()
rng = random.Random(42)
slots = rng.sample(range(0, 32 * MIB // CHUNK), REQUESTS)
offsets = [s * CHUNK + rng.randrange(0, 512) for s in slots]

cookies = [h.aio_pwrite(pattern(1000 + i, CHUNK - 512), off) for i, off in enumerate(offsets)]
check(h.aio_in_flight() > 1, "several writes in flight at once (%d)" % h.aio_in_flight())
while h.aio_in_flight() > 0:
    h.poll(-1)
done = [h.aio_command_completed(c) for c in cookies]
check(all(done), "every write reported completed")
print("OK: %d concurrent writes completed" % REQUESTS, flush=True)

bufs = []
for i, off in enumerate(offsets):
    buf = nbd.Buffer(CHUNK - 512)
    bufs.append((buf, h.aio_pread(buf, off), i))
while h.aio_in_flight() > 0:
    h.poll(-1)
for buf, cookie, i in bufs:
    h.aio_command_completed(cookie)
    if buf.to_bytearray() != pattern(1000 + i, CHUNK - 512):
        raise AssertionError("FAILED: concurrent read %d returned the wrong data" % i)
print("OK: %d concurrent reads returned their own data" % REQUESTS, flush=True)
h.shutdown()
print("PASS inflight", flush=True)
