//! The running configuration: an immutable [`Snapshot`] that the request path reads lock-free and
//! that a reload replaces whole.
//!
//! A request takes the current snapshot once (`request_filter`) and keeps it to its end, so a
//! reload never changes the rules under a request in flight; open tunnels and live polling
//! sessions keep their backend (the sid memory in [`crate::affinity`] outlives snapshots).
//! Health state lives in a [`HealthRegistry`] shared by all pools and carried into the next
//! snapshot when the health-check settings did not change, so a reload does not forget which
//! backends are down.

use crate::affinity::Affinity;
use crate::cluster::Directory;
use crate::config::{Config, ConfigError, Startup};
use crate::hooks::{HookKind, HookRequest, Hooks};
use crate::metrics::{ConfigStats, Metrics};
use crate::routing::{health_registry, Drain, Router};
use crate::uid::UidResolver;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::lb::HealthRegistry;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// Everything the request path derives from one configuration.
pub struct Snapshot {
    /// The validated configuration, as the file says. Its restart-only keys may name values
    /// a reload could not apply: read those from [`Snapshot::startup`].
    pub config: Config,
    /// The restart-only settings the process runs with: one value, shared by every snapshot.
    pub startup: Arc<Startup>,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Uid sources.
    pub resolver: UidResolver,
    /// Pools and rings.
    pub router: Router,
    /// Health state of every backend.
    pub health: Arc<HealthRegistry>,
    /// The 430 body names the sources tried; built once per configuration.
    pub missing_uid_body: Bytes,
    /// The JavaScript hooks, if any are configured (`None` costs the request path nothing).
    pub hooks: Option<Hooks>,
    /// Metric label children for this configuration's pools, backends and uid sources.
    pub stats: ConfigStats,
}

impl Snapshot {
    /// Derives everything from a parsed configuration: reads and checks the files it names
    /// (hooks, JWT keys; each worker thread compiles the hooks once for this snapshot's
    /// generation) and builds the rings. `gopush check`, the start and every reload come
    /// through here, so what `check` accepts is what runs.
    fn build(
        config: Config,
        health: Arc<HealthRegistry>,
        shared: &Shared,
    ) -> Result<Self, ConfigError> {
        let invalid = |(key, message): (String, String)| config.invalid(key, message);
        let resolver = UidResolver::build(&config.uid, config.dir()).map_err(invalid)?;
        let hooks = crate::hooks::Program::load(&config.hooks, config.dir())
            .map_err(invalid)?
            .map(|p| Hooks::new(Arc::new(p)));
        let tried = match hooks.as_ref().and_then(|h| h.program().file(HookKind::Uid)) {
            // The file name only: the body goes to clients, the directory is nobody's business.
            Some(f) => format!(
                "the uid hook {}",
                f.path
                    .file_name()
                    .map_or("".into(), |n| n.to_string_lossy())
            ),
            None => resolver.describe_sources().to_string(),
        };
        let missing_uid_body =
            Bytes::from(format!("gopush: no uid in the request (tried {tried})\n"));
        if let Some(acme) = &config.acme {
            // Checked here so that `gopush check` reports an unreadable CA file.
            acme.resolved(config.dir())
                .map_err(|(key, message)| config.invalid(format!("acme.{key}"), message))?;
        }
        let router = Router::new(&config, &health, &shared.drain)
            .map_err(|message| config.invalid("pools", message))?;
        // Dynamic pools are still empty here: their children are added as discovery fills them
        // (`ConfigStats::sync`).
        let stats = shared.metrics.resolve(&router, &config.uid.sources);
        let loaded_at = SystemTime::now();
        shared.metrics.set_loaded_at(unix_seconds(loaded_at));
        Ok(Snapshot {
            router,
            resolver,
            health,
            missing_uid_body,
            hooks,
            stats,
            loaded_at,
            config,
            startup: shared.startup.clone(),
        })
    }

