//! The admin listener: a JSON API, Prometheus metrics and an embedded web page, served by a
//! Pingora `ServeHttp` service on its own address (`admin.listen`, loopback by default), in the
//! same process as the proxy. Everything but the page itself needs authentication
//! ([`authorize`]).
//!
//! ```text
//! GET  /                              the admin page (static; it asks for the token)
//! GET  /metrics                       Prometheus text format
//! GET  /api/status                    version, uptime, config, pools and backends with counts
//! GET  /api/route?uid=U&product=P     where U goes now, and where if that backend were down
//! POST /api/backends/{addr}/drain     no new sessions for addr (live ones stay)
//! POST /api/backends/{addr}/undrain
//! POST /api/push                      {uid | room | all, event, data?, namespace?} → Redis
//! POST /api/disconnect                {uid | room, namespace?, close?} → Redis
//! POST /api/reload                    re-read the configuration file
//! ```
//!
//! The API only reads the live snapshot and the shared drain set and metrics; it is never on the
//! proxy's request path.

pub mod push;

use crate::config::{AdminConfig, Config};
use crate::decide::{self, Refusal};
use crate::live::{unix_seconds, Live, Snapshot};
use crate::routing::backend_addr;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;
use push::Publisher;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use subtle::ConstantTimeEq;

/// The admin page, embedded in the binary.
pub const PAGE_HTML: &str = include_str!("page.html");

/// Socket.IO's reserved event names: the emitter refuses them, and so do we.
const RESERVED_EVENTS: [&str; 6] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// Decides whether an admin request may proceed: the one place for authentication.
///
/// When `admin.token` is set, the request must carry `Authorization: Bearer TOKEN` (compared in
/// constant time). When the `admin(req)` JavaScript hook is configured, it is asked next and only
/// `true` admits (a failing hook denies). With neither (allowed on a loopback listener only, see
/// config validation) every request passes.
pub fn authorize(snap: &Snapshot, req: &RequestHeader, peer: Option<std::net::IpAddr>) -> bool {
    if !token_ok(req, &snap.config.admin) {
        return false;
    }
    match snap.admin_allowed(req, peer) {
        Ok(None) => true,
        Ok(Some(allowed)) => allowed,
        Err(e) => {
            tracing::warn!("admin hook failed, request denied: {e}");
            false
        }
    }
}

/// The token part of [`authorize`]: passes when no token is set.
fn token_ok(req: &RequestHeader, admin: &AdminConfig) -> bool {
    let Some(token) = admin.token() else {
        return true;
    };
    let Some(given) = bearer(req) else {
        return false;
    };
    // Constant time over the bytes; only the length can leak, as with any such comparison.
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// Refuses what only a hostile web page in an operator's browser would send.
///
/// - A state-changing request whose `Origin` is not this listener (cross-site request forgery:
///   browsers send `Origin` on every `POST`, curl and scripts do not; a request without one is
///   not from a page of another site).
/// - Unless a **token** is configured (`has_token`), a `Host` that is a name other than
///   `localhost`: a DNS-rebinding page reaches the listener under its own name (its
///   `evil.example` now resolves to 127.0.0.1), so the browser sends `Host: evil.example:PORT`
///   and treats the answers as its own. A literal IP address or `localhost` in `Host` cannot
///   come from such a page. An `admin(req)` hook does not lift this check: everything it can
///   look at (`req.ip` is 127.0.0.1 for a rebound browser on the same machine, headers,
///   cookies of the rebound name) is what the attacker's page sends; a token is a secret it
///   does not have (the admin page keeps it in its own origin's `sessionStorage`, no cookie).
fn browser_guard(req: &RequestHeader, method: &Method, has_token: bool) -> Option<String> {
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !has_token && !is_address_host(host) {
        return Some(format!(
            "Host `{host}` is not an IP address or localhost (DNS rebinding): without admin.token only those are served; set admin.token to reach the admin listener by name"
        ));
    }
    if method != Method::GET && method != Method::HEAD {
        if let Some(origin) = req.headers.get(http::header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| {
                    o.strip_prefix("http://")
                        .or_else(|| o.strip_prefix("https://"))
                })
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !same {
                return Some("cross-origin request refused (Origin does not match Host)".into());
            }
        }
    }
    None
}

