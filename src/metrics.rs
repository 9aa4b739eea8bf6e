//! Prometheus metrics, served at `/metrics` on the admin listener.
//!
//! The metric families live in one [`Metrics`] registry for the life of the process (counters
//! count "since start", whatever reloads happen). The request path never formats a label: each
//! configuration [`crate::live::Snapshot`] resolves the label children it needs once, when it is
//! built ([`ConfigStats`]), and a request only bumps atomics through them. Labels are pool,
//! backend, status class, uid source and fixed reasons: bounded by the configuration, never
//! per uid.
//!
//! Events that happen where no [`Metrics`] handle reaches (hook calls, token and callback
//! outcomes, slow request heads) are counted in the process-wide [`counters()`], which every
//! [`Metrics`] registers: they are bumped where they happen and read as they are at a scrape.

use crate::config::UidSource;
use crate::routing::{backend_addr, Router};
use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

/// Status classes counted per backend; index = first digit - 1, and the last is "no response"
/// (the client went away before one was written).
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Why the agent answered a request itself (label of `gopush_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// No uid in the request (430).
    MissingUid = 0,
    /// An unusable uid (400).
    InvalidUid = 1,
    /// Unknown product (404).
    UnknownProduct = 2,
    /// No healthy, non-draining backend (503).
    NoBackend = 3,
    /// A limit (429, 431, 503).
    Limit = 4,
    /// A signed token or the auth callback refused the credentials (430).
    Rejected = 5,
    /// A hook or the auth callback failed (500 / 503, configurable).
    HookFailed = 6,
}

const REFUSAL_LABELS: [&str; 7] = [
    "missing_uid",
    "invalid_uid",
    "unknown_product",
    "no_backend",
    "limit",
    "rejected",
    "hook_failed",
];

/// Every metric family of the process.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    connect_failures: IntCounterVec,
    tunnels: IntGaugeVec,
    active: IntGaugeVec,
    healthy: IntGaugeVec,
    draining: IntGaugeVec,
    duration: HistogramVec,
    uid_lookups: IntCounterVec,
    refused: [IntCounter; 7],
    affinity_hits: IntCounter,
    pushes: IntCounterVec,
    reloads: IntCounterVec,
    config_loaded: IntGauge,
    tls_expiry: IntGaugeVec,
}

/// Counters of events in code that holds no [`Metrics`] (the hook engine, the uid sources, the
/// connection wrapper). Process-wide and created once, so a count survives reloads and is the
/// same whichever [`Metrics`] serves it (tests build several in one process); each [`Metrics`]
/// registers the families, whose clones share their values.
pub struct Counters {
    /// JS hook calls (any hook).
    pub hook_calls: IntCounter,
    /// A hook threw, returned a value of the wrong shape, or could not be loaded on a thread.
    pub hook_errors: IntCounter,
    /// A hook ran past its time budget and was interrupted.
    pub hook_timeouts: IntCounter,
    /// A hook hit the memory or stack limit.
    pub hook_memory: IntCounter,
    /// A signed token was present but refused (bad signature, expired, wrong algorithm, ...).
    pub jwt_rejected: IntCounter,
    /// The auth callback answered 401/403.
    pub callback_rejected: IntCounter,
    /// The auth callback timed out, was unreachable or answered something unusable.
    pub callback_errors: IntCounter,
    /// Auth callback answers served from the cache.
    pub callback_cache_hits: IntCounter,
    /// Auth callback requests actually sent.
    pub callback_requests: IntCounter,
    /// Connections closed because their request head was not complete within
    /// `limits.header_timeout`.
    pub header_timeouts: IntCounter,
    /// ACME orders that ended with a certificate.
    pub acme_orders_ok: IntCounter,
    /// ACME orders (or account registrations) that failed.
    pub acme_orders_error: IntCounter,
    /// notAfter of each ACME certificate in use (Unix seconds), by its first domain.
    pub acme_expiry: IntGaugeVec,
    acme_orders: IntCounterVec,
    /// TLS handshakes that failed (bad or unknown client hello, no certificate for the name).
    pub tls_handshake_errors: IntCounter,
    /// TLS handshakes not complete within `tls.handshake_timeout`.
    pub tls_handshake_timeouts: IntCounter,
    tls_handshakes: IntCounterVec,
    /// Directory writes dropped because the queue was full (Redis slow or down).
    pub cluster_dropped: IntCounter,
    /// Failed directory rounds (connect, write or heartbeat).
    pub cluster_errors: IntCounter,
    /// Agents alive in the directory, as of the last heartbeat.
    pub cluster_agents: IntGauge,
    /// Connections of live agents, as of the last heartbeat.
    pub cluster_connections: IntGauge,
    /// Uids with connections, as of the last heartbeat.
    pub cluster_users: IntGauge,
    /// This agent's connections in its directory table.
    pub cluster_local: IntGauge,
    /// 1 while this agent's part of the directory is not known to be in Redis.
    pub cluster_stale: IntGauge,
    cluster_sid_lookups: IntCounterVec,
    connections_closed: IntCounterVec,
    /// Webhook deliveries dropped (oldest first) because a receiver's queue was full.
    pub webhook_dropped: IntCounter,
    /// Webhook deliveries the receiver accepted (2xx).
    pub webhook_sent: IntCounter,
    /// Failed webhook attempts (each is retried).
    pub webhook_errors: IntCounter,
    hooks: IntCounterVec,
    uid_auth: IntCounterVec,
}

impl Counters {
    fn new() -> Self {
        let hooks = IntCounterVec::new(
            Opts::new(
                "gopush_hooks_total",
                "JavaScript hook calls (result=call) and their failures (error, timeout, memory).",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| panic!("metric gopush_hooks_total: {e}"));
        let uid_auth = IntCounterVec::new(
            Opts::new(
                "gopush_uid_auth_total",
                "Signed-token and auth-callback uid sources: rejections, callback errors, requests and cache hits.",
            ),
            &["event"],
        )
        .unwrap_or_else(|e| panic!("metric gopush_uid_auth_total: {e}"));
        let acme_orders = IntCounterVec::new(
            Opts::new(
                "gopush_acme_orders_total",
                "ACME certificate orders by result (ok, error); a stored certificate reused is no order.",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| panic!("metric gopush_acme_orders_total: {e}"));
        let acme_expiry = IntGaugeVec::new(
            Opts::new(
                "gopush_acme_certificate_expiry_seconds",
                "notAfter (Unix seconds) of the ACME certificate in use, by its first domain.",
            ),
            &["name"],
        )
        .unwrap_or_else(|e| panic!("metric gopush_acme_certificate_expiry_seconds: {e}"));
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "gopush_tls_handshake_failures_total",
                "TLS handshakes that failed (error: bad hello, plain HTTP, unknown name without tls.default) or timed out (tls.handshake_timeout).",
            ),
            &["reason"],
        )
        .unwrap_or_else(|e| panic!("metric gopush_tls_handshake_failures_total: {e}"));
        // Every child is created here, so each is exported (at 0) before its first event.
        let hook = |l: &str| hooks.with_label_values(&[l]);
        let auth = |l: &str| uid_auth.with_label_values(&[l]);
        Counters {
            hook_calls: hook("call"),
            hook_errors: hook("error"),
            hook_timeouts: hook("timeout"),
            hook_memory: hook("memory"),
            jwt_rejected: auth("jwt_rejected"),
            callback_rejected: auth("callback_rejected"),
            callback_errors: auth("callback_error"),
            callback_requests: auth("callback_request"),
            callback_cache_hits: auth("callback_cache_hit"),
            header_timeouts: IntCounter::new(
                "gopush_header_timeouts_total",
                "Connections closed because their request head was not complete within limits.header_timeout (slow clients, slowloris).",
            )
            .unwrap_or_else(|e| panic!("metric gopush_header_timeouts_total: {e}")),
            acme_orders_ok: acme_orders.with_label_values(&["ok"]),
            acme_orders_error: acme_orders.with_label_values(&["error"]),
            acme_orders,
            acme_expiry,
            tls_handshake_errors: tls_handshakes.with_label_values(&["error"]),
            tls_handshake_timeouts: tls_handshakes.with_label_values(&["timeout"]),
            tls_handshakes,
            cluster_dropped: plain_counter(
                "gopush_cluster_queue_dropped_total",
                "Directory writes dropped (oldest first) because the queue was full; the agent re-publishes its state afterwards.",
            ),
            webhook_dropped: plain_counter(
                "gopush_webhook_dropped_total",
                "Webhook deliveries dropped (oldest first) because a receiver's queue was full.",
            ),
            webhook_sent: plain_counter(
                "gopush_webhook_sent_total",
                "Webhook deliveries accepted by the receiver (2xx).",
            ),
            webhook_errors: plain_counter(
                "gopush_webhook_errors_total",
                "Failed webhook attempts (each is retried with backoff).",
            ),
            cluster_errors: plain_counter(
                "gopush_cluster_redis_errors_total",
                "Directory rounds that failed (Redis unreachable, slow or refusing).",
            ),
            cluster_agents: plain_gauge("gopush_cluster_agents", "Agents alive in the cluster directory (as of the last heartbeat)."),
            cluster_connections: plain_gauge("gopush_cluster_connections", "Connections (WebSocket tunnels and polling sessions) of all live agents (as of the last heartbeat)."),
            cluster_users: plain_gauge("gopush_cluster_users", "Uids with at least one connection in the cluster (as of the last heartbeat)."),
            cluster_local: plain_gauge("gopush_cluster_local_connections", "This agent's connections in the directory."),
            cluster_stale: plain_gauge("gopush_cluster_stale", "1 while this agent's part of the directory is not known to be in Redis, else 0."),
            cluster_sid_lookups: IntCounterVec::new(
                Opts::new(
                    "gopush_cluster_sid_lookups_total",
                    "Shared sid memory lookups on the request path (a sid this agent did not know), by result.",
                ),
                &["result"],
            )
            .unwrap_or_else(|e| panic!("metric gopush_cluster_sid_lookups_total: {e}")),
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "gopush_connections_closed_total",
                    "Connections this agent closed on purpose (limits.per_uid.on_exceed: close_oldest, or an admin's DELETE /api/connections), by reason.",
                ),
                &["reason"],
            )
            .unwrap_or_else(|e| panic!("metric gopush_connections_closed_total: {e}")),
            hooks,
            uid_auth,
        }
    }

    /// Counts a shared sid memory lookup (`hit`, `miss`, `error`, `unavailable`).
    pub fn cluster_sid_lookup(&self, result: &str) {
        self.cluster_sid_lookups.with_label_values(&[result]).inc();
    }

    /// Counts a connection this agent closed on purpose.
    pub fn connection_closed(&self, reason: crate::kick::Reason) {
        self.connections_closed
            .with_label_values(&[reason.label()])
            .inc();
    }
}

fn plain_counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn plain_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(Counters::new);

/// The process-wide event counters.
pub fn counters() -> &'static Counters {
    &COUNTERS
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    // Names are constants of this module and registered once: a clash is a programming error
    // that the unit tests catch, so it is only logged here.
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::error!("metrics: cannot register a collector: {e}");
    }
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // Opts built from constants never fail validation (checked by the unit tests).
    let v = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
        panic!("metric {name}: {e}");
    });
    register(r, v)
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    register(r, c)
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
        panic!("metric {name}: {e}");
    });
    register(r, v)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let r = Registry::new();
        let pb = ["pool", "backend"];
        let requests = counter_vec(
            &r,
            "gopush_requests_total",
            "Proxied requests by pool, backend and response status class (a WebSocket counts once, by its 101).",
            &["pool", "backend", "class"],
        );
        let connect_failures = counter_vec(
            &r,
            "gopush_upstream_connect_failures_total",
            "Connections to a backend that were refused or timed out.",
            &pb,
        );
        let tunnels = gauge_vec(
            &r,
            "gopush_open_tunnels",
            "Open WebSocket tunnels by pool and backend.",
            &pb,
        );
        let active = gauge_vec(
            &r,
            "gopush_active_requests",
            "HTTP requests in flight (long-polls included, tunnels excluded) by pool and backend.",
            &pb,
        );
        let healthy = gauge_vec(
            &r,
            "gopush_backend_healthy",
            "1 if the backend passes its health check, else 0.",
            &pb,
        );
        let draining = gauge_vec(
            &r,
            "gopush_backend_draining",
            "1 if the backend is draining (no new sessions), else 0.",
            &pb,
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "gopush_request_duration_seconds",
                "Time from request head to the end of the response, by pool (tunnels excluded; long-polls included).",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["pool"],
        )
        .unwrap_or_else(|e| panic!("metric gopush_request_duration_seconds: {e}"));
        let duration = register(&r, duration);
        let uid_lookups = counter_vec(
            &r,
            "gopush_uid_lookups_total",
            "Uid sources tried: hit (this source gave the uid) or miss (it gave none).",
            &["source", "result"],
        );
        let refused_vec = counter_vec(
            &r,
            "gopush_refused_total",
            "Requests the agent answered itself, by reason.",
            &["reason"],
        );
        let refused = REFUSAL_LABELS.map(|l| refused_vec.with_label_values(&[l]));
        let affinity_hits = counter(
            &r,
            "gopush_affinity_hits_total",
            "Requests routed by the sid memory (a live session kept on its backend).",
        );
        let pushes = counter_vec(
            &r,
            "gopush_pushes_total",
            "Admin API pushes and disconnects published to Redis, by kind and result.",
            &["kind", "result"],
        );
        let reloads = counter_vec(
            &r,
            "gopush_config_reloads_total",
            "Configuration reloads by result.",
            &["result"],
        );
        let config_loaded = register(
            &r,
            IntGauge::new(
                "gopush_config_loaded_timestamp_seconds",
                "Unix time the running configuration was loaded.",
            )
            .unwrap_or_else(|e| panic!("metric gopush_config_loaded_timestamp_seconds: {e}")),
        );
        let tls_expiry = gauge_vec(
            &r,
            "gopush_tls_certificate_expiry_seconds",
            "Unix time of the notAfter of each certificate a TLS listener serves, by listener, certificate file and name.",
            &["listen", "file", "name"],
        );
        let c = counters();
        register(&r, c.tls_handshakes.clone());
        register(&r, c.hooks.clone());
        register(&r, c.uid_auth.clone());
        register(&r, c.header_timeouts.clone());
        register(&r, c.acme_orders.clone());
        register(&r, c.acme_expiry.clone());
        Metrics {
            registry: r,
            requests,
            connect_failures,
            tunnels,
            active,
            healthy,
            draining,
            duration,
            uid_lookups,
            refused,
            affinity_hits,
            pushes,
            reloads,
            config_loaded,
            tls_expiry,
        }
    }

    /// Exports the certificates the TLS listeners serve now (replacing what was exported).
    pub fn set_certificates(&self, listeners: &crate::tls::Listeners) {
        self.tls_expiry.reset();
        for l in listeners.tls() {
            let listen = l.addr.to_string();
            for cert in &l.resolver.table().certs {
                let file = cert.cert_file.display().to_string();
                for name in &cert.names {
                    self.tls_expiry
                        .with_label_values(&[listen.as_str(), file.as_str(), name.as_str()])
                        .set(cert.not_after);
                }
            }
        }
    }

    /// Exports the cluster directory's families (only when `cluster` is enabled, so that
    /// without it `/metrics` stays as it was).
    pub fn register_cluster(&self) {
        let c = counters();
        let r = &self.registry;
        register(r, c.cluster_dropped.clone());
        register(r, c.webhook_dropped.clone());
        register(r, c.webhook_sent.clone());
        register(r, c.webhook_errors.clone());
        register(r, c.cluster_errors.clone());
        register(r, c.cluster_agents.clone());
        register(r, c.cluster_connections.clone());
        register(r, c.cluster_users.clone());
        register(r, c.cluster_local.clone());
        register(r, c.cluster_stale.clone());
        register(r, c.cluster_sid_lookups.clone());
        for l in ["hit", "miss", "error", "unavailable"] {
            c.cluster_sid_lookups.with_label_values(&[l]);
        }
        register(r, c.connections_closed.clone());
        for l in ["close_oldest", "admin"] {
            c.connections_closed.with_label_values(&[l]);
        }
        c.cluster_stale.set(1);
    }

    /// Counts a request the agent refused.
    pub fn refused(&self, kind: RefusalKind) {
        self.refused[kind as usize].inc();
    }

    /// Counts a request routed by the sid memory.
    pub fn affinity_hit(&self) {
        self.affinity_hits.inc();
    }

    /// Counts a push or disconnect (`kind`: uid/room/all/disconnect; `result`: ok/bad/unavailable).
    pub fn push(&self, kind: &str, result: &str) {
        self.pushes.with_label_values(&[kind, result]).inc();
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Records when the running configuration was loaded.
    pub fn set_loaded_at(&self, unix_seconds: i64) {
        self.config_loaded.set(unix_seconds);
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(out)
    }

    /// The label children one configuration needs (see the module docs).
    pub fn resolve(self: &Arc<Self>, router: &Router, sources: &[UidSource]) -> ConfigStats {
        let pools = router
            .pools()
            .map(|pool| {
                let stats = PoolStats {
                    name: pool.name().into(),
                    duration: self.duration.with_label_values(&[pool.name()]),
                    backends: ArcSwap::from_pointee(Vec::new()),
                    metrics: self.clone(),
                };
                for addr in pool.backends().iter().filter_map(backend_addr) {
                    stats.get_or_resolve(addr);
                }
                stats
            })
            .collect();
        let label = |s: &UidSource| match s {
            UidSource::Cookie(n) => format!("cookie:{n}"),
            UidSource::Query(n) => format!("query:{n}"),
            UidSource::Header(n) => format!("header:{n}"),
            UidSource::Jwt(_) => "jwt".to_string(),
            UidSource::Callback(_) => "callback".to_string(),
        };
        let uid_hits = sources
            .iter()
            .map(|s| self.uid_lookups.with_label_values(&[&label(s), "hit"]))
            .collect();
        let uid_misses = sources
            .iter()
            .map(|s| self.uid_lookups.with_label_values(&[&label(s), "miss"]))
            .collect();
        ConfigStats {
            pools,
            uid_hits,
            uid_misses,
        }
    }

    fn backend_stats(&self, pool: &str, addr: SocketAddr) -> BackendStats {
        let a = addr.to_string();
        let l = [pool, a.as_str()];
        BackendStats {
            addr,
            requests: STATUS_CLASSES.map(|c| self.requests.with_label_values(&[pool, &a, c])),
            connect_failures: self.connect_failures.with_label_values(&l),
            tunnels: self.tunnels.with_label_values(&l),
            active: self.active.with_label_values(&l),
            healthy: self.healthy.with_label_values(&l),
            draining: self.draining.with_label_values(&l),
        }
    }
}

/// Label children of one backend in one pool.
pub struct BackendStats {
    /// The backend.
    pub addr: SocketAddr,
    /// By [`STATUS_CLASSES`].
    pub requests: [IntCounter; 6],
    /// Refused or timed-out connects.
    pub connect_failures: IntCounter,
    /// Open tunnels.
    pub tunnels: IntGauge,
    /// Requests in flight.
    pub active: IntGauge,
    /// Health (set when metrics or status are read).
    pub healthy: IntGauge,
    /// Draining (set when metrics or status are read).
    pub draining: IntGauge,
}

impl BackendStats {
    /// Counts a finished request by its status (0: no response written).
    pub fn count_status(&self, status: u16) {
        let class = match status {
            100..=599 => usize::from(status / 100) - 1,
            _ => STATUS_CLASSES.len() - 1,
        };
        self.requests[class].inc();
    }

    /// Requests since start, all classes.
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().map(IntCounter::get).sum()
    }

    /// Requests since start that ended in a 5xx (including the agent's own 502 for a failed
    /// upstream) or without any response.
    pub fn errors_total(&self) -> u64 {
        self.requests[4].get() + self.requests[5].get()
    }
}

/// Label children of one pool.
pub struct PoolStats {
    name: Box<str>,
    /// Request durations of the pool.
    pub duration: Histogram,
    /// Per backend; append-only, so that a pool whose membership changes at run time (DNS or
    /// file discovery) gets its new backends' children once, and a backend that left keeps
    /// counting its live sessions down.
    backends: ArcSwap<Vec<Arc<BackendStats>>>,
    metrics: Arc<Metrics>,
}

impl PoolStats {
    /// The children of `addr`, if already resolved (pools are small: a linear scan beats
    /// hashing).
    pub fn get(&self, addr: &SocketAddr) -> Option<Arc<BackendStats>> {
        self.backends
            .load()
            .iter()
            .find(|b| b.addr == *addr)
            .cloned()
    }

    /// The children of `addr`, resolving them on first sight (a backend that discovery added
    /// after the snapshot was built; the discovery loop resolves them as it finds them, so the
    /// request path rarely gets here).
    pub fn get_or_resolve(&self, addr: SocketAddr) -> Arc<BackendStats> {
        if let Some(found) = self.get(&addr) {
            return found;
        }
        let fresh = Arc::new(self.metrics.backend_stats(&self.name, addr));
        let mut result = fresh.clone();
        self.backends.rcu(|old| {
            let mut next = Vec::clone(old);
            match next.iter().find(|b| b.addr == addr) {
                // Someone else appended it meanwhile: the same underlying metrics either way.
                Some(existing) => result = existing.clone(),
                None => {
                    result = fresh.clone();
                    next.push(fresh.clone());
                }
            }
            next
        });
        result
    }
}

/// Label children of one configuration (one [`crate::live::Snapshot`]).
pub struct ConfigStats {
    /// By pool index of the snapshot's router.
    pub pools: Vec<PoolStats>,
    uid_hits: Vec<IntCounter>,
    uid_misses: Vec<IntCounter>,
}

impl ConfigStats {
    /// The uid came from source `index`; the ones before it had nothing.
    pub fn uid_found(&self, index: usize) {
        if let Some(hit) = self.uid_hits.get(index) {
            hit.inc();
        }
        for miss in self.uid_misses.iter().take(index) {
            miss.inc();
        }
    }

    /// No source had a uid.
    pub fn uid_missing(&self) {
        for miss in &self.uid_misses {
            miss.inc();
        }
    }

    /// Resolves the children of every backend the router's pools have now (after discovery).
    pub fn sync(&self, router: &Router) {
        for (pool, stats) in router.pools().zip(&self.pools) {
            for addr in pool.backends().iter().filter_map(backend_addr) {
                stats.get_or_resolve(addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn families_register_and_encode() {
        let m = Arc::new(Metrics::new());
        let config = Config::from_str_named(
            "pools:\n  default:\n    backends: [\"127.0.0.1:4000\", \"127.0.0.1:4001\"]\n",
            Path::new("x.yaml"),
        )
        .unwrap();
        let router = Router::offline(&config).unwrap();
        let stats = m.resolve(&router, &config.uid.sources);
        let b1: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let s1 = stats.pools[0].get(&b1).unwrap();
        s1.count_status(204);
        s1.count_status(0);
        stats.uid_found(1);
        m.refused(RefusalKind::MissingUid);
        let text = String::from_utf8(m.encode().unwrap()).unwrap();
        assert!(
            text.contains(
                r#"gopush_requests_total{backend="127.0.0.1:4001",class="2xx",pool="default"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"class="none""#), "{text}");
        assert!(text.contains(r#"gopush_uid_lookups_total{result="hit",source="query:uid"} 1"#));
        assert!(text.contains(r#"gopush_uid_lookups_total{result="miss",source="cookie:uid"} 1"#));
        assert!(text.contains(r#"gopush_refused_total{reason="missing_uid"} 1"#));
        assert_eq!(s1.requests_total(), 2);
        assert_eq!(s1.errors_total(), 1);
        // A backend discovered later is resolved on first sight, once.
        let late: SocketAddr = "127.0.0.1:4999".parse().unwrap();
        assert!(stats.pools[0].get(&late).is_none());
        let l1 = stats.pools[0].get_or_resolve(late);
        let l2 = stats.pools[0].get_or_resolve(late);
        assert!(Arc::ptr_eq(&l1, &l2));
    }

    #[test]
    fn process_counters_are_exported_by_every_registry() {
        let (m1, m2) = (Metrics::new(), Metrics::new());
        let scrape = |m: &Metrics| String::from_utf8(m.encode().unwrap()).unwrap();
        let text = scrape(&m1);
        for line in [
            r#"gopush_hooks_total{result="call"}"#,
            r#"gopush_hooks_total{result="error"}"#,
            r#"gopush_hooks_total{result="timeout"}"#,
            r#"gopush_hooks_total{result="memory"}"#,
            r#"gopush_uid_auth_total{event="jwt_rejected"}"#,
            r#"gopush_uid_auth_total{event="callback_rejected"}"#,
            r#"gopush_uid_auth_total{event="callback_error"}"#,
            r#"gopush_uid_auth_total{event="callback_request"}"#,
            r#"gopush_uid_auth_total{event="callback_cache_hit"}"#,
            "gopush_header_timeouts_total ",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // Bumped once, at the event; both registries read the same value (other tests of this
        // process may bump it too, so only "at least").
        counters().header_timeouts.inc();
        let now = counters().header_timeouts.get();
        assert!(now >= 1);
        for m in [&m1, &m2] {
            let text = scrape(m);
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix("gopush_header_timeouts_total "))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap();
            assert!(value >= now, "{value} < {now}");
        }
    }

    #[test]
    fn a_second_snapshot_shares_the_counters() {
        let m = Arc::new(Metrics::new());
        let config = Config::from_str_named(
            "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\n",
            Path::new("x.yaml"),
        )
        .unwrap();
        let router = Router::offline(&config).unwrap();
        let a = m.resolve(&router, &config.uid.sources);
        let b = m.resolve(&router, &config.uid.sources);
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        a.pools[0].get(&addr).unwrap().tunnels.inc();
        b.pools[0].get(&addr).unwrap().tunnels.dec();
        assert_eq!(a.pools[0].get(&addr).unwrap().tunnels.get(), 0);
    }
}