    /// Asks the admin hook whether `req` may use the admin console: `Ok(None)` when no admin
    /// hook is configured (the console applies its own rule), `Err` when the hook failed (deny).
    /// `peer` is the TCP peer; trusted `X-Forwarded-For` is applied as for every hook.
    pub fn admin_allowed(
        &self,
        req: &pingora::http::RequestHeader,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Option<bool>, crate::hooks::HookError> {
        let Some(hooks) = &self.hooks else {
            return Ok(None);
        };
        let query = req.uri.query().unwrap_or("");
        let hook_req = HookRequest {
            header: req,
            ip: crate::client_ip::of_request(&self.config.trusted_proxies, peer, req),
            product: crate::uid::query_value(query, &self.config.product_param),
        };
        hooks.admin(&hook_req)
    }
}

/// Seconds since the Unix epoch (0 for a clock set before it).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// What outlives every snapshot.
struct Shared {
    /// Taken from the first configuration only (see [`Startup`]).
    startup: Arc<Startup>,
    metrics: Arc<Metrics>,
    drain: Arc<Drain>,
    /// Session memory: a reload must not move live sessions (`None`: `affinity.enabled: false`).
    sessions: Option<Affinity>,
    /// The listeners as started; a reload swaps their certificates.
    tls: Arc<crate::tls::Listeners>,
    /// The cluster directory (`None`: no `cluster` section, or disabled).
    directory: Option<Arc<Directory>>,
}

impl Shared {
    /// Fixes the restart-only settings of the first configuration for the process's life.
    fn new(config: &Config) -> Result<Self, (String, String)> {
        let tls = Arc::new(crate::tls::Listeners::new(config)?);
        let metrics = Arc::new(Metrics::new());
        metrics.set_certificates(&tls);
        let startup = Arc::new(Startup::of(config));
        let affinity = &startup.affinity;
        let sessions = affinity
            .enabled
            .then(|| Affinity::new(affinity.max_sessions, affinity.ttl));
        let directory = startup.cluster.as_ref().map(|(cfg, url)| {
            metrics.register_cluster();
            Arc::new(Directory::new(cfg, url, affinity.ttl, &affinity.path))
        });
        Ok(Shared {
            directory,
            startup,
            metrics,
            drain: Arc::new(Drain::default()),
            sessions,
            tls,
        })
    }
}

/// The current snapshot and where to reload it from.
pub struct Live {
    current: ArcSwap<Snapshot>,
    path: Option<PathBuf>,
    reloading: tokio::sync::Mutex<()>,
    shared: Shared,
}

impl Live {
    /// Starts from `config`; `path` is re-read on reload (`None`: reload is refused). Pools with
    /// DNS or file discovery are empty until [`Live::refresh_discovery`] has run once.
    pub fn new(config: Config, path: Option<PathBuf>) -> Result<Self, ConfigError> {
        let health = health_registry(&config.health_check);
        let shared = Shared::new(&config).map_err(|(key, message)| config.invalid(key, message))?;
        Ok(Live {
            current: ArcSwap::from_pointee(Snapshot::build(config, health, &shared)?),
            path,
            reloading: tokio::sync::Mutex::new(()),
            shared,
        })
    }

    /// Runs DNS / file discovery of every dynamic pool once.
    pub async fn refresh_discovery(&self) {
        let snapshot = self.load();
        snapshot.router.refresh().await;
        snapshot.stats.sync(&snapshot.router);
    }

