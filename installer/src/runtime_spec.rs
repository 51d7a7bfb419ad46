//! What the `kybernate` runtime entry must say, per containerd config version.

use std::path::Path;

use toml_edit::{DocumentMut, Item, TableLike, Value};

use crate::{InstallerError, Result};

/// The runtime handler name RuntimeClasses refer to.
pub const RUNTIME_NAME: &str = "kybernate";
/// The shim containerd starts for the runtime: `containerd-shim-kybernate-v1`.
pub const RUNTIME_TYPE: &str = "io.containerd.kybernate.v1";
/// The binary name containerd derives from [`RUNTIME_TYPE`].
pub const SHIM_BINARY: &str = "containerd-shim-kybernate-v1";
/// CRI only copies listed pod annotations into the OCI spec; restore reads
/// `kybernate.io/restore-from` from there.
pub const POD_ANNOTATIONS: &[&str] = &["kybernate.io/*"];
/// runc options that change how the container runs, copied from the node's default runtime
/// so that a kybernate container runs like a runc one (cgroup driver above all).
/// Only options set to something other than their zero value are copied: an empty options
/// table lets CRI pass no options at all, which every shim accepts. (CRI hands a runtime type
/// other than runc's a `runtimeoptions.v1.Options`, not runc's options; containerd 2.x puts
/// the table into its `ConfigBody`, where the shim reads `SystemdCgroup` and `BinaryName`.)
pub const COPIED_OPTIONS: &[&str] = &[
    "SystemdCgroup",
    "BinaryName",
    "Root",
    "NoPivotRoot",
    "NoNewKeyring",
    "ShimCgroup",
    "IoUid",
    "IoGid",
];

/// The containerd config schema: it decides which plugin holds the CRI runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigVersion {
    /// `version = 2`, read by containerd 1.x.
    V2,
    /// `version = 3`, read by containerd 2.x.
    V3,
}

impl ConfigVersion {
    /// The number written as `version = N`.
    pub fn number(self) -> i64 {
        match self {
            Self::V2 => 2,
            Self::V3 => 3,
        }
    }

    /// The plugin whose `containerd.runtimes` table holds CRI runtime handlers.
    pub fn cri_plugin(self) -> &'static str {
        match self {
            Self::V2 => "io.containerd.grpc.v1.cri",
            Self::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    /// Key path from the document root to the `runtimes` table.
    pub fn runtimes_path(self) -> [&'static str; 4] {
        ["plugins", self.cri_plugin(), "containerd", "runtimes"]
    }

    /// Reads `version` from a parsed config. `Ok(None)` when the key is absent (a template
    /// that leaves it to its base); version 1 and anything else are refused.
    pub fn from_document(doc: &DocumentMut, path: &Path) -> Result<Option<Self>> {
        let Some(item) = doc.get("version") else {
            return Ok(None);
        };
        match item.as_integer() {
            Some(2) => Ok(Some(Self::V2)),
            Some(3) => Ok(Some(Self::V3)),
            _ => Err(InstallerError::UnknownVersion {
                path: path.to_path_buf(),
                found: item.to_string().trim().to_string(),
            }),
        }
    }

    /// Like [`Self::from_document`] but a missing key means version 1, which is refused.
    pub fn require(doc: &DocumentMut, path: &Path) -> Result<Self> {
        Self::from_document(doc, path)?.ok_or_else(|| InstallerError::UnknownVersion {
            path: path.to_path_buf(),
            found: "1 (no version key)".to_string(),
        })
    }
}

/// The settings the installer writes for the `kybernate` runtime.
#[derive(Debug, Clone)]
pub struct RuntimeSpec {
    /// Schema the entry is written for.
    pub version: ConfigVersion,
    /// runc options copied from the default runtime, in [`COPIED_OPTIONS`] order.
    pub options: Vec<(String, Value)>,
}

impl RuntimeSpec {
    /// Builds the entry for `version`, copying runc options from `source` (the config that
    /// containerd effectively runs with) when it has a default runtime with options.
    pub fn new(version: ConfigVersion, source: Option<&DocumentMut>) -> Self {
        let options = source
            .and_then(|doc| default_runtime_options(doc, version))
            .map(|opts| {
                COPIED_OPTIONS
                    .iter()
                    .filter_map(|name| {
                        let value = opts.get(name)?.as_value()?.clone();
                        (!is_unset(&value)).then(|| ((*name).to_string(), value.decorated("", "")))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self { version, options }
    }

    /// Compares an existing runtime table with this spec; `None` when they agree, else a
    /// short description of the first difference.
    pub fn difference(&self, existing: &dyn TableLike) -> Option<String> {
        let runtime_type = existing.get("runtime_type").and_then(Item::as_str);
        if runtime_type != Some(RUNTIME_TYPE) {
            return Some(format!(
                "runtime_type is {runtime_type:?}, not {RUNTIME_TYPE:?}"
            ));
        }
        let annotations: Option<Vec<&str>> = existing
            .get("pod_annotations")
            .and_then(Item::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect());
        if annotations.as_deref() != Some(POD_ANNOTATIONS) {
            return Some(format!(
                "pod_annotations is {annotations:?}, not {POD_ANNOTATIONS:?}"
            ));
        }
        let existing_opts = existing.get("options").and_then(Item::as_table_like);
        let existing_count = existing_opts.map_or(0, |o| o.len());
        if existing_count != self.options.len() {
            return Some(format!(
                "options has {existing_count} keys, the installer writes {}",
                self.options.len()
            ));
        }
        for (name, value) in &self.options {
            let have = existing_opts
                .and_then(|o| o.get(name))
                .and_then(Item::as_value);
            if have.map(plain) != Some(plain(value)) {
                return Some(format!("options.{name} differs"));
            }
        }
        None
    }
}

/// An option left at its zero value means "runc's default", which the shim has anyway.
fn is_unset(value: &Value) -> bool {
    match value {
        Value::String(s) => s.value().is_empty(),
        Value::Integer(i) => *i.value() == 0,
        Value::Boolean(b) => !*b.value(),
        _ => false,
    }
}

/// A value without its formatting, so `'a'` and `"a"` compare equal.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => format!("s:{}", s.value()),
        Value::Integer(i) => format!("i:{}", i.value()),
        Value::Boolean(b) => format!("b:{}", b.value()),
        Value::Float(f) => format!("f:{}", f.value()),
        other => other.clone().decorated("", "").to_string(),
    }
}

/// Finds a table-like item by key path, through tables, dotted keys and inline tables.
pub fn lookup<'d>(doc: &'d DocumentMut, path: &[&str]) -> Option<&'d dyn TableLike> {
    let mut current: &dyn TableLike = doc.as_table();
    for key in path {
        current = current.get(key)?.as_table_like()?;
    }
    Some(current)
}

/// The options table of the runtime that `default_runtime_name` names, else of `runc`.
fn default_runtime_options(doc: &DocumentMut, version: ConfigVersion) -> Option<&dyn TableLike> {
    let runtimes = lookup(doc, &version.runtimes_path())?;
    let containerd = lookup(doc, &version.runtimes_path()[..3])?;
    let default_name = containerd
        .get("default_runtime_name")
        .and_then(Item::as_str)
        .filter(|name| *name != RUNTIME_NAME && runtimes.contains_key(name))
        .unwrap_or("runc");
    runtimes
        .get(default_name)?
        .as_table_like()?
        .get("options")?
        .as_table_like()
}
