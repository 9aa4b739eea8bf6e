//! The one [`ProxyHttp`] implementation: each phase delegates to the module that owns its step.
//!
//! ```text
//! request_filter           uid (hook, or sources: cookie/query/header/jwt/callback) → route hook
//!                          → routing (pool, ring, health) / affinity → Ctx
//!                          (#946 guard for WebSocket upgrades, see `upgrade`)
//! upstream_peer            Ctx.backend → HttpPeer (on a refused connect: the next ring backend)
//! upstream_request_filter  forward::set_uid, forward::set_proxy_headers
//! response_filter          upgrade: lift the idle timeout on 101, close cleanly otherwise
//! response_body_filter     affinity: learn sid → backend from a polling handshake
//! logging                  access_log::write
//! ```

use crate::access_log;
use crate::affinity::{self, Affinity};
use crate::callback::Answer;
use crate::handover::{self, HandOver};
use crate::hooks::{HookKind, HookRequest, RouteDecision};
use crate::limits::head_deadline::HeadDeadline;
use crate::limits::{Exceeded, Limiter, Slots};
use crate::live::{Live, Snapshot};
use crate::metrics::{BackendStats, Metrics, RefusalKind};
use crate::routing::backend_addr;
use crate::uid::{query_value, validate_value, Step, Uid, UidError};
use crate::upgrade;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::lb::Backend;
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::proxy::FailToProxy;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The agent: the live configuration plus what outlives a reload.
pub struct Agent {
    live: Arc<Live>,
    /// Session memory outlives configuration snapshots: a reload must not move live sessions.
    affinity: Option<Affinity>,
    /// Rate and concurrency counters; they outlive snapshots too.
    limiter: Arc<Limiter>,
    /// This process's hand-over stage (see [`crate::handover`]): once it hands its listeners to
    /// a new one (or stops), responses say `Connection: close`, so clients move to the new
    /// process while this one still answers; once it stops accepting, its tunnels are closed one
    /// by one.
    handover: Arc<HandOver>,
    /// In `gopush demo`, the page served at `/`.
    demo_page: Option<&'static str>,
    /// Process-wide metric families (per-backend children live in the snapshot).
    metrics: Arc<Metrics>,
}

/// What one request learned, filled in phase order and read by `logging`.
pub struct Ctx {
    start: Instant,
    /// The configuration this request is handled with, from start to end.
    snapshot: Option<Arc<Snapshot>>,
    uid: Option<Uid>,
    /// Index of the pool in the snapshot's router.
    pool: Option<usize>,
    backend: Option<Backend>,
    /// A backend that refused the connection; the retry picks the next one on the ring.
    refused: Option<Backend>,
    /// The session's backend came from the sid memory, not the ring.
    via_affinity: bool,
    /// The route hook named this backend itself (no pool, no retry elsewhere).
    explicit: bool,
    /// Scan the response for a new Engine.IO sid.
    learn_sid: bool,
    /// The #946 guard is in place for this upgrade request.
    upgrade_guard: bool,
    /// Concurrency slots (and an upgrade's tunnel slot) held until the request (or tunnel) ends.
    slots: Slots,
    /// The chosen backend's metric children, while this request counts in its active requests
    /// (or, once upgraded, its open tunnels).
    stats: Option<Arc<BackendStats>>,
    /// The request is counted as an open tunnel of its backend, not as an active request.
    tunnel_counted: bool,
    /// A tunnel's moment to close during a hand-over (ms after the listeners stop accepting).
    close_at: Option<u32>,
    /// The agent sent this tunnel's client a close frame: the tunnel ends at its next frame.
    going_away: bool,
}

