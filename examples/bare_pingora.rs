//! The floor gopush is measured against in `benches/run.sh --bare`: a bare Pingora 0.9.1 proxy
//! doing the same routing job (uid cookie → Ketama ring → backend) with nothing else: no uid
//! validation, header rewriting, limits, affinity, metrics or logging.
//!
//! `cargo run --release --example bare_pingora -- LISTEN BACKEND...`

use async_trait::async_trait;
use pingora::lb::{selection::consistent::KetamaHashing, LoadBalancer};
use pingora::prelude::*;
use std::sync::Arc;

struct Bare(Arc<LoadBalancer<KetamaHashing>>);

fn cookie_uid(req: &pingora::http::RequestHeader) -> &[u8] {
    let Some(c) = req.headers.get("cookie") else {
        return b"";
    };
    c.as_bytes()
        .split(|b| *b == b';')
        .map(|kv| kv.trim_ascii_start())
        .find_map(|kv| kv.strip_prefix(b"uid="))
        .unwrap_or(b"")
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, s: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        let backend = self
            .0
            .select(cookie_uid(s.req_header()), 256)
            .ok_or_else(|| Error::new_str("no backend"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((listen, backends)) = args.split_first() else {
        eprintln!("usage: bare_pingora LISTEN BACKEND...");
        std::process::exit(2);
    };
    let lb = match LoadBalancer::try_from_iter(backends) {
        Ok(lb) => lb,
        Err(e) => {
            eprintln!("bad backend list: {e}");
            std::process::exit(2);
        }
    };
    let mut server = match Server::new(None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("server: {e}");
            std::process::exit(1);
        }
    };
    server.bootstrap();
    let mut svc = http_proxy_service(&server.configuration, Bare(Arc::new(lb)));
    svc.add_tcp(listen);
    // BARE_THREADS: the proxy's worker threads (default 2, as in the benchmark).
    svc.threads = std::env::var("BARE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .or(Some(2));
    server.add_service(svc);
    server.run_forever();
}
