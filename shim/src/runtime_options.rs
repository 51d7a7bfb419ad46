//! The runc options a container's runtime options ask for, in whichever form containerd
//! delivers them: runc's own `containerd.runc.v1.Options` (a client that sends them), or the
//! generic `runtimeoptions.v1.Options` that CRI sends for a runtime type other than runc's,
//! carrying the runtime's TOML `options` table (`ConfigBody`) or a file naming it
//! (`ConfigPath`, `ctr run --runtime-config-path`). The installer copies the node's runc
//! options (`SystemdCgroup` above all) into the `kybernate` runtime's table, so the shim must
//! read them from there to run containers as runc would: `SystemdCgroup`, `BinaryName`,
//! `Root`, `NoPivotRoot`, `NoNewKeyring` and `CriuPath`. `ShimCgroup`, `IoUid` and `IoGid`
//! are not honoured yet.

use std::path::{Path, PathBuf};

use containerd_shim::api::Options;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};
use serde::{Deserialize, Serialize};

use crate::error::{Result, ShimError};

/// File in the bundle recording the options of a created container, so the `delete`
/// subcommand (cleanup after a crashed shim) runs runc the way Create did.
pub const OPTIONS_FILE: &str = "kybernate-runc-options.json";

/// The runc options this shim honours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuncOptions {
    /// `SystemdCgroup = true`: runc manages the container's cgroup through systemd
    /// (`runc --systemd-cgroup`), as the kubelet's systemd cgroup driver requires; the
    /// spec's `cgroupsPath` is then `slice:prefix:name`.
    pub systemd_cgroup: bool,
    /// `BinaryName`: a runc-compatible binary to run instead of the configured runc (e.g.
    /// `nvidia-container-runtime` on GPU nodes, which wraps runc); `None` keeps the shim's.
    #[serde(default)]
    pub binary_name: Option<String>,
    /// `Root`: runc's state root instead of the shim's; the namespace is appended, as
    /// runc's shim does.
    #[serde(default)]
    pub root: Option<String>,
    /// `NoPivotRoot`: `runc create/restore --no-pivot` (rootfs on a ramdisk).
    #[serde(default)]
    pub no_pivot_root: bool,
    /// `NoNewKeyring`: `runc create --no-new-keyring` (the container shares the session
    /// keyring).
    #[serde(default)]
    pub no_new_keyring: bool,
    /// `CriuPath`: the CRIU binary runc runs for checkpoint and restore (`runc --criu`).
    #[serde(default)]
    pub criu_path: Option<String>,
    /// `ShimCgroup`: the cgroup the shim process joins (so that its memory and CPU count
    /// against the pod, as with runc's shim).
    #[serde(default)]
    pub shim_cgroup: Option<String>,
    /// `IoUid` / `IoGid`: owner of the container's ends of its stdio pipes, for a process
    /// that runs as another user (0/0, root, when unset).
    #[serde(default)]
    pub io_owner: Option<(u32, u32)>,
}

/// The fields of `runtimeoptions.v1.Options` (containerd's `pkg/runtimeoptions`).
#[derive(Debug, Default)]
struct GenericOptions {
    config_path: String,
    config_body: Vec<u8>,
}

