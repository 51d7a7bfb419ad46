//! Target `rootfs_diff`: the shim's check of a checkpoint's rootfs diff (the JSON list of
//! deletions and the tar of new entries) before anything is applied to a rootfs.

use std::path::Component;

use kybernate_shim::rootfs_diff;

use crate::Verdict;

const BLOCK: usize = 512;

/// The input is the list, a NUL byte, then the tar (JSON text holds no raw NUL, so every list
/// can be written this way). The tar's header checksums are recomputed first: random bytes
/// almost never carry a matching one, and the fuzzer would not get past the first header.
/// Every path of an accepted diff must be relative and stay below the rootfs.
pub fn rootfs_diff(data: &[u8]) -> Verdict {
    let (list, tar) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let mut tar = tar.to_vec();
    fix_header_checksums(&mut tar);
    let checked = match rootfs_diff::check(list, tar.as_slice()) {
        Ok(checked) => checked,
        Err(e) => return Verdict::Rejected(e.to_string()),
    };
    for path in checked.deleted.iter().chain(&checked.opaque) {
        assert!(
            path.components().all(|c| matches!(c, Component::Normal(_))),
            "accepted path {} leaves the rootfs",
            path.display()
        );
    }
    Verdict::Accepted
}

/// Walks the tar's headers as a reader does (each header, then its data rounded up to whole
/// blocks) and writes each header's correct checksum. Stops at an all-zero block or at a
/// size field that is not octal, leaving the rest as it is.
pub fn fix_header_checksums(tar: &mut [u8]) {
    let mut at = 0usize;
    while let Some(header) = at.checked_add(BLOCK).and_then(|end| tar.get_mut(at..end)) {
        if header.iter().all(|&b| b == 0) {
            return;
        }
        header[148..156].fill(b' ');
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        let field = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(field.as_bytes());
        let Some(size) = octal(&header[124..136]) else {
            return;
        };
        let Some(next) = usize::try_from(size)
            .ok()
            .and_then(|size| size.checked_next_multiple_of(BLOCK))
            .and_then(|data| data.checked_add(BLOCK))
            .and_then(|step| at.checked_add(step))
        else {
            return;
        };
        at = next;
    }
}

fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_file_tar() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(600);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "a/b.txt", &[7u8; 600][..])
            .unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_cksum();
        builder.append_data(&mut header, "c", &[][..]).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn recomputed_checksums_let_a_mutated_header_through() {
        let mut mutated = one_file_tar();
        // A changed mode in the second header (after 512 + 1024 bytes) breaks its checksum.
        mutated[1536 + 100] = b'7';
        let list = br#"{"version":1,"deleted":[],"opaque":[]}"#;
        let as_is = kybernate_shim::rootfs_diff::check(list, mutated.as_slice());
        assert!(as_is.unwrap_err().to_string().contains("checksum"));
        fix_header_checksums(&mut mutated);
        let fixed = kybernate_shim::rootfs_diff::check(list, mutated.as_slice()).unwrap();
        assert_eq!(fixed.entries, 2);
    }

    #[test]
    fn the_list_and_the_tar_are_split_at_the_first_nul() {
        let input = [
            &br#"{"version":1,"deleted":["x"],"opaque":[]}"#[..],
            &[0],
            &one_file_tar(),
        ]
        .concat();
        assert_eq!(rootfs_diff(&input), Verdict::Accepted);
        let leaving = [
            &br#"{"version":1,"deleted":["../x"],"opaque":[]}"#[..],
            &[0],
        ]
        .concat();
        assert!(
            matches!(rootfs_diff(&leaving), Verdict::Rejected(e) if e.contains("leaves the rootfs"))
        );
    }
}
