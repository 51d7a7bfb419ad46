//! Install and uninstall are planned in full before anything is written: every file's new
//! content is computed and checked first, so a refusal leaves the host untouched, and a
//! dry run prints exactly what would be applied.

use std::fmt::Write as _;
use std::path::PathBuf;

use toml_edit::DocumentMut;

use crate::config_edit::{insert_entry, parse, remove_entry};
use crate::files::{mode_or, read_text, remove_file, write_atomic, HostRoot};
use crate::flavour::{Flavour, Target};
use crate::gotemplate;
use crate::runtime_spec::{ConfigVersion, RuntimeSpec, SHIM_BINARY};
use crate::shim::ShimStep;
use crate::{InstallerError, Result};

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Where the host filesystem is mounted.
    pub host: HostRoot,
    /// Forces a flavour instead of detecting it.
    pub flavour: Option<Flavour>,
    /// Host path of the containerd config, instead of the flavour's default.
    pub config: Option<PathBuf>,
    /// The shim binary inside the installer image.
    pub shim_source: PathBuf,
    /// Host directory the shim goes into.
    pub shim_dir: PathBuf,
    /// Replace a `kybernate` runtime the installer did not write.
    pub force: bool,
}

/// Why a file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// A file containerd reads: the config, template or drop-in.
    Config,
    /// The installer's own record: a backup or a created-file marker.
    Record,
}

/// One file's content before and after (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    /// The path as the installer opens it (under the host root).
    pub path: PathBuf,
    /// Content now.
    pub before: Option<String>,
    /// Content after the plan is applied.
    pub after: Option<String>,
    /// Config or record.
    pub role: FileRole,
}

/// Everything one install or uninstall will do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The node's containerd.
    pub target: Target,
    /// File changes, in the order they are applied.
    pub files: Vec<FileWrite>,
    /// The shim binary step.
    pub shim: ShimStep,
    /// Lines for the log that explain choices.
    pub notes: Vec<String>,
}

const BLOCK_BEGIN: &str =
    "# BEGIN kybernate-installer: `kybernate-installer --uninstall` removes this block.\n";
const BLOCK_END: &str = "# END kybernate-installer\n";

impl Plan {
    /// Whether a file containerd reads changes, which is what needs a restart.
    pub fn config_changed(&self) -> bool {
        self.files
            .iter()
            .any(|f| f.role == FileRole::Config && f.before != f.after)
    }

    /// A unified diff of the config files plus one line per other step.
    pub fn diff(&self) -> String {
        let mut out = String::new();
        for file in self.files.iter().filter(|f| f.before != f.after) {
            let path = file.path.display();
            match file.role {
                FileRole::Record => {
                    let verb = if file.after.is_some() {
                        "write"
                    } else {
                        "remove"
                    };
                    let _ = writeln!(out, "# would {verb} {path}");
                }
                FileRole::Config => {
                    let before = file.before.as_deref().unwrap_or("");
                    let after = file.after.as_deref().unwrap_or("");
                    let diff = similar::TextDiff::from_lines(before, after);
                    let old = if file.before.is_some() {
                        path.to_string()
                    } else {
                        "/dev/null".to_string()
                    };
                    let new = if file.after.is_some() {
                        path.to_string()
                    } else {
                        "/dev/null".to_string()
                    };
                    let _ = write!(out, "{}", diff.unified_diff().header(&old, &new));
                }
            }
        }
        let _ = writeln!(out, "# {}", self.shim.describe());
        out
    }

