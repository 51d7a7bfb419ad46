//! Planning an uninstall: the drop-in or the runtime entry goes, the config returns to the
//! bytes of its backup, a template the installer created is removed, the shim goes last.

use crate::config_edit::{entry_is_ours, entry_state, EntryState, MARKER};
use crate::dropin::{self, DROPIN_NAME};
use crate::files::{backup_path, created_marker_path, read_text};
use crate::flavour::detect;
use crate::plan::{
    grpc_address, load, load_generated, without_entry, FileRole, FileWrite, InstallOptions, Plan,
};
use crate::runtime_spec::{ConfigVersion, RuntimeSpec, SHIM_BINARY};
use crate::shim::ShimStep;
use crate::Result;

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
            let ours = entry_is_ours(&config.doc, version);
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