/// `127.0.0.1:6004`, `[::1]:6004`, `10.0.0.5:6004`, `localhost:6004` (port optional): a `Host`
/// that is a literal address or `localhost`, never a name that DNS (an attacker's) resolves.
fn is_address_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.starts_with(':') => ip,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || (host.starts_with('[') && name.parse::<std::net::Ipv6Addr>().is_ok())
        || (!host.starts_with('[') && name.parse::<std::net::Ipv4Addr>().is_ok())
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(req: &RequestHeader) -> Option<&str> {
    let value = req
        .headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The admin application.
pub struct AdminApp {
    live: Arc<Live>,
    publisher: Publisher,
    started: Instant,
}

impl AdminApp {
    /// Serves the admin API over `live`.
    pub fn new(live: Arc<Live>) -> Self {
        AdminApp {
            live,
            publisher: Publisher::default(),
            started: Instant::now(),
        }
    }
}

/// An API answer: status and body.
struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
    extra: Option<(http::HeaderName, &'static str)>,
}

impl Reply {
    fn json(status: StatusCode, value: &Value) -> Reply {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Reply {
            status,
            content_type: "application/json",
            body,
            extra: None,
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        Reply::json(status, &json!({ "error": message.into() }))
    }

    fn into_response(self) -> Response<Vec<u8>> {
        let mut builder = Response::builder()
            .status(self.status)
            .header(http::header::CONTENT_TYPE, self.content_type)
            .header(http::header::CONTENT_LENGTH, self.body.len())
            .header(http::header::CACHE_CONTROL, "no-store");
        if let Some((name, value)) = self.extra {
            builder = builder.header(name, value);
        }
        builder.body(self.body).unwrap_or_else(|_| {
            let mut r = Response::new(Vec::new());
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let reply = self.handle(session).await;
        if reply.status.is_client_error() || reply.status.is_server_error() {
            // The request body may be unread (refused before it was read): do not let it be
            // parsed as the next request.
            session.set_keepalive(None);
        }
        reply.into_response()
    }
}

impl AdminApp {
    async fn handle(&self, session: &mut ServerSession) -> Reply {
        let snap = self.live.load();
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        if path == "/" || path == "/index.html" {
            return match method {
                Method::GET | Method::HEAD => Reply {
                    status: StatusCode::OK,
                    content_type: "text/html; charset=utf-8",
                    body: PAGE_HTML.as_bytes().to_vec(),
                    extra: None,
                },
                _ => method_not_allowed(),
            };
        }
        if let Some(why) = browser_guard(req, &method, snap.config.admin.has_authentication()) {
            return Reply::error(StatusCode::FORBIDDEN, why);
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if !authorize(&snap, req, peer) {
            return Reply {
                extra: Some((
                    http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"gopush admin\"",
                )),
                ..Reply::error(
                    StatusCode::UNAUTHORIZED,
                    "authentication required: send `Authorization: Bearer <admin.token>`",
                )
            };
        }
        let query = req.uri.query().unwrap_or("").to_string();
        let get = method == Method::GET || method == Method::HEAD;
        let post = method == Method::POST;
        match path.as_str() {
            "/metrics" if get => self.metrics(&snap),
            "/api/status" if get => self.status(&snap),
            "/api/route" if get => route(&snap, self.live.sessions(), &query),
            "/api/reload" if post => self.reload().await,
            "/api/push" if post => match read_body(session, &snap.config).await {
                Ok(body) => self.push(&snap, &body).await,
                Err(reply) => reply,
            },
            "/api/disconnect" if post => match read_body(session, &snap.config).await {
                Ok(body) => self.disconnect(&snap, &body).await,
                Err(reply) => reply,
            },
            "/metrics" | "/api/status" | "/api/route" | "/api/reload" | "/api/push"
            | "/api/disconnect" => method_not_allowed(),
            _ => match drain_path(&path) {
                Some((addr, draining)) if post => self.drain(&snap, addr, draining),
                Some(_) => method_not_allowed(),
                None => Reply::error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
            },
        }
    }

    /// Sets the health and drain gauges from the current state (they are not updated on the
    /// request path).
    fn refresh_gauges(&self, snap: &Snapshot) {
        let drain = self.live.drain();
        for (pool, stats) in snap.router.pools().zip(&snap.stats.pools) {
            for b in pool.backends() {
                let Some(addr) = backend_addr(&b) else {
                    continue;
                };
                let s = stats.get_or_resolve(addr);
                s.healthy.set(i64::from(pool.is_ready(&b)));
                s.draining.set(i64::from(drain.contains(&addr)));
            }
        }
    }

    fn metrics(&self, snap: &Snapshot) -> Reply {
        self.refresh_gauges(snap);
        match self.live.metrics().encode() {
            Ok(body) => Reply {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body,
                extra: None,
            },
            Err(e) => Reply::error(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}")),
        }
    }

    fn status(&self, snap: &Snapshot) -> Reply {
        self.refresh_gauges(snap);
        let drain = self.live.drain();
        let pools: Vec<Value> = snap
            .router
            .pools()
            .zip(&snap.stats.pools)
            .map(|(pool, stats)| {
                let backends: Vec<Value> = pool
                    .backends()
                    .iter()
                    .filter_map(|b| {
                        let addr = backend_addr(b)?;
                        let s = stats.get_or_resolve(addr);
                        Some(json!({
                            "addr": addr.to_string(),
                            "weight": b.weight,
                            "healthy": pool.is_ready(b),
                            "draining": drain.contains(&addr),
                            "active_requests": s.active.get(),
                            "open_tunnels": s.tunnels.get(),
                            "requests": s.requests_total(),
                            "errors": s.errors_total(),
                            "connect_failures": s.connect_failures.get(),
                        }))
                    })
                    .collect();
                json!({ "name": pool.name(), "backends": backends })
            })
            .collect();
        Reply::json(
            StatusCode::OK,
            &json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": self.started.elapsed().as_secs(),
                "config": {
                    "file": self.live.path().map(|p| p.display().to_string()),
                    "loaded_at": rfc3339(snap.loaded_at),
                    "loaded_at_unix": unix_seconds(snap.loaded_at),
                },
                "draining": drain.list().iter().map(ToString::to_string).collect::<Vec<_>>(),
                "pools": pools,
            }),
        )
    }

    async fn reload(&self) -> Reply {
        match self.live.reload().await {
            Ok(()) => {
                let snap = self.live.load();
                Reply::json(
                    StatusCode::OK,
                    &json!({
                        "reloaded": true,
                        "loaded_at": rfc3339(snap.loaded_at),
                        "loaded_at_unix": unix_seconds(snap.loaded_at),
                    }),
                )
            }
            Err(e) => Reply::json(
                StatusCode::BAD_REQUEST,
                &json!({
                    "error": e.to_string(),
                    "note": "the running configuration stays",
                }),
            ),
        }
    }

    fn drain(&self, snap: &Snapshot, addr: &str, draining: bool) -> Reply {
        // `127.0.0.1%3A4000` (a client that escaped the colon) means the same address.
        let decoded = percent_encoding::percent_decode_str(addr).decode_utf8_lossy();
        let Ok(addr) = decoded.parse::<SocketAddr>() else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format!("backend: `{addr}` is not an IP:port"),
            );
        };
        if !snap.router.has_backend(&addr) {
            return Reply::error(
                StatusCode::NOT_FOUND,
                format!("backend: {addr} is not a backend of any pool"),
            );
        }
        let changed = self.live.drain().set(addr, draining);
        if changed {
            tracing::info!(backend = %addr, draining, "admin: drain state changed");
        }
        Reply::json(
            StatusCode::OK,
            &json!({ "backend": addr.to_string(), "draining": draining, "changed": changed }),
        )
    }

    async fn push(&self, snap: &Snapshot, body: &[u8]) -> Reply {
        let metrics = self.live.metrics();
        let req: PushRequest = match parse_json(body) {
            Ok(r) => r,
            Err(reply) => {
                metrics.push("event", "bad_request");
                return reply;
            }
        };
        let cfg = &snap.config.push;
        let (kind, room) = match target(req.uid, req.room, req.all, cfg, true) {
            Ok(t) => t,
            Err(reply) => {
                metrics.push("event", "bad_request");
                return reply;
            }
        };
        if let Err(reply) = check_event(&req.event).and(check_namespace(&req.namespace)) {
            metrics.push(kind, "bad_request");
            return reply;
        }
        let mut data = vec![Value::String(req.event)];
        if let Some(d) = req.data {
            data.push(d);
        }
        let message = match push::event(cfg, &req.namespace, room.as_deref(), &data) {
            Ok(m) => m,
            Err(e) => {
                metrics.push(kind, "bad_request");
                return Reply::error(StatusCode::BAD_REQUEST, format!("data: {e}"));
            }
        };
        if message.payload.len() > cfg.max_payload {
            metrics.push(kind, "bad_request");
            return Reply::error(
                StatusCode::BAD_REQUEST,
                format!(
                    "data: the encoded event is {} bytes, over push.max_payload ({})",
                    message.payload.len(),
                    cfg.max_payload
                ),
            );
        }
        match self.publisher.publish(cfg, &message).await {
            Ok(receivers) => {
                metrics.push(kind, "ok");
                Reply::json(
                    StatusCode::OK,
                    &json!({
                        "published": true,
                        "channel": message.channel,
                        "room": room,
                        "bytes": message.payload.len(),
                        "receivers": receivers,
                    }),
                )
            }
            Err(why) => {
                metrics.push(kind, "unavailable");
                tracing::warn!("admin push: {why}");
                Reply::error(StatusCode::SERVICE_UNAVAILABLE, why)
            }
        }
    }

    async fn disconnect(&self, snap: &Snapshot, body: &[u8]) -> Reply {
        let metrics = self.live.metrics();
        let req: DisconnectRequest = match parse_json(body) {
            Ok(r) => r,
            Err(reply) => {
                metrics.push("disconnect", "bad_request");
                return reply;
            }
        };
        let cfg = &snap.config.push;
        let room = match target(req.uid, req.room, None, cfg, false) {
            Ok((_, Some(room))) => room,
            Ok((_, None)) => {
                // `all` is not accepted for a disconnect (target() refuses it); kept total.
                return Reply::error(StatusCode::BAD_REQUEST, "uid or room: required");
            }
            Err(reply) => {
                metrics.push("disconnect", "bad_request");
                return reply;
            }
        };
        if let Err(reply) = check_namespace(&req.namespace) {
            metrics.push("disconnect", "bad_request");
            return reply;
        }
        let message = match push::disconnect(cfg, &req.namespace, &room, req.close) {
            Ok(m) => m,
            Err(e) => return Reply::error(StatusCode::BAD_REQUEST, format!("room: {e}")),
        };
        match self.publisher.publish(cfg, &message).await {
            Ok(receivers) => {
                metrics.push("disconnect", "ok");
                Reply::json(
                    StatusCode::OK,
                    &json!({
                        "published": true,
                        "channel": message.channel,
                        "room": room,
                        "receivers": receivers,
                    }),
                )
            }
            Err(why) => {
                metrics.push("disconnect", "unavailable");
                tracing::warn!("admin disconnect: {why}");
                Reply::error(StatusCode::SERVICE_UNAVAILABLE, why)
            }
        }
    }
}

/// `POST /api/push` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    uid: Option<String>,
    room: Option<String>,
    all: Option<bool>,
    event: String,
    /// The event's one argument; absent: the event has none.
    data: Option<Value>,
    #[serde(default = "root_namespace")]
    namespace: String,
}

