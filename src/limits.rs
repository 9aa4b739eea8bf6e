//! Request limits: header size, open tunnels, per-client-IP and per-uid request rates and
//! concurrency. Excess gets a clear refusal (431, 503 or 429 with the limit named), never a crash.
//!
//! Counting uses `pingora-limits` (count-min sketches: constant memory whatever the number of
//! clients; an estimate can only over-count, so a limit never lets more through than set).
//! The counters live in the agent and survive reloads; the thresholds come from the request's
//! configuration snapshot, so a reload changes them at once.
//!
//! The deadline for a request head (`limits.header_timeout`, against slowloris) acts on the
//! connection itself, before a request exists: see [`head_deadline`].

pub mod head_deadline;

use crate::config::{LimitsConfig, RateLimit};
use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::Rate;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Which limit a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// The request head is larger than `limits.max_header_bytes`.
    HeaderTooLarge,
    /// `limits.max_tunnels` WebSockets are open.
    Tunnels,
    /// The client IP sent more than `limits.per_ip.requests_per_second`.
    IpRate,
    /// The client IP has `limits.per_ip.max_concurrent` requests/tunnels open.
    IpConcurrency,
    /// The uid sent more than `limits.per_uid.requests_per_second`.
    UidRate,
    /// The uid has `limits.per_uid.max_concurrent` requests/tunnels open.
    UidConcurrency,
}

impl Exceeded {
    /// Status, reason phrase and body of the refusal.
    pub fn response(self) -> (u16, &'static str, &'static str) {
        match self {
            Exceeded::HeaderTooLarge => (
                431,
                "Request Header Fields Too Large",
                "gopush: request header larger than limits.max_header_bytes\n",
            ),
            Exceeded::Tunnels => (
                503,
                "Service Unavailable",
                "gopush: too many open WebSockets (limits.max_tunnels)\n",
            ),
            Exceeded::IpRate => (
                429,
                "Too Many Requests",
                "gopush: too many requests from this address (limits.per_ip.requests_per_second)\n",
            ),
            Exceeded::IpConcurrency => (
                429,
                "Too Many Requests",
                "gopush: too many open requests from this address (limits.per_ip.max_concurrent)\n",
            ),
            Exceeded::UidRate => (
                429,
                "Too Many Requests",
                "gopush: too many requests for this uid (limits.per_uid.requests_per_second)\n",
            ),
            Exceeded::UidConcurrency => (
                429,
                "Too Many Requests",
                "gopush: too many open requests for this uid (limits.per_uid.max_concurrent)\n",
            ),
        }
    }
}

/// The counters behind the limits.
pub struct Limiter {
    ip_rate: Rate,
    uid_rate: Rate,
    ip_open: Inflight,
    uid_open: Inflight,
    tunnels: AtomicUsize,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            ip_rate: Rate::new(Duration::from_secs(1)),
            uid_rate: Rate::new(Duration::from_secs(1)),
            ip_open: Inflight::new(),
            uid_open: Inflight::new(),
            tunnels: AtomicUsize::new(0),
        }
    }
}

/// Held for the life of a request (or tunnel): releases its concurrency slots when dropped.
#[derive(Default)]
pub struct Slots {
    _ip: Option<Guard>,
    _uid: Option<Guard>,
}

impl Limiter {
    /// Checks the head size and the per-IP limits; counts this request.
    pub fn admit_client(
        &self,
        cfg: &LimitsConfig,
        header_bytes: usize,
        ip: Option<IpAddr>,
        slots: &mut Slots,
    ) -> Result<(), Exceeded> {
        if header_bytes > cfg.max_header_bytes {
            return Err(Exceeded::HeaderTooLarge);
        }
        if let Some(ip) = ip {
            slots._ip = check(&self.ip_rate, &self.ip_open, &cfg.per_ip, &ip).map_err(|rate| {
                if rate {
                    Exceeded::IpRate
                } else {
                    Exceeded::IpConcurrency
                }
            })?;
        }
        Ok(())
    }

