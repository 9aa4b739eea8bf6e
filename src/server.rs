//! Assembles the Pingora server: the proxy service on the listen addresses, the admin service on
//! its own address, the health-check loop and the SIGHUP reloader, then runs it until a signal
//! ends it.

use crate::admin::AdminApp;
use crate::config::Config;
use crate::handover::HandOver;
use crate::limits::head_deadline::HeadDeadlineApp;
use crate::live::{CertWatch, DiscoveryLoop, HealthLoop, Live, ReloadOnHangup};
use crate::proxy::Agent;
use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::Opt;
use pingora::server::Server;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// How `gopush run` was asked to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunMode {
    /// Run in the background (`-d`).
    pub daemon: bool,
    /// Take the listening sockets over from a running old process (`-u`).
    pub upgrade: bool,
}

/// Every address the agent will listen on can be bound now.
fn check_bindable(config: &Config) -> anyhow::Result<()> {
    let mut addrs: Vec<(String, std::net::SocketAddr)> = config
        .listen
        .addrs()
        .into_iter()
        .enumerate()
        .map(|(i, a)| (format!("listen[{i}]"), a))
        .collect();
    if config.admin.enabled {
        addrs.push(("admin.listen".into(), config.admin.listen));
    }
    for (key, addr) in addrs {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            anyhow::bail!("cannot listen on {addr} ({key}): {e}");
        }
    }
    Ok(())
}

/// Runs the agent; returns only if the server could not be set up.
pub fn run(
    config: &Config,
    config_path: Option<PathBuf>,
    mode: RunMode,
    demo_page: Option<&'static str>,
) -> anyhow::Result<()> {
    let opt = Opt {
        upgrade: mode.upgrade,
        daemon: mode.daemon || config.server.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, config.server.to_pingora());
    // Pingora's bootstrap (which, with `-u`, takes the listening sockets over from the old
    // process) runs as a service the listeners wait for, i.e. after the fork in daemon mode: a
    // daemon's bootstrap is what tells the waiting parent that it is ready
    // (`daemon_wait_for_ready`). Bootstrapped before the fork, the parent would wait for a
    // signal that never comes (600 s).
    let bootstrap = server.bootstrap_as_a_service();

    let live = Arc::new(
        Live::new(config.clone(), config_path)
            .map_err(|e| anyhow::anyhow!("configuration error: {e}"))?,
    );
    if !mode.upgrade {
        // Pingora retries a busy address for ~30 s and then panics that service's thread while
        // the rest of the process runs on (an agent without its admin API, say): refuse to
        // start instead. (An upgrade takes the sockets over from the old process: not checked.)
        check_bindable(config)?;
    }
    if config.pools.values().any(|p| p.is_dynamic()) {
        // Discovered pools must have backends before the first request: resolve them now.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(live.refresh_discovery());
    }
    let handover = Arc::new(HandOver::new(config.server.tunnel_close_spread()));
    let watch = WatchClosing {
        phases: Mutex::new(Some(server.watch_execution_phase())),
        handover: handover.clone(),
    };
    let mut agent = Agent::new(live.clone(), handover);
    if config.server.drivers_per_thread() {
        agent = agent.with_pools_per_thread();
    }
    if let Some(page) = demo_page {
        agent = agent.with_demo_page(page);
    }
    let proxy = pingora::proxy::http_proxy(&server.configuration, agent);
    let limits_of = live.clone();
    let mut proxy =
        HeadDeadlineApp::new(proxy, move || limits_of.load().config.limits.header_timeout)
            .with_listeners(live.listeners().clone());
    // Pingora keeps a 64 KiB read buffer in front of every accepted connection unless told
    // otherwise; see `server.read_buffer_bytes`.
    let l4 = L4BufferSettings::default().read(config.server.read_buffer_bytes);
    if config.server.drivers_per_thread() && config.server.read_buffer_bytes == 0 {
        // One I/O driver per thread: long-lived connections move to their serving thread's
        // driver (`crate::local_tcp`).
        proxy = proxy.with_rehome();
    }
    let mut proxy =
        pingora::services::listening::Service::new("Pingora HTTP Proxy Service".to_string(), proxy);
    // TLS listeners too are plain TCP to Pingora: the handshake is done by the wrapper above
    // (see `crate::tls`), so the graceful upgrade hands their sockets over like any other.
    for addr in config.listen.addrs() {
        proxy.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(l4));
    }
    server.add_service(proxy).add_dependency(&bootstrap);
    if config.admin.enabled {
        let mut admin = pingora::services::listening::Service::new(
            "gopush admin".to_string(),
            AdminApp::new(live.clone()),
        );
        admin.add_tcp(&config.admin.listen.to_string());
        // A few operators and a Prometheus scraper: one thread is plenty, and keeps the
        // proxy's threads for traffic.
        admin.threads = Some(1);
        server.add_service(admin).add_dependency(&bootstrap);
        if !config.admin_authenticated() {
            tracing::warn!(listen = %config.admin.listen, "the admin API has no token (admin.token) and no admin hook: any local process can use it");
        }
    }
    server.add_service(background_service("watch for hand-over", watch));
    server.add_service(background_service(
        "health checks",
        HealthLoop(live.clone()),
    ));
    server.add_service(background_service("discovery", DiscoveryLoop(live.clone())));
    if let Some(dir) = live.directory() {
        // A stopping agent's users get its grace period to reconnect elsewhere before their
        // offline checks (their tunnels close only during it).
        dir.set_hand_over(std::time::Duration::from_secs(
            config.server.grace_period_seconds,
        ));
        server.add_service(background_service(
            "cluster directory",
            crate::cluster::DirectoryService(dir.clone()),
        ));
        server.add_service(background_service(
            "cluster commands",
            crate::cluster::CommandService(dir.clone()),
        ));
    }
    if let Some(acme) = &config.acme {
        let acme = acme
            .resolved(config.dir())
            .map_err(|(key, message)| config.invalid(format!("acme.{key}"), message))?;
        // Every TLS listener serves it for its names, from the files the service just wrote.
        let listeners = live.listeners().clone();
        let publish: crate::acme::Publish = Arc::new(move |acme, _| {
            crate::tls::publish_acme(&listeners, &acme.cert_path(), &acme.key_path());
        });
        server.add_service(background_service(
            "acme",
            crate::acme::AcmeService::new(acme, publish),
        ));
    }
    if live.listeners().tls().next().is_some() {
        server.add_service(background_service(
            "certificate files",
            CertWatch(live.clone()),
        ));
    }
    server.add_service(background_service("reload on SIGHUP", ReloadOnHangup(live)));
    let daemon = mode.daemon || config.server.daemon;
    let reopen = crate::logging::ReopenOnUsr1 {
        path: config
            .server
            .error_log
            .as_ref()
            .filter(|_| daemon)
            .map(Into::into),
    };
    server.add_service(background_service("reopen error log on SIGUSR1", reopen));
    if daemon && config.server.daemon_wait_for_ready {
        early_ready_signal::install()?;
    }
    tracing::info!(listen = ?config.listen.addrs(), tls = ?config.listen.0.iter().filter(|e| e.tls.is_some()).map(|e| e.addr).collect::<Vec<_>>(), admin = %config.admin.listen, admin_enabled = config.admin.enabled, pools = config.pools.len(), "gopush agent starting");
    server.run_forever()
}

