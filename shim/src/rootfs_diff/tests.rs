//! Diff of a hand-built overlay upper dir (files, dirs, symlinks, a whiteout, an opaque dir,
//! an excluded mount point) applied onto an image tree; refusal of hostile tars. Needs root
//! (whiteout device nodes and `trusted.*` xattrs), as CI runs it.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn mknod_whiteout(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is NUL-terminated and lives for the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(0, 0)) };
    assert_eq!(
        rc,
        0,
        "mknod whiteout {} (needs root): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn set_opaque(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new("trusted.overlay.opaque").unwrap();
    // SAFETY: both strings are NUL-terminated; the value is 1 readable byte.
    let rc = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    assert_eq!(
        rc,
        0,
        "set trusted.overlay.opaque on {} (needs root): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

#[test]
fn diff_of_an_upper_dir_applies_onto_the_image_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (upper, images, rootfs) = (
        dir.path().join("upper"),
        dir.path().join("images"),
        dir.path().join("rootfs"),
    );
    fs::create_dir_all(&images).unwrap();
    // The image as the new container sees it.
    write(&rootfs.join("etc/passwd"), "root\n");
    write(&rootfs.join("etc/motd"), "welcome\n");
    write(&rootfs.join("etc/conf"), "old\n");
    write(&rootfs.join("var/cache/old.txt"), "stale\n");
    write(&rootfs.join("var/cache/sub/older.txt"), "stale\n");
    fs::create_dir_all(rootfs.join("bin")).unwrap();

    // What the container changed.
    write(&upper.join("etc/conf"), "new\n");
    fs::set_permissions(upper.join("etc/conf"), fs::Permissions::from_mode(0o640)).unwrap();
    write(&upper.join("data/deep/state.log"), "1\n2\n3\n");
    fs::create_dir_all(upper.join("bin")).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", upper.join("bin/tool")).unwrap();
    mknod_whiteout(&upper.join("etc/motd"));
    write(&upper.join("var/cache/fresh.txt"), "fresh\n");
    set_opaque(&upper.join("var/cache"));
    write(&upper.join("etc/hosts"), "127.0.0.1 mount point\n");
    write(&upper.join("dev/null-ish"), "under a mount\n");
    let excluded: BTreeSet<PathBuf> = mount_points(
        &serde_json::from_value(serde_json::json!({
            "ociVersion": "1.1.0",
            "mounts": [{"destination": "/etc/hosts"}, {"destination": "/dev"}]
        }))
        .unwrap(),
    );

    let taken = capture(&upper, &excluded, &images).unwrap();
    assert_eq!(taken.deletions, 2, "one whiteout and one opaque dir");
    assert!(taken.tar_bytes > 0);
    let applied = apply(&images, &rootfs).unwrap();
    assert_eq!(applied.entries, taken.entries);

    assert_eq!(
        fs::read_to_string(rootfs.join("etc/conf")).unwrap(),
        "new\n"
    );
    let mode = fs::metadata(rootfs.join("etc/conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    assert_eq!(
        fs::read_to_string(rootfs.join("data/deep/state.log")).unwrap(),
        "1\n2\n3\n"
    );
    assert_eq!(
        fs::read_link(rootfs.join("bin/tool")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert!(
        !rootfs.join("etc/motd").exists(),
        "the whiteout deleted motd"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/passwd")).unwrap(),
        "root\n"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("var/cache/fresh.txt")).unwrap(),
        "fresh\n"
    );
    assert!(
        !rootfs.join("var/cache/old.txt").exists() && !rootfs.join("var/cache/sub").exists(),
        "the opaque dir hid the image's content"
    );
    assert!(
        !rootfs.join("etc/hosts").exists(),
        "a mount point was carried"
    );
    assert!(
        !rootfs.join("dev").exists(),
        "content under a mount was carried"
    );
}

/// A tar with one regular entry whose raw name is `name` (bypassing the tar crate's checks).
fn hostile_tar(images: &Path, name: &[u8], link: Option<&[u8]>) {
    let file = File::create(images.join(DIFF_TAR)).unwrap();
    let mut builder = tar::Builder::new(file);
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_mode(0o644);
    match link {
        Some(target) => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.as_old_mut().linkname[..target.len()].copy_from_slice(target);
            header.set_size(0);
            header.set_cksum();
            builder.append(&header, &[][..]).unwrap();
        }
        None => {
            header.set_size(4);
            header.set_cksum();
            builder.append(&header, &b"evil"[..]).unwrap();
        }
    }
    builder.finish().unwrap();
    fs::write(
        images.join(DIFF_LIST),
        r#"{"version":1,"deleted":[],"opaque":[]}"#,
    )
    .unwrap();
}

#[test]
fn entries_leaving_the_rootfs_are_refused() {
    for name in [&b"../x"[..], b"/x", b"a/../../x"] {
        let dir = tempfile::tempdir().unwrap();
        let (images, rootfs) = (dir.path().join("images"), dir.path().join("root/fs"));
        fs::create_dir_all(&images).unwrap();
        fs::create_dir_all(&rootfs).unwrap();
        hostile_tar(&images, name, None);
        let err = apply(&images, &rootfs).unwrap_err().to_string();
        assert!(
            err.contains("rootfs-diff.tar is corrupt") && err.contains("leaves the rootfs"),
            "{}: {err}",
            String::from_utf8_lossy(name)
        );
        assert!(!dir.path().join("root/x").exists() && !dir.path().join("x").exists());
    }
}

#[test]
fn writes_through_a_symlink_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (images, rootfs, outside) = (
        dir.path().join("images"),
        dir.path().join("rootfs"),
        dir.path().join("outside"),
    );
    fs::create_dir_all(&images).unwrap();
    fs::create_dir_all(&outside).unwrap();
    // A symlink already in the rootfs, pointing out of it.
    fs::create_dir_all(&rootfs).unwrap();
    std::os::unix::fs::symlink(&outside, rootfs.join("link")).unwrap();
    hostile_tar(&images, b"link/evil", None);
    let err = apply(&images, &rootfs).unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
    assert!(!outside.join("evil").exists(), "wrote through the symlink");

    // A symlink entry in the tar followed by an entry below it.
    let file = File::create(images.join(DIFF_TAR)).unwrap();
    let mut builder = tar::Builder::new(file);
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    builder
        .append_link(&mut link, "jump", outside.as_path())
        .unwrap();
    let mut file_header = tar::Header::new_gnu();
    file_header.set_size(4);
    file_header.set_mode(0o644);
    builder
        .append_data(&mut file_header, "jump/evil", &b"evil"[..])
        .unwrap();
    builder.finish().unwrap();
    let err = apply(&images, &rootfs).unwrap_err().to_string();
    assert!(err.contains("below the symlink jump"), "{err}");
    assert!(!outside.join("evil").exists());
    assert!(
        !rootfs.join("jump").exists(),
        "applied part of a refused diff"
    );
}

#[test]
fn a_damaged_list_or_a_lone_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        !present(dir.path()).unwrap(),
        "no diff: an older checkpoint"
    );
    fs::write(dir.path().join(DIFF_TAR), b"").unwrap();
    let err = present(dir.path()).unwrap_err().to_string();
    assert!(err.contains("rootfs-diff.json is corrupt"), "{err}");
    fs::write(
        dir.path().join(DIFF_LIST),
        br#"{"version":1,"deleted":["../etc"]}"#,
    )
    .unwrap();
    let err = apply(dir.path(), &dir.path().join("rootfs")).unwrap_err();
    assert!(
        err.to_string().contains("rootfs-diff.json is corrupt"),
        "{err}"
    );
    fs::write(
        dir.path().join(DIFF_LIST),
        br#"{"version":1,"deleted":["/etc/passwd"],"opaque":[]}"#,
    )
    .unwrap();
    let err = apply(dir.path(), &dir.path().join("rootfs")).unwrap_err();
    assert!(err.to_string().contains("leaves the rootfs"), "{err}");
}