/// A request the agent answers itself.
enum Refusal {
    MissingUid,
    InvalidUid(&'static str),
    /// Credentials were refused (a bad token, the auth callback said no): 430 with the reason.
    Rejected(&'static str),
    UnknownProduct,
    NoHealthyBackend,
    /// A hook failed or the auth callback could not be asked: this status; details are logged.
    Failed(u16, &'static str),
    Limit(Exceeded),
}

fn uid_refusal(e: UidError) -> Refusal {
    match e {
        UidError::Missing => Refusal::MissingUid,
        UidError::Invalid(why) => Refusal::InvalidUid(why),
        UidError::Rejected(why) => Refusal::Rejected(why),
    }
}

/// The `req` a hook sees; built only when a hook is about to run.
fn hook_request<'a>(
    snap: &Snapshot,
    session: &'a Session,
    product: Option<&'a str>,
) -> HookRequest<'a> {
    let req = session.req_header();
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    HookRequest {
        header: req,
        ip: crate::client_ip::of_request(&snap.config.trusted_proxies, peer, req),
        product,
    }
}

impl Refusal {
    fn kind(&self) -> RefusalKind {
        match self {
            Refusal::MissingUid => RefusalKind::MissingUid,
            Refusal::InvalidUid(_) => RefusalKind::InvalidUid,
            Refusal::UnknownProduct => RefusalKind::UnknownProduct,
            Refusal::NoHealthyBackend => RefusalKind::NoBackend,
            Refusal::Limit(_) => RefusalKind::Limit,
            Refusal::Rejected(_) => RefusalKind::Rejected,
            Refusal::Failed(..) => RefusalKind::HookFailed,
        }
    }
}

impl Agent {
    /// Builds the agent around a live configuration; `handover` is moved through its stages by
    /// the server as the process hands over or stops (see [`crate::server`]).
    pub fn new(live: Arc<Live>, handover: Arc<HandOver>) -> Self {
        let snapshot = live.load();
        let affinity = &snapshot.config.affinity;
        let affinity = affinity
            .enabled
            .then(|| Affinity::new(affinity.max_sessions, affinity.ttl));
        Agent {
            metrics: live.metrics().clone(),
            live,
            affinity,
            limiter: Arc::new(Limiter::default()),
            handover,
            demo_page: None,
        }
    }

    /// Serves `page` at `GET /` (the demo).
    pub fn with_demo_page(mut self, page: &'static str) -> Self {
        self.demo_page = Some(page);
        self
    }

    /// The uid: from the uid hook when there is one, else from the sources in order (asking
    /// an auth callback where one is configured).
    async fn resolve_uid(&self, snap: &Snapshot, session: &mut Session) -> Result<Uid, Refusal> {
        let max_len = snap.resolver.max_len();
        if let Some(hooks) = snap.hooks.as_ref().filter(|h| h.has(HookKind::Uid)) {
            let query = session.req_header().uri.query().unwrap_or("");
            let product = query_value(query, &snap.config.product_param);
            return match hooks.uid(&hook_request(snap, session, product)) {
                Ok(Some(uid)) => {
                    validate_value(&uid, max_len).map_err(uid_refusal)?;
                    Ok(Uid::Owned(uid.into_boxed_str()))
                }
                Ok(None) => Err(Refusal::MissingUid),
                Err(e) if e.is_limit() => Err(Refusal::Failed(500, "the uid hook failed")),
                Err(_) => Err(Refusal::Failed(
                    snap.config.hooks.on_throw.uid,
                    "the uid hook failed",
                )),
            };
        }
        let mut from = 0;
        // Bounded: every turn either returns or moves `from` past a callback source.
        loop {
            match snap
                .resolver
                .next(session.req_header(), from)
                .map_err(uid_refusal)?
            {
                Step::Found(uid) => return Ok(uid),
                Step::Ask(i) => {
                    let Some(client) = snap.resolver.callback(i) else {
                        return Err(Refusal::MissingUid);
                    };
                    let Some(creds) = client.credentials(session.req_header()) else {
                        from = i + 1;
                        continue;
                    };
                    return match client.ask(&creds).await {
                        Answer::Uid(uid) => {
                            validate_value(&uid, max_len).map_err(uid_refusal)?;
                            Ok(Uid::Owned(Box::from(&*uid)))
                        }
                        Answer::Rejected => Err(Refusal::Rejected(
                            "the auth callback refused the credentials",
                        )),
                        Answer::Failed => Err(Refusal::Failed(
                            client.on_error(),
                            "the auth callback could not be asked",
                        )),
                    };
                }
            }
        }
    }

