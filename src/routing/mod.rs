//! Routing: product → pool → Ketama ring → healthy backend.
//!
//! Second step of the request path. Each pool is a `pingora-load-balancing` [`Backends`] view
//! (membership, discovery, health from the shared [`HealthRegistry`]) plus a Ketama
//! [`Continuum`] built over its membership, the ring Pingora's `KetamaHashing` builds, a port of
//! nginx's `hash ... consistent` (160 points per weight, CRC32): the same uid bytes and the same
//! literal `IP:port` list give the same backend as nginx, in any number of agents. An unhealthy
//! backend does not rebuild the ring; selection walks past it, so only its own uids move, and
//! they come back when it recovers.
//!
//! There is no `LoadBalancer`: its selector would be a second ring, rebuilt on every membership
//! change and never read. Selection walks the `Continuum` itself rather than calling
//! `LoadBalancer::select_with`: that one allocates a `HashSet` and hashes every candidate two or
//! three times with SipHash on each call (~400 ns per request here); the walk below allocates
//! nothing and hashes once, for the readiness of the one candidate it accepts.

use crate::config::{Config, HealthCheckConfig, HealthCheckKind, PoolConfig, DEFAULT_POOL};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use futures::FutureExt;
use pingora::lb::{health_check, Backend, Backends, HealthRegistry};
use pingora_ketama::{Bucket, Continuum};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many ring points `select` may visit. It counts points, repeats included (160 per backend
/// and weight unit), so this bounds the walk past unhealthy backends; Pingora's examples use 256.
const MAX_RING_STEPS: usize = 256;

/// Backends that take no new sessions (the admin API's drain). Shared by every pool and every
/// configuration snapshot, so a reload keeps it.
///
/// Draining is not unhealthiness: the ring skips a draining backend for new sessions (its uids go
/// to the next backend on the ring), while the sid memory keeps routing live sessions to it as
/// long as it is healthy, and its open tunnels stay.
#[derive(Default)]
pub struct Drain {
    /// Usually empty or a handful: a linear scan of a small vector is the cheapest lookup.
    set: ArcSwap<Vec<SocketAddr>>,
}

impl Drain {
    /// Is `addr` draining? One atomic load, and nothing more while no backend drains.
    pub fn contains(&self, addr: &SocketAddr) -> bool {
        let set = self.set.load();
        !set.is_empty() && set.contains(addr)
    }

    /// Is this backend draining?
    pub fn contains_backend(&self, backend: &Backend) -> bool {
        backend_addr(backend).is_some_and(|a| self.contains(&a))
    }

    /// Starts (`true`) or ends draining `addr`; returns whether anything changed.
    pub fn set(&self, addr: SocketAddr, draining: bool) -> bool {
        let mut changed = false;
        self.set.rcu(|old| {
            let mut next = Vec::clone(old);
            changed = if draining {
                !next.contains(&addr) && {
                    next.push(addr);
                    true
                }
            } else {
                let before = next.len();
                next.retain(|a| *a != addr);
                next.len() != before
            };
            next
        });
        changed
    }

    /// Forgets backends that are no longer configured (after a reload): a backend removed and
    /// added back later starts undrained.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.set
            .rcu(|old| old.iter().copied().filter(|a| keep(a)).collect::<Vec<_>>());
    }

    /// The draining backends.
    pub fn list(&self) -> Vec<SocketAddr> {
        Vec::clone(&self.set.load())
    }
}

/// A pool's Ketama ring and the backends on it (rebuilt when the membership changes).
struct Ring {
    continuum: Continuum,
    /// The ring's backends by address. Pools are small (a handful to a few dozen backends), so
    /// a linear scan beats hashing.
    backends: Vec<(SocketAddr, Backend)>,
}

impl Ring {
    /// The ring of `backends`, built exactly as Pingora's `KetamaHashing` builds its own (same
    /// buckets in the same order), so both agree on every key.
    fn new(backends: &BTreeSet<Backend>) -> Self {
        let members: Vec<(SocketAddr, Backend)> = backends
            .iter()
            .filter_map(|b| backend_addr(b).map(|a| (a, b.clone())))
            .collect();
        let buckets: Vec<Bucket> = members
            .iter()
            .map(|(a, b)| Bucket::new(*a, b.weight as u32))
            .collect();
        Ring {
            continuum: Continuum::new(&buckets),
            backends: members,
        }
    }

