//! Planning an install: the shim step, then the runtime entry in place, in a drop-in, or
//! as a block appended to a Go template, plus the backup or created-file record.

use std::path::Path;

use crate::config_edit::{entry_state, parse, EntryState};
use crate::dropin::{self, DROPIN_NAME};
use crate::files::{backup_path, created_marker_path, read_text};
use crate::flavour::detect;
use crate::plan::{
    grpc_address, load, load_generated, with_entry, without_entry, FileRole, FileWrite,
    InstallOptions, Plan,
};
use crate::runtime_spec::{ConfigVersion, RuntimeSpec, SHIM_BINARY};
use crate::shim::ShimStep;
use crate::{InstallerError, Result};

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
        notes.push(format!(
            "using drop-in {} (imported by {})",
            path.display(),
            config.path.display()
        ));
        files.push(dropin_write(&path, &spec, opts.force)?);
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

/// The drop-in's change: written when absent or when it is the installer's own and
/// outdated; a foreign file in its place is a conflict unless forced.
fn dropin_write(path: &Path, spec: &RuntimeSpec, force: bool) -> Result<FileWrite> {
    let before = read_text(path)?;
    let after = match &before {
        Some(existing) if entry_state(&parse(existing, path)?, spec) == EntryState::Matches => {
            before.clone()
        }
        Some(existing) if !dropin::is_ours(existing) && !force => {
            return Err(InstallerError::Conflict {
                path: path.to_path_buf(),
                detail: "the drop-in file exists and was not written by the installer".into(),
            })
        }
        _ => Some(dropin::render(spec, path)?),
    };
    Ok(FileWrite {
        path: path.to_path_buf(),
        before,
        after,
        role: FileRole::Config,
    })
}