    /// The restart-only settings the process runs with (a reload never changes them).
    pub fn startup(&self) -> &Startup {
        &self.shared.startup
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The sid memory, shared by every snapshot (`None` when disabled).
    pub fn sessions(&self) -> Option<&Affinity> {
        self.shared.sessions.as_ref()
    }

    /// The listeners as started (which are TLS, with their current certificates).
    pub fn listeners(&self) -> &Arc<crate::tls::Listeners> {
        &self.shared.tls
    }

    /// The cluster directory (`None` without a `cluster` section).
    pub fn directory(&self) -> Option<&Arc<Directory>> {
        self.shared.directory.as_ref()
    }

    /// The draining backends (kept across reloads for backends that stay).
    pub fn drain(&self) -> &Drain {
        &self.shared.drain
    }

    /// The current snapshot (one atomic increment; hold it for a whole request).
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The file reloads read.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// Re-reads the file and swaps in the new snapshot. On any error the running snapshot stays
    /// and the error is returned. Settings that need new sockets or a new process ([`Startup`]:
    /// `listen`, `server`, `affinity`, `admin.listen`, `admin.enabled`, `access_log.format`)
    /// stay as they are, with a warning.
    pub async fn reload(&self) -> Result<(), ConfigError> {
        let result = self.reload_inner().await;
        self.shared.metrics.reload(result.is_ok());
        result
    }

    async fn reload_inner(&self) -> Result<(), ConfigError> {
        let _one_at_a_time = self.reloading.lock().await;
        let Some(path) = &self.path else {
            return Err(ConfigError::Invalid {
                file: PathBuf::from("<embedded>"),
                key: String::new(),
                message: "this configuration was not loaded from a file".into(),
            });
        };
        let config = Config::load(path)?;
        let old = self.load();
        let running = &self.shared.startup;
        let ignored = running.changed_keys(&Startup::of(&config));
        let any = |keys: &[&str]| keys.iter().any(|k| ignored.contains(k));
        // The same three lines as ever: operators' alerts and the e2e suite match them.
        if any(&["listen"]) {
            tracing::warn!("reload: `listen` changes need a restart or a graceful upgrade; keeping the old addresses");
        }
        if any(&["server", "affinity"]) {
            tracing::warn!("reload: `server` and `affinity` changes need a restart or a graceful upgrade; keeping the old values");
        }
        if any(&["cluster"]) {
            tracing::warn!("reload: `cluster` changes need a restart or a graceful upgrade; keeping the old values");
        }
        if any(&["admin.listen", "admin.enabled", "access_log.format"]) {
            tracing::warn!("reload: `admin.listen`, `admin.enabled` and `access_log.format` changes need a restart or a graceful upgrade; keeping the old values");
        }
        if running.admin_enabled
            && !running.admin_listen.ip().is_loopback()
            && !config.admin_authenticated()
        {
            // The running listener is not loopback: dropping its token would open it.
            return Err(ConfigError::Invalid {
                file: path.clone(),
                key: "admin.token".into(),
                message: format!(
                    "the running admin listener {} is not a loopback address: it needs a token",
                    running.admin_listen
                ),
            });
        }
        let health = if config.health_check == old.config.health_check {
            old.health.clone()
        } else {
            health_registry(&config.health_check)
        };
        let fresh_health = !Arc::ptr_eq(&health, &old.health);
        let next = Snapshot::build(config, health, &self.shared)?;
        // Dynamic pools are empty until discovered: never swap in a pool without backends.
        next.router.refresh().await;
        next.stats.sync(&next.router);
        if fresh_health {
            // New probes start out "healthy": learn the truth before taking traffic.
            next.health.run_health_check(true).await;
        }
        // Certificates last: everything else is checked, so a failure here still keeps the
        // running configuration whole.
        let missing = self
            .shared
            .tls
            .reload(&next.config)
            .map_err(|(key, message)| ConfigError::Invalid {
                file: path.clone(),
                key,
                message,
            })?;
        for addr in missing {
            tracing::warn!(listen = %addr, "reload: the file has no TLS entry for this running TLS listener; it keeps its certificates");
        }
        self.shared.metrics.set_certificates(&self.shared.tls);
        let pools: Vec<String> = next.router.pools().map(|p| p.name().to_string()).collect();
        // Drain state survives the reload for backends that stay.
        self.shared.drain.retain(|a| next.router.has_backend(a));
        self.current.store(Arc::new(next));
        tracing::info!(file = %path.display(), ?pools, "configuration reloaded");
        Ok(())
    }
}

/// Probes every backend of the current snapshot at its configured interval.
pub struct HealthLoop(pub Arc<Live>);

#[async_trait]
impl BackgroundService for HealthLoop {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let snapshot = self.0.load();
            snapshot.health.run_health_check(true).await;
            let interval = snapshot.config.health_check.interval;
            drop(snapshot);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// Re-runs DNS / file discovery of the dynamic pools at their configured intervals.
pub struct DiscoveryLoop(pub Arc<Live>);

#[async_trait]
impl BackgroundService for DiscoveryLoop {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let snapshot = self.0.load();
            let tick = snapshot
                .config
                .pools
                .values()
                .flat_map(|p| {
                    let dns = p.dns.as_ref().map(|d| d.interval);
                    let file = p.file.as_ref().map(|f| f.interval);
                    dns.into_iter().chain(file)
                })
                .min();
            let Some(tick) = tick else {
                // No dynamic pool now; a reload may add one.
                drop(snapshot);
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            };
            snapshot.router.refresh().await;
            snapshot.stats.sync(&snapshot.router);
            drop(snapshot);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(tick.max(std::time::Duration::from_millis(100))) => {}
            }
        }
    }
}

