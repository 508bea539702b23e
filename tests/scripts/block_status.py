"""BLOCK_STATUS on base:allocation: extents are well formed, cover the request from its start,
written data is never reported as zero, and whatever is reported zero reads as zeroes."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd
from twb import MIB, check, connect, pattern

h = connect(meta=nbd.CONTEXT_BASE_ALLOCATION)
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation negotiated")
size = h.get_size()

data_off, data_len = 0, MIB
zero_off, zero_len = 4 * MIB, 4 * MIB
h.pwrite(pattern(1, data_len), data_off)
h.pwrite(pattern(2, zero_len), zero_off)
h.zero(zero_len, zero_off)
h.flush()


def extents(length, offset, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
            raise AssertionError("unexpected context %r" % metacontext)
        got.append((off, list(entries)))
        return 0

    h.block_status(length, offset, cb, flags)
    check(len(got) == 1, "one base:allocation reply for %d bytes at %d" % (length, offset))
    off, entries = got[0]
    check(off == offset, "reply starts at the requested offset %d" % offset)
    check(len(entries) >= 2 and len(entries) % 2 == 0, "entries come in (length, flags) pairs")
    result = []
    pos = offset
    for i in range(0, len(entries), 2):
        length_i, flags_i = entries[i], entries[i + 1]
        if length_i <= 0:
            raise AssertionError("FAILED: extent %d has length %d" % (i // 2, length_i))
        if flags_i & ~(nbd.STATE_HOLE | nbd.STATE_ZERO):
            raise AssertionError("FAILED: extent flags %#x outside base:allocation" % flags_i)
        result.append((pos, length_i, flags_i))
        pos += length_i
    check(pos > offset, "extents describe at least one byte")
    check(pos <= size, "extents do not run past the end of the export")
    return result


def verify(exts, what):
    for pos, length, flags in exts:
        overlap = max(0, min(pos + length, data_off + data_len) - max(pos, data_off))
        if overlap and flags & nbd.STATE_ZERO:
            raise AssertionError("FAILED: %s: written data at %d reported as zero" % (what, pos))
        if flags & nbd.STATE_ZERO:
            # Sample the start and end of each zero extent (bounded read size).
            for sample_off in (pos, max(pos, pos + length - 65536)):
                n = min(65536, pos + length - sample_off)
                got = h.pread(n, sample_off)
                if got != bytes(n):
                    raise AssertionError(
                        "FAILED: %s: extent at %d reported zero but reads non-zero" % (what, pos))
    print("OK: %s: %d extents consistent with the data" % (what, len(exts)), flush=True)


whole = min(size, 64 * MIB)
exts = extents(whole, 0)
verify(exts, "block status of the first %d bytes" % whole)
exts = extents(3 * MIB + 17, 513)
verify(exts, "unaligned block status")
exts = extents(zero_len, zero_off)
verify(exts, "block status of a zeroed range")
one = extents(whole, 0, nbd.CMD_FLAG_REQ_ONE)
check(len(one) == 1, "REQ_ONE returns exactly one extent (got %d)" % len(one))
verify(one, "REQ_ONE block status")
tail = extents(4096, size - 4096)
verify(tail, "block status of the last 4 KiB")
h.shutdown()
print("PASS block_status", flush=True)
