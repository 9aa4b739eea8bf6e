//! The one [`ProxyHttp`] implementation: the request path from accept to backend.
//!
//! ```text
//! request_filter           limits (head size, per IP) → decide::resolve_uid → limits (per uid,
//!                          max_connections: reject or close_oldest) → decide::route → Route
//!                          (gauge on the backend, #946 guard, see `upgrade`); a poll of a session
//!                          the agent closed is answered here (`kick`)
//! upstream_peer            the decision's backend → HttpPeer
//! connected_to_upstream    a listed upgrade keeps a duplicate of the backend socket (`kick::Cut`)
//! fail_to_connect          a ring decision retries once on the next ring backend
//! upstream_request_filter  forward::set_uid, forward::set_proxy_headers, upgrade: Connection close
//! response_filter          101: the gauge becomes a tunnel gauge, the idle timeout is lifted;
//!                          a pending poll of a session the agent closed: its answer is replaced
//! response_body_filter     sid memory: learn sid → (uid, backend) from a polling handshake;
//!                          hand-over: close tunnels one by one; a tunnel the agent cut: its
//!                          closing frames at the upstream EOF (`kick`)
//! logging                  status and duration metrics, access_log::write
//! ```
//!
//! What to do with a request is decided in [`crate::decide`]; this module only carries the
//! decision through Pingora's phases and counts what happens.

use crate::access_log;
use crate::affinity;
use crate::cluster::{Directory, TunnelEntry};
use crate::config::OnExceed;
use crate::decide::{self, Decision, Refusal, Target};
use crate::handover::{self, HandOver};
use crate::kick::{Cut, FrameTracker};
use crate::limits::head_deadline::HeadDeadline;
use crate::limits::{Exceeded, Limiter, Slots};
use crate::live::{Live, Snapshot};
use crate::metrics::{BackendStats, Metrics};
use crate::routing::backend_addr;
use crate::uid::Uid;
use crate::upgrade;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::proxy::FailToProxy;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The agent: the live configuration plus what outlives a reload.
pub struct Agent {
    /// The configuration snapshots and what outlives them (the sid memory among it).
    live: Arc<Live>,
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
    /// The cluster directory (`None` without a `cluster` section: nothing below touches it).
    directory: Option<Arc<Directory>>,
    /// Backend connections are pooled per thread (see [`Agent::with_pools_per_thread`]).
    pools_per_thread: bool,
}

/// One request, from its head to its end.
pub struct Ctx {
    start: Instant,
    /// The configuration this request is handled with, from start to end.
    snap: Arc<Snapshot>,
    /// Concurrency slots (and an upgrade's tunnel slot, reserved at admission) held until the
    /// request (or tunnel) ends.
    slots: Slots,
    /// The canonical uid, once resolved (a request refused after that is logged with it).
    uid: Option<Uid>,
    /// Once decided: where the request goes and what happened there.
    route: Option<Route>,
    /// With a cluster directory: this request's part in an Engine.IO session.
    eio: Option<Eio>,
    /// An upgrade's backend socket, duplicated when connected (becomes the tunnel's [`Cut`]).
    upstream: Option<Cut>,
    /// A poll of a session the agent closed: its answer is this goodbye instead.
    goodbye: Option<Goodbye>,
}

/// The answer of a poll of a closed session (see [`crate::kick`]).
struct Goodbye {
    body: Bytes,
    sent: bool,
}

impl Goodbye {
    /// `body` replaces the answer `response` heads: a 200 of its length, in plain text.
    fn answer(response: &mut ResponseHeader, body: Bytes) -> Result<Goodbye> {
        response.set_status(200)?;
        response.remove_header(&http::header::CONTENT_ENCODING);
        response.remove_header(&http::header::TRANSFER_ENCODING);
        response.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=UTF-8")?;
        response.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        Ok(Goodbye { body, sent: false })
    }

    /// The backend's answer is replaced whole (its length was set in `response_filter`).
    fn replace(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        if self.sent {
            *body = None;
        } else if body.is_some() || end_of_stream {
            *body = Some(self.body.clone());
            self.sent = true;
        }
    }
}

