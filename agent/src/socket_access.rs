//! Access to the agent's socket for the uids in `allowed_uids`, through POSIX ACLs.
//!
//! connect(2) on a Unix socket needs write permission on the socket file and search
//! permission on each directory above it. The socket stays 0600 root:root; each allowed uid
//! gets an ACL entry of its own on the socket (read and write) and, when the socket's
//! directory is closed to others, on that directory (search only). No group has to be set up
//! on the node, and nobody who merely shares a group gains access. What a caller may do is
//! still decided per request from its SO_PEERCRED uid (`grpc::authorise`).
//!
//! The ACL is written as the kernel's `system.posix_acl_access` extended attribute, whose
//! layout is part of the Linux ABI (`include/uapi/linux/posix_acl_xattr.h`): a little-endian
//! version word (2), then 8-byte entries (tag, permissions, id) sorted by tag and id.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const XATTR_NAME: &str = "system.posix_acl_access";
const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
/// The id field of entries that name no user or group.
const NO_ID: u32 = u32::MAX;
/// Read and write: what connect(2) needs on the socket.
const READ_WRITE: u16 = 0o6;
/// Search: what connect(2) needs on each directory above the socket.
const SEARCH: u16 = 0o1;

/// Lets each uid of `uids` connect to the socket at `socket`.
pub fn grant(socket: &Path, uids: &[u32]) -> std::io::Result<()> {
    if uids.is_empty() {
        return Ok(());
    }
    set_acl(socket, uids, READ_WRITE)?;
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        let others_may_search = std::fs::metadata(dir)?.permissions().mode() & 0o001 != 0;
        if !others_may_search {
            set_acl(dir, uids, SEARCH)?;
        }
    }
    Ok(())
}

/// Replaces the access ACL of `path` with its current mode bits plus `perm` for each uid.
fn set_acl(path: &Path, uids: &[u32], perm: u16) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    let value = encode(mode, uids, perm);
    let name = CString::new(XATTR_NAME).expect("no NUL in the attribute name");
    let path_c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: both strings are NUL-terminated and `value` outlives the call.
    let rc = unsafe {
        libc::setxattr(
            path_c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The attribute value: owner, group and others as in `mode`, one entry per uid, and a mask
/// that lets the uid entries take effect.
fn encode(mode: u32, uids: &[u32], perm: u16) -> Vec<u8> {
    let bits = |shift: u32| u16::try_from((mode >> shift) & 0o7).expect("three bits");
    let group = bits(3);
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut entries = vec![(USER_OBJ, bits(6), NO_ID)];
    entries.extend(sorted.iter().map(|&uid| (USER, perm, uid)));
    entries.extend([
        (GROUP_OBJ, group, NO_ID),
        (MASK, group | perm, NO_ID),
        (OTHER, bits(0), NO_ID),
    ]);
    let mut out = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend(tag.to_le_bytes());
        out.extend(perm.to_le_bytes());
        out.extend(id.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_owner_each_uid_once_group_mask_and_others_in_tag_order() {
        let value = encode(0o600, &[1001, 1000, 1001], READ_WRITE);
        let words: Vec<(u16, u16, u32)> = value[4..]
            .chunks(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect();
        assert_eq!(&value[..4], &2u32.to_le_bytes());
        assert_eq!(
            words,
            [
                (USER_OBJ, 6, NO_ID),
                (USER, 6, 1000),
                (USER, 6, 1001),
                (GROUP_OBJ, 0, NO_ID),
                (MASK, 6, NO_ID),
                (OTHER, 0, NO_ID),
            ]
        );
    }

    #[test]
    fn no_uids_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        std::fs::write(&socket, b"").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        grant(&socket, &[]).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
