//! Fuzz target `manifest`: the body is kybernate_fuzz_targets::manifest, shared with the replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kybernate_fuzz_targets::manifest(data);
});
