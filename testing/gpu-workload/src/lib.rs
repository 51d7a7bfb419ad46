//! The test GPU workload ([`run`]) and the harness that runs it on a simulated GPU node
//! under real CRIU ([`harness`]). Tests only; the fake driver is never the product path.

pub mod harness;
mod workload;

pub use workload::{parse_args, pattern, run, WorkloadConfig, CHUNK};
