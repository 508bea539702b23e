//! A whole server session (handshake + transmission) fed with arbitrary client bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    twinblock_nbd::fuzzing::fuzz_one(data);
});