/// `POST /api/disconnect` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    uid: Option<String>,
    room: Option<String>,
    #[serde(default = "root_namespace")]
    namespace: String,
    /// Also close the underlying connection (the client reconnects by itself).
    #[serde(default)]
    close: bool,
}

fn root_namespace() -> String {
    "/".into()
}

/// Exactly one of uid / room / all; answers the metric label and the room (None: everyone).
fn target(
    uid: Option<String>,
    room: Option<String>,
    all: Option<bool>,
    cfg: &crate::config::PushConfig,
    all_allowed: bool,
) -> Result<(&'static str, Option<String>), Reply> {
    let all = all.unwrap_or(false);
    if all && !all_allowed {
        return Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "all: not accepted here (name a uid or a room)",
        ));
    }
    let wanted = if all_allowed {
        "one of `uid`, `room` or `all: true`"
    } else {
        "one of `uid` or `room`"
    };
    match (uid, room, all) {
        (Some(uid), None, false) => {
            if uid.is_empty() || uid.chars().any(char::is_control) {
                return Err(Reply::error(
                    StatusCode::BAD_REQUEST,
                    "uid: must be non-empty, without control characters",
                ));
            }
            Ok(("uid", Some(push::uid_room(&cfg.uid_room, &uid))))
        }
        (None, Some(room), false) => {
            if room.is_empty() {
                return Err(Reply::error(
                    StatusCode::BAD_REQUEST,
                    "room: must be non-empty",
                ));
            }
            Ok(("room", Some(room)))
        }
        (None, None, true) => Ok(("all", None)),
        (None, None, false) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("target missing: give {wanted}"),
        )),
        _ => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("target ambiguous: give only {wanted}"),
        )),
    }
}

