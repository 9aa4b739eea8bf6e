//! The one [`ProxyHttp`] implementation: each phase delegates to the module that owns its step.
//!
//! ```text
//! request_filter           uid::locate → routing (pool, ring, health) / affinity → Ctx
//!                          (#946 guard for WebSocket upgrades, see `upgrade`)
//! upstream_peer            Ctx.backend → HttpPeer (on a refused connect: the next ring backend)
//! upstream_request_filter  forward::set_uid, forward::set_proxy_headers
//! response_filter          upgrade: lift the idle timeout on 101, close cleanly otherwise
//! response_body_filter     affinity: learn sid → backend from a polling handshake
//! logging                  access_log::write
//! ```

use crate::access_log;
use crate::affinity::{self, Affinity};
use crate::config::{Config, ForwardConfig};
use crate::routing::Router;
use crate::uid::{query_value, UidError, UidResolver, UidSpan};
use crate::upgrade;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::lb::Backend;
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything the agent needs per request, built once from the configuration.
pub struct Agent {
    resolver: UidResolver,
    router: Router,
    affinity: Option<Affinity>,
    forward: ForwardConfig,
    product_param: String,
    connect_timeout: Duration,
    access_log: bool,
    /// The 430 body names the sources tried; it never changes, so it is built once.
    missing_uid_body: Bytes,
    /// In `gopush demo`, the page served at `/`.
    demo_page: Option<&'static str>,
}

/// What one request learned, filled in phase order and read by `logging`.
pub struct Ctx {
    start: Instant,
    uid: Option<UidSpan>,
    pool: Option<Arc<str>>,
    backend: Option<Backend>,
    /// A backend that refused the connection; the retry picks the next one on the ring.
    refused: Option<Backend>,
    /// The session's backend came from the sid memory, not the ring.
    via_affinity: bool,
    /// Scan the response for a new Engine.IO sid.
    learn_sid: bool,
    /// The #946 guard is in place for this upgrade request.
    upgrade_guard: bool,
}

/// A request the agent answers itself.
enum Refusal {
    MissingUid,
    InvalidUid(&'static str),
    UnknownProduct,
    NoHealthyBackend,
}

impl Agent {
    /// Builds the agent from a validated configuration.
    pub fn new(config: &Config) -> Self {
        let resolver = UidResolver::new(&config.uid);
        let missing_uid_body = Bytes::from(format!(
            "gopush: no uid in the request (tried {})\n",
            resolver.describe_sources()
        ));
        Agent {
            resolver,
            router: Router::new(config),
            affinity: config
                .affinity
                .enabled
                .then(|| Affinity::new(config.affinity.max_sessions, config.affinity.ttl)),
            forward: config.uid.forward.clone(),
            product_param: config.product_param.clone(),
            connect_timeout: config.upstream.connect_timeout,
            access_log: config.access_log.enabled,
            missing_uid_body,
            demo_page: None,
        }
    }

    /// Serves `page` at `GET /` (the demo).
    pub fn with_demo_page(mut self, page: &'static str) -> Self {
        self.demo_page = Some(page);
        self
    }

    /// The pools and rings (for the health-check services).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Resolves uid, pool and backend, or says why the request is refused.
    fn route(&self, session: &Session, ctx: &mut Ctx) -> Result<(), Refusal> {
        let req = session.req_header();
        let span = self.resolver.locate(req).map_err(|e| match e {
            UidError::Missing => Refusal::MissingUid,
            UidError::Invalid(why) => Refusal::InvalidUid(why),
        })?;
        ctx.uid = Some(span);
        let uid = span.get(&self.resolver, req);
        let query = req.uri.query().unwrap_or("");
        let product = query_value(query, &self.product_param);
        let pool = self
            .router
            .pool(product)
            .map_err(|_| Refusal::UnknownProduct)?;
        ctx.pool = Some(pool.name_arc().clone());

        if let Some(memory) = &self.affinity {
            if let Some(sid) = query_value(query, "sid") {
                if let Some(b) = memory.lookup(sid).filter(|b| pool.is_ready(b)) {
                    ctx.via_affinity = true;
                    ctx.backend = Some(b);
                    return Ok(());
                }
            } else {
                ctx.learn_sid = affinity::is_polling_handshake(query);
            }
        }
        let backend = pool
            .select(uid.as_bytes())
            .ok_or(Refusal::NoHealthyBackend)?;
        ctx.backend = Some(backend);
        Ok(())
    }