/// `run -d` with `daemon_wait_for_ready`: Pingora 0.9.1's waiting parent starts listening for the
/// daemon's "ready" SIGUSR1 only some time after the fork (its doc says before), so a daemon that
/// is ready first kills the parent with SIGUSR1's default action and `run -d` fails (seen on a
/// loaded machine). This handler stands in until Pingora's listener is there: in the original
/// process, and only there, SIGUSR1 means "ready", answered as Pingora answers it (exit 0). The
/// daemon inherits the handler (and chains to it from its own SIGUSR1 listener), where the pid
/// check makes it a no-op.
mod early_ready_signal {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use std::sync::atomic::{AtomicI32, Ordering};

    static PARENT: AtomicI32 = AtomicI32::new(0);

    extern "C" fn ready(_: nix::libc::c_int) {
        // Async-signal-safe: an atomic load, getpid and _exit only.
        if nix::unistd::getpid().as_raw() == PARENT.load(Ordering::Relaxed) {
            // SAFETY: `_exit` is async-signal-safe and ends the process without unwinding.
            unsafe { nix::libc::_exit(0) };
        }
    }

    pub fn install() -> anyhow::Result<()> {
        PARENT.store(nix::unistd::getpid().as_raw(), Ordering::Relaxed);
        let action = SigAction::new(
            SigHandler::Handler(ready),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: `ready` only does async-signal-safe work (see above), and it replaces SIG_DFL
        // before any other SIGUSR1 handler of this process exists (those come after the fork).
        unsafe { sigaction(Signal::SIGUSR1, &action) }?;
        Ok(())
    }
}

/// Moves the agent through its hand-over stages (see [`crate::handover`]) as Pingora goes
/// through a graceful upgrade or stop.
struct WatchClosing {
    phases: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    handover: Arc<HandOver>,
}

#[async_trait]
impl BackgroundService for WatchClosing {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().ok().and_then(|mut p| p.take()) else {
            return;
        };
        // Not stopped by the shutdown watch: the phases *are* the shutdown, watched to its end.
        loop {
            match phases.recv().await {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulUpgradeCloseTimeout
                    | ExecutionPhase::GracefulTerminate,
                ) => {
                    if self.handover.start_closing() {
                        tracing::info!(
                            "handing over or stopping: responses now close their connections"
                        );
                    }
                }
                Ok(ExecutionPhase::ShutdownStarted | ExecutionPhase::ShutdownGracePeriod) => {
                    // (Also enters the closing stage, if a stop skipped the phases above.)
                    if self.handover.stop_accepting() {
                        if self.handover.spreads_closes() {
                            tracing::info!("no longer accepting: open WebSocket tunnels close one by one over the first half of the grace period");
                        } else {
                            tracing::info!("no longer accepting: open WebSocket tunnels are cut when the grace period ends");
                        }
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
