//! Install and uninstall are planned in full before anything is written: every file's new
//! content is computed and checked first, so a refusal leaves the host untouched, and a
//! dry run prints exactly what would be applied.

use std::fmt::Write as _;
use std::path::PathBuf;

use toml_edit::DocumentMut;

use crate::config_edit::{entry_state, insert_entry, parse, remove_entry, EntryState, MARKER};
use crate::dropin::{self, DROPIN_NAME};
use crate::files::{
    backup_path, created_marker_path, mode_or, read_text, remove_file, write_atomic, HostRoot,
};
use crate::flavour::{detect, Flavour, Target};
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
                    if let Some(dir) = file.path.parent().filter(|_| file.role == FileRole::Config)
                    {
                        if !dir.exists() && file.path.file_name().is_some_and(|n| n == DROPIN_NAME)
                        {
                            std::fs::create_dir_all(dir).map_err(|source| {
                                InstallerError::Write {
                                    path: dir.to_path_buf(),
                                    source,
                                }
                            })?;
                        }
                    }
                    write_atomic(&file.path, text.as_bytes(), mode_or(&file.path, 0o644))?
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
struct ConfigFile {
    path: PathBuf,
    text: String,
    /// Parsed text, with Go template actions masked.
    doc: DocumentMut,
    template: bool,
}