    async fn refuse(&self, session: &mut Session, why: Refusal) -> Result<()> {
        let (status, reason, body) = match why {
            Refusal::MissingUid => (430, "Uid Required", self.missing_uid_body.clone()),
            Refusal::InvalidUid(why) => (
                400,
                "Bad Request",
                Bytes::from(format!("gopush: invalid uid: {why}\n")),
            ),
            Refusal::UnknownProduct => (
                404,
                "Not Found",
                Bytes::from_static(b"gopush: unknown product\n"),
            ),
            Refusal::NoHealthyBackend => (
                503,
                "Service Unavailable",
                Bytes::from_static(b"gopush: no healthy backend in the pool\n"),
            ),
        };
        respond(session, status, reason, "text/plain; charset=utf-8", body).await
    }

    fn uid<'s>(&self, session: &'s Session, ctx: &Ctx) -> &'s str {
        ctx.uid
            .map_or("", |span| span.get(&self.resolver, session.req_header()))
    }
}

/// Writes a complete small response and keeps the connection reusable when that is safe.
pub async fn respond(
    session: &mut Session,
    status: u16,
    reason: &str,
    content_type: &str,
    body: Bytes,
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(3))?;
    // The `http` crate knows no phrase for 430; clients and logs should see one.
    header.set_reason_phrase(Some(reason))?;
    header.insert_header("content-type", content_type)?;
    header.insert_header("content-length", body.len())?;
    if !session.is_body_empty() {
        // An unread request body would be parsed as the next request.
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

#[async_trait]
impl ProxyHttp for Agent {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            uid: None,
            pool: None,
            backend: None,
            refused: None,
            via_affinity: false,
            learn_sid: false,
            upgrade_guard: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if let Some(page) = self.demo_page {
            let req = session.req_header();
            if req.method == http::Method::GET && req.uri.path() == "/" {
                let body = Bytes::from_static(page.as_bytes());
                respond(session, 200, "OK", "text/html; charset=utf-8", body).await?;
                return Ok(true);
            }
        }
        if let Err(why) = self.route(session, ctx) {
            self.refuse(session, why).await?;
            return Ok(true);
        }
        ctx.upgrade_guard = upgrade::guard_request(session);
        Ok(false)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        if let Some(refused) = &ctx.refused {
            // Retry after a refused connect: the next backend on this uid's ring.
            let uid = self.uid(session, ctx);
            let next = ctx
                .pool
                .as_deref()
                .and_then(|name| self.router.pool(Some(name)).ok())
                .and_then(|pool| pool.select_avoiding(uid.as_bytes(), refused));
            ctx.backend = next;
        }
        let addr = match ctx.backend.as_ref().map(|b| &b.addr) {
            Some(PeerAddr::Inet(addr)) => *addr,
            _ => {
                return Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no healthy backend in the pool",
                ))
            }
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // One retry on the next backend covers the gap before the health check notices a dead
        // backend. A remembered session is not moved: its state exists only on its backend.
        if ctx.refused.is_none() && !ctx.via_affinity {
            ctx.refused = ctx.backend.clone();
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let uid = self.uid(session, ctx);
        crate::forward::set_uid(upstream_request, &self.forward, uid)?;
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        crate::forward::set_proxy_headers(upstream_request, client_ip)?;
        if ctx.upgrade_guard {
            upgrade::guard_upstream_request(upstream_request)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.upgrade_guard {
            upgrade::on_response(session, upstream_response.status.as_u16());
        }
        if ctx.learn_sid && upstream_response.status != http::StatusCode::OK {
            ctx.learn_sid = false;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if ctx.learn_sid {
            if let (Some(chunk), Some(memory), Some(backend)) =
                (body.as_ref(), &self.affinity, &ctx.backend)
            {
                ctx.learn_sid = false;
                if let Some(sid) = affinity::sid_in_handshake(chunk) {
                    memory.learn(sid, backend.clone());
                }
            }
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if !self.access_log {
            return;
        }
        let uid = self.uid(session, ctx);
        access_log::write(access_log::Entry {
            session,
            uid,
            pool: ctx.pool.as_deref().unwrap_or("-"),
            backend: ctx.backend.as_ref(),
            affinity: ctx.via_affinity,
            elapsed: ctx.start.elapsed(),
            error: e,
        });
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        // A client going away (tab closed, load tool ending, refused upgrade) is routine.
        matches!(error.esource(), pingora::ErrorSource::Downstream)
    }
}
