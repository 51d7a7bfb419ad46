//! Adds and removes the `kybernate` runtime table in a parsed containerd config with
//! `toml_edit`, so every comment, key order and unrelated setting stays byte for byte.

use std::path::Path;

use toml_edit::{value, Array, DocumentMut, Item, Table, Value};

use crate::runtime_spec::{
    ConfigVersion, RuntimeSpec, POD_ANNOTATIONS, RUNTIME_NAME, RUNTIME_TYPE,
};
use crate::{InstallerError, Result};

/// Text in the comment above every table the installer writes; it marks the table as the
/// installer's own, which it may update and remove.
pub const MARKER: &str = "kybernate-installer";

/// Parses a config, turning the parser's multi-line report into one line.
pub fn parse(text: &str, path: &Path) -> Result<DocumentMut> {
    text.parse::<DocumentMut>()
        .map_err(|e| InstallerError::Parse {
            path: path.to_path_buf(),
            message: e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })
}

/// What a config says about the `kybernate` runtime today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryState {
    /// No such runtime.
    Absent,
    /// It exists and says exactly what the installer would write.
    Matches,
    /// It exists with other settings; `ours` when it carries the installer's marker.
    Differs {
        /// Whether the installer wrote it (and so may rewrite it).
        ours: bool,
        /// The first difference.
        detail: String,
    },
}

/// Looks at the `kybernate` runtime of `doc` against `spec`.
pub fn entry_state(doc: &DocumentMut, spec: &RuntimeSpec) -> EntryState {
    let path = spec.version.runtimes_path();
    let Some(entry) = crate::runtime_spec::lookup(doc, &path)
        .and_then(|runtimes| runtimes.get(RUNTIME_NAME))
        .and_then(Item::as_table_like)
    else {
        return EntryState::Absent;
    };
    match spec.difference(entry) {
        None => EntryState::Matches,
        Some(detail) => EntryState::Differs {
            ours: entry_is_ours(doc, spec.version),
            detail,
        },
    }
}

/// Whether the `kybernate` runtime table carries the installer's marker comment.
pub fn entry_is_ours(doc: &DocumentMut, version: ConfigVersion) -> bool {
    crate::runtime_spec::lookup(doc, &version.runtimes_path())
        .and_then(|r| r.get(RUNTIME_NAME))
        .and_then(Item::as_table)
        .and_then(|t| t.decor().prefix())
        .and_then(|p| p.as_str())
        .is_some_and(|p| p.contains(MARKER))
}

/// Walks to the `runtimes` table, creating implicit parents that are missing.
fn runtimes_table_mut<'d>(
    doc: &'d mut DocumentMut,
    version: ConfigVersion,
    path: &Path,
) -> Result<&'d mut Table> {
    let mut table = doc.as_table_mut();
    for key in version.runtimes_path() {
        let item = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        let unsupported = |what: &str| {
            InstallerError::Unsupported {
            path: path.to_path_buf(),
            detail: format!("`{key}` on the way to the runtimes table is {what}; add the kybernate runtime by hand"),
        }
        };
        let Some(t) = item.as_table_mut() else {
            return Err(unsupported("not a [table]"));
        };
        if t.is_dotted() {
            return Err(unsupported("written with dotted keys"));
        }
        table = t;
    }
    Ok(table)
}

/// Indentation of a table header and its keys, taken from a sibling runtime so the new
/// table looks like the rest of the file.
#[derive(Debug, Clone)]
struct Indent {
    header: String,
    keys: String,
}

impl Indent {
    fn of_sibling(runtimes: &Table) -> Self {
        let sibling = runtimes
            .iter()
            .find_map(|(name, item)| item.as_table().map(|t| (name, t)))
            .filter(|(name, _)| *name != RUNTIME_NAME);
        let Some((_, table)) = sibling else {
            return Self {
                header: String::new(),
                keys: "  ".to_string(),
            };
        };
        let header = table
            .decor()
            .prefix()
            .and_then(|p| p.as_str())
            .map(|p| p.rsplit('\n').next().unwrap_or("").to_string())
            .unwrap_or_default();
        let keys = table
            .iter()
            .find(|(_, item)| item.is_value())
            .and_then(|(k, _)| table.key(k))
            .and_then(|k| k.leaf_decor().prefix())
            .and_then(|p| p.as_str())
            .map(|p| p.rsplit('\n').next().unwrap_or("").to_string())
            .unwrap_or_else(|| format!("{header}  "));
        Self { header, keys }
    }
}

fn indented(table: &mut Table, key: &str, item: Item, indent: &str) {
    table.insert(key, item);
    if let Some(mut k) = table.key_mut(key) {
        k.leaf_decor_mut().set_prefix(indent);
    }
}

/// Adds the `kybernate` runtime table; the caller has made sure none exists. New tables
/// carry no document position, so they print right after the last existing runtime table.
pub fn insert_entry(doc: &mut DocumentMut, spec: &RuntimeSpec, path: &Path) -> Result<()> {
    let runtimes = runtimes_table_mut(doc, spec.version, path)?;
    let indent = Indent::of_sibling(runtimes);
    let mut entry = Table::new();
    entry.decor_mut().set_prefix(format!(
        "\n{h}# Added by {MARKER}: the Kybernate checkpoint/restore runtime. CRI passes the\n\
         {h}# kybernate.io/* pod annotations to its shim. `{MARKER} --uninstall` removes it.\n{h}",
        h = indent.header
    ));
    indented(
        &mut entry,
        "runtime_type",
        value(RUNTIME_TYPE),
        &indent.keys,
    );
    let annotations: Array = POD_ANNOTATIONS.iter().copied().collect();
    indented(
        &mut entry,
        "pod_annotations",
        value(annotations),
        &indent.keys,
    );
    if !spec.options.is_empty() {
        let mut options = Table::new();
        options.decor_mut().set_prefix(format!("\n{}", indent.keys));
        let option_indent = format!("{}  ", indent.keys);
        for (name, v) in &spec.options {
            let v: Value = v.clone().decorated(" ", "");
            indented(&mut options, name, Item::Value(v), &option_indent);
        }
        entry.insert("options", Item::Table(options));
    }
    runtimes.insert(RUNTIME_NAME, Item::Table(entry));
    Ok(())
}

/// Removes the `kybernate` runtime table and any implicit parent tables left empty by it.
/// Returns whether there was one.
pub fn remove_entry(doc: &mut DocumentMut, version: ConfigVersion) -> bool {
    fn remove_under(table: &mut Table, path: &[&str]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return table.remove(RUNTIME_NAME).is_some();
        };
        let Some(child) = table.get_mut(first).and_then(Item::as_table_mut) else {
            return false;
        };
        let removed = remove_under(child, rest);
        if removed && child.is_implicit() && child.is_empty() {
            table.remove(first);
        }
        removed
    }
    remove_under(doc.as_table_mut(), &version.runtimes_path())
}
