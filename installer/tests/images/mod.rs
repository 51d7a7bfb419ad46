//! The agent and controller images as the product ships them: built from this workspace's
//! binaries by scripts/build-images.sh (buildah, the local bookworm slim base), exported as
//! OCI archives, and the agent DaemonSet's pod spec read from deploy/ so that the test runs
//! the image exactly the way the manifest does.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The binaries the images hold, with the package that builds each.
pub const BINARIES: [(&str, &str); 5] = [
    ("kybernate-agent", "kybernate-agent"),
    ("kybernatectl", "kybernate-agent"),
    (
        "containerd-shim-kybernate-v1",
        "containerd-shim-kybernate-v1",
    ),
    ("kybernate-installer", "kybernate-installer"),
    ("kybernate-controller", "kybernate-controller"),
];

/// The directory with this build's binaries. A workspace test run has built them all; a
/// single-package run builds the missing ones.
pub fn bin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_kybernate-installer"))
        .parent()
        .unwrap()
        .to_path_buf();
    for (bin, package) in BINARIES {
        if !dir.join(bin).is_file() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", package, "--bin", bin])
                .status()
                .expect("cargo build");
            assert!(status.success(), "building {bin} ({package}) failed");
        }
    }
    dir
}

/// Images built for one test run, removed from buildah's storage on drop.
pub struct BuiltImages {
    pub tag: String,
    pub work: tempfile::TempDir,
}