fn check_event(event: &str) -> Result<(), Reply> {
    if event.is_empty() {
        return Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "event: must be non-empty",
        ));
    }
    if RESERVED_EVENTS.contains(&event) {
        return Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("event: `{event}` is reserved by Socket.IO"),
        ));
    }
    Ok(())
}

fn check_namespace(nsp: &str) -> Result<(), Reply> {
    if !nsp.starts_with('/') || nsp.contains('#') {
        return Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("namespace: `{nsp}` must start with `/` and contain no `#`"),
        ));
    }
    Ok(())
}

/// Parses a JSON body; the error names the field (serde's "unknown field `x`", "missing field
/// `event`", "invalid type ... at line 1 column 9").
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    if body.is_empty() {
        return Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "body: a JSON object is required",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| Reply::error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// Reads the whole request body, refusing more than the push limit allows (JSON can be up to
/// about twice the size of its msgpack encoding, plus room for the envelope).
async fn read_body(session: &mut ServerSession, config: &Config) -> Result<Vec<u8>, Reply> {
    let limit = config
        .push
        .max_payload
        .saturating_mul(2)
        .saturating_add(4096);
    let mut body = Vec::new();
    // Bounded: every chunk is non-empty and the total is capped, so this ends.
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(Reply::error(
                        StatusCode::BAD_REQUEST,
                        format!("body: larger than {limit} bytes (2 × push.max_payload + 4 KiB)"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(Reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("body: cannot read it: {e}"),
                ))
            }
        }
    }
}

