//! The floor gopush is measured against in `benches/run.sh`: a bare Pingora 0.9.1 proxy doing the
//! same routing job (uid cookie → Ketama ring → backend) and nothing else: no uid validation,
//! header rewriting, limits, health checks, affinity, metrics or logging. Pingora's own WebSocket
//! pass-through (without gopush's pingora#946 workaround).
//!
//! ```text
//! bare_pingora LISTEN DEFAULT_POOL [STATIC_POOL]     pools: comma-separated ip:port lists
//! ```
//! `?product=static` picks the second pool, as gopush's `product_param` does in the benchmark.
//! `BARE_THREADS` sets the worker threads (default 2, gopush's benchmark setting);
//! `BARE_WORK_STEALING=true` turns on Pingora's work-stealing runtime (default off, as in gopush).

use async_trait::async_trait;
use pingora::lb::{selection::consistent::KetamaHashing, LoadBalancer};
use pingora::prelude::*;

struct Bare {
    default: LoadBalancer<KetamaHashing>,
    static_pool: Option<LoadBalancer<KetamaHashing>>,
}

/// The raw `uid` cookie (what nginx's `$cookie_uid` hashes), through gopush's own cookie lookup
/// (the `cookie` crate), so both proxies parse the header alike.
fn cookie_uid(req: &RequestHeader) -> &[u8] {
    req.headers
        .get("cookie")
        .and_then(|c| c.to_str().ok())
        .and_then(|c| gopush::uid::cookie_in(c, "uid"))
        .map_or(b"", str::as_bytes)
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, s: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        let req = s.req_header();
        let pool = match (&self.static_pool, req.uri.query()) {
            (Some(p), Some(q)) if q.split('&').any(|kv| kv == "product=static") => p,
            _ => &self.default,
        };
        let backend = pool
            .select(cookie_uid(req), 256)
            .ok_or_else(|| Error::new_str("no backend"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

fn pool(list: &str) -> LoadBalancer<KetamaHashing> {
    LoadBalancer::try_from_iter(list.split(',')).unwrap_or_else(|e| {
        eprintln!("bad backend list '{list}': {e}");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, default, static_pool) = match args.as_slice() {
        [l, d] => (l, pool(d), None),
        [l, d, s] => (l, pool(d), Some(pool(s))),
        _ => {
            eprintln!("usage: bare_pingora LISTEN DEFAULT_POOL [STATIC_POOL]");
            std::process::exit(2)
        }
    };
    // Pingora's defaults, except a short shutdown (the harness stops it with SIGTERM) and the
    // runtime: gopush's default (no work stealing), so that the gopush / Pingora ratios show what
    // gopush adds rather than a runtime choice. BARE_WORK_STEALING=true: Pingora's default.
    let conf = pingora::server::configuration::ServerConf {
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        work_stealing: std::env::var("BARE_WORK_STEALING").is_ok_and(|v| v == "true"),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let bare = Bare {
        default,
        static_pool,
    };
    let mut svc = http_proxy_service(&server.configuration, bare);
    // BARE_L4_READ: the client-side read buffer in bytes (experiments; unset = Pingora's 64 KiB).
    let mut l4 = pingora::listeners::L4BufferSettings::default();
    if let Some(n) = std::env::var("BARE_L4_READ")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        l4 = l4.read(n);
    }
    svc.add_listener(pingora::listeners::ListenerConfig::tcp(listen).l4_buffer(l4));
    svc.threads = std::env::var("BARE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .or(Some(2));
    server.add_service(svc);
    server.run_forever();
}
