"""With structured replies refused by the client (like the Linux kernel driver) every command
still works through simple replies; with them requested they are negotiated."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd
from twb import MIB, check, check_read, connect, expect_nbd_error, pattern

h = connect(structured=False, strict=False)
check(not h.get_structured_replies_negotiated(), "structured replies off when not requested")
size = h.get_size()
h.pwrite(pattern(11, 2 * MIB), MIB)
check_read(h, MIB, pattern(11, 2 * MIB), "2 MiB read through a simple reply")
check_read(h, MIB + 3, pattern(11, 2 * MIB)[3:3 + 5000], "unaligned read through a simple reply")
if h.can_fua():
    h.pwrite(pattern(12, 4096), 5 * MIB, nbd.CMD_FLAG_FUA)
    check_read(h, 5 * MIB, pattern(12, 4096), "FUA write with simple replies")
h.flush()
h.zero(4096, MIB)
check_read(h, MIB, bytes(4096), "zero with simple replies")
h.trim(4096, 4 * MIB)
if h.can_cache():
    h.cache(4096, MIB)
print("OK: flush, zero, trim, cache with simple replies", flush=True)
expect_nbd_error("read past the end with simple replies", h.pread, 4096, size)
check_read(h, MIB + 4096, pattern(11, 2 * MIB)[4096:8192], "connection usable after the error")
h.shutdown()

h = connect(structured=True, meta=nbd.CONTEXT_BASE_ALLOCATION)
check(h.get_structured_replies_negotiated(), "structured replies negotiated when requested")
check_read(h, MIB + 8192, pattern(11, 2 * MIB)[8192:8192 + MIB], "read through structured replies")
h.shutdown()
print("PASS simple_replies", flush=True)
