"""READ and WRITE at aligned and unaligned offsets and lengths, WRITE with FUA, FLUSH, and
visibility of the data on a second connection."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd
from twb import MIB, check, check_read, connect, pattern

h = connect()
size = h.get_size()
check(size >= 16 * MIB, "export is at least 16 MiB (size %d)" % size)
check(h.get_structured_replies_negotiated(), "structured replies negotiated by default")

# (offset, length): aligned, sub-sector, crossing 4 KiB and 64 KiB boundaries, large, last bytes.
cases = [
    (0, 4096),
    (8191, 1),
    (8193, 511),
    (12345, 65537),
    (131072 - 7, 14),
    (1 * MIB, 4 * MIB),
    (7 * MIB + 3, 1 * MIB + 5),
    (size - 2000, 1000),
    (size - 1, 1),
]
for i, (off, length) in enumerate(cases):
    h.pwrite(pattern(i, length), off)
for i, (off, length) in enumerate(cases):
    check_read(h, off, pattern(i, length), "read back %d bytes at offset %d" % (length, off))

# Overlapping writes: the last one wins, the rest of the first stays.
base = 10 * MIB
h.pwrite(pattern(100, 64 * 1024), base)
h.pwrite(pattern(101, 1000), base + 3000)
expected = bytearray(pattern(100, 64 * 1024))
expected[3000:4000] = pattern(101, 1000)
check_read(h, base, bytes(expected), "overlapping write: last write wins")

# FUA write, then FLUSH.
check(h.can_flush(), "server advertises FLUSH")
if h.can_fua():
    h.pwrite(pattern(200, 8192), 12 * MIB + 512, nbd.CMD_FLAG_FUA)
    check_read(h, 12 * MIB + 512, pattern(200, 8192), "FUA write reads back")
else:
    print("NOTE: server does not advertise FUA", flush=True)
h.flush()
print("OK: flush", flush=True)

# A second connection sees everything the first wrote.
h2 = connect()
for i, (off, length) in enumerate(cases[:4]):
    check_read(h2, off, pattern(i, length), "second connection sees %d bytes at %d" % (length, off))
h2.shutdown()
h.shutdown()
print("PASS read_write", flush=True)
