//! The settings that take effect only when the process starts: sockets, Pingora's server, the
//! sid memory and the log format. [`crate::live::Live`] takes them once from the first
//! configuration and every snapshot shares that one value, so a reload cannot change them: a
//! reloaded file that differs here is only reported ([`Startup::changed_keys`]).

use super::{AffinityConfig, ClusterConfig, Config, LogFormat, ServerSection};
use std::net::SocketAddr;
use std::time::Duration;

/// The restart-only part of a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// `listen`: the proxy's sockets, whether each is TLS, its ALPN and handshake bound. (A
    /// listener's certificates, `tls.default` and `redirect_https` / `https_port` are reloadable.)
    pub listen: Vec<ListenShape>,
    /// `server`: Pingora's server settings (threads, daemon, grace period, ...).
    pub server: ServerSection,
    /// `affinity`: the sid memory is sized once and outlives every snapshot.
    pub affinity: AffinityConfig,
    /// `admin.enabled`: whether the admin listener exists.
    pub admin_enabled: bool,
    /// `admin.listen`: its socket.
    pub admin_listen: SocketAddr,
    /// `access_log.format`: the log is one stream, set up once.
    pub access_log_format: LogFormat,
    /// `cluster`: the directory's agent id and writer live as long as the process (`None`:
    /// absent or disabled). Its Redis URL is resolved here (`push.redis` by default).
    pub cluster: Option<(ClusterConfig, String)>,
    /// `acme`: its service is started once.
    pub acme: Option<crate::acme::AcmeConfig>,
}

/// The restart-only part of one `listen` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenShape {
    /// The socket.
    pub addr: SocketAddr,
    /// TLS: `(tls.h2, tls.handshake_timeout)`; `None`: plain.
    pub tls: Option<(bool, Duration)>,
}

impl Startup {
    /// The restart-only settings of `config`.
    pub fn of(config: &Config) -> Self {
        Startup {
            listen: config
                .listen
                .0
                .iter()
                .map(|e| ListenShape {
                    addr: e.addr,
                    tls: e.tls.as_ref().map(|t| (t.h2, t.handshake_timeout)),
                })
                .collect(),
            server: config.server.clone(),
            affinity: config.affinity.clone(),
            admin_enabled: config.admin.enabled,
            admin_listen: config.admin.listen,
            access_log_format: config.access_log.format,
            cluster: config
                .cluster
                .as_ref()
                .filter(|c| c.enabled)
                .map(|c| (c.clone(), c.redis_url(&config.push).to_string())),
            acme: config.acme.clone(),
        }
    }

    /// The keys whose values `next` would change (what a reload has to leave as they are).
    pub fn changed_keys(&self, next: &Startup) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut check = |differs: bool, key: &'static str| {
            if differs {
                keys.push(key);
            }
        };
        check(self.listen != next.listen, "listen");
        check(self.server != next.server, "server");
        check(self.affinity != next.affinity, "affinity");
        check(self.admin_enabled != next.admin_enabled, "admin.enabled");
        check(self.admin_listen != next.admin_listen, "admin.listen");
        check(
            self.access_log_format != next.access_log_format,
            "access_log.format",
        );
        check(self.cluster != next.cluster, "cluster");
        check(self.acme != next.acme, "acme");
        keys
    }
}