    /// Writes the plan: install puts the shim first so containerd finds it once it
    /// restarts; records are written before the configs they describe.
    pub fn apply(&self) -> Result<()> {
        let installing = matches!(
            self.shim,
            ShimStep::Copy { .. } | ShimStep::Unchanged { .. }
        );
        if installing {
            self.shim.apply()?;
        }
        for file in self.files.iter().filter(|f| f.before != f.after) {
            match &file.after {
                Some(text) => {
                    // A drop-in may be the first file in its import directory.
                    if let Some(dir) = file
                        .path
                        .parent()
                        .filter(|d| file.before.is_none() && !d.exists())
                    {
                        std::fs::create_dir_all(dir).map_err(|source| InstallerError::Write {
                            path: dir.to_path_buf(),
                            source,
                        })?;
                    }
                    // Records may copy a config that holds credentials: owner-only.
                    let mode = match file.role {
                        FileRole::Config => mode_or(&file.path, 0o644),
                        FileRole::Record => 0o600,
                    };
                    write_atomic(&file.path, text.as_bytes(), mode)?
                }
                None => remove_file(&file.path)?,
            }
        }
        if !installing {
            self.shim.apply()?;
        }
        Ok(())
    }
}

/// The edited file, read and checked.
pub(crate) struct ConfigFile {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
    /// Parsed text, with Go template actions masked.
    pub(crate) doc: DocumentMut,
    pub(crate) template: bool,
}

pub(crate) fn load(path: PathBuf, text: String) -> Result<ConfigFile> {
    let template = gotemplate::has_actions(&text);
    let masked = if template {
        gotemplate::mask(&text, &path)?
    } else {
        text.clone()
    };
    let doc = parse(&masked, &path)?;
    Ok(ConfigFile {
        path,
        text,
        doc,
        template,
    })
}

pub(crate) fn load_generated(
    host: &HostRoot,
    target: &Target,
) -> Result<Option<(PathBuf, DocumentMut)>> {
    let Some(generated) = &target.generated else {
        return Ok(None);
    };
    let path = host.resolve(generated);
    match read_text(&path)? {
        Some(text) => Ok(Some((path.clone(), parse(&text, &path)?))),
        None => Ok(None),
    }
}

/// The socket a config sets in `[grpc] address`, if any (a host path).
pub(crate) fn grpc_address(doc: &DocumentMut) -> Option<PathBuf> {
    let address = doc.get("grpc")?.get("address")?.as_str()?;
    (!address.is_empty() && !address.contains("{{") && !address.contains("${"))
        .then(|| PathBuf::from(address))
}

/// `check` carries the masked parse of `config`; a template gets a text block appended,
/// a plain config a table inserted with `toml_edit`.
pub(crate) fn with_entry(config: &ConfigFile, spec: &RuntimeSpec) -> Result<String> {
    if !config.template {
        let mut doc = config.doc.clone();
        insert_entry(&mut doc, spec, &config.path)?;
        return Ok(doc.to_string());
    }
    let mut fresh = DocumentMut::new();
    insert_entry(&mut fresh, spec, &config.path)?;
    let mut text = config.text.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = write!(
        text,
        "\n{BLOCK_BEGIN}{}{BLOCK_END}",
        fresh.to_string().trim_start_matches('\n')
    );
    Ok(text)
}

/// The config's text without the installer's runtime entry.
pub(crate) fn without_entry(
    config: &ConfigFile,
    version: ConfigVersion,
    force: bool,
) -> Result<String> {
    if config.template {
        if let Some(start) = config.text.find(&format!("\n{BLOCK_BEGIN}")) {
            let tail = &config.text[start..];
            if let Some(end) = tail.find(BLOCK_END) {
                let mut text = config.text[..start].to_string();
                text.push_str(&tail[end + BLOCK_END.len()..]);
                return Ok(text);
            }
        }
        if force {
            return Err(InstallerError::Unsupported {
                path: config.path.clone(),
                detail: "the kybernate runtime in this template was not written by the installer; remove it by hand".into(),
            });
        }
        return Ok(config.text.clone());
    }
    let mut doc = config.doc.clone();
    remove_entry(&mut doc, version);
    Ok(doc.to_string())
}

/// The shim's host path for the given options.
pub fn shim_host_path(opts: &InstallOptions) -> PathBuf {
    opts.host.resolve(&opts.shim_dir.join(SHIM_BINARY))
}
