"""Helpers shared by the nbdsh test scripts (run under nbdsh, which provides the `nbd` module).

Each script connects to the URI in $TWB_URI, checks one group of NBD commands against the
server, prints "OK: ..." lines as it goes and raises (non-zero exit) on the first mismatch.
"""
import os
import random

import nbd

MIB = 1024 * 1024


def uri():
    return os.environ["TWB_URI"]


def connect(structured=True, meta=None, strict=True):
    """A connected handle. structured=False asks for simple replies only."""
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(meta)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri())
    return h


def pattern(seed, length):
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def check(cond, what):
    if not cond:
        raise AssertionError("FAILED: " + what)
    print("OK:", what, flush=True)


def errno_is(err, name):
    """nbd.Error carries the errno as its symbolic name ("ENOTSUP"); ENOTSUP and EOPNOTSUPP are
    the same number on Linux and either name may appear."""
    aliases = {"ENOTSUP": ("ENOTSUP", "EOPNOTSUPP"), "EOPNOTSUPP": ("ENOTSUP", "EOPNOTSUPP")}
    return err.errno in aliases.get(name, (name,))


def expect_nbd_error(what, fn, *args, **kwargs):
    """Runs fn and requires it to fail with nbd.Error; returns the error."""
    try:
        fn(*args, **kwargs)
    except nbd.Error as err:
        print("OK: %s -> error (errno %s): %s" % (what, err.errno, err.string), flush=True)
        return err
    raise AssertionError("FAILED: %s succeeded but should have failed" % what)


def first_mismatch(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_read(h, offset, expected, what):
    got = h.pread(len(expected), offset)
    bad = first_mismatch(got, expected)
    if bad is not None:
        raise AssertionError(
            "FAILED: %s: read of %d bytes at %d differs at byte %d (offset %d)"
            % (what, len(expected), offset, bad, offset + bad))
    print("OK:", what, flush=True)
