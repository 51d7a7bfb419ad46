//! Drop-in files: where a containerd 2.x config imports a directory, the runtime goes into
//! a file of its own there, and the main config is not touched at all.
//!
//! Only for `version = 3`: containerd 2.x merges imported plugin tables key by key.
//! containerd 1.6 replaces a whole plugin's table with the imported one (measured: a
//! drop-in with only the runtime dropped the main config's runc runtime and
//! `sandbox_image`), so version 2 configs are always edited in place.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Value};

use crate::config_edit::{insert_entry, MARKER};
use crate::runtime_spec::{ConfigVersion, RuntimeSpec};
use crate::Result;

/// File name of the installer's drop-in.
pub const DROPIN_NAME: &str = "kybernate.toml";

/// The host directory whose `*.toml` (or `*`) files `config` imports, if any. Relative
/// imports are taken relative to the config's directory, as containerd does.
pub fn import_dir(
    doc: &DocumentMut,
    config_host_path: &Path,
    version: ConfigVersion,
) -> Option<PathBuf> {
    if version != ConfigVersion::V3 {
        return None;
    }
    let imports = doc.get("imports").and_then(Item::as_array)?;
    imports.iter().filter_map(Value::as_str).find_map(|entry| {
        let pattern = Path::new(entry);
        let file = pattern.file_name()?.to_str()?;
        if file != "*.toml" && file != "*" {
            return None;
        }
        let dir = pattern.parent()?;
        if dir.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
            return None;
        }
        Some(if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            config_host_path
                .parent()
                .unwrap_or(Path::new("/"))
                .join(dir)
        })
    })
}

/// The drop-in's full text.
pub fn render(spec: &RuntimeSpec, path: &Path) -> Result<String> {
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(format!(
        "# Written by {MARKER}; `{MARKER} --uninstall` removes this file.\n"
    ));
    doc.insert("version", toml_edit::value(spec.version.number()));
    insert_entry(&mut doc, spec, path)?;
    Ok(doc.to_string())
}

/// Whether a drop-in's text is the installer's own.
pub fn is_ours(text: &str) -> bool {
    text.lines()
        .next()
        .is_some_and(|l| l.starts_with('#') && l.contains(MARKER))
}
