//! Streaming checkpoints: CRIU's images flow between CRIU and the NVMe tier's chunk store
//! through CRIU's own image-streamer interface (`--stream`), never as an image set in tmpfs.
//!
//! [`StreamCapture`] receives `criu dump --stream`; [`StreamServe`] feeds
//! `criu restore --stream`. The chunk format and the manifest are the tier's usual ones, so a
//! streamed checkpoint loads, drains and restores like any other, and a checkpoint stored
//! from a RAM-tier image set streams back like a streamed one.

mod barrier;
mod capture;
mod chunker;
mod readahead;
mod serve;
mod wire;

pub use capture::StreamCapture;
pub use serve::StreamServe;
pub use wire::{CAPTURE_SOCKET, SERVE_SOCKET};

#[cfg(test)]
mod tests;