/// What the directory needs to know about a request under the Socket.IO path.
struct Eio {
    /// The session's sid (every request after the handshake carries it).
    sid: Option<String>,
    /// A polling handshake: its answer opens a connection.
    handshake: bool,
    /// A polling request (GET or POST) of session `sid`.
    polling: bool,
    /// The client address the directory shows.
    client: Option<std::net::IpAddr>,
    /// The Engine.IO protocol version (`EIO` in the query; 0: none).
    version: u8,
}

/// A decided request.
struct Route {
    decision: Decision,
    /// The request in its backend's gauges (none for an explicit backend, outside any pool).
    gauge: Option<Gauge>,
    /// The one retry after a refused connect was spent.
    retried: bool,
    /// The #946 guard is in place for this upgrade request.
    upgrade_guard: bool,
    /// Set by the backend's 101.
    tunnel: Option<Tunnel>,
    /// The tunnel in the cluster directory until it ends.
    listed: Option<TunnelEntry>,
    /// Where the tunnel's server→client frames start (listed tunnels only): where the agent may
    /// write its own frames when it closes the tunnel.
    frames: Option<FrameTracker>,
}

/// An open WebSocket tunnel (its `limits.max_tunnels` slot is in [`Ctx::slots`]).
struct Tunnel {
    /// Its moment to close during a hand-over (ms after the listeners stop accepting).
    close_at: Option<u32>,
    /// The agent sent the client a close frame: the tunnel ends at its next frame.
    going_away: bool,
}

/// A request counted in its backend's in-flight gauge, or once upgraded in its open tunnels;
/// released on drop, whichever way the request ended.
struct Gauge {
    stats: Arc<BackendStats>,
    tunnel: bool,
}

impl Gauge {
    fn new(snap: &Snapshot, target: &Target) -> Option<Gauge> {
        let stats = backend_addr(target.backend())
            .zip(target.pool().and_then(|i| snap.stats.pools.get(i)))
            .map(|(addr, pool)| pool.get_or_resolve(addr))?;
        stats.active.inc();
        Some(Gauge {
            stats,
            tunnel: false,
        })
    }

    /// The 101: counted now, not when the tunnel ends (a WebSocket can live for hours).
    fn become_tunnel(&mut self) {
        self.stats.count_status(101);
        self.stats.active.dec();
        self.stats.tunnels.inc();
        self.tunnel = true;
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        if self.tunnel {
            self.stats.tunnels.dec();
        } else {
            self.stats.active.dec();
        }
    }
}

impl Agent {
    /// Builds the agent around a live configuration; `handover` is moved through its stages by
    /// the server as the process hands over or stops (see [`crate::server`]).
    pub fn new(live: Arc<Live>, handover: Arc<HandOver>) -> Self {
        Agent {
            directory: live.directory().cloned(),
            metrics: live.metrics().clone(),
            live,
            limiter: Arc::new(Limiter::default()),
            handover,
            demo_page: None,
            pools_per_thread: false,
        }
    }

    /// Serves `page` at `GET /` (the demo).
    pub fn with_demo_page(mut self, page: &'static str) -> Self {
        self.demo_page = Some(page);
        self
    }

    /// With one runtime per thread, a kept-alive backend connection is reused only by the
    /// thread that opened it: its socket is registered with that thread's I/O driver, and on
    /// another thread every event of it (every message, once it carries a WebSocket) would be
    /// handed across threads (see [`crate::local_tcp`]).
    pub fn with_pools_per_thread(mut self) -> Self {
        self.pools_per_thread = true;
        self
    }