/// `listen[].tls.watch`: loads certificate files that changed on disk (a renewal written over
/// them by certbot, say) without a reload; files that do not load are reported once and the
/// served certificates stay.
pub struct CertWatch(pub Arc<Live>);

impl CertWatch {
    /// Checks the listeners whose `tls.watch` has passed since their last check (`last`), and
    /// returns how long until one is due again (at most a second: a reload may shorten it).
    fn check_due(
        &self,
        last: &mut HashMap<SocketAddr, tokio::time::Instant>,
        failed: &mut HashMap<SocketAddr, Option<crate::tls::FileStamps>>,
    ) -> std::time::Duration {
        use crate::tls::FilesCheck;
        let now = tokio::time::Instant::now();
        let mut next = std::time::Duration::from_secs(1);
        let listeners = self.0.listeners();
        for listener in listeners.tls() {
            let Some(every) = listener.resolver.table().watch() else {
                continue;
            };
            let since = last.entry(listener.addr).or_insert(now);
            let due = *since + every;
            if due > now {
                next = next.min(due - now);
                continue;
            }
            *since = now;
            next = next.min(every);
            match listeners.check_files(listener, failed.entry(listener.addr).or_default()) {
                FilesCheck::Unchanged => {}
                FilesCheck::Loaded => {
                    self.0.metrics().set_certificates(listeners);
                    tracing::info!(listen = %listener.addr, "certificate files changed on disk: loaded, new handshakes get them");
                }
                FilesCheck::Failed(key, message) => tracing::error!(
                    listen = %listener.addr,
                    "certificate files changed on disk but do not load, the served ones stay: {key}: {message}"
                ),
            }
        }
        next
    }
}

#[async_trait]
impl BackgroundService for CertWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last = HashMap::new();
        let mut failed = HashMap::new();
        loop {
            let next = self.check_due(&mut last, &mut failed);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(next) => {}
            }
        }
    }
}

/// Reloads the configuration on SIGHUP.
pub struct ReloadOnHangup(pub Arc<Live>);