/// `GET /api/route?uid=U&product=P&sid=S`: where a request of uid `U` goes now, decided by the
/// proxy's own [`decide::route`] (route hook, product, sid memory, health, drain). `U` is the
/// uid as a client sends it (cookie or query value) and so percent-decoded once here, as any URL
/// parameter; the answer's `uid` is the canonical (decoded) uid. `sid` asks about a live session.
fn route(snap: &Snapshot, sessions: Option<&crate::affinity::Affinity>, query: &str) -> Reply {
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let uid = match param("uid").filter(|u| !u.is_empty()) {
        Some(u) => u,
        None => return Reply::error(StatusCode::BAD_REQUEST, "uid: required (?uid=...)"),
    };
    let uid = match crate::uid::Uid::from_raw(&uid, snap.config.uid.max_len) {
        Ok(uid) => uid,
        Err(e) => {
            let why = match e {
                crate::uid::UidError::Invalid(why) => why,
                _ => "required",
            };
            return Reply::error(StatusCode::BAD_REQUEST, format!("uid: {why}"));
        }
    };
    let product = param(&snap.config.product_param);
    let sid = param("sid");
    let decided = decide::probe_request(snap, product.as_deref(), sid.as_deref())
        .and_then(|req| decide::route(snap, sessions, &req, None, &uid));
    let decision = match decided {
        Ok(d) => d,
        Err(Refusal::UnknownProduct) => {
            return Reply::error(
                StatusCode::NOT_FOUND,
                format!(
                    "product: no pool named `{}`",
                    product.as_deref().unwrap_or_default()
                ),
            )
        }
        Err(why) => {
            let (status, _, body) = why.response(snap);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let text = String::from_utf8_lossy(&body).trim_end().to_string();
            return Reply::json(status, &json!({ "uid": uid.as_str(), "error": text }));
        }
    };
    let target = &decision.target;
    let show = |b: Option<&pingora::lb::Backend>| b.and_then(backend_addr).map(|a| a.to_string());
    let backend = show(Some(target.backend()));
    let Some(pool) = target.pool().and_then(|i| snap.router.pool_at(i)) else {
        // The route hook named a backend: no pool, no ring.
        return Reply::json(
            StatusCode::OK,
            &json!({ "uid": uid.as_str(), "via": target.via(), "pool": null, "backend": backend,
                     "failover": null, "ring": null, "ring_healthy": null, "ring_draining": null }),
        );
    };
    let key = uid.ring_key();
    let ring = pool.select_ignoring_health(key);
    let failover = pool.select_avoiding(key, target.backend());
    Reply::json(
        StatusCode::OK,
        &json!({
            "uid": uid.as_str(),
            "via": target.via(),
            "pool": pool.name(),
            "backend": backend,
            "failover": show(failover.as_ref()),
            "ring": show(ring.as_ref()),
            "ring_healthy": ring.as_ref().map(|b| pool.is_ready(b)),
            "ring_draining": ring.as_ref().map(|b| pool.is_draining(b)),
        }),
    )
}

