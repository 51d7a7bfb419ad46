//! File work off the agent's thread. Every actor of the agent runs on the one actix System
//! thread; a `remove_dir_all` of gigabytes of images or an fsync there would stall every
//! request, so such work goes to tokio's blocking pool.

use crate::error::AgentError;

/// Runs blocking file work on the blocking pool and waits for it.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AgentError::Internal(format!("blocking task: {e}")))
}
