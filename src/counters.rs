//! Counters of hook and uid-source failures and of slow clients cut at `limits.header_timeout`,
//! for operators (the admin console exposes them).
//!
//! Process-wide and monotonic: they survive configuration reloads, so a rate computed from two
//! readings stays meaningful. Relaxed atomics: each counter is independent and only ever added to.

use std::sync::atomic::{AtomicU64, Ordering};

/// Failure counters; read them with [`metrics`] and [`Metrics::read`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// JS hook calls (any hook).
    pub hook_calls: AtomicU64,
    /// A hook threw, returned a value of the wrong shape, or could not be loaded on a thread.
    pub hook_errors: AtomicU64,
    /// A hook ran past its time budget and was interrupted.
    pub hook_timeouts: AtomicU64,
    /// A hook hit the memory or stack limit.
    pub hook_memory: AtomicU64,
    /// A signed token was present but refused (bad signature, expired, wrong algorithm, ...).
    pub jwt_rejected: AtomicU64,
    /// The auth callback answered 401/403.
    pub callback_rejected: AtomicU64,
    /// The auth callback timed out, was unreachable or answered something unusable.
    pub callback_errors: AtomicU64,
    /// Auth callback answers served from the cache.
    pub callback_cache_hits: AtomicU64,
    /// Auth callback requests actually sent.
    pub callback_requests: AtomicU64,
    /// Connections closed because their request head was not complete within
    /// `limits.header_timeout`.
    pub header_timeouts: AtomicU64,
}

/// A plain copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`Metrics::hook_calls`].
    pub hook_calls: u64,
    /// See [`Metrics::hook_errors`].
    pub hook_errors: u64,
    /// See [`Metrics::hook_timeouts`].
    pub hook_timeouts: u64,
    /// See [`Metrics::hook_memory`].
    pub hook_memory: u64,
    /// See [`Metrics::jwt_rejected`].
    pub jwt_rejected: u64,
    /// See [`Metrics::callback_rejected`].
    pub callback_rejected: u64,
    /// See [`Metrics::callback_errors`].
    pub callback_errors: u64,
    /// See [`Metrics::callback_cache_hits`].
    pub callback_cache_hits: u64,
    /// See [`Metrics::callback_requests`].
    pub callback_requests: u64,
    /// See [`Metrics::header_timeouts`].
    pub header_timeouts: u64,
}

impl Metrics {
    const fn new() -> Self {
        Metrics {
            hook_calls: AtomicU64::new(0),
            hook_errors: AtomicU64::new(0),
            hook_timeouts: AtomicU64::new(0),
            hook_memory: AtomicU64::new(0),
            jwt_rejected: AtomicU64::new(0),
            callback_rejected: AtomicU64::new(0),
            callback_errors: AtomicU64::new(0),
            callback_cache_hits: AtomicU64::new(0),
            callback_requests: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
        }
    }

    /// The counters now.
    pub fn read(&self) -> MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            hook_calls: r(&self.hook_calls),
            hook_errors: r(&self.hook_errors),
            hook_timeouts: r(&self.hook_timeouts),
            hook_memory: r(&self.hook_memory),
            jwt_rejected: r(&self.jwt_rejected),
            callback_rejected: r(&self.callback_rejected),
            callback_errors: r(&self.callback_errors),
            callback_cache_hits: r(&self.callback_cache_hits),
            callback_requests: r(&self.callback_requests),
            header_timeouts: r(&self.header_timeouts),
        }
    }
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

static METRICS: Metrics = Metrics::new();

/// The process-wide counters.
pub fn metrics() -> &'static Metrics {
    &METRICS
}
