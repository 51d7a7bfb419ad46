//! Fuzz target `record`: the body is kybernate_fuzz_targets::record, shared with the replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kybernate_fuzz_targets::record(data);
});
