//! The pure option and request parsers and the request validator, fed with arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    twinblock_nbd::fuzzing::fuzz_parsers(data);
});