fn load(path: PathBuf, text: String) -> Result<ConfigFile> {
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

fn load_generated(host: &HostRoot, target: &Target) -> Result<Option<(PathBuf, DocumentMut)>> {
    let Some(generated) = &target.generated else {
        return Ok(None);
    };
    let path = host.resolve(generated);
    match read_text(&path)? {
        Some(text) => Ok(Some((path.clone(), parse(&text, &path)?))),
        None => Ok(None),
    }
}

/// Plans an install: shim copy, runtime entry (in place, drop-in or template block),
/// backup.
pub fn plan_install(opts: &InstallOptions) -> Result<Plan> {
    let host = &opts.host;
    let target = detect(host, opts.flavour, opts.config.as_deref())?;
    let shim_to = host.resolve(&opts.shim_dir.join(SHIM_BINARY));
    let shim = ShimStep::for_install(&opts.shim_source, &shim_to)?;
    let generated = load_generated(host, &target)?;
    let config_path = host.resolve(&target.config);
    let mut notes = Vec::new();

    let (config, created) = match read_text(&config_path)? {
        Some(text) => (load(config_path.clone(), text)?, false),
        None => match &generated {
            Some((gen_path, _)) => {
                notes.push(format!(
                    "creating {} from {}",
                    config_path.display(),
                    gen_path.display()
                ));
                let seed = crate::files::read_required(gen_path)?;
                (load(config_path.clone(), seed)?, true)
            }
            None => return Err(InstallerError::HostPathMissing { path: config_path }),
        },
    };
    let version = match ConfigVersion::from_document(&config.doc, &config.path)? {
        Some(v) => v,
        None => match &generated {
            Some((gen_path, gen_doc)) => ConfigVersion::require(gen_doc, gen_path)?,
            None => ConfigVersion::require(&config.doc, &config.path)?,
        },
    };
    let mut target = target;
    if let Some(address) = grpc_address(&config.doc) {
        target.socket = address;
    }
    let source = generated.as_ref().map_or(&config.doc, |(_, doc)| doc);
    let spec = RuntimeSpec::new(version, Some(source));
    notes.push(format!(
        "{} node, config version {}, runtime options copied: {}",
        target.flavour.name(),
        version.number(),
        spec.options
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let state = entry_state(&config.doc, &spec);
    let mut files = Vec::new();
    let dropin_dir = (!config.template && state == EntryState::Absent)
        .then(|| dropin::import_dir(&config.doc, &target.config, version))
        .flatten();
    if let Some(dir) = dropin_dir {
        let path = host.resolve(&dir.join(DROPIN_NAME));
        let before = read_text(&path)?;
        let wanted = dropin::render(&spec, &path)?;
        if let Some(existing) = &before {
            let doc = parse(existing, &path)?;
            match entry_state(&doc, &spec) {
                EntryState::Matches | EntryState::Absent => {}
                EntryState::Differs { ours, detail } => {
                    if !ours && !dropin::is_ours(existing) && !opts.force {
                        return Err(InstallerError::Conflict { path, detail });
                    }
                }
            }
            if !dropin::is_ours(existing)
                && !opts.force
                && entry_state(&doc, &spec) != EntryState::Matches
            {
                return Err(InstallerError::Conflict {
                    path,
                    detail: "file exists and was not written by the installer".into(),
                });
            }
        }
        let after = match &before {
            Some(existing)
                if entry_state(&parse(existing, &path)?, &spec) == EntryState::Matches =>
            {
                before.clone()
            }
            _ => Some(wanted),
        };
        notes.push(format!(
            "using drop-in {} (imported by {})",
            path.display(),
            config.path.display()
        ));
        files.push(FileWrite {
            path,
            before,
            after,
            role: FileRole::Config,
        });
        return Ok(Plan {
            target,
            files,
            shim,
            notes,
        });
    }

    let after = match state {
        EntryState::Matches => config.text.clone(),
        EntryState::Absent => with_entry(&config, &spec)?,
        EntryState::Differs { ours, detail } => {
            if !ours && !opts.force {
                return Err(InstallerError::Conflict {
                    path: config.path.clone(),
                    detail,
                });
            }
            let without = without_entry(&config, version, true)?;
            with_entry(&load(config.path.clone(), without)?, &spec)?
        }
    };
    let check = load(config.path.clone(), after.clone())?;
    if entry_state(&check.doc, &spec) != EntryState::Matches {
        return Err(InstallerError::Unsupported {
            path: config.path.clone(),
            detail: "the runtime entry did not read back as written; nothing changed".into(),
        });
    }
    let changed = after != config.text || created;
    if changed {
        if created {
            let marker = created_marker_path(&config.path);
            files.push(FileWrite {
                before: read_text(&marker)?,
                path: marker,
                after: Some(config.text.clone()),
                role: FileRole::Record,
            });
        } else {
            let backup = backup_path(&config.path);
            let existing = read_text(&backup)?;
            let after_backup = existing.clone().or_else(|| Some(config.text.clone()));
            files.push(FileWrite {
                path: backup,
                before: existing,
                after: after_backup,
                role: FileRole::Record,
            });
        }
    }
    let before = if created {
        None
    } else {
        Some(config.text.clone())
    };
    files.push(FileWrite {
        path: config.path.clone(),
        before,
        after: Some(after),
        role: FileRole::Config,
    });
    Ok(Plan {
        target,
        files,
        shim,
        notes,
    })
}

/// The socket a config sets in `[grpc] address`, if any (a host path).
fn grpc_address(doc: &DocumentMut) -> Option<PathBuf> {
    let address = doc.get("grpc")?.get("address")?.as_str()?;
    (!address.is_empty() && !address.contains("{{")).then(|| PathBuf::from(address))
}

/// `check` carries the masked parse of `config`; a template gets a text block appended,
/// a plain config a table inserted with `toml_edit`.
fn with_entry(config: &ConfigFile, spec: &RuntimeSpec) -> Result<String> {
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
fn without_entry(config: &ConfigFile, version: ConfigVersion, force: bool) -> Result<String> {
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

/// Plans an uninstall: the drop-in or the runtime entry goes, the config returns to its
/// backup, the shim is removed.
pub fn plan_uninstall(opts: &InstallOptions) -> Result<Plan> {
    let host = &opts.host;
    let target = detect(host, opts.flavour, opts.config.as_deref())?;
    let shim = ShimStep::for_uninstall(&host.resolve(&opts.shim_dir.join(SHIM_BINARY)));
    let config_path = host.resolve(&target.config);
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let Some(text) = read_text(&config_path)? else {
        notes.push(format!(
            "{} does not exist; no runtime entry to remove",
            config_path.display()
        ));
        return Ok(Plan {
            target,
            files,
            shim,
            notes,
        });
    };
    let config = load(config_path.clone(), text)?;
    let mut target = target;
    if let Some(address) = grpc_address(&config.doc) {
        target.socket = address;
    }
    let generated = load_generated(host, &target)?;
    let version = match ConfigVersion::from_document(&config.doc, &config.path)? {
        Some(v) => v,
        None => match &generated {
            Some((p, d)) => ConfigVersion::require(d, p)?,
            None => ConfigVersion::require(&config.doc, &config.path)?,
        },
    };

    if let Some(dir) = dropin::import_dir(&config.doc, &target.config, version) {
        let path = host.resolve(&dir.join(DROPIN_NAME));
        if let Some(existing) = read_text(&path)? {
            if dropin::is_ours(&existing) || opts.force {
                files.push(FileWrite {
                    path,
                    before: Some(existing),
                    after: None,
                    role: FileRole::Config,
                });
            } else {
                notes.push(format!(
                    "{} was not written by {MARKER}; left as is (--force removes it)",
                    path.display()
                ));
            }
        }
    }

    let spec = RuntimeSpec::new(version, None);
    let after = match entry_state(&config.doc, &spec) {
        EntryState::Absent => config.text.clone(),
        EntryState::Matches | EntryState::Differs { .. } => {
            let ours = crate::runtime_spec::lookup(&config.doc, &version.runtimes_path())
                .and_then(|r| r.get(crate::runtime_spec::RUNTIME_NAME))
                .and_then(toml_edit::Item::as_table)
                .and_then(|t| t.decor().prefix())
                .and_then(|p| p.as_str())
                .is_some_and(|p| p.contains(MARKER));
            if ours || opts.force {
                without_entry(&config, version, opts.force)?
            } else {
                notes.push(format!("runtime kybernate in {} was not written by {MARKER}; left as is (--force removes it)", config.path.display()));
                config.text.clone()
            }
        }
    };
    let backup = backup_path(&config.path);
    let marker = created_marker_path(&config.path);
    let mut final_text = Some(after);
    if let Some(saved) = read_text(&backup)? {
        if final_text.as_deref().map(str::trim_end) == Some(saved.trim_end()) {
            final_text = Some(saved.clone());
            files.push(FileWrite {
                path: backup,
                before: Some(saved),
                after: None,
                role: FileRole::Record,
            });
        } else {
            notes.push(format!(
                "{} differs from {} (edited since install); backup kept",
                config.path.display(),
                backup.display()
            ));
        }
    }
    if let Some(seed) = read_text(&marker)? {
        if final_text.as_deref() == Some(seed.as_str()) {
            final_text = None;
        } else {
            notes.push(format!(
                "{} was edited since the installer created it; kept",
                config.path.display()
            ));
        }
        files.push(FileWrite {
            path: marker,
            before: Some(seed),
            after: None,
            role: FileRole::Record,
        });
    }
    // The config goes first so a failure never leaves it without its backup.
    files.insert(
        0,
        FileWrite {
            path: config.path,
            before: Some(config.text),
            after: final_text,
            role: FileRole::Config,
        },
    );
    Ok(Plan {
        target,
        files,
        shim,
        notes,
    })
}

/// The shim's host path for the given options.
pub fn shim_host_path(opts: &InstallOptions) -> PathBuf {
    opts.host.resolve(&opts.shim_dir.join(SHIM_BINARY))
}