    /// Limits, uid, limits again, decision: the request is routed or refused.
    async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), Refusal> {
        let snap = &ctx.snap;
        let limits = &snap.config.limits;
        let peer = peer_ip(session);
        // Limits first: a refused client costs no hook run and no callback question.
        let head = head_size(session.req_header());
        self.limiter
            .admit_client(limits, head, peer, &mut ctx.slots)
            .map_err(Refusal::Limit)?;
        let uid = decide::resolve_uid(snap, session.req_header(), peer)
            .await
            .inspect_err(|r| {
                if *r == Refusal::MissingUid {
                    snap.stats.uid_missing();
                }
            })?;
        if let Some(i) = uid.source() {
            snap.stats.uid_found(i);
        }
        let uid = ctx.uid.insert(uid);
        let upgrade = session.is_upgrade_req();
        self.limiter
            .admit_uid(limits, uid.as_str(), upgrade, &mut ctx.slots)
            .map_err(Refusal::Limit)?;
        if let Some(dir) = &self.directory {
            let eio = eio_of(snap, session.req_header(), peer);
            if let Some(sid) = &eio.sid {
                dir.touch(sid);
                // The shared sid memory, asked only for a session this agent does not know (one
                // bounded Redis round trip per session and agent), so that `route` finds it in
                // the local memory like any other.
                if let Some(memory) = self.live.sessions() {
                    if memory.lookup(sid, uid.as_str()).is_none() {
                        if let Some(backend) = dir.lookup_sid(uid.as_str(), sid).await {
                            memory.learn(sid, uid.as_str(), backend);
                        }
                    }
                }
            }
            let max = limits.per_uid.max_connections;
            // A new connection: a polling handshake, or a WebSocket that is not an upgrade of
            // a session (those are counted already).
            let opens = eio.handshake || (upgrade && eio.sid.is_none());
            if max > 0 && opens {
                match limits.per_uid.on_exceed {
                    OnExceed::Reject => {
                        if dir.count_uid(uid.as_str()).await >= max as usize {
                            return Err(Refusal::Limit(Exceeded::UidConnections));
                        }
                    }
                    OnExceed::CloseOldest => {
                        dir.close_oldest(uid.as_str(), max as usize).await;
                    }
                }
            }
            ctx.eio = Some(eio);
        }
        let decision = decide::route(snap, self.live.sessions(), session.req_header(), peer, uid)?;
        if matches!(decision.target, Target::Session { .. }) {
            self.metrics.affinity_hit();
        }
        ctx.route = Some(Route {
            gauge: Gauge::new(snap, &decision.target),
            decision,
            retried: false,
            upgrade_guard: upgrade::guard_request(session),
            tunnel: None,
            listed: None,
            frames: None,
        });
        Ok(())
    }

    /// The backend answered an upgrade with 101: the request becomes a tunnel (in its gauge, in
    /// the hand-over's closing order and, with a cluster directory, listed with the duplicate of
    /// its backend socket that `kick` closes it by).
    fn open_tunnel(
        &self,
        route: &mut Route,
        uid: Option<&Uid>,
        eio: Option<&Eio>,
        upstream: &mut Option<Cut>,
    ) {
        route.tunnel = Some(Tunnel {
            close_at: self.handover.tunnel_opened(),
            going_away: false,
        });
        if let Some(g) = &mut route.gauge {
            g.become_tunnel();
        }
        if let (Some(dir), Some(uid), Some(eio)) = (&self.directory, uid, eio) {
            route.listed = Some(dir.open_tunnel(
                eio.sid.as_deref(),
                uid.as_str(),
                route.decision.target.backend(),
                eio.client,
                eio.version,
                upstream.take(),
            ));
            route.frames = Some(FrameTracker::default());
        }
    }

    /// A chunk of a tunnel's server→client stream: a tunnel the agent cut (`kick`) gets its
    /// closing frames at the upstream EOF; during a hand-over a tunnel whose moment has come is
    /// closed cleanly in place of a ping, and ends at the client's next frame.
    fn tunnel_chunk(
        &self,
        route: &mut Route,
        eio: Option<&Eio>,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        let Some(tunnel) = &mut route.tunnel else {
            return Ok(());
        };
        if let (Some(frames), Some(listed)) = (&mut route.frames, &route.listed) {
            if let Some(b) = body.as_deref() {
                frames.feed(b);
            }
            // The agent cut the backend socket: this is the upstream EOF.
            if let (true, Some(reason)) = (end_of_stream, listed.kicked()) {
                if tunnel.going_away {
                    // The hand-over's close frame went out already: no second one.
                    return Ok(());
                }
                let engine = eio.is_some_and(|e| matches!(e.version, 3 | 4));
                if let Some(bye) = crate::kick::closing_frames(frames, engine, reason) {
                    *body = Some(match body.take() {
                        Some(b) => [b, bye].concat().into(),
                        None => bye,
                    });
                }
                return Ok(());
            }
        }
        let Some(at) = tunnel.close_at else {
            return Ok(());
        };
        if tunnel.going_away {
            return Err(handed_over());
        }
        if body.as_deref().is_some_and(handover::is_lone_ping) && self.handover.tunnel_due(at) {
            // The client reconnects through the new process.
            *body = Some(Bytes::from_static(handover::GOING_AWAY));
            tunnel.going_away = true;
        }
        Ok(())
    }

    /// Sid memory: the first chunk of a polling handshake's answer names the sid its backend
    /// made (a handshake body is a few hundred bytes), remembered as `(uid, backend)`.
    fn learn_sid(&self, route: &mut Route, chunk: Option<&Bytes>, uid: Option<&Uid>) {
        let (Some(chunk), Some(memory), Some(uid)) = (chunk, self.live.sessions(), uid) else {
            return;
        };
        route.decision.learn_sid = false;
        if let Some(sid) = affinity::sid_in_open_packet(chunk) {
            memory.learn(sid, uid.as_str(), route.decision.target.backend().clone());
        }
    }

    /// A request of a polling session this agent closed: the agent answers it itself (a GET
    /// with the goodbye payload, once; a POST with `ok`), without asking the backend.
    fn kicked_answer(&self, session: &Session, ctx: &Ctx) -> Option<Bytes> {
        let dir = self.directory.as_ref()?;
        let eio = ctx.eio.as_ref().filter(|e| e.polling)?;
        let sid = eio.sid.as_deref()?;
        dir.goodbye(sid, session.req_header().method == http::Method::GET)
    }
}