#[test]
fn the_upper_dir_comes_from_the_topmost_overlay_mount() {
    let info = "\
36 25 0:32 / /run/b/rootfs rw - ext4 /dev/sda1 rw
37 36 0:33 / /run/b/rootfs rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/snap/12/fs,workdir=/snap/12/work
38 25 0:34 / /run/with\\040space/rootfs rw - overlay overlay rw,lowerdir=/l,upperdir=/up\\054per,workdir=/w
39 25 0:35 / /run/native/rootfs rw - ext4 /dev/sda1 rw
";
    assert_eq!(
        overlay_upper(info, Path::new("/run/b/rootfs")),
        Ok(PathBuf::from("/snap/12/fs"))
    );
    assert_eq!(
        overlay_upper(info, Path::new("/run/with space/rootfs")),
        Ok(PathBuf::from("/up,per"))
    );
    assert_eq!(
        overlay_upper(info, Path::new("/run/native/rootfs")),
        Err("ext4".to_owned())
    );
    assert_eq!(
        overlay_upper(info, Path::new("/nowhere")),
        Err("no mount".to_owned())
    );
}

#[test]
fn check_reads_the_list_and_tar_without_any_rootfs() {
    let list = br#"{"version":1,"deleted":["etc/motd"],"opaque":["./var/cache"]}"#;
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "data/a.txt", &b"abc"[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let checked = check(list, tar.as_slice()).unwrap();
    assert_eq!(
        checked,
        CheckedDiff {
            deleted: vec![PathBuf::from("etc/motd")],
            opaque: vec![PathBuf::from("var/cache")],
            entries: 1,
        }
    );
    let e = check(
        br#"{"version":1,"deleted":["/etc/passwd"],"opaque":[]}"#,
        tar.as_slice(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("leaves the rootfs"), "{e}");
}