impl RuncOptions {
    /// Reads the options containerd sent with Create; unknown option types give the
    /// defaults (runc's own defaults), malformed ones an error naming what is wrong.
    pub fn from_any(id: &str, any: &Any) -> Result<Self> {
        let invalid = |message: String| ShimError::Invalid {
            id: id.to_owned(),
            message,
        };
        if any.type_url.ends_with("containerd.runc.v1.Options") {
            let parsed = Options::parse_from_bytes(&any.value)
                .map_err(|e| invalid(format!("runtime options ({}): {e}", any.type_url)))?;
            let set = |s: String| Some(s).filter(|s| !s.is_empty());
            return Ok(Self {
                systemd_cgroup: parsed.systemd_cgroup,
                binary_name: set(parsed.binary_name),
                root: set(parsed.root),
                no_pivot_root: parsed.no_pivot_root,
                no_new_keyring: parsed.no_new_keyring,
                // This form of the options no longer carries CriuPath (its field is retired).
                criu_path: None,
                shim_cgroup: set(parsed.shim_cgroup),
                io_owner: owner(parsed.io_uid, parsed.io_gid),
            });
        }
        if !any.type_url.ends_with("runtimeoptions.v1.Options") {
            return Ok(Self::default());
        }
        let generic = GenericOptions::decode(&any.value)
            .map_err(|e| invalid(format!("runtime options ({}): {e}", any.type_url)))?;
        if !generic.config_body.is_empty() {
            let text = String::from_utf8(generic.config_body).map_err(|_| {
                invalid("the runtime's options table (ConfigBody) is not UTF-8".into())
            })?;
            return Self::from_toml(&text)
                .map_err(|e| invalid(format!("the runtime's options table (ConfigBody): {e}")));
        }
        if !generic.config_path.is_empty() {
            let path = PathBuf::from(&generic.config_path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ShimError::io(
                    id,
                    format!("read runtime options (ConfigPath) {}", path.display()),
                    e,
                )
            })?;
            return Self::from_toml(&text)
                .map_err(|e| invalid(format!("runtime options {}: {e}", path.display())));
        }
        Ok(Self::default())
    }

    /// Reads the runc keys of a runtime's TOML options table; other keys are left to runc's
    /// defaults. A key of the wrong type is refused rather than ignored.
    pub fn from_toml(text: &str) -> std::result::Result<Self, String> {
        let table: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
        let flag = |key: &str| match table.get(key) {
            None => Ok(false),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(format!("{key} must be true or false, found {other}")),
        };
        let text = |key: &str| match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.is_empty())),
            Some(other) => Err(format!("{key} must be a string, found {other}")),
        };
        let id = |key: &str| match table.get(key) {
            None => Ok(0),
            Some(toml::Value::Integer(n)) => u32::try_from(*n)
                .map_err(|_| format!("{key} must be a uid/gid from 0 to 4294967295, found {n}")),
            Some(other) => Err(format!("{key} must be a number, found {other}")),
        };
        Ok(Self {
            shim_cgroup: text("ShimCgroup")?,
            io_owner: owner(id("IoUid")?, id("IoGid")?),
            systemd_cgroup: flag("SystemdCgroup")?,
            binary_name: text("BinaryName")?,
            root: text("Root")?,
            no_pivot_root: flag("NoPivotRoot")?,
            no_new_keyring: flag("NoNewKeyring")?,
            criu_path: text("CriuPath")?,
        })
    }

    /// Checks what Create can check before runc runs: `Root` can be created, `CriuPath` is
    /// an executable file. The error names the option and its value.
    pub fn check(&self, id: &str, runc_root: &Path) -> Result<()> {
        let invalid = |message: String| ShimError::Invalid {
            id: id.to_owned(),
            message,
        };
        if let Some(root) = &self.root {
            std::fs::create_dir_all(runc_root)
                .map_err(|e| invalid(format!("runtime option Root = {root:?}: {e}")))?;
        }
        if let Some(criu) = &self.criu_path {
            let executable = std::fs::metadata(criu).map(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            });
            match executable {
                Ok(true) => {}
                Ok(false) => {
                    return Err(invalid(format!(
                        "runtime option CriuPath = {criu:?}: not an executable file"
                    )))
                }
                Err(e) => return Err(invalid(format!("runtime option CriuPath = {criu:?}: {e}"))),
            }
        }
        Ok(())
    }

    /// The kubelet's systemd cgroup driver gives containers a `cgroupsPath` of the form
    /// `NAME.slice:prefix:name`. containerd 1.x's CRI does not pass a runtime's options table
    /// to a shim other than runc's, so the spec is the one place such a node tells the shim;
    /// runc's cgroupfs driver would take that string for a directory outside the pod's cgroup.
    pub fn with_spec(mut self, spec: &oci_spec::runtime::Spec) -> Self {
        let path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .and_then(|p| p.to_str())
            .unwrap_or_default();
        let parts: Vec<&str> = path.split(':').collect();
        if parts.len() == 3 && parts[0].ends_with(".slice") {
            self.systemd_cgroup = true;
        }
        self
    }

    /// Records the options in `bundle` for the `delete` subcommand.
    pub fn save(&self, id: &str, bundle: &Path) -> Result<()> {
        let path = bundle.join(OPTIONS_FILE);
        let json = serde_json::to_vec(self).map_err(|e| ShimError::Invalid {
            id: id.to_owned(),
            message: format!("encode runtime options: {e}"),
        })?;
        std::fs::write(&path, json)
            .map_err(|e| ShimError::io(id, format!("write {}", path.display()), e))
    }

    /// The options recorded in `bundle`; runc's defaults when Create never wrote them.
    pub fn load(bundle: &Path) -> Self {
        std::fs::read(bundle.join(OPTIONS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }
}

/// The stdio owner `IoUid`/`IoGid` ask for; none when both are root's.
fn owner(uid: u32, gid: u32) -> Option<(u32, u32)> {
    (uid != 0 || gid != 0).then_some((uid, gid))
}

impl GenericOptions {
    /// Decodes the three-field message by hand: the protos crate does not ship it.
    fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut input = CodedInputStream::from_bytes(bytes);
        let mut out = Self::default();
        loop {
            let tag = input.read_raw_tag_or_eof().map_err(|e| e.to_string())?;
            let Some(tag) = tag else {
                return Ok(out);
            };
            match tag {
                // 1: type_url (string), 2: config_path (string), 3: config_body (bytes)
                0x0a => {
                    input.read_string().map_err(|e| e.to_string())?;
                }
                0x12 => out.config_path = input.read_string().map_err(|e| e.to_string())?,
                0x1a => out.config_body = input.read_bytes().map_err(|e| e.to_string())?,
                other => {
                    let wire = containerd_shim::protos::protobuf::rt::WireType::new(other & 7)
                        .ok_or_else(|| format!("bad wire type in tag {other}"))?;
                    input
                        .skip_field(wire)
                        .map_err(|e| format!("field tag {other}: {e}"))?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(path: &str, body: &[u8]) -> Any {
        let mut value = Vec::new();
        let mut field = |tag: u8, bytes: &[u8]| {
            value.push(tag);
            value.push(u8::try_from(bytes.len()).unwrap());
            value.extend_from_slice(bytes);
        };
        field(0x0a, b"runtimeoptions.v1.Options");
        if !path.is_empty() {
            field(0x12, path.as_bytes());
        }
        if !body.is_empty() {
            field(0x1a, body);
        }
        Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn runc_options_carry_systemd_cgroup() {
        let mut options = Options::new();
        options.systemd_cgroup = true;
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: options.write_to_bytes().unwrap(),
            ..Default::default()
        };
        assert!(RuncOptions::from_any("c1", &any).unwrap().systemd_cgroup);
        options.systemd_cgroup = false;
        let any = Any {
            value: options.write_to_bytes().unwrap(),
            ..any
        };
        assert!(!RuncOptions::from_any("c1", &any).unwrap().systemd_cgroup);
    }

    #[test]
    fn cri_config_body_is_the_runtime_options_table() {
        let body = b"BinaryName = \"runc\"\nSystemdCgroup = true\n";
        let options = RuncOptions::from_any("c1", &generic("", body)).unwrap();
        assert!(options.systemd_cgroup);
        assert_eq!(options.binary_name.as_deref(), Some("runc"));
        let options = RuncOptions::from_any("c1", &generic("", b"NoPivotRoot = true\n")).unwrap();
        assert!(!options.systemd_cgroup);
    }

    #[test]
    fn config_path_is_read_and_a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kybernate.toml");
        std::fs::write(&file, "SystemdCgroup = true\n").unwrap();
        let options = RuncOptions::from_any("c1", &generic(file.to_str().unwrap(), b"")).unwrap();
        assert!(options.systemd_cgroup);
        let missing = dir.path().join("missing.toml");
        let e = RuncOptions::from_any("c1", &generic(missing.to_str().unwrap(), b""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.toml") && e.contains("container c1"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_systemd_cgroup_is_refused_by_name() {
        let e = RuncOptions::from_any("c1", &generic("", b"SystemdCgroup = \"yes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SystemdCgroup") && e.contains("ConfigBody"),
            "{e}"
        );
        let e = RuncOptions::from_any("c1", &generic("", b"SystemdCgroup = \n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not TOML"), "{e}");
        let e = RuncOptions::from_any("c1", &generic("", b"BinaryName = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("BinaryName"), "{e}");
    }

    #[test]
    fn unknown_option_types_and_empty_options_are_runc_defaults() {
        let any = Any {
            type_url: "example.com/other.Options".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        assert_eq!(
            RuncOptions::from_any("c1", &any).unwrap(),
            RuncOptions::default()
        );
        assert_eq!(
            RuncOptions::from_any("c1", &generic("", b"")).unwrap(),
            RuncOptions::default()
        );
    }

    #[test]
    fn a_systemd_cgroups_path_selects_the_systemd_driver() {
        let spec = |path: &str| -> oci_spec::runtime::Spec {
            serde_json::from_value(serde_json::json!({"linux": {"cgroupsPath": path}})).unwrap()
        };
        let from = |path: &str| RuncOptions::default().with_spec(&spec(path)).systemd_cgroup;
        assert!(from("kubepods-besteffort-pod1.slice:cri-containerd:abc"));
        assert!(!from("/kubepods/besteffort/pod1/abc"));
        assert!(!from("/default/c1"));
        assert!(!from("a:b"));
        assert!(
            !RuncOptions::default()
                .with_spec(&serde_json::from_value(serde_json::json!({})).unwrap())
                .systemd_cgroup
        );
    }

    #[test]
    fn options_saved_in_the_bundle_are_loaded_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RuncOptions::load(dir.path()), RuncOptions::default());
        let options = RuncOptions {
            systemd_cgroup: true,
            binary_name: Some("/usr/bin/nvidia-container-runtime".into()),
            root: Some("/run/other".into()),
            no_pivot_root: true,
            no_new_keyring: true,
            criu_path: Some("/opt/criu".into()),
            shim_cgroup: Some("/kubepods/pod1".into()),
            io_owner: Some((1000, 1001)),
        };
        options.save("c1", dir.path()).unwrap();
        assert_eq!(RuncOptions::load(dir.path()), options);
    }

    #[test]
    fn every_honoured_option_is_read_from_both_forms() {
        // Under 128 bytes: the test's message encoder writes one-byte lengths.
        let body = b"BinaryName = \"/b\"\nRoot = \"/r\"\nNoPivotRoot = true\nNoNewKeyring = true\nCriuPath = \"/c\"\nShimCgroup = \"/s\"\nIoUid = 7\nIoGid = 8\n";
        let table = RuncOptions::from_any("c1", &generic("", body)).unwrap();
        assert_eq!(
            table,
            RuncOptions {
                systemd_cgroup: false,
                binary_name: Some("/b".into()),
                root: Some("/r".into()),
                no_pivot_root: true,
                no_new_keyring: true,
                criu_path: Some("/c".into()),
                shim_cgroup: Some("/s".into()),
                io_owner: Some((7, 8)),
            }
        );
        let runc = Options {
            no_pivot_root: true,
            no_new_keyring: true,
            root: "/r".into(),
            binary_name: "/b".into(),
            shim_cgroup: "/s".into(),
            io_uid: 7,
            io_gid: 8,
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: runc.write_to_bytes().unwrap(),
            ..Default::default()
        };
        assert_eq!(
            RuncOptions::from_any("c1", &any).unwrap(),
            RuncOptions {
                criu_path: None,
                ..table
            }
        );
        let e = RuncOptions::from_toml("NoPivotRoot = \"yes\"\n").unwrap_err();
        assert!(e.contains("NoPivotRoot"), "{e}");
        let e = RuncOptions::from_toml("Root = 1\n").unwrap_err();
        assert!(e.contains("Root"), "{e}");
        let e = RuncOptions::from_toml("IoUid = -1\n").unwrap_err();
        assert!(e.contains("IoUid"), "{e}");
        assert_eq!(
            RuncOptions::from_toml("IoUid = 0\n").unwrap().io_owner,
            None
        );
    }

    #[test]
    fn a_root_that_cannot_be_made_or_a_criu_that_cannot_run_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let options = RuncOptions {
            root: Some(file.join("r").display().to_string()),
            ..Default::default()
        };
        let e = options
            .check("c1", &file.join("r").join("ns"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Root") && e.contains("container c1"), "{e}");
        for criu in [file.clone(), dir.path().join("missing")] {
            let options = RuncOptions {
                criu_path: Some(criu.display().to_string()),
                ..Default::default()
            };
            let e = options.check("c1", dir.path()).unwrap_err().to_string();
            assert!(
                e.contains("CriuPath") && e.contains(&criu.display().to_string()),
                "{e}"
            );
        }
        assert!(RuncOptions::default().check("c1", dir.path()).is_ok());
    }
}