    /// Checks the per-uid limits, and the tunnel cap for an upgrade; counts this request.
    pub fn admit_uid(
        &self,
        cfg: &LimitsConfig,
        uid: &str,
        upgrade: bool,
        slots: &mut Slots,
    ) -> Result<(), Exceeded> {
        if upgrade && self.tunnels.load(Ordering::Relaxed) >= cfg.max_tunnels {
            return Err(Exceeded::Tunnels);
        }
        slots._uid = check(&self.uid_rate, &self.uid_open, &cfg.per_uid, uid).map_err(|rate| {
            if rate {
                Exceeded::UidRate
            } else {
                Exceeded::UidConcurrency
            }
        })?;
        Ok(())
    }

    /// A tunnel opened (the 101 was relayed); it counts until the returned slot is dropped.
    pub fn tunnel_opened(self: &Arc<Self>) -> TunnelSlot {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelSlot(self.clone())
    }

    /// Open tunnels now.
    pub fn open_tunnels(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }
}

/// One open tunnel in [`Limiter::open_tunnels`] while it lives.
pub struct TunnelSlot(Arc<Limiter>);

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `Err(true)`: over the rate; `Err(false)`: over the concurrency. Counts only admitted requests'
/// concurrency (the guard is dropped on refusal).
fn check<K: std::hash::Hash + ?Sized>(
    rate: &Rate,
    open: &Inflight,
    limit: &RateLimit,
    key: &K,
) -> Result<Option<Guard>, bool> {
    if limit.requests_per_second > 0 {
        // `observe` returns the count in the current one-second window, this request included.
        let seen = rate.observe(&key, 1);
        if seen > limit.requests_per_second as isize {
            return Err(true);
        }
    }
    if limit.max_concurrent > 0 {
        let (guard, now_open) = open.incr(key, 1);
        if now_open > limit.max_concurrent as isize {
            return Err(false);
        }
        return Ok(Some(guard));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(per_uid: RateLimit) -> LimitsConfig {
        LimitsConfig {
            per_uid,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn header_size_is_capped() {
        let l = Limiter::default();
        let c = LimitsConfig::default();
        let mut s = Slots::default();
        assert!(l.admit_client(&c, c.max_header_bytes, None, &mut s).is_ok());
        assert_eq!(
            l.admit_client(&c, c.max_header_bytes + 1, None, &mut s),
            Err(Exceeded::HeaderTooLarge)
        );
    }

    #[test]
    fn uid_rate_refuses_past_the_limit_and_others_are_unaffected() {
        let l = Limiter::default();
        let c = cfg(RateLimit {
            requests_per_second: 5,
            max_concurrent: 0,
        });
        let mut refused = 0;
        for _ in 0..20 {
            if l.admit_uid(&c, "alice", false, &mut Slots::default())
                .is_err()
            {
                refused += 1;
            }
        }
        // Twenty at once against 5/s: 15 over. Even if a one-second window boundary splits the
        // burst (k and 20-k), at least 10 are over.
        assert!(refused >= 10, "refused {refused}");
        assert!(l.admit_uid(&c, "bob", false, &mut Slots::default()).is_ok());
    }

    #[test]
    fn concurrency_slots_are_released_on_drop() {
        let l = Limiter::default();
        let c = cfg(RateLimit {
            requests_per_second: 0,
            max_concurrent: 2,
        });
        let mut a = Slots::default();
        let mut b = Slots::default();
        l.admit_uid(&c, "u", false, &mut a).unwrap();
        l.admit_uid(&c, "u", false, &mut b).unwrap();
        assert_eq!(
            l.admit_uid(&c, "u", false, &mut Slots::default()),
            Err(Exceeded::UidConcurrency)
        );
        drop(a);
        assert!(l.admit_uid(&c, "u", false, &mut Slots::default()).is_ok());
    }

    #[test]
    fn tunnel_cap_applies_to_upgrades_only() {
        let l = Arc::new(Limiter::default());
        let c = LimitsConfig {
            max_tunnels: 1,
            ..LimitsConfig::default()
        };
        let slot = l.tunnel_opened();
        assert_eq!(
            l.admit_uid(&c, "u", true, &mut Slots::default()),
            Err(Exceeded::Tunnels)
        );
        assert!(l.admit_uid(&c, "u", false, &mut Slots::default()).is_ok());
        drop(slot);
        assert!(l.admit_uid(&c, "u", true, &mut Slots::default()).is_ok());
        assert_eq!(l.open_tunnels(), 0);
    }
}
