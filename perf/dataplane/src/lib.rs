//! Benchmarks of the data plane against the baselines named in issue 3 (pzstd, dd
//! oflag=direct, s5cmd), all measured in the same run on the same generated image.

pub mod encryption;
pub mod generate;
pub mod measure;
pub mod priority;
pub mod steps;
pub mod suite;
