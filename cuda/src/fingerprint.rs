//! What a checkpoint records about the GPUs it ran on, and the check that decides
//! before CRIU runs whether a node can restore it (and with which UUID remapping).

use crate::driver::{GpuDevice, GpuPair, GpuUuid};
use crate::error::CudaError;
use crate::libcuda::REMAP_MIN_DRIVER;

/// Driver version, model, memory and UUID of each GPU. Stored in the checkpoint
/// manifest; compared with the target node on restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuFingerprint {
    /// `cuDriverGetVersion` (e.g. 12080).
    pub driver_version: i32,
    /// The GPUs, in ordinal order.
    pub devices: Vec<GpuDevice>,
}

impl GpuFingerprint {
    /// Keeps only the GPUs a container was given (its GPU seat), so a restore needs
    /// only as many GPUs as the workload used.
    pub fn restricted_to(&self, uuids: &[GpuUuid]) -> GpuFingerprint {
        GpuFingerprint {
            driver_version: self.driver_version,
            devices: self
                .devices
                .iter()
                .filter(|d| uuids.contains(&d.uuid))
                .cloned()
                .collect(),
        }
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

/// Decides how `recorded` maps onto `current` (this node; `None` = no CUDA driver).
/// Returns the UUID pairs for `cuCheckpointProcessRestore`: empty when every recorded
/// GPU is present under its own UUID, else one pair per recorded GPU. Refuses another
/// model, too little memory, an older driver, or a missing driver.
pub fn plan_restore(
    recorded: &GpuFingerprint,
    current: Option<&GpuFingerprint>,
) -> Result<Vec<GpuPair>, CudaError> {
    if recorded.devices.is_empty() {
        return Ok(Vec::new());
    }
    let refuse = |reason: String| Err(CudaError::Incompatible { reason });
    let Some(current) = current else {
        return refuse(format!(
            "the checkpoint used {} GPU(s) but this node has no CUDA driver",
            recorded.devices.len()
        ));
    };
    if current.driver_version < recorded.driver_version {
        return refuse(format!(
            "driver version {} on this node is older than {} recorded at checkpoint",
            current.driver_version, recorded.driver_version
        ));
    }
    let suits = |want: &GpuDevice, d: &GpuDevice| {
        d.name == want.name && d.total_memory >= want.total_memory
    };
    // A GPU present under its recorded UUID keeps it; the others take free GPUs of
    // the same model with enough memory.
    let mut taken = vec![false; current.devices.len()];
    let mut chosen: Vec<Option<usize>> = recorded
        .devices
        .iter()
        .map(|want| {
            let i = current
                .devices
                .iter()
                .position(|d| d.uuid == want.uuid && suits(want, d))?;
            taken[i] = true;
            Some(i)
        })
        .collect();
    for (want, slot) in recorded.devices.iter().zip(chosen.iter_mut()) {
        if slot.is_some() {
            continue;
        }
        let free = current
            .devices
            .iter()
            .enumerate()
            .position(|(i, d)| !taken[i] && suits(want, d));
        let Some(i) = free else {
            return refuse(format!(
                "no free GPU of model {:?} with at least {} MiB for recorded GPU {} (this node has: {})",
                want.name,
                mib(want.total_memory),
                want.uuid,
                describe(&current.devices)
            ));
        };
        taken[i] = true;
        *slot = Some(i);
    }
    let pairs: Vec<GpuPair> = recorded
        .devices
        .iter()
        .zip(chosen)
        .filter_map(|(want, i)| {
            Some(GpuPair {
                old: want.uuid,
                new: current.devices[i?].uuid,
            })
        })
        .collect();
    if pairs.iter().all(|p| p.old == p.new) {
        return Ok(Vec::new());
    }
    if current.driver_version < REMAP_MIN_DRIVER {
        return refuse(format!(
            "restoring onto other GPUs needs UUID remapping, which needs driver API {REMAP_MIN_DRIVER} \
             or newer; this node has {}",
            current.driver_version
        ));
    }
    Ok(pairs)
}

fn describe(devices: &[GpuDevice]) -> String {
    if devices.is_empty() {
        return "no GPUs".into();
    }
    devices
        .iter()
        .map(|d| format!("{} {:?} {} MiB", d.uuid, d.name, mib(d.total_memory)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(byte: u8, name: &str, gib: u64) -> GpuDevice {
        GpuDevice {
            uuid: GpuUuid([byte; 16]),
            name: name.into(),
            total_memory: gib << 30,
        }
    }

    fn fp(version: i32, devices: Vec<GpuDevice>) -> GpuFingerprint {
        GpuFingerprint {
            driver_version: version,
            devices,
        }
    }

    #[test]
    fn same_gpus_need_no_pairs() {
        let a = fp(12080, vec![gpu(1, "A100", 40)]);
        assert_eq!(plan_restore(&a, Some(&a)).unwrap(), Vec::new());
    }

    #[test]
    fn other_uuid_of_same_model_is_remapped() {
        let rec = fp(13000, vec![gpu(1, "A100", 40), gpu(2, "A100", 40)]);
        let cur = fp(13000, vec![gpu(2, "A100", 40), gpu(9, "A100", 80)]);
        let pairs = plan_restore(&rec, Some(&cur)).unwrap();
        assert_eq!(
            pairs,
            vec![
                GpuPair {
                    old: GpuUuid([1; 16]),
                    new: GpuUuid([9; 16])
                },
                GpuPair {
                    old: GpuUuid([2; 16]),
                    new: GpuUuid([2; 16])
                },
            ]
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        let rec = fp(13000, vec![gpu(1, "A100", 40)]);
        let cases = [
            (fp(12080, vec![gpu(1, "A100", 40)]), "older than 13000"),
            (fp(13000, vec![gpu(1, "H100", 80)]), "model \"A100\""),
            (fp(13000, vec![gpu(2, "A100", 20)]), "at least 40960 MiB"),
        ];
        for (cur, needle) in cases {
            let err = plan_restore(&rec, Some(&cur)).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
        let err = plan_restore(&rec, None).unwrap_err().to_string();
        assert!(err.contains("no CUDA driver"), "{err}");
    }

    #[test]
    fn remap_on_old_driver_is_refused() {
        let rec = fp(12080, vec![gpu(1, "A100", 40)]);
        let cur = fp(12080, vec![gpu(2, "A100", 40)]);
        let err = plan_restore(&rec, Some(&cur)).unwrap_err().to_string();
        assert!(err.contains("needs driver API 13000"), "{err}");
    }

    #[test]
    fn fingerprint_round_trips_through_json() {
        let a = fp(13000, vec![gpu(0xab, "NVIDIA H100 80GB HBM3", 80)]);
        let text = serde_json::to_string(&a).unwrap();
        assert!(
            text.contains("GPU-abababab-abab-abab-abab-abababababab"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<GpuFingerprint>(&text).unwrap(), a);
    }
}
