//! Per-object exponential backoff for `error_policy`: an object that keeps failing is
//! retried less and less often, up to a bound, and starts over after one success. Other
//! objects are not slowed by it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Failure counts by object, with the delays they lead to.
#[derive(Debug)]
pub struct ErrorBackoff {
    first: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Default for ErrorBackoff {
    /// 5 s after the first failure, doubling up to 5 min.
    fn default() -> Self {
        Self::new(Duration::from_secs(5), Duration::from_secs(300))
    }
}

impl ErrorBackoff {
    /// Waits `first` after an object's first failure, doubling per failure up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more failure of `object` and returns how long to wait before retrying it.
    pub fn failed(&self, object: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(object.to_owned()).or_insert(0);
        let delay = self
            .first
            .checked_mul(2u32.saturating_pow(*count))
            .map_or(self.max, |d| d.min(self.max));
        *count = count.saturating_add(1);
        delay
    }

    /// `object` reconciled successfully: its next failure waits `first` again.
    pub fn succeeded(&self, object: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(object);
    }

    /// The key of an object: kind, namespace and name.
    pub fn key<K: kube::Resource<DynamicType = ()>>(obj: &K) -> String {
        format!(
            "{}/{}/{}",
            K::kind(&()),
            obj.meta().namespace.as_deref().unwrap_or_default(),
            obj.meta().name.as_deref().unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_failure_up_to_the_bound_and_resets_on_success() {
        let backoff = ErrorBackoff::new(Duration::from_secs(5), Duration::from_secs(60));
        let delays: Vec<u64> = (0..7).map(|_| backoff.failed("a").as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60, 60]);
        backoff.succeeded("a");
        assert_eq!(backoff.failed("a"), Duration::from_secs(5));
    }

    #[test]
    fn objects_back_off_independently() {
        let backoff = ErrorBackoff::default();
        for _ in 0..4 {
            backoff.failed("a");
        }
        assert_eq!(backoff.failed("b"), Duration::from_secs(5));
        assert_eq!(backoff.failed("a"), Duration::from_secs(80));
    }

    #[test]
    fn many_failures_never_overflow() {
        let backoff = ErrorBackoff::default();
        for _ in 0..100 {
            assert!(backoff.failed("a") <= Duration::from_secs(300));
        }
        assert_eq!(backoff.failed("a"), Duration::from_secs(300));
    }
}
