//! Assembles the Pingora server: the proxy service on the listen addresses and one health-check
//! background service per pool, then runs it until a signal ends it.

use crate::config::Config;
use crate::proxy::Agent;
use pingora::server::configuration::Opt;
use pingora::server::Server;

/// How `gopush run` was asked to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunMode {
    /// Run in the background (`-d`).
    pub daemon: bool,
    /// Take the listening sockets over from a running old process (`-u`).
    pub upgrade: bool,
}

/// Runs the agent; returns only if the server could not be set up.
pub fn run(config: &Config, mode: RunMode, demo_page: Option<&'static str>) -> anyhow::Result<()> {
    let opt = Opt {
        upgrade: mode.upgrade,
        daemon: mode.daemon || config.server.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, config.server.to_pingora());
    server.bootstrap();

    let mut agent = Agent::new(config);
    if let Some(page) = demo_page {
        agent = agent.with_demo_page(page);
    }
    let health = agent.router().health_services();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, agent);
    for addr in &config.listen.0 {
        proxy.add_tcp(&addr.to_string());
    }
    server.add_service(proxy);
    for service in health {
        server.add_service(service);
    }
    tracing::info!(listen = ?config.listen.0, pools = config.pools.len(), "gopush agent starting");
    server.run_forever()
}