    /// Resolves uid, pool and backend, or says why the request is refused.
    async fn route(
        &self,
        snap: &Snapshot,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<(), Refusal> {
        {
            // Limits first: a refused client costs no hook run and no callback question.
            let req = session.req_header();
            let client_ip = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            self.limiter
                .admit_client(
                    &snap.config.limits,
                    head_size(req),
                    client_ip,
                    &mut ctx.slots,
                )
                .map_err(Refusal::Limit)?;
        }
        let resolved = self.resolve_uid(snap, session).await.inspect_err(|r| {
            if matches!(r, Refusal::MissingUid) {
                snap.stats.uid_missing();
            }
        })?;
        if let Uid::Span(span) = &resolved {
            snap.stats.uid_found(span.source());
        }
        let req = session.req_header();
        let limits = &snap.config.limits;
        let uid = ctx.uid.insert(resolved).get(&snap.resolver, req);
        self.limiter
            .admit_uid(limits, uid, session.is_upgrade_req(), &mut ctx.slots)
            .map_err(Refusal::Limit)?;
        let query = req.uri.query().unwrap_or("");
        let product = query_value(query, &snap.config.product_param);
        let mut chosen = None;
        if let Some(hooks) = snap.hooks.as_ref().filter(|h| h.has(HookKind::Route)) {
            let failed = |e: crate::hooks::HookError| {
                let status = if e.is_limit() {
                    500
                } else {
                    snap.config.hooks.on_throw.route
                };
                Refusal::Failed(status, "the route hook failed")
            };
            match hooks.route(&hook_request(snap, session, product), uid) {
                Ok(RouteDecision::Default) => {}
                Ok(RouteDecision::Pool(name)) => match snap.router.pool_index(Some(&name)) {
                    Ok(i) => chosen = Some(i),
                    Err(_) => {
                        tracing::warn!(target: "gopush::hooks", "hook route: returned pool `{name}`, which is not configured");
                        crate::counters::bump(&crate::counters::metrics().hook_errors);
                        return Err(failed(crate::hooks::HookError::BadReturn(name)));
                    }
                },
                Ok(RouteDecision::Backend(addr)) => {
                    ctx.explicit = true;
                    ctx.backend = Some(Backend {
                        addr: PeerAddr::Inet(addr),
                        weight: 1,
                        ext: Default::default(),
                    });
                    return Ok(());
                }
                Err(e) => return Err(failed(e)),
            }
        }
        let index = match chosen {
            Some(i) => i,
            None => snap
                .router
                .pool_index(product)
                .map_err(|_| Refusal::UnknownProduct)?,
        };
        ctx.pool = Some(index);
        let pool = snap.router.pool_at(index).ok_or(Refusal::UnknownProduct)?;

        if let Some(memory) = &self.affinity {
            if let Some(sid) = query_value(query, "sid") {
                // Health (or retired by discovery), not drain: a live session stays on a
                // draining backend.
                if let Some(b) = memory.lookup(sid).filter(|b| pool.accepts_session(b)) {
                    self.metrics.affinity_hit();
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

    async fn refuse(&self, snap: &Snapshot, session: &mut Session, why: Refusal) -> Result<()> {
        let (status, reason, body) = match why {
            Refusal::MissingUid => (430, "Uid Required", snap.missing_uid_body.clone()),
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
            Refusal::Rejected(why) => (
                430,
                "Uid Required",
                Bytes::from(format!("gopush: uid refused: {why}\n")),
            ),
            Refusal::Failed(status, what) => (
                status,
                reason_phrase(status),
                Bytes::from(format!("gopush: {what}\n")),
            ),
            Refusal::Limit(which) => {
                let (status, reason, body) = which.response();
                (status, reason, Bytes::from_static(body.as_bytes()))
            }
        };
        respond(session, status, reason, "text/plain; charset=utf-8", body).await
    }
}

impl Ctx {
    /// The metric children of the backend this request counts against.
    fn backend_stats(&self) -> Option<&BackendStats> {
        self.stats.as_deref()
    }

    /// Starts counting this request as in flight on `ctx.backend`.
    fn count_backend(&mut self) {
        self.uncount_backend();
        self.stats = match (&self.snapshot, self.pool, &self.backend) {
            (Some(snap), Some(pool), Some(b)) => backend_addr(b)
                .zip(snap.stats.pools.get(pool))
                .map(|(addr, stats)| stats.get_or_resolve(addr)),
            _ => None,
        };
        if let Some(s) = self.backend_stats() {
            s.active.inc();
        }
    }

    /// Stops counting this request (or tunnel) on its backend.
    fn uncount_backend(&mut self) {
        if let Some(s) = self.backend_stats() {
            if self.tunnel_counted {
                s.tunnels.dec();
            } else {
                s.active.dec();
            }
        }
        self.stats = None;
        self.tunnel_counted = false;
    }

    /// The request's uid ("" before it is resolved).
    fn uid<'s>(&'s self, session: &'s Session) -> &'s str {
        match (&self.snapshot, &self.uid) {
            (Some(snap), Some(uid)) => uid.get(&snap.resolver, session.req_header()),
            _ => "",
        }
    }
}

/// How a tunnel closed for a hand-over ends (not logged as an error).
fn handed_over() -> Box<Error> {
    Error::explain(
        ErrorType::ConnectionClosed,
        "tunnel closed for the hand-over to a new process",
    )
}

/// The phrase for a configured error status (`http` knows none for 430).
fn reason_phrase(status: u16) -> &'static str {
    if status == 430 {
        return "Uid Required";
    }
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

impl Drop for Ctx {
    // Pingora drops the context when the request or tunnel is over, whichever way it ended, so
    // the gauges cannot leak.
    fn drop(&mut self) {
        self.uncount_backend();
    }
}

/// Size of the request head as the limit counts it: request target and header lines.
fn head_size(req: &RequestHeader) -> usize {
    let headers: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    req.uri.path_and_query().map_or(0, |p| p.as_str().len()) + headers
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
            snapshot: None,
            uid: None,
            pool: None,
            backend: None,
            refused: None,
            via_affinity: false,
            explicit: false,
            learn_sid: false,
            upgrade_guard: false,
            slots: Slots::default(),
            stats: None,
            tunnel_counted: false,
            close_at: None,
            going_away: false,
        }
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // The head is in: lift `limits.header_timeout` until the connection's next request.
        if let Some(deadline) = session.stream().and_then(HeadDeadline::of) {
            deadline.head_read();
        }
        Ok(())
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
        let snap = self.live.load();
        let routed = self.route(&snap, session, ctx).await;
        ctx.snapshot = Some(snap.clone());
        if let Err(why) = routed {
            self.metrics.refused(why.kind());
            if self.handover.is_closing() {
                session.set_keepalive(None);
            }
            self.refuse(&snap, session, why).await?;
            return Ok(true);
        }
        ctx.count_backend();
        ctx.upgrade_guard = upgrade::guard_request(session);
        Ok(false)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        if let (Some(refused), Some(snap), Some(index)) = (&ctx.refused, &ctx.snapshot, ctx.pool) {
            // Retry after a refused connect: the next backend on this uid's ring.
            let uid = ctx
                .uid
                .as_ref()
                .map_or("", |u| u.get(&snap.resolver, session.req_header()));
            ctx.backend = snap
                .router
                .pool_at(index)
                .and_then(|pool| pool.select_avoiding(uid.as_bytes(), refused));
            ctx.count_backend();
        }
        let connect_timeout = ctx.snapshot.as_ref().map_or(Duration::from_secs(1), |s| {
            s.config.upstream.connect_timeout
        });
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
        peer.options.connection_timeout = Some(connect_timeout);
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
        if let Some(s) = ctx.backend_stats() {
            s.connect_failures.inc();
        }
        if ctx.refused.is_none() && !ctx.via_affinity && !ctx.explicit {
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
        if let (Some(snap), Some(uid)) = (&ctx.snapshot, &ctx.uid) {
            // Validated in request_filter, so decoding succeeds; the raw value is the fallback.
            let uid = uid.forwarded(&snap.resolver, session.req_header());
            crate::forward::set_uid(upstream_request, &snap.config.uid.forward, &uid)?;
        }
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        crate::forward::set_proxy_headers(upstream_request, client_ip)?;
        if ctx.upgrade_guard {
            upgrade::guard_upstream_request(upstream_request)?;
        }
        upgrade::close_upstream(upstream_request)?;
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
        ctx.slots
            .upgrade_answered(upstream_response.status.as_u16());
        if self.handover.is_closing() {
            session.set_keepalive(None);
        }
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            ctx.close_at = self.handover.tunnel_opened();
            if let Some(s) = ctx.backend_stats() {
                // Counted now, not when the tunnel ends: a WebSocket can live for hours.
                s.count_status(101);
                s.active.dec();
                s.tunnels.inc();
            }
            ctx.tunnel_counted = ctx.stats.is_some();
        }
        if ctx.learn_sid && upstream_response.status != http::StatusCode::OK {
            ctx.learn_sid = false;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.going_away {
            // The client's answer to our close frame (or anything after it): end the tunnel.
            return Err(handed_over());
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
        if let Some(at) = ctx.close_at {
            if ctx.going_away {
                return Err(handed_over());
            }
            if body.as_deref().is_some_and(handover::is_lone_ping) && self.handover.tunnel_due(at) {
                // Its moment has come during a hand-over: a clean close instead of this ping;
                // the client reconnects through the new process.
                *body = Some(Bytes::from_static(handover::GOING_AWAY));
                ctx.going_away = true;
                return Ok(None);
            }
        }
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
        let Some(snap) = &ctx.snapshot else {
            return; // the demo page, or a request that never got this far
        };
        let elapsed = ctx.start.elapsed();
        if let Some(stats) = ctx.backend_stats().filter(|_| !ctx.tunnel_counted) {
            // (A tunnel was counted by its 101 in response_filter.)
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            stats.count_status(status);
            if !session.was_upgraded() {
                if let Some(pool) = ctx.pool.and_then(|i| snap.stats.pools.get(i)) {
                    pool.duration.observe(elapsed.as_secs_f64());
                }
            }
        }
        if !snap.config.access_log.enabled {
            return;
        }
        let pool = ctx
            .pool
            .and_then(|i| snap.router.pool_at(i))
            .map_or("-", |p| p.name());
        access_log::write(access_log::Entry {
            session,
            uid: ctx.uid(session),
            pool,
            backend: ctx.backend.as_ref(),
            affinity: ctx.via_affinity,
            elapsed,
            error: e,
        });
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => 502,
                pingora::ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                _ => 500,
            },
        };
        // Pingora's own error page is an empty body; say what happened, as the refusals do.
        if code > 0 && session.response_written().is_none() {
            let body: &'static str = match code {
                503 => "gopush: no healthy backend in the pool\n",
                502 => "gopush: the backend failed or closed the connection\n",
                504 => "gopush: the backend did not answer in time\n",
                400 => "gopush: bad request\n",
                _ => "gopush: the request failed\n",
            };
            let reason = http::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error");
            session.set_keepalive(None);
            let body = Bytes::from_static(body.as_bytes());
            if let Err(e) = respond(session, code, reason, "text/plain; charset=utf-8", body).await
            {
                tracing::debug!("could not send the error response: {e}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, error: &Error) -> bool {
        // A client going away (tab closed, load tool ending, refused upgrade) is routine, and so
        // is a tunnel the agent closed itself during a hand-over.
        ctx.going_away || matches!(error.esource(), pingora::ErrorSource::Downstream)
    }
}