/// The goodbye for a poll (a GET) that was pending when the agent closed its session (`kick`):
/// the backend answers it with a noop (or a 400, if it raced the close), and the client gets
/// the goodbye instead, so that it does not reconnect. A 400 also makes the directory look up
/// whether another agent closed the session.
async fn goodbye_for_poll(
    dir: &Directory,
    eio: &Eio,
    method: &http::Method,
    status: http::StatusCode,
    uid: Option<&Uid>,
) -> Option<Bytes> {
    let (true, Some(sid)) = (eio.polling && method == http::Method::GET, &eio.sid) else {
        return None;
    };
    if let (http::StatusCode::BAD_REQUEST, Some(uid)) = (status, uid) {
        dir.learn_closed(uid.as_str(), sid).await;
    }
    dir.goodbye(sid, true)
}

/// The cluster directory's view of a polling answer: a handshake's answer opens the
/// connection; a close packet in a poll's answer means the server ended the session.
fn track_polling_answer(dir: &Directory, eio: &mut Eio, chunk: &[u8], uid: &Uid, route: &Route) {
    if eio.handshake {
        eio.handshake = false;
        if let Some(open) = affinity::open_packet(chunk) {
            dir.open_polling(
                open.sid,
                uid.as_str(),
                route.decision.target.backend(),
                open.idle_ms,
                eio.client,
                eio.version,
            );
        }
    } else if eio.polling && affinity::has_close_packet(chunk) {
        if let Some(sid) = &eio.sid {
            dir.close_sid(sid);
        }
    }
}

/// The Engine.IO side of a request, for the directory.
fn eio_of(snap: &Snapshot, req: &RequestHeader, peer: Option<std::net::IpAddr>) -> Eio {
    let path = &snap.startup.affinity.path;
    let under = req.uri.path().starts_with(path.as_str());
    let query = req.uri.query().unwrap_or("");
    let sid = under
        .then(|| crate::uid::query_value(query, "sid"))
        .flatten()
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let polling = under && crate::uid::query_value(query, "transport") == Some("polling");
    Eio {
        handshake: sid.is_none() && affinity::is_polling_handshake(req, path),
        polling: polling && sid.is_some(),
        sid,
        client: crate::client_ip::of_request(&snap.config.trusted_proxies, peer, req),
        version: under
            .then(|| crate::uid::query_value(query, "EIO"))
            .flatten()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    }
}

