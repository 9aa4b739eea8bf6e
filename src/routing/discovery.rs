//! Where a pool's backends come from: the static list, DNS and a watched file, merged.
//!
//! Pingora's `Backends::update` calls [`PoolDiscovery::discover`]; a failed lookup (DNS
//! down, unreadable file) returns an error, so the pool keeps the membership it had rather than
//! losing its backends. Discovered backends are literal addresses, so every agent that gets the
//! same DNS answer builds the same ring.

use crate::config::{parse_backend_line, BackendConfig, DnsDiscovery, FileDiscovery, PoolConfig};
use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::Backend;
use pingora::{Error, ErrorType, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

/// The merged sources of one pool.
pub struct PoolDiscovery {
    fixed: BTreeSet<Backend>,
    dns: Option<Dns>,
    file: Option<PathBuf>,
}

struct Dns {
    resolver: TokioResolver,
    name: String,
    port: u16,
    weight: u16,
}

/// A backend built from configuration values.
pub fn backend(b: &BackendConfig) -> Backend {
    Backend {
        addr: pingora::protocols::l4::socket::SocketAddr::Inet(b.addr),
        weight: usize::from(b.weight),
        ext: Default::default(),
    }
}

impl PoolDiscovery {
    /// The sources a pool's configuration names. Fails only if the system resolver
    /// configuration cannot be read.
    pub fn new(pool: &PoolConfig) -> std::result::Result<Self, String> {
        let dns = pool.dns.as_ref().map(Dns::new).transpose()?;
        Ok(PoolDiscovery {
            fixed: pool.backends.iter().map(backend).collect(),
            dns,
            file: pool.file.as_ref().map(|f: &FileDiscovery| f.path.clone()),
        })
    }

    /// The static part, available without I/O.
    pub fn fixed(&self) -> &BTreeSet<Backend> {
        &self.fixed
    }
}

impl Dns {
    fn new(cfg: &DnsDiscovery) -> std::result::Result<Self, String> {
        let builder = match cfg.resolver {
            Some(server) => {
                let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                for c in &mut ns.connections {
                    c.port = server.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?,
        };
        let mut builder = builder;
        // Membership must follow the records: do not serve answers from a cache past the
        // configured interval.
        builder.options_mut().cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns {
            resolver,
            name: cfg.name.clone(),
            port: cfg.port,
            weight: cfg.weight,
        })
    }
}

fn discovery_error(what: String) -> Box<Error> {
    Error::explain(ErrorType::Custom("discovery"), what)
}

#[async_trait]
impl ServiceDiscovery for PoolDiscovery {
    async fn discover(&self) -> Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let mut all = self.fixed.clone();
        if let Some(dns) = &self.dns {
            let ips = dns
                .resolver
                .lookup_ip(dns.name.as_str())
                .await
                .map_err(|e| discovery_error(format!("DNS lookup of {}: {e}", dns.name)))?;
            for ip in ips.iter() {
                all.insert(backend(&BackendConfig {
                    addr: std::net::SocketAddr::new(ip, dns.port),
                    weight: dns.weight,
                }));
            }
        }
        if let Some(path) = &self.file {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| discovery_error(format!("{}: {e}", path.display())))?;
            for (n, line) in text.lines().enumerate() {
                match parse_backend_line(line) {
                    None => {}
                    Some(Ok(b)) => {
                        all.insert(backend(&b));
                    }
                    Some(Err(e)) => {
                        return Err(discovery_error(format!(
                            "{}:{}: {e}",
                            path.display(),
                            n + 1
                        )))
                    }
                }
            }
        }
        if all.is_empty() {
            return Err(discovery_error(
                "no backends found; keeping the previous ones".into(),
            ));
        }
        Ok((all, HashMap::new()))
    }
}