#[async_trait]
impl BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP, reload disabled: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hangup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    if let Err(e) = self.0.reload().await {
                        tracing::error!("reload refused, the running configuration stays: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        let config = Config::from_str_named(
            yaml,
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/x.yaml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let shared = Shared::new(&config).unwrap_or_else(|(k, m)| panic!("{k}: {m}"));
        Snapshot::build(config, Arc::new(HealthRegistry::new()), &shared)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn req(xff: Option<&str>) -> pingora::http::RequestHeader {
        let mut r = pingora::http::RequestHeader::build("GET", b"/admin", None).unwrap();
        if let Some(x) = xff {
            r.append_header("x-forwarded-for", x).unwrap();
        }
        r
    }

    const POOLS: &str = "pools: {default: {backends: [\"127.0.0.1:4000\"]}}\n";

    #[test]
    fn admin_hook_sees_the_client_behind_trusted_proxies_only() {
        // A hook that decides by `req.ip` alone, to see which address it is given. (Not
        // the shipped hooks/admin.js, which checks a secret: an address is not one.)
        let dir = std::env::temp_dir().join(format!("gopush-live-ip-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hook = dir.join("admin.js");
        std::fs::write(
            &hook,
            "module.exports = (req) => req.ip === '127.0.0.1' || req.ip === '::1';\n",
        )
        .unwrap();
        let hooks = format!("hooks: {{admin: \"{}\"}}\n", hook.display());
        let loopback = Some("127.0.0.1".parse().unwrap());
        let s = snapshot(&format!("{POOLS}{hooks}"));
        assert_eq!(s.admin_allowed(&req(None), loopback), Ok(Some(true)));
        // Untrusted peer: its X-Forwarded-For is ignored, the peer is the client.
        assert_eq!(
            s.admin_allowed(&req(Some("203.0.113.5")), loopback),
            Ok(Some(true))
        );
        let s = snapshot(&format!("{POOLS}{hooks}trusted_proxies: [\"127.0.0.1\"]\n"));
        assert_eq!(
            s.admin_allowed(&req(Some("203.0.113.5")), loopback),
            Ok(Some(false))
        );
        assert_eq!(s.admin_allowed(&req(Some("::1")), loopback), Ok(Some(true)));
        // No admin hook: the console decides by itself.
        assert_eq!(
            snapshot(POOLS).admin_allowed(&req(None), loopback),
            Ok(None)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_430_body_names_the_uid_hook_file_not_its_directory() {
        let s = snapshot(&format!("{POOLS}hooks: {{uid: ../hooks/uid.js}}\n"));
        let body = String::from_utf8_lossy(&s.missing_uid_body).to_string();
        assert_eq!(
            body,
            "gopush: no uid in the request (tried the uid hook uid.js)\n"
        );
        assert!(s.hooks.is_some());
        assert!(snapshot(POOLS).hooks.is_none());
    }

    #[tokio::test]
    async fn a_reload_cannot_change_the_startup_settings() {
        let dir = std::env::temp_dir().join(format!("gopush-live-startup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gopush.yaml");
        let pools =
            "pools: {default: {backends: [\"127.0.0.1:4000\"]}}\nhealth_check: {kind: none}\n";
        std::fs::write(&path, pools).unwrap();
        let live = Live::new(Config::load(&path).unwrap(), Some(path.clone())).unwrap();
        let before = live.load();
        std::fs::write(
            &path,
            format!(
                "{pools}listen: \"127.0.0.1:7003\"\naffinity: {{path: /app/}}\nserver: {{threads: 3}}\nadmin: {{listen: \"127.0.0.1:7004\"}}\naccess_log: {{format: json}}\nproduct_param: p\n"
            ),
        )
        .unwrap();
        live.reload().await.unwrap();
        let after = live.load();
        // The runtime key changed; the restart-only ones are the very same value as before.
        assert_eq!(after.config.product_param, "p");
        assert!(Arc::ptr_eq(&before.startup, &after.startup));
        assert_eq!(after.startup.affinity.path, "/socket.io/");
        assert_eq!(*live.startup(), Startup::of(&before.config));
        assert_eq!(
            live.startup().changed_keys(&Startup::of(&after.config)),
            [
                "listen",
                "server",
                "affinity",
                "admin.listen",
                "access_log.format"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
