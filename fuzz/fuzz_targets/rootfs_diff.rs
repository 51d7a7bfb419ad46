//! Fuzz target `rootfs_diff`: the body is kybernate_fuzz_targets::rootfs_diff, shared with the replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kybernate_fuzz_targets::rootfs_diff(data);
});
