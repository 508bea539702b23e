"""Requests the server must refuse (out of range) get an error reply and the connection keeps
working."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from twb import check_read, connect, expect_nbd_error, pattern

h = connect(strict=False)
size = h.get_size()
h.pwrite(pattern(3, 4096), 0)
expect_nbd_error("read starting at the end", h.pread, 512, size)
expect_nbd_error("read crossing the end", h.pread, 8192, size - 4096)
expect_nbd_error("write crossing the end", h.pwrite, pattern(4, 8192), size - 4096)
expect_nbd_error("zero past the end", h.zero, 4096, size)
expect_nbd_error("trim past the end", h.trim, 4096, size + 4096)
check_read(h, 0, pattern(3, 4096), "connection still serves after the errors")
check_read(h, size - 4096, h.pread(4096, size - 4096), "last block still readable")
h.shutdown()
print("PASS errors", flush=True)