/// `/api/backends/{addr}/drain` → (addr, true); `/undrain` → (addr, false).
fn drain_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/api/backends/")?;
    if let Some(addr) = rest.strip_suffix("/drain") {
        return Some((addr, true));
    }
    rest.strip_suffix("/undrain").map(|addr| (addr, false))
}

fn method_not_allowed() -> Reply {
    Reply::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn admin(token: Option<&str>) -> AdminConfig {
        let yaml = match token {
            Some(t) => format!("token: \"{t}\""),
            None => "{}".into(),
        };
        let mut a: AdminConfig = serde_yaml::from_str(&yaml).unwrap();
        if token.is_none() {
            a.token = None::<Secret>;
        }
        a
    }

    fn req(auth: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/api/status", None).unwrap();
        if let Some(a) = auth {
            r.insert_header("authorization", a).unwrap();
        }
        r
    }

    #[test]
    fn bearer_token_is_required_when_configured() {
        let a = admin(Some("s3cret"));
        assert!(!token_ok(&req(None), &a));
        assert!(!token_ok(&req(Some("Bearer nope")), &a));
        assert!(!token_ok(&req(Some("Bearer s3cre")), &a));
        assert!(!token_ok(&req(Some("Basic s3cret")), &a));
        assert!(token_ok(&req(Some("Bearer s3cret")), &a));
        assert!(token_ok(&req(Some("bearer  s3cret ")), &a));
    }

    #[test]
    fn no_token_means_open_and_empty_token_is_no_token() {
        assert!(token_ok(&req(None), &admin(None)));
        assert!(token_ok(&req(None), &admin(Some(""))));
    }

    #[test]
    fn browsers_from_elsewhere_are_refused() {
        let build = |method: &str, host: &str, origin: Option<&str>| {
            let mut r = RequestHeader::build(method, b"/api/push", None).unwrap();
            r.insert_header("host", host).unwrap();
            if let Some(o) = origin {
                r.insert_header("origin", o).unwrap();
            }
            r
        };
        let open = false; // no token (an admin hook or nothing)
        let locked = true; // admin.token
        let post = Method::POST;
        // Same origin (the page) and no Origin (curl) pass.
        let page = build("POST", "127.0.0.1:6004", Some("http://127.0.0.1:6004"));
        assert!(browser_guard(&page, &post, open).is_none());
        assert!(browser_guard(&build("POST", "localhost:6004", None), &post, open).is_none());
        assert!(browser_guard(&build("POST", "[::1]:6004", None), &post, open).is_none());
        // Another site's page posting here.
        let csrf = build("POST", "127.0.0.1:6004", Some("http://evil.example"));
        assert!(browser_guard(&csrf, &post, open).is_some());
        assert!(browser_guard(&csrf, &post, locked).is_some());
        // DNS rebinding without a token (with or without an admin hook); with a token the
        // name does not matter.
        let rebound = build("GET", "evil.example:6004", None);
        assert!(browser_guard(&rebound, &Method::GET, open).is_some());
        assert!(browser_guard(&rebound, &Method::GET, locked).is_none());
        let rebound_post = build(
            "POST",
            "evil.example:6004",
            Some("http://evil.example:6004"),
        );
        assert!(browser_guard(&rebound_post, &post, open).is_some());
        assert!(browser_guard(&rebound_post, &post, locked).is_none());
        // Names that only look like addresses are names.
        for host in [
            "127.0.0.1.evil.example",
            "[::1].evil.example",
            "0x7f.1",
            "",
            "[::1",
        ] {
            assert!(
                browser_guard(&build("GET", host, None), &Method::GET, open).is_some(),
                "{host:?}"
            );
        }
        // Literal addresses (a non-loopback listener reached by IP) and localhost pass.
        for host in [
            "10.0.0.5:6004",
            "[fd00::5]:6004",
            "127.0.0.1",
            "LOCALHOST:6004",
        ] {
            assert!(
                browser_guard(&build("GET", host, None), &Method::GET, open).is_none(),
                "{host:?}"
            );
        }
        // The page behind a TLS-terminating proxy is same-origin too.
        let tls = build("POST", "admin.example", Some("https://admin.example"));
        assert!(browser_guard(&tls, &post, locked).is_none());
        let other = build("POST", "admin.example", Some("https://admin.example.evil"));
        assert!(browser_guard(&other, &post, locked).is_some());
    }

    #[test]
    fn drain_paths() {
        assert_eq!(
            drain_path("/api/backends/127.0.0.1:4000/drain"),
            Some(("127.0.0.1:4000", true))
        );
        assert_eq!(
            drain_path("/api/backends/[::1]:4000/undrain"),
            Some(("[::1]:4000", false))
        );
        assert_eq!(drain_path("/api/backends/x"), None);
    }

    #[test]
    fn push_targets() {
        let cfg = crate::config::PushConfig::default();
        let t = target(Some("alice".into()), None, None, &cfg, true)
            .ok()
            .unwrap();
        assert_eq!(t, ("uid", Some("uid:alice".to_string())));
        assert!(target(None, None, None, &cfg, true).is_err());
        assert!(target(None, None, Some(false), &cfg, true).is_err());
        assert!(target(Some("a".into()), Some("r".into()), None, &cfg, true).is_err());
        assert_eq!(
            target(None, None, Some(true), &cfg, true).ok().unwrap(),
            ("all", None)
        );
        assert!(target(None, None, Some(true), &cfg, false).is_err());
    }

    #[test]
    fn bodies_name_the_bad_field() {
        let unknown = parse_json::<PushRequest>(br#"{"uid":"a","event":"e","bogus":1}"#)
            .err()
            .unwrap();
        assert!(String::from_utf8_lossy(&unknown.body).contains("bogus"));
        let missing = parse_json::<PushRequest>(br#"{"uid":"a"}"#).err().unwrap();
        assert!(String::from_utf8_lossy(&missing.body).contains("event"));
        assert!(parse_json::<PushRequest>(b"{not json").is_err());
    }
}
