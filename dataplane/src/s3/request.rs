//! Retries with backoff and error mapping for S3 requests.

use std::future::Future;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use super::S3Config;
use crate::{TierError, TierKind};

/// HTTP status of a failed request, if the server answered.
pub(crate) fn status<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// Whether a failure may go away on its own: no answer, a timeout, 5xx, 408 or 429.
pub(crate) fn is_retryable<E>(err: &SdkError<E>) -> bool {
    match err {
        SdkError::ServiceError(_) => status(err).is_none_or(|s| s >= 500 || s == 408 || s == 429),
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    }
}

/// Runs `op` up to `max_attempts` times with exponential backoff; returns the last error and
/// the number of attempts made.
pub(crate) async fn retrying<T, E, Fut>(
    config: &S3Config,
    what: &str,
    mut op: impl FnMut() -> Fut,
) -> Result<T, (SdkError<E>, u32)>
where
    Fut: Future<Output = Result<T, SdkError<E>>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < config.max_attempts && is_retryable(&e) => {
                tracing::warn!(what, attempt, error = %DisplayErrorContext(&e), "S3 request failed; retrying");
                tokio::time::sleep(config.retry_delay(attempt)).await;
            }
            Err(e) => return Err((e, attempt)),
        }
    }
}

/// A readable description of a failed request; it never contains credentials.
pub(crate) fn describe<E>(err: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = err.code().map(|c| format!(" {c}")).unwrap_or_default();
    let message = err.message().map(|m| format!(": {m}")).unwrap_or_default();
    match status(err) {
        Some(403) => format!(
            "access denied (HTTP 403{code}{message}); the credentials were rejected or lack permission"
        ),
        Some(s) => format!("HTTP {s}{code}{message}"),
        None => format!("no response from the server: {}", DisplayErrorContext(err)),
    }
}

/// Maps a failed request to [`TierError::Remote`].
pub(crate) fn remote<E>(
    op: impl Into<String>,
    key: &str,
    err: &SdkError<E>,
    attempts: u32,
) -> TierError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let tries = if attempts > 1 {
        format!(" (after {attempts} attempts)")
    } else {
        String::new()
    };
    TierError::Remote {
        tier: TierKind::S3,
        op: op.into(),
        key: key.to_owned(),
        detail: format!("{}{tries}", describe(err)),
    }
}
