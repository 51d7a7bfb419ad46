//! Byte-rate limits, so background drains do not starve the workloads' disk and network:
//! a transfer asks its [`ByteRate`] before it moves bytes and waits when the rate is used up.
//! The bucket itself is `governor`'s (GCRA); this module turns bytes into its cells and waits
//! on a thread or a task.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Called with every wait a limit imposed (for metrics).
pub type WaitHook = Arc<dyn Fn(Duration) + Send + Sync>;

/// A limit of bytes per second shared by every transfer that holds it; bursts of up to a
/// tenth of a second's bytes pass at once.
pub struct ByteRate<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    bytes_per_sec: u32,
    burst: NonZeroU32,
    on_wait: Option<WaitHook>,
}

impl<C: Clock> std::fmt::Debug for ByteRate<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteRate")
            .field("bytes_per_sec", &self.bytes_per_sec)
            .field("burst", &self.burst)
            .finish()
    }
}

/// Smallest burst: one small write or ranged GET always fits.
const MIN_BURST: u32 = 64 << 10;

impl ByteRate {
    /// A limit of `bytes_per_sec`; 0 means no limit (`None`). At most `u32::MAX` (4 GB/s).
    pub fn new(bytes_per_sec: u64) -> Result<Option<Self>, String> {
        Self::with_clock(bytes_per_sec, DefaultClock::default())
    }
}

impl<C: Clock> ByteRate<C> {
    /// [`ByteRate::new`] on `clock`.
    pub fn with_clock(bytes_per_sec: u64, clock: C) -> Result<Option<Self>, String> {
        if bytes_per_sec == 0 {
            return Ok(None);
        }
        let rate = u32::try_from(bytes_per_sec)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(|| format!("{bytes_per_sec} bytes per second is above the largest limit, {} (use 0 for none)", u32::MAX))?;
        let burst = NonZeroU32::new((rate.get() / 10).max(MIN_BURST)).expect("positive");
        let quota = Quota::per_second(rate).allow_burst(burst);
        Ok(Some(Self {
            limiter: RateLimiter::direct_with_clock(quota, clock),
            bytes_per_sec: rate.get(),
            burst,
            on_wait: None,
        }))
    }

    /// Calls `hook` with every wait this limit imposes.
    pub fn with_wait_hook(mut self, hook: WaitHook) -> Self {
        self.on_wait = Some(hook);
        self
    }

    /// The limit.
    pub fn bytes_per_sec(&self) -> u64 {
        u64::from(self.bytes_per_sec)
    }

    /// Takes `bytes` from the bucket now, or says how long to wait before asking again.
    /// `bytes` must be at most the burst ([`ByteRate::pieces`] splits larger amounts).
    fn take(&self, bytes: NonZeroU32) -> Option<Duration> {
        match self.limiter.check_n(bytes) {
            Ok(Ok(())) => None,
            Ok(Err(not_until)) => Some(not_until.wait_time_from(self.limiter.clock().now())),
            Err(_) => unreachable!("pieces never exceed the burst"),
        }
    }

    /// `bytes` split into amounts the bucket can hold.
    fn pieces(&self, bytes: u64) -> impl Iterator<Item = NonZeroU32> + '_ {
        let burst = u64::from(self.burst.get());
        let full = bytes / burst;
        let rest = u32::try_from(bytes % burst).expect("below the burst");
        (0..full).map(|_| self.burst).chain(NonZeroU32::new(rest))
    }

    fn waited(&self, total: Duration) -> Duration {
        if let (Some(hook), false) = (&self.on_wait, total.is_zero()) {
            hook(total);
        }
        total
    }

    /// Blocks the calling thread until `bytes` may move; returns how long it waited.
    pub fn pace_blocking(&self, bytes: u64) -> Duration {
        let mut total = Duration::ZERO;
        for piece in self.pieces(bytes) {
            while let Some(wait) = self.take(piece) {
                std::thread::sleep(wait);
                total += wait;
            }
        }
        self.waited(total)
    }

    /// Waits on the tokio timer until `bytes` may move; returns how long it waited.
    pub async fn pace(&self, bytes: u64) -> Duration {
        let mut total = Duration::ZERO;
        for piece in self.pieces(bytes) {
            while let Some(wait) = self.take(piece) {
                tokio::time::sleep(wait).await;
                total += wait;
            }
        }
        self.waited(total)
    }
}

/// How one transfer runs: the byte-rate limits it honours (`None` is unlimited), its priority
/// class in the data plane, and the token that cancels it. The agent hands background work
/// its configured limits and foreground restores none (unless configured otherwise).
#[derive(Clone, Debug, Default)]
pub struct Pacing {
    /// Priority of the transfer's CPU work ([`crate::PriorityGate`]).
    pub class: crate::WorkClass,
    /// Stops the transfer; a cancelled store keeps nothing.
    pub cancel: crate::CancelToken,
    /// Chunk writes to the local disk (NVMe).
    pub disk_write: Option<Arc<ByteRate>>,
    /// Uploads to object storage.
    pub upload: Option<Arc<ByteRate>>,
    /// Downloads from object storage.
    pub download: Option<Arc<ByteRate>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(bytes_per_sec: u64) -> (ByteRate<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let rate = ByteRate::with_clock(bytes_per_sec, clock.clone())
            .unwrap()
            .unwrap();
        (rate, clock)
    }

    #[test]
    fn a_burst_passes_then_the_rest_waits_at_the_rate() {
        let (rate, clock) = rate(10 << 20);
        let burst = NonZeroU32::new(1 << 20).unwrap();
        assert_eq!(rate.burst, burst, "a tenth of a second's bytes");
        assert_eq!(rate.take(burst), None);
        // The bucket is empty: the next MiB comes a tenth of a second later.
        let wait = rate.take(burst).expect("must wait");
        assert!(
            (Duration::from_millis(99)..=Duration::from_millis(101)).contains(&wait),
            "{wait:?}"
        );
        clock.advance(wait);
        assert_eq!(rate.take(burst), None);
    }

    #[test]
    fn large_transfers_are_split_into_bursts() {
        let (rate, _) = rate(1 << 20);
        let burst = u64::from(rate.burst.get());
        let pieces: Vec<u32> = rate.pieces(2 * burst + 5).map(NonZeroU32::get).collect();
        assert_eq!(pieces, vec![rate.burst.get(), rate.burst.get(), 5]);
        assert_eq!(rate.pieces(0).count(), 0);
        assert_eq!(
            rate.pieces(burst).map(NonZeroU32::get).collect::<Vec<_>>(),
            vec![rate.burst.get()]
        );
    }

    #[test]
    fn zero_is_no_limit_and_too_large_a_limit_is_refused() {
        assert!(ByteRate::new(0).unwrap().is_none());
        let err = ByteRate::new(u64::from(u32::MAX) + 1).unwrap_err();
        assert!(err.contains("above the largest limit"), "{err}");
        let small = ByteRate::new(1000).unwrap().unwrap();
        assert_eq!(small.burst.get(), MIN_BURST);
        assert_eq!(small.bytes_per_sec(), 1000);
    }
}
