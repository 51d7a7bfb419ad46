//! Fuzz target `request`: the body is kybernate_fuzz_targets::request, shared with the replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kybernate_fuzz_targets::request(data);
});
