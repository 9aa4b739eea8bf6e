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
    /// The uid holds `limits.per_uid.max_connections` connections in the cluster.
    UidConnections,
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
            Exceeded::UidConnections => (
                429,
                "Too Many Requests",
                "gopush: too many connections for this uid (limits.per_uid.max_connections)\n",
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

/// Held for the life of a request (or tunnel): releases its concurrency slots, and an upgrade's
/// tunnel slot, when dropped.
#[derive(Default)]
pub struct Slots {
    _ip: Option<Guard>,
    _uid: Option<Guard>,
    /// An upgrade's place under `limits.max_tunnels`, taken at admission: first a reservation
    /// while the backend is asked, then the open tunnel itself after the 101.
    tunnel: Option<TunnelSlot>,
}

impl Slots {
    /// The backend answered an upgrade with `status`: a final answer other than 101 refuses the
    /// upgrade, so its tunnel slot is released at once (informational answers decide nothing).
    /// Without a tunnel slot (not an upgrade), nothing happens.
    pub fn upgrade_answered(&mut self, status: u16) {
        if status != 101 && status >= 200 {
            self.tunnel = None;
        }
    }

    /// Holds a tunnel slot (an upgrade admitted and not refused).
    #[cfg(test)]
    pub fn holds_tunnel(&self) -> bool {
        self.tunnel.is_some()
    }
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

    /// Checks the per-uid limits; counts this request. For an upgrade, also takes a tunnel slot
    /// under `limits.max_tunnels` (compare-and-increment, so the cap holds however many upgrades
    /// arrive at once) and keeps it in `slots`: it stays taken while the backend is asked and,
    /// after a 101, for the life of the tunnel; it is released when `slots` is dropped (connect
    /// failure, client gone, request over) or the upgrade is refused
    /// ([`Slots::upgrade_answered`]).
    pub fn admit_uid(
        self: &Arc<Self>,
        cfg: &LimitsConfig,
        uid: &str,
        upgrade: bool,
        slots: &mut Slots,
    ) -> Result<(), Exceeded> {
        // Taken first (a refused upgrade does not count against the uid); released on drop if
        // the uid limits refuse the request.
        let tunnel = if upgrade {
            Some(self.reserve_tunnel(cfg.max_tunnels)?)
        } else {
            None
        };
        let per_uid = cfg.per_uid.rate();
        slots._uid = check(&self.uid_rate, &self.uid_open, &per_uid, uid).map_err(|rate| {
            if rate {
                Exceeded::UidRate
            } else {
                Exceeded::UidConcurrency
            }
        })?;
        if tunnel.is_some() {
            slots.tunnel = tunnel;
        }
        Ok(())
    }

    fn reserve_tunnel(self: &Arc<Self>, max: usize) -> Result<TunnelSlot, Exceeded> {
        self.tunnels
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Exceeded::Tunnels)?;
        Ok(TunnelSlot(self.clone()))
    }

    /// Tunnel slots taken now: upgrades admitted and waiting for the backend's answer, plus open
    /// tunnels. This is what `limits.max_tunnels` caps. (Tunnels that are open exactly, after
    /// their 101, are the per-backend `gopush_open_tunnels` gauge.)
    #[cfg(test)]
    pub fn tunnel_slots(&self) -> usize {
        self.tunnels.load(Ordering::Relaxed)
    }
}

/// One place under `limits.max_tunnels` while it lives.
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
            per_uid: crate::config::UidLimit {
                requests_per_second: per_uid.requests_per_second,
                max_concurrent: per_uid.max_concurrent,
                ..Default::default()
            },
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
        let l = Arc::new(Limiter::default());
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
        let l = Arc::new(Limiter::default());
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
        let mut tunnel = Slots::default();
        l.admit_uid(&c, "u", true, &mut tunnel).unwrap();
        assert!(tunnel.holds_tunnel());
        tunnel.upgrade_answered(101);
        assert!(
            tunnel.holds_tunnel(),
            "the reservation is the open tunnel's slot"
        );
        assert_eq!(
            l.admit_uid(&c, "u", true, &mut Slots::default()),
            Err(Exceeded::Tunnels)
        );
        assert!(l.admit_uid(&c, "u", false, &mut Slots::default()).is_ok());
        drop(tunnel);
        assert!(l.admit_uid(&c, "u", true, &mut Slots::default()).is_ok());
        assert_eq!(l.tunnel_slots(), 0);
    }

    #[test]
    fn refused_upgrade_releases_its_tunnel_slot() {
        let l = Arc::new(Limiter::default());
        let c = LimitsConfig {
            max_tunnels: 1,
            ..LimitsConfig::default()
        };
        let mut a = Slots::default();
        l.admit_uid(&c, "u", true, &mut a).unwrap();
        a.upgrade_answered(100); // informational: still waiting
        assert_eq!(l.tunnel_slots(), 1);
        a.upgrade_answered(403);
        assert!(!a.holds_tunnel());
        assert_eq!(l.tunnel_slots(), 0);
        let mut b = Slots::default();
        assert!(l.admit_uid(&c, "u", true, &mut b).is_ok());
        assert_eq!(l.tunnel_slots(), 1);
    }

    #[test]
    fn refused_by_uid_limits_releases_the_reservation() {
        let l = Arc::new(Limiter::default());
        let c = LimitsConfig {
            max_tunnels: 1,
            per_uid: crate::config::UidLimit {
                requests_per_second: 0,
                max_concurrent: 1,
                ..Default::default()
            },
            ..LimitsConfig::default()
        };
        let mut held = Slots::default();
        l.admit_uid(&c, "busy", false, &mut held).unwrap();
        assert_eq!(
            l.admit_uid(&c, "busy", true, &mut Slots::default()),
            Err(Exceeded::UidConcurrency)
        );
        assert_eq!(l.tunnel_slots(), 0);
    }

    /// Issue 11 item 3: the cap was checked at admission but counted only at the 101, so a burst
    /// of upgrades admitted before any 101 went through. Many threads admit upgrades at once and
    /// hold what they got: exactly `max_tunnels` are admitted.
    #[test]
    fn tunnel_cap_holds_under_concurrent_admissions() {
        const THREADS: usize = 16;
        const PER_THREAD: usize = 50;
        let l = Arc::new(Limiter::default());
        let c = Arc::new(LimitsConfig {
            max_tunnels: 2,
            ..LimitsConfig::default()
        });
        let start = Arc::new(std::sync::Barrier::new(THREADS));
        let done = Arc::new(std::sync::Barrier::new(THREADS + 1));
        let admitted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (l, c) = (l.clone(), c.clone());
                let (start, done, admitted) = (start.clone(), done.clone(), admitted.clone());
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    start.wait();
                    for i in 0..PER_THREAD {
                        let mut slots = Slots::default();
                        if l.admit_uid(&c, &format!("u{t}-{i}"), true, &mut slots)
                            .is_ok()
                        {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            held.push(slots); // the tunnel stays open until the end
                        }
                    }
                    done.wait();
                    drop(held);
                })
            })
            .collect();
        done.wait();
        let admitted_now = admitted.load(Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            admitted_now, 2,
            "{admitted_now} upgrades admitted against max_tunnels 2"
        );
        assert_eq!(l.tunnel_slots(), 0, "every slot released on drop");
    }
}
