//! Which path a CUDA checkpoint takes: the driver's classic one (VRAM staged into the
//! target's host memory, then dumped by CRIU) or custom storage (VRAM copied by us
//! straight from the driver's mappings into the data plane). The agent config chooses
//! `auto`, `on` or `off`; the driver is probed at run time.

use std::fmt;
use std::str::FromStr;

/// `[cuda] custom_storage` in the agent config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CustomStorageSetting {
    /// Custom storage when the driver offers it, else classic.
    #[default]
    Auto,
    /// Custom storage, or refuse to checkpoint GPUs at all.
    On,
    /// Always the classic path.
    Off,
}

impl FromStr for CustomStorageSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(CustomStorageSetting::Auto),
            "on" => Ok(CustomStorageSetting::On),
            "off" => Ok(CustomStorageSetting::Off),
            other => Err(format!(
                "custom_storage must be \"auto\", \"on\" or \"off\", not {other:?}"
            )),
        }
    }
}

/// How a checkpoint's VRAM was saved; recorded in the manifest, because a restore must
/// take the same path back.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointMode {
    /// The driver staged VRAM into the process's memory; CRIU's images hold it.
    #[default]
    Classic,
    /// VRAM went through the driver's mappings into the data plane; CRIU's images hold
    /// only host state.
    CustomStorage,
}

impl CheckpointMode {
    /// The mode's name in messages and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Classic => "classic",
            CheckpointMode::CustomStorage => "custom_storage",
        }
    }
}

impl fmt::Display for CheckpointMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The chosen path and the reason, for the one log line at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeChoice {
    /// The path checkpoints take.
    pub mode: CheckpointMode,
    /// Why, in words.
    pub reason: String,
}

/// The agent config asks for a checkpoint mode this node's driver does not offer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("CUDA checkpoint mode {mode} unavailable: {reason}")]
pub struct ModeUnavailable {
    /// The mode asked for.
    pub mode: CheckpointMode,
    /// Why not.
    pub reason: String,
}

/// Chooses the checkpoint path from the setting and the driver probe (`Err`: why the
/// driver does not offer custom storage). `on` without driver support is an error
/// naming the reason.
pub fn choose_mode(
    setting: CustomStorageSetting,
    probe: Result<(), String>,
) -> Result<ModeChoice, ModeUnavailable> {
    let choice = |mode, reason: String| Ok(ModeChoice { mode, reason });
    match (setting, probe) {
        (CustomStorageSetting::Off, _) => choice(
            CheckpointMode::Classic,
            "custom_storage = \"off\" in the agent config".into(),
        ),
        (CustomStorageSetting::Auto, Ok(())) => choice(
            CheckpointMode::CustomStorage,
            "custom_storage = \"auto\" and the driver offers custom storage".into(),
        ),
        (CustomStorageSetting::On, Ok(())) => choice(
            CheckpointMode::CustomStorage,
            "custom_storage = \"on\" and the driver offers custom storage".into(),
        ),
        (CustomStorageSetting::Auto, Err(why)) => choice(
            CheckpointMode::Classic,
            format!("custom_storage = \"auto\" but the driver does not offer it: {why}"),
        ),
        (CustomStorageSetting::On, Err(why)) => Err(ModeUnavailable {
            mode: CheckpointMode::CustomStorage,
            reason: format!("custom_storage = \"on\" but the driver does not offer it: {why}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_refuse_other_words() {
        assert_eq!("auto".parse(), Ok(CustomStorageSetting::Auto));
        assert_eq!("on".parse(), Ok(CustomStorageSetting::On));
        assert_eq!("off".parse(), Ok(CustomStorageSetting::Off));
        let err = "yes".parse::<CustomStorageSetting>().unwrap_err();
        assert!(err.contains("\"yes\""), "{err}");
    }

    #[test]
    fn each_setting_chooses_with_a_reason() {
        let no = || Err("driver API 13000 is older than 13040".to_string());
        let auto_yes = choose_mode(CustomStorageSetting::Auto, Ok(())).unwrap();
        assert_eq!(auto_yes.mode, CheckpointMode::CustomStorage);
        let auto_no = choose_mode(CustomStorageSetting::Auto, no()).unwrap();
        assert_eq!(auto_no.mode, CheckpointMode::Classic);
        assert!(
            auto_no.reason.contains("older than 13040"),
            "{}",
            auto_no.reason
        );
        let off = choose_mode(CustomStorageSetting::Off, Ok(())).unwrap();
        assert_eq!(off.mode, CheckpointMode::Classic);
        let err = choose_mode(CustomStorageSetting::On, no()).unwrap_err();
        assert!(err.to_string().contains("older than 13040"), "{err}");
    }
}