/// The TCP peer's address.
fn peer_ip(session: &Session) -> Option<std::net::IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Did the request come over TLS? (Its connection's digest has the handshake's facts; an
/// HTTP/2 stream shares its connection's digest.)
fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// The 308 of a plain listener with `redirect_https`, unless the request is an ACME HTTP-01
/// challenge (served over plain HTTP by definition). `None`: not redirected.
fn https_redirect(snap: &Snapshot, session: &Session) -> Option<Result<String, &'static str>> {
    let local = session.server_addr().and_then(|a| a.as_inet()).copied();
    let entry = crate::tls::entry_for(&snap.config, local)?;
    if !entry.redirect_https {
        return None;
    }
    let req = session.req_header();
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    if req.uri.path().starts_with(ACME_CHALLENGE) {
        return None;
    }
    let host = req
        .uri
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| a.host().to_string())
        });
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Some(Err(
            "gopush: no Host in the request: cannot redirect to https\n",
        ));
    };
    Some(Ok(match entry.https_port {
        Some(port) => format!("https://{host}:{port}{path}"),
        None => format!("https://{host}{path}"),
    }))
}

/// Where ACME HTTP-01 challenges are served: never redirected.
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// How a tunnel closed for a hand-over ends (not logged as an error).
fn handed_over() -> Box<Error> {
    Error::explain(
        ErrorType::ConnectionClosed,
        "tunnel closed for the hand-over to a new process",
    )
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

/// The backend connection for `addr`. With one runtime per thread (`pools_per_thread`), the
/// thread's key joins the peer's hash, which Pingora's connection pool matches on: a kept-alive
/// backend connection is reused only by the thread that opened it, whose I/O driver it is
/// registered with (`crate::local_tcp`).
fn backend_peer(
    addr: std::net::SocketAddr,
    connect_timeout: Duration,
    pools_per_thread: bool,
) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(connect_timeout);
    if pools_per_thread {
        peer.group_key = crate::local_tcp::thread_key();
    }
    peer
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
            snap: self.live.load(),
            slots: Slots::default(),
            uid: None,
            route: None,
            eio: None,
            upstream: None,
            goodbye: None,
        }
    }

    /// No downstream modules. Pingora's default is a response-compression module with
    /// compression off, whose filters still run on every request and every body chunk (a
    /// relayed WebSocket message included); gopush leaves compression to the backends.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // The head is in: lift `limits.header_timeout` until the request is done (`logging`).
        if let Some(deadline) = session.stream().and_then(HeadDeadline::of) {
            deadline.head_read();
            if session.is_upgrade_req() {
                deadline.upgrading();
            }
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // An ACME HTTP-01 validation carries no uid and goes to no backend.
        let req = session.req_header();
        if req.method == http::Method::GET
            && req.uri.path().starts_with(crate::acme::CHALLENGE_PREFIX)
        {
            if let Some(key_auth) = crate::acme::challenges().answer(req.uri.path()).await {
                let body = Bytes::from(key_auth);
                respond(session, 200, "OK", "application/octet-stream", body).await?;
                return Ok(true);
            }
        }
        match https_redirect(&ctx.snap, session) {
            None => {}
            Some(Ok(location)) => {
                let mut header = ResponseHeader::build(308, Some(3))?;
                header.insert_header(http::header::LOCATION, location)?;
                header.insert_header("content-length", 0)?;
                if !session.is_body_empty() {
                    session.set_keepalive(None);
                }
                session
                    .write_response_header(Box::new(header), true)
                    .await?;
                return Ok(true);
            }
            Some(Err(body)) => {
                respond(
                    session,
                    400,
                    "Bad Request",
                    "text/plain; charset=utf-8",
                    Bytes::from_static(body.as_bytes()),
                )
                .await?;
                return Ok(true);
            }
        }
        if let Some(page) = self.demo_page {
            let req = session.req_header();
            if req.method == http::Method::GET && req.uri.path() == "/" {
                let body = Bytes::from_static(page.as_bytes());
                respond(session, 200, "OK", "text/html; charset=utf-8", body).await?;
                return Ok(true);
            }
        }
        let Err(why) = self.admit(session, ctx).await else {
            if let Some(body) = self.kicked_answer(session, ctx) {
                // Not the backend's answer: not counted as one.
                ctx.route = None;
                respond(session, 200, "OK", "text/plain; charset=UTF-8", body).await?;
                return Ok(true);
            }
            return Ok(false);
        };
        self.metrics.refused(why.kind());
        if self.handover.is_closing() {
            session.set_keepalive(None);
        }
        let (status, reason, body) = why.response(&ctx.snap);
        respond(session, status, reason, "text/plain; charset=utf-8", body).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let addr = match ctx
            .route
            .as_ref()
            .map(|r| &r.decision.target.backend().addr)
        {
            Some(PeerAddr::Inet(addr)) => *addr,
            _ => {
                return Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no healthy backend in the pool",
                ))
            }
        };
        let connect_timeout = ctx.snap.config.upstream.connect_timeout;
        Ok(Box::new(backend_peer(
            addr,
            connect_timeout,
            self.pools_per_thread,
        )))
    }

    async fn connected_to_upstream(
        &self,
        session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // A listed tunnel's way to be closed from outside (see `kick`): only upgrades pay the dup.
        if self.directory.is_some() && ctx.eio.is_some() && session.is_upgrade_req() {
            ctx.upstream = Cut::dup(fd);
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let (Some(route), Some(uid)) = (&mut ctx.route, &ctx.uid) else {
            return e;
        };
        if let Some(g) = &route.gauge {
            g.stats.connect_failures.inc();
        }
        // One retry on the next ring backend covers the gap before the health check notices a
        // dead backend. A live session or a hook's backend is not moved.
        let Target::Ring { pool, backend } = &route.decision.target else {
            return e;
        };
        if route.retried {
            return e;
        }
        route.retried = true;
        let pool = *pool;
        let next = ctx
            .snap
            .router
            .pool_at(pool)
            .and_then(|p| p.select_avoiding(uid.ring_key(), backend));
        let Some(backend) = next else {
            return Error::explain(ErrorType::HTTPStatus(503), "no healthy backend in the pool");
        };
        route.decision.target = Target::Ring { pool, backend };
        // The old gauge is released by the assignment.
        route.gauge = Gauge::new(&ctx.snap, &route.decision.target);
        e.set_retry(true);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(uid) = &ctx.uid {
            crate::forward::set_uid(upstream_request, &ctx.snap.config.uid.forward, uid.as_str())?;
        }
        crate::forward::set_proxy_headers(upstream_request, peer_ip(session), is_tls(session))?;
        if ctx.route.as_ref().is_some_and(|r| r.upgrade_guard) {
            upgrade::guard_upstream_request(upstream_request)?;
        }
        // Whatever the answer, a backend connection that carried an upgrade is never pooled.
        upgrade::close_upstream(upstream_request)?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if self.handover.is_closing() {
            session.set_keepalive(None);
        }
        let Some(route) = &mut ctx.route else {
            return Ok(());
        };
        let status = upstream_response.status;
        if route.upgrade_guard {
            upgrade::on_response(session, status.as_u16());
        }
        // A refused upgrade gives its reserved tunnel slot back now.
        ctx.slots.upgrade_answered(status.as_u16());
        if status == http::StatusCode::SWITCHING_PROTOCOLS {
            self.open_tunnel(route, ctx.uid.as_ref(), ctx.eio.as_ref(), &mut ctx.upstream);
        } else {
            // No tunnel: the duplicate must not keep the backend connection open.
            ctx.upstream = None;
        }
        if let (Some(dir), Some(eio)) = (&self.directory, &ctx.eio) {
            let method = &session.req_header().method;
            if let Some(body) = goodbye_for_poll(dir, eio, method, status, ctx.uid.as_ref()).await {
                route.decision.learn_sid = false;
                ctx.goodbye = Some(Goodbye::answer(upstream_response, body)?);
                return Ok(());
            }
        }
        if status != http::StatusCode::OK {
            route.decision.learn_sid = false;
            if let (Some(dir), Some(eio)) = (&self.directory, &mut ctx.eio) {
                eio.handshake = false;
                if status == http::StatusCode::BAD_REQUEST && eio.polling {
                    // "Session ID unknown": the session is gone from its backend.
                    if let Some(sid) = &eio.sid {
                        dir.close_sid(sid);
                    }
                }
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (
            Some(dir),
            Some(Eio {
                sid: Some(sid),
                polling: true,
                ..
            }),
            Some(chunk),
        ) = (&self.directory, &ctx.eio, body.as_deref())
        {
            // The client's Engine.IO close (`socket.close()` over polling posts `1`).
            if affinity::has_close_packet(chunk) {
                dir.close_sid(sid);
            }
        }
        if ctx
            .route
            .as_ref()
            .and_then(|r| r.tunnel.as_ref())
            .is_some_and(|t| t.going_away)
        {
            // The client's answer to our close frame (or anything after it): end the tunnel.
            return Err(handed_over());
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(goodbye) = &mut ctx.goodbye {
            goodbye.replace(body, end_of_stream);
            return Ok(None);
        }
        let Some(route) = &mut ctx.route else {
            return Ok(None);
        };
        if route.tunnel.is_some() {
            self.tunnel_chunk(route, ctx.eio.as_ref(), body, end_of_stream)?;
            return Ok(None);
        }
        if let (Some(dir), Some(eio), Some(chunk), Some(uid)) =
            (&self.directory, &mut ctx.eio, body.as_deref(), &ctx.uid)
        {
            track_polling_answer(dir, eio, chunk, uid, route);
        }
        if route.decision.learn_sid {
            self.learn_sid(route, body.as_ref(), ctx.uid.as_ref());
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // Pingora runs this for every request before keeping the connection alive: the next
        // head, if any, is under `limits.header_timeout` again from its first byte.
        if let Some(deadline) = session.stream().and_then(HeadDeadline::of) {
            deadline.request_done();
        }
        if let (
            Some(dir),
            Some(Eio {
                sid: Some(sid),
                polling: true,
                ..
            }),
        ) = (&self.directory, &ctx.eio)
        {
            // A long-poll's end restarts the idle clock too.
            dir.touch(sid);
        }
        let snap = &ctx.snap;
        let elapsed = ctx.start.elapsed();
        let route = ctx.route.as_ref();
        if let Some(g) = route.and_then(|r| r.gauge.as_ref()).filter(|g| !g.tunnel) {
            // (A tunnel was counted by its 101 in response_filter.)
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            g.stats.count_status(status);
            if !session.was_upgraded() {
                let pool = route.and_then(|r| r.decision.target.pool());
                if let Some(pool) = pool.and_then(|i| snap.stats.pools.get(i)) {
                    pool.duration.observe(elapsed.as_secs_f64());
                }
            }
        }
        if !snap.config.access_log.enabled {
            return;
        }
        let target = route.map(|r| &r.decision.target);
        let pool = target
            .and_then(Target::pool)
            .and_then(|i| snap.router.pool_at(i))
            .map_or("-", |p| p.name());
        access_log::write(access_log::Entry {
            session,
            uid: ctx.uid.as_ref().map_or("", Uid::as_str),
            pool,
            backend: target.map(Target::backend),
            affinity: matches!(target, Some(Target::Session { .. })),
            elapsed,
            error: e,
        });
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
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
            let (status, reason, body) = Refusal::Proxy(code).response(&ctx.snap);
            session.set_keepalive(None);
            if let Err(e) =
                respond(session, status, reason, "text/plain; charset=utf-8", body).await
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
        let going_away = ctx
            .route
            .as_ref()
            .and_then(|r| r.tunnel.as_ref())
            .is_some_and(|t| t.going_away);
        let kicked = ctx
            .route
            .as_ref()
            .and_then(|r| r.listed.as_ref())
            .is_some_and(|l| l.kicked().is_some());
        going_away || kicked || matches!(error.esource(), pingora::ErrorSource::Downstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    #[test]
    fn backend_connections_are_pooled_per_thread_only_when_asked() {
        let addr: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let timeout = Duration::from_secs(1);
        // Pingora's pool offers a kept-alive connection to the peers of the same reuse hash.
        let key = move |per_thread| backend_peer(addr, timeout, per_thread).reuse_hash();
        let here = key(true);
        assert_eq!(key(true), here, "one pool key on a thread");
        let there = std::thread::spawn(move || key(true)).join().ok();
        assert!(
            there.is_some_and(|k| k != here),
            "another thread, another pool"
        );
        let shared = std::thread::spawn(move || key(false)).join().ok();
        assert_eq!(
            shared,
            Some(key(false)),
            "without: one pool for all threads"
        );
    }
}
