//! The CUDA session actor. It runs before CRIU on checkpoint and after CRIU on restore.
//!
//! This agent build finds which processes of a workload have the CUDA driver mapped. Workloads
//! without CUDA are skipped cleanly; a workload that uses CUDA is refused before anything is
//! frozen, because dumping it without the driver's checkpoint step would lose its GPU state.

use actix::prelude::*;

/// The CUDA phase failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CudaError {
    /// A process of the workload uses the CUDA driver, which this agent cannot checkpoint.
    #[error("process {pid} has {library} mapped; this agent has no CUDA driver session, so its GPU state cannot be checkpointed")]
    NoDriverSession {
        /// The CUDA process.
        pid: i32,
        /// The mapped driver library.
        library: String,
    },
}

impl CudaError {
    /// Label for failure metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CudaError::NoDriverSession { .. } => "cuda_no_driver",
        }
    }
}

/// Which processes of a workload use CUDA.
#[derive(Debug, Message)]
#[rtype(result = "Result<CudaPlan, CudaError>")]
pub struct PrepareCheckpoint {
    /// Every PID of the workload.
    pub pids: Vec<i32>,
}

/// What the CUDA phase did for a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaPlan {
    /// No process uses CUDA: nothing to lock or restore.
    CpuOnly,
}

/// The CUDA session of the node.
#[derive(Debug, Default)]
pub struct CudaSession;

impl Actor for CudaSession {
    type Context = Context<Self>;
}

impl Handler<PrepareCheckpoint> for CudaSession {
    type Result = Result<CudaPlan, CudaError>;

    fn handle(&mut self, msg: PrepareCheckpoint, _: &mut Self::Context) -> Self::Result {
        for pid in msg.pids {
            if let Some(library) = mapped_cuda_driver(pid) {
                return Err(CudaError::NoDriverSession { pid, library });
            }
        }
        Ok(CudaPlan::CpuOnly)
    }
}

/// The CUDA driver library mapped into `pid`, if any.
pub fn mapped_cuda_driver(pid: i32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|file| file.starts_with("libcuda.so"))
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn processes_without_cuda_are_cpu_only() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(mapped_cuda_driver(me), None);
        let session = CudaSession.start();
        let plan = session
            .send(PrepareCheckpoint { pids: vec![me] })
            .await
            .unwrap();
        assert_eq!(plan, Ok(CudaPlan::CpuOnly));
    }
}