impl BuiltImages {
    /// Builds the named images (space-separated) from the test build's binaries with
    /// scripts/build-images.sh.
    pub fn build(names: &str) -> Self {
        for tool in ["buildah", "debootstrap", "strip"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                found,
                "{tool} is missing: run scripts/install-image-tools.sh as root"
            );
        }
        let work = tempfile::tempdir().expect("temp dir");
        let tag = format!("ci-test-{}", std::process::id());
        let out = Command::new("bash")
            .arg(workspace().join("scripts/build-images.sh"))
            .arg(bin_dir())
            .arg(&tag)
            .env("IMAGES_WORK_DIR", work.path().join("contexts"))
            .env("IMAGE_PREFIX", "docker.io/kybernate")
            .env("IMAGES", names)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/build-images.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { tag, work }
    }

    pub fn name(&self, image: &str) -> String {
        format!("docker.io/kybernate/{image}:{}", self.tag)
    }

    /// `buildah push` of one image into an OCI archive for `ctr images import`.
    pub fn export(&self, image: &str) -> PathBuf {
        let archive = self.work.path().join(format!("{image}.oci.tar"));
        let name = self.name(image);
        let out = Command::new("buildah")
            .args(["push", "--quiet", &name])
            .arg(format!("oci-archive:{}:{name}", archive.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "buildah push {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        archive
    }

    /// The image's config as buildah reports it (`buildah inspect`).
    pub fn inspect(&self, image: &str) -> serde_json::Value {
        let out = Command::new("buildah")
            .args(["inspect", "--type", "image", &self.name(image)])
            .output()
            .unwrap();
        assert!(out.status.success(), "buildah inspect {image}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for BuiltImages {
    fn drop(&mut self) {
        for image in ["kybernate-agent", "kybernate-controller"] {
            let _ = Command::new("buildah")
                .args(["rmi", "--force", &self.name(image)])
                .output();
        }
    }
}

/// One volume mount of a container in the DaemonSet, resolved to where its data comes from.
#[derive(Debug, Clone)]
pub struct PodMount {
    pub name: String,
    pub mount_path: String,
    pub read_only: bool,
    pub source: VolumeSource,
}

/// Where a volume's data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumeSource {
    /// A host path, with its `type` (Directory, Socket, ...).
    HostPath { path: String, kind: String },
    /// A key-to-file ConfigMap volume.
    ConfigMap { name: String },
    /// A Secret volume that may be absent (`optional: true`): then the kubelet mounts it
    /// empty.
    OptionalSecret { name: String },
}

/// One container of the DaemonSet's pod template.
#[derive(Debug, Clone)]
pub struct PodContainer {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub privileged: bool,
    /// `securityContext.capabilities`: whether it drops ALL, and what it adds (`CAP_` names).
    pub drops_all_capabilities: bool,
    pub added_capabilities: Vec<String>,
    pub read_only_root: bool,
    /// `securityContext.seccompProfile.type`.
    pub seccomp: Option<String>,
    pub mounts: Vec<PodMount>,
}

/// The parts of deploy/40-agent-daemonset.yaml that decide how the image runs.
#[derive(Debug, Clone)]
pub struct AgentPod {
    pub host_pid: bool,
    pub init: Vec<PodContainer>,
    pub containers: Vec<PodContainer>,
}

fn yaml(path: &str) -> serde_yaml::Value {
    let file = workspace().join(path);
    let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

impl AgentPod {
    pub fn from_deploy() -> Self {
        let doc = yaml("deploy/40-agent-daemonset.yaml");
        let spec = &doc["spec"]["template"]["spec"];
        let volumes = spec["volumes"].as_sequence().expect("volumes");
        let source = |name: &str| -> VolumeSource {
            let v = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("volume {name} is mounted but not declared"));
            if let Some(host) = v.get("hostPath") {
                VolumeSource::HostPath {
                    path: host["path"].as_str().expect("hostPath.path").into(),
                    kind: host["type"].as_str().unwrap_or("").into(),
                }
            } else if let Some(cm) = v.get("configMap") {
                VolumeSource::ConfigMap {
                    name: cm["name"].as_str().expect("configMap.name").into(),
                }
            } else if let Some(secret) = v.get("secret") {
                assert_eq!(
                    secret["optional"].as_bool(),
                    Some(true),
                    "volume {name}: a Secret the agent needs to start must be created by the test"
                );
                VolumeSource::OptionalSecret {
                    name: secret["secretName"].as_str().expect("secretName").into(),
                }
            } else {
                panic!("volume {name}: only hostPath, configMap and optional secret volumes are understood")
            }
        };
        let containers = |key: &str| -> Vec<PodContainer> {
            spec[key]
                .as_sequence()
                .map(|cs| {
                    cs.iter()
                        .map(|c| PodContainer {
                            name: c["name"].as_str().unwrap().into(),
                            image: c["image"].as_str().unwrap().into(),
                            command: strings(&c["command"]),
                            args: strings(&c["args"]),
                            privileged: c["securityContext"]["privileged"].as_bool() == Some(true),
                            drops_all_capabilities: strings(
                                &c["securityContext"]["capabilities"]["drop"],
                            ) == ["ALL"],
                            added_capabilities: strings(
                                &c["securityContext"]["capabilities"]["add"],
                            )
                            .iter()
                            .map(|name| format!("CAP_{name}"))
                            .collect(),
                            read_only_root: c["securityContext"]["readOnlyRootFilesystem"]
                                .as_bool()
                                == Some(true),
                            seccomp: c["securityContext"]["seccompProfile"]["type"]
                                .as_str()
                                .map(String::from),
                            mounts: c["volumeMounts"]
                                .as_sequence()
                                .map(|ms| {
                                    ms.iter()
                                        .map(|m| {
                                            let name = m["name"].as_str().unwrap();
                                            PodMount {
                                                name: name.into(),
                                                mount_path: m["mountPath"].as_str().unwrap().into(),
                                                read_only: m["readOnly"].as_bool() == Some(true),
                                                source: source(name),
                                            }
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            host_pid: spec["hostPID"].as_bool() == Some(true),
            init: containers("initContainers"),
            containers: containers("containers"),
        }
    }

    pub fn init_container(&self, name: &str) -> &PodContainer {
        self.init
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no init container {name} in the DaemonSet"))
    }

    pub fn container(&self, name: &str) -> &PodContainer {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name} in the DaemonSet"))
    }
}

/// The file a ConfigMap volume puts at `key` (deploy/30-configmap.yaml and the like).
pub fn config_map_file(name: &str, key: &str) -> String {
    for file in fs::read_dir(workspace().join("deploy")).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(&text) else {
            continue;
        };
        if doc["kind"].as_str() == Some("ConfigMap")
            && doc["metadata"]["name"].as_str() == Some(name)
        {
            return doc["data"][key]
                .as_str()
                .unwrap_or_else(|| panic!("ConfigMap {name} has no key {key}"))
                .to_string();
        }
    }
    panic!("no ConfigMap {name} in deploy/")
}

/// `ctr run` flags for a container of the pod: privileged, or exactly the capabilities it
/// adds after dropping ALL; a read-only root; containerd's default seccomp profile for
/// RuntimeDefault (none for Unconfined); the host's PID namespace when the pod has hostPID;
/// and each mount with its source resolved by `resolve`, which maps a volume to the path on
/// this test's host that stands in for it.
pub fn ctr_run_flags(
    pod: &AgentPod,
    container: &PodContainer,
    mut resolve: impl FnMut(&PodMount) -> PathBuf,
    skip: Option<&str>,
) -> Vec<String> {
    let mut flags = Vec::new();
    if container.privileged {
        flags.push("--privileged".to_string());
    }
    if container.drops_all_capabilities {
        // ctr applies --cap-add before --cap-drop, so "drop ALL, add these" is spelled as
        // adding these and dropping every other capability the kernel knows.
        for cap in grantable(&container.added_capabilities) {
            flags.extend(["--cap-add".to_string(), cap]);
        }
        for cap in caps::all() {
            let name = cap.to_string();
            if !container.added_capabilities.contains(&name) {
                flags.extend(["--cap-drop".to_string(), name]);
            }
        }
    }
    if container.read_only_root {
        flags.push("--read-only".to_string());
    }
    match container.seccomp.as_deref() {
        Some("RuntimeDefault") => flags.push("--seccomp".to_string()),
        None | Some("Unconfined") => {}
        Some(other) => panic!("seccomp profile {other} is not understood by this test"),
    }
    if pod.host_pid {
        flags.push("--with-ns".to_string());
        // The test's own PID namespace is the host's (PID 1's may be unreadable).
        flags.push(format!("pid:/proc/{}/ns/pid", std::process::id()));
    }
    for mount in &container.mounts {
        if Some(mount.name.as_str()) == skip {
            continue;
        }
        let src = resolve(mount);
        let mode = if mount.read_only { "ro" } else { "rw" };
        flags.push("--mount".to_string());
        flags.push(format!(
            "type=bind,src={},dst={},options=rbind:{mode}",
            src.display(),
            mount.mount_path
        ));
    }
    flags
}

/// The capabilities of `wanted` that this test host can grant at all: those in the test's own
/// bounding set (runc fails with EPERM on any other). Some VMs run even root without one or
/// two (this CI's lacks CAP_SYS_RESOURCE); the note says which were left out.
pub fn grantable(wanted: &[String]) -> Vec<String> {
    let bounding: Vec<String> = caps::read(None, caps::CapSet::Bounding)
        .expect("read the test's bounding set")
        .iter()
        .map(ToString::to_string)
        .collect();
    let (granted, missing): (Vec<String>, Vec<String>) = wanted
        .iter()
        .cloned()
        .partition(|cap| bounding.contains(cap));
    if !missing.is_empty() {
        eprintln!("note: this host cannot grant {missing:?} (not in its bounding set)");
    }
    granted
}