    fn backend(&self, addr: &SocketAddr) -> Option<&Backend> {
        self.backends
            .iter()
            .find_map(|(a, b)| (a == addr).then_some(b))
    }
}

/// One named pool of backends and its ring.
pub struct Pool {
    name: Arc<str>,
    /// Membership (discovery) and readiness (health).
    backends: Backends,
    /// What selection walks; rebuilt when `backends`' membership changes.
    ring: ArcSwap<Ring>,
    /// The admin API's drain set (shared by every pool and snapshot).
    drain: Arc<Drain>,
    /// Membership changes at run time (DNS or file discovery).
    dynamic: bool,
    /// Backends that left the membership through discovery, and when: they are drained, not
    /// cut, so live sessions may still be routed to them.
    retired: std::sync::Mutex<HashMap<SocketAddr, Instant>>,
}

/// How long a backend that left discovery still receives its live sessions.
const RETIRED_FOR: Duration = Duration::from_secs(3600);

impl Pool {
    fn new(
        name: &str,
        config: &PoolConfig,
        health: &Arc<HealthRegistry>,
        drain: &Arc<Drain>,
    ) -> Result<Self, String> {
        let discovery = PoolDiscovery::new(config)?;
        // Views of one shared registry: a backend listed in several pools (or kept across a
        // reload) is probed once and keeps its health state.
        let backends = Backends::new_with_health_registry(Box::new(discovery), health.clone());
        // A static pool is known without I/O: fill its membership now. A dynamic one is filled
        // by `refresh`, which the caller awaits before the pool takes traffic.
        if !config.is_dynamic() {
            let _ = backends.update(|_| {}).now_or_never();
        }
        let ring = ArcSwap::from_pointee(Ring::new(&backends.get_backend()));
        Ok(Pool {
            name: name.into(),
            backends,
            ring,
            drain: drain.clone(),
            dynamic: config.is_dynamic(),
            retired: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Runs discovery again and rebuilds the ring if the membership changed. Backends that left
    /// are remembered as retired (drained); failures keep the previous membership.
    pub async fn refresh(&self) {
        if !self.dynamic {
            return;
        }
        let before = self.backends.get_backend();
        let mut changed = None;
        // The callback runs only on a change, while readiness covers both the old and the new
        // members, so a request walking either ring meanwhile finds its backend ready.
        let updated = self
            .backends
            .update(|after| {
                self.ring.store(Arc::new(Ring::new(&after)));
                changed = Some(after);
            })
            .await;
        if let Err(e) = updated {
            tracing::warn!(pool = %self.name, "discovery failed, keeping the current backends: {e}");
            return;
        }
        let Some(after) = changed else {
            return;
        };
        let addrs = |set: &BTreeSet<Backend>| -> Vec<String> {
            set.iter()
                .filter_map(backend_addr)
                .map(|a| a.to_string())
                .collect()
        };
        tracing::info!(pool = %self.name, backends = ?addrs(&after), "discovery changed the pool");
        if let Ok(mut retired) = self.retired.lock() {
            let now = Instant::now();
            retired.retain(|_, since| now.duration_since(*since) < RETIRED_FOR);
            for b in after.iter() {
                if let Some(a) = backend_addr(b) {
                    retired.remove(&a);
                }
            }
            for b in before.difference(&after) {
                if let Some(a) = backend_addr(b) {
                    tracing::info!(pool = %self.name, backend = %a, "backend left discovery: draining (live sessions stay)");
                    retired.insert(a, now);
                }
            }
        }
    }

    /// Does this pool change membership at run time?
    pub fn is_dynamic(&self) -> bool {
        self.dynamic
    }

    /// May a live session still be routed to `backend`? Current and healthy, or retired by
    /// discovery (drained: its sessions stay until they end).
    pub fn accepts_session(&self, backend: &Backend) -> bool {
        if self.is_ready(backend) {
            return true;
        }
        // Only dynamic pools retire backends; static pools never take this lock.
        self.dynamic
            && backend_addr(backend).is_some_and(|a| {
                self.retired
                    .lock()
                    .map(|r| r.contains_key(&a))
                    .unwrap_or(false)
            })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first healthy, non-draining backend on the ring for `key`, or `None` if there is none.
    pub fn select(&self, key: &[u8]) -> Option<Backend> {
        self.walk(key, |b, ready| ready() && !self.drain.contains_backend(b))
    }

    /// The first backend on the ring for `key`, from its point onwards, that `accept` takes.
    /// `accept` gets the backend and a function answering whether it is ready (healthy and
    /// enabled), so that conditions that need no health lookup are tried first. At most
    /// [`MAX_RING_STEPS`] points are visited, repeats included, as Pingora's own selection does;
    /// a backend already refused is not asked again.
    fn walk(
        &self,
        key: &[u8],
        accept: impl Fn(&Backend, &dyn Fn() -> bool) -> bool,
    ) -> Option<Backend> {
        let ring = self.ring.load();
        let mut idx = ring.continuum.node_idx(key);
        // Refused backends (a ring alternates between few backends: a small array suffices; past
        // its size, a backend may be asked twice, which is only slower).
        let mut refused = [None::<SocketAddr>; 8];
        let mut n_refused = 0;
        for _ in 0..MAX_RING_STEPS {
            let addr = *ring.continuum.get_addr(&mut idx)?;
            if refused[..n_refused].contains(&Some(addr)) {
                continue;
            }
            let Some(backend) = ring.backend(&addr) else {
                continue;
            };
            if accept(backend, &|| self.backends.ready(backend)) {
                return Some(backend.clone());
            }
            if n_refused < refused.len() {
                refused[n_refused] = Some(addr);
                n_refused += 1;
            }
        }
        None
    }

    /// Like [`Pool::select`], skipping `avoid` (a backend that just refused a connection, or the
    /// one whose failover is asked for).
    pub fn select_avoiding(&self, key: &[u8], avoid: &Backend) -> Option<Backend> {
        self.walk(key, |b, ready| {
            b.addr != avoid.addr && !self.drain.contains_backend(b) && ready()
        })
    }

    /// Is `backend` draining?
    pub fn is_draining(&self, backend: &Backend) -> bool {
        self.drain.contains_backend(backend)
    }

    /// The ring's answer ignoring health: where `key` belongs when every backend is up.
    pub fn select_ignoring_health(&self, key: &[u8]) -> Option<Backend> {
        self.walk(key, |_, _| true)
    }

    /// Where `key` goes when `primary` is down (ignoring every other backend's health).
    pub fn failover(&self, key: &[u8], primary: &Backend) -> Option<Backend> {
        self.walk(key, |b, _| b.addr != primary.addr)
    }

    /// Is `backend` a current member of this pool and healthy? Draining does not count here:
    /// live sessions stay on a draining backend (gopush never disables backends in the ring
    /// itself, so Pingora's readiness is health alone).
    pub fn is_ready(&self, backend: &Backend) -> bool {
        self.backends.ready(backend)
    }

    /// The pool's backends, in address order.
    pub fn backends(&self) -> Vec<Backend> {
        self.backends.get_backend().iter().cloned().collect()
    }
}

/// The health registry for a configuration: the probe it describes, shared by every pool.
pub fn health_registry(hc: &HealthCheckConfig) -> Arc<HealthRegistry> {
    let registry = HealthRegistry::new();
    match hc.kind {
        HealthCheckKind::None => {}
        HealthCheckKind::Tcp => {
            let mut check = health_check::TcpHealthCheck::new();
            check.peer_template.options.connection_timeout = Some(hc.timeout);
            check.consecutive_failure = hc.fall.max(1);
            check.consecutive_success = hc.rise.max(1);
            check.health_changed_callback = Some(Box::new(LogHealth));
            registry.set_health_check(check);
        }
        HealthCheckKind::Http => {
            let mut check = health_check::HttpHealthCheck::new(&hc.host, false);
            check.peer_template.options.connection_timeout = Some(hc.timeout);
            check.consecutive_failure = hc.fall.max(1);
            check.consecutive_success = hc.rise.max(1);
            check.peer_template.options.read_timeout = Some(hc.timeout);
            // The path was validated at load time, so building the request cannot fail on it.
            if let Ok(req) = pingora::http::RequestHeader::build("GET", hc.path.as_bytes(), None) {
                check.req = req;
                let _ = check.req.insert_header("Host", hc.host.as_str());
            }
            check.health_changed_callback = Some(Box::new(LogHealth));
            registry.set_health_check(Box::new(check));
        }
    }
    Arc::new(registry)
}

/// Logs health transitions; they are rare and operators need to see them.
struct LogHealth;

#[async_trait]
impl health_check::HealthObserve for LogHealth {
    async fn observe(&self, target: &Backend, healthy: bool) {
        if healthy {
            tracing::info!(backend = %target.addr, "backend is healthy");
        } else {
            tracing::warn!(backend = %target.addr, "backend is unhealthy: its uids move to the next backend on the ring");
        }
    }
}

/// Why a request could not be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The product names no pool.
    UnknownProduct,
    /// Every backend of the pool is down.
    NoHealthyBackend,
}

/// All pools of one configuration, by name.
pub struct Router {
    pools: Vec<Pool>,
    by_name: HashMap<String, usize>,
    default: usize,
}

impl Router {
    /// Builds every pool's ring as views of `health` (probing is the caller's: see
    /// [`crate::live`]); `drain` is the shared set of draining backends. Dynamic pools are empty
    /// until [`Router::refresh`].
    pub fn new(
        config: &Config,
        health: &Arc<HealthRegistry>,
        drain: &Arc<Drain>,
    ) -> Result<Self, String> {
        let pools: Vec<Pool> = config
            .pools
            .iter()
            .map(|(name, p)| {
                Pool::new(name, p, health, drain).map_err(|e| format!("pools.{name}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let by_name: HashMap<String, usize> = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.to_string(), i))
            .collect();
        // Validation guarantees the default pool; 0 only keeps this total.
        let default = by_name.get(DEFAULT_POOL).copied().unwrap_or(0);
        Ok(Router {
            pools,
            by_name,
            default,
        })
    }

    /// Runs discovery of every dynamic pool once.
    pub async fn refresh(&self) {
        for pool in &self.pools {
            pool.refresh().await;
        }
    }

    /// A router whose backends are all considered healthy (offline use: `gopush route`).
    pub fn offline(config: &Config) -> Result<Self, String> {
        Self::new(
            config,
            &Arc::new(HealthRegistry::new()),
            &Arc::new(Drain::default()),
        )
    }

    /// The index of the pool for a product; an absent or empty product means `default`.
    pub fn pool_index(&self, product: Option<&str>) -> Result<usize, RouteError> {
        match product.filter(|p| !p.is_empty()) {
            None => Ok(self.default),
            Some(name) => self
                .by_name
                .get(name)
                .copied()
                .ok_or(RouteError::UnknownProduct),
        }
    }

    /// The pool at `index` (from [`Router::pool_index`] of this router).
    pub fn pool_at(&self, index: usize) -> Option<&Pool> {
        self.pools.get(index)
    }

    /// The pool for a product; an absent or empty product means the `default` pool.
    pub fn pool(&self, product: Option<&str>) -> Result<&Pool, RouteError> {
        let i = self.pool_index(product)?;
        self.pools.get(i).ok_or(RouteError::UnknownProduct)
    }

    /// Pool and backend for `uid` (ring + health).
    pub fn route(&self, product: Option<&str>, uid: &str) -> Result<(&Pool, Backend), RouteError> {
        let pool = self.pool(product)?;
        let backend = pool
            .select(uid.as_bytes())
            .ok_or(RouteError::NoHealthyBackend)?;
        Ok((pool, backend))
    }

    /// Every pool, in name order.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter()
    }

    /// Is `addr` a backend of any pool?
    pub fn has_backend(&self, addr: &SocketAddr) -> bool {
        self.pools
            .iter()
            .any(|p| p.backends().iter().any(|b| backend_addr(b) == Some(*addr)))
    }
}

/// The socket address of a backend, for display.
pub fn backend_addr(b: &Backend) -> Option<SocketAddr> {
    b.addr.as_inet().copied()
}

pub mod discovery;

use discovery::PoolDiscovery;

#[cfg(test)]
mod tests;
