"""CACHE: advertised, accepted, and leaves the data as it was."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from twb import MIB, check, check_read, connect, pattern

h = connect()
check(h.can_cache(), "server advertises CACHE")
h.pwrite(pattern(5, MIB), 6 * MIB)
h.cache(MIB, 6 * MIB)
print("OK: cache 1 MiB", flush=True)
h.cache(1000, 6 * MIB + 77)
print("OK: unaligned cache", flush=True)
check_read(h, 6 * MIB, pattern(5, MIB), "data unchanged after CACHE")
h.shutdown()
print("PASS cache", flush=True)
