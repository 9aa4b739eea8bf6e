//! What happens to a request: who it is for and where it goes, decided without sockets.
//!
//! ```text
//! resolve_uid   the uid hook, or the sources in order (cookie, query, header, jwt, callback)
//!               → one canonical Uid (decoded; the value as sent kept only as the ring key)
//! route         route hook (default / pool / explicit backend) → product's pool
//!               → live session (sid memory, same uid, backend still accepted) → ring (health, drain)
//!               → Decision { target, learn_sid }
//! ```
//!
//! The proxy ([`crate::proxy`]), the admin API's `/api/route` and `gopush route` all call
//! [`route`], so they give the same answer for the same request, hooks and sid memory included.
//! Limits are not decided here: they count requests, which only the proxy does (between
//! [`resolve_uid`] and [`route`], so a refused uid costs no route hook run).
//!
//! Every answer the agent writes itself comes from one table, [`Refusal::response`].

use crate::affinity::{self, Affinity};
use crate::callback::Answer;
use crate::hooks::{HookError, HookKind, HookRequest, RouteDecision};
use crate::limits::Exceeded;
use crate::live::Snapshot;
use crate::metrics::RefusalKind;
use crate::uid::{query_value, Step, Uid, UidError};
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::lb::Backend;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use std::net::IpAddr;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The uid's place on the pool's ring (healthy, not draining). On a refused connect the
    /// next backend on the ring is tried once.
    Ring { pool: usize, backend: Backend },
    /// A live Engine.IO session's backend, from the sid memory. Never moved: the session's
    /// state exists only there.
    Session { pool: usize, backend: Backend },
    /// The route hook named this backend (outside any pool: no ring, no health, no retry).
    Explicit { backend: Backend },
}

impl Target {
    /// The chosen backend.
    pub fn backend(&self) -> &Backend {
        match self {
            Target::Ring { backend, .. }
            | Target::Session { backend, .. }
            | Target::Explicit { backend } => backend,
        }
    }

    /// Index of the pool in the snapshot's router (`None` for an explicit backend).
    pub fn pool(&self) -> Option<usize> {
        match self {
            Target::Ring { pool, .. } | Target::Session { pool, .. } => Some(*pool),
            Target::Explicit { .. } => None,
        }
    }

    /// How it was chosen, for the admin API and `gopush route`.
    pub fn via(&self) -> &'static str {
        match self {
            Target::Ring { .. } => "ring",
            Target::Session { .. } => "session",
            Target::Explicit { .. } => "hook",
        }
    }
}

/// The outcome of [`route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    /// The request opens a polling session on a pool backend: read its sid from the response.
    pub learn_sid: bool,
}

/// A request the agent answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    MissingUid,
    InvalidUid(&'static str),
    /// Credentials were refused (a bad token, the auth callback said no): 430 with the reason.
    Rejected(&'static str),
    UnknownProduct,
    NoHealthyBackend,
    /// A hook failed or the auth callback could not be asked: this status; details are logged.
    Failed(u16, &'static str),
    Limit(Exceeded),
    /// Proxying failed after the decision (`fail_to_proxy`): this status.
    Proxy(u16),
}

impl From<UidError> for Refusal {
    fn from(e: UidError) -> Self {
        match e {
            UidError::Missing => Refusal::MissingUid,
            UidError::Invalid(why) => Refusal::InvalidUid(why),
            UidError::Rejected(why) => Refusal::Rejected(why),
        }
    }
}

impl Refusal {
    /// The label it is counted under.
    pub fn kind(&self) -> RefusalKind {
        match self {
            Refusal::MissingUid => RefusalKind::MissingUid,
            Refusal::InvalidUid(_) => RefusalKind::InvalidUid,
            Refusal::UnknownProduct => RefusalKind::UnknownProduct,
            Refusal::NoHealthyBackend | Refusal::Proxy(_) => RefusalKind::NoBackend,
            Refusal::Limit(_) => RefusalKind::Limit,
            Refusal::Rejected(_) => RefusalKind::Rejected,
            Refusal::Failed(..) => RefusalKind::HookFailed,
        }
    }

    /// Status, reason phrase and body: the one table every answer the agent writes comes from.
    pub fn response(&self, snap: &Snapshot) -> (u16, &'static str, Bytes) {
        let text = |s: &'static str| Bytes::from_static(s.as_bytes());
        match self {
            Refusal::MissingUid => (430, "Uid Required", snap.missing_uid_body.clone()),
            Refusal::InvalidUid(why) => (
                400,
                "Bad Request",
                Bytes::from(format!("gopush: invalid uid: {why}\n")),
            ),
            Refusal::Rejected(why) => (
                430,
                "Uid Required",
                Bytes::from(format!("gopush: uid refused: {why}\n")),
            ),
            Refusal::UnknownProduct => (404, "Not Found", text("gopush: unknown product\n")),
            Refusal::NoHealthyBackend => (
                503,
                "Service Unavailable",
                text("gopush: no healthy backend in the pool\n"),
            ),
            Refusal::Failed(status, what) => (
                *status,
                reason_phrase(*status),
                Bytes::from(format!("gopush: {what}\n")),
            ),
            Refusal::Limit(which) => {
                let (status, reason, body) = which.response();
                (status, reason, text(body))
            }
            Refusal::Proxy(status) => {
                let body = match status {
                    503 => "gopush: no healthy backend in the pool\n",
                    502 => "gopush: the backend failed or closed the connection\n",
                    504 => "gopush: the backend did not answer in time\n",
                    400 => "gopush: bad request\n",
                    _ => "gopush: the request failed\n",
                };
                (*status, reason_phrase(*status), text(body))
            }
        }
    }
}

/// The phrase for a status (`http` knows none for 430).
pub fn reason_phrase(status: u16) -> &'static str {
    if status == 430 {
        return "Uid Required";
    }
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// The `req` a hook sees; built only when a hook is about to run.
fn hook_request<'a>(
    snap: &Snapshot,
    req: &'a RequestHeader,
    peer: Option<IpAddr>,
) -> HookRequest<'a> {
    let query = req.uri.query().unwrap_or("");
    HookRequest {
        header: req,
        ip: crate::client_ip::of_request(&snap.config.trusted_proxies, peer, req),
        product: query_value(query, &snap.config.product_param),
    }
}

/// The uid of `req`: from the uid hook when there is one, else from the sources in order
/// (asking an auth callback where one is configured). `peer` is the TCP peer.
pub async fn resolve_uid(
    snap: &Snapshot,
    req: &RequestHeader,
    peer: Option<IpAddr>,
) -> Result<Uid, Refusal> {
    let max_len = snap.resolver.max_len();
    if let Some(hooks) = snap.hooks.as_ref().filter(|h| h.has(HookKind::Uid)) {
        return match hooks.uid(&hook_request(snap, req, peer)) {
            Ok(Some(uid)) => Ok(Uid::from_value(&uid, max_len)?),
            Ok(None) => Err(Refusal::MissingUid),
            Err(e) => Err(hook_failed(
                snap.config.hooks.on_throw.uid,
                &e,
                "the uid hook failed",
            )),
        };
    }
    let mut from = 0;
    // Bounded: every turn either returns or moves `from` past a callback source.
    loop {
        match snap.resolver.next(req, from)? {
            Step::Found(uid) => return Ok(uid),
            Step::Ask(i) => {
                let Some(client) = snap.resolver.callback(i) else {
                    return Err(Refusal::MissingUid);
                };
                let Some(creds) = client.credentials(req) else {
                    from = i + 1;
                    continue;
                };
                return match client.ask(&creds).await {
                    Answer::Uid(uid) => Ok(Uid::from_value(&uid, max_len)?.with_source(i)),
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

/// A hook's failure: its resource limits always answer 500 (the operator's budget, not the
/// client's fault); anything else the configured status.
fn hook_failed(on_throw: u16, e: &HookError, what: &'static str) -> Refusal {
    Refusal::Failed(if e.is_limit() { 500 } else { on_throw }, what)
}

/// Where the request of `uid` goes: route hook, product, live session, ring.
pub fn route(
    snap: &Snapshot,
    sessions: Option<&Affinity>,
    req: &RequestHeader,
    peer: Option<IpAddr>,
    uid: &Uid,
) -> Result<Decision, Refusal> {
    let query = req.uri.query().unwrap_or("");
    let product = query_value(query, &snap.config.product_param);
    let mut chosen = None;
    if let Some(hooks) = snap.hooks.as_ref().filter(|h| h.has(HookKind::Route)) {
        let on_throw = snap.config.hooks.on_throw.route;
        match hooks.route(&hook_request(snap, req, peer), uid.as_str()) {
            Ok(RouteDecision::Default) => {}
            Ok(RouteDecision::Pool(name)) => match snap.router.pool_index(Some(&name)) {
                Ok(i) => chosen = Some(i),
                Err(_) => {
                    tracing::warn!(target: "gopush::hooks", "hook route: returned pool `{name}`, which is not configured");
                    crate::metrics::counters().hook_errors.inc();
                    let e = HookError::BadReturn(name);
                    return Err(hook_failed(on_throw, &e, "the route hook failed"));
                }
            },
            Ok(RouteDecision::Backend(addr)) => {
                let backend = Backend {
                    addr: PeerAddr::Inet(addr),
                    weight: 1,
                    ext: Default::default(),
                };
                return Ok(Decision {
                    target: Target::Explicit { backend },
                    learn_sid: false,
                });
            }
            Err(e) => return Err(hook_failed(on_throw, &e, "the route hook failed")),
        }
    }
    let pool_index = match chosen {
        Some(i) => i,
        None => snap
            .router
            .pool_index(product)
            .map_err(|_| Refusal::UnknownProduct)?,
    };
    let pool = snap
        .router
        .pool_at(pool_index)
        .ok_or(Refusal::UnknownProduct)?;
    let mut learn_sid = false;
    if let Some(memory) = sessions {
        if let Some(sid) = query_value(query, "sid") {
            // Health (or retired by discovery), not drain: a live session stays on a draining
            // backend.
            if let Some(backend) = memory
                .lookup(sid, uid.as_str())
                .filter(|b| pool.accepts_session(b))
            {
                return Ok(Decision {
                    target: Target::Session {
                        pool: pool_index,
                        backend,
                    },
                    learn_sid: false,
                });
            }
        } else {
            learn_sid = affinity::is_polling_handshake(req, &snap.startup.affinity.path);
        }
    }
    let backend = pool
        .select(uid.ring_key())
        .ok_or(Refusal::NoHealthyBackend)?;
    Ok(Decision {
        target: Target::Ring {
            pool: pool_index,
            backend,
        },
        learn_sid,
    })
}

/// The request head `/api/route` and `gopush route` decide for: a polling request under the
/// Socket.IO path carrying the product and, when given, the live session's sid, so that the
/// route hook and the sid memory see what they would see from a client.
pub fn probe_request(
    snap: &Snapshot,
    product: Option<&str>,
    sid: Option<&str>,
) -> Result<RequestHeader, Refusal> {
    let mut target = format!("{}?EIO=4&transport=polling", snap.startup.affinity.path);
    let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    if let Some(p) = product {
        target.push_str(&format!("&{}={}", enc(&snap.config.product_param), enc(p)));
    }
    if let Some(s) = sid {
        target.push_str(&format!("&sid={}", enc(s)));
    }
    let mut req =
        RequestHeader::build("GET", target.as_bytes(), None).map_err(|_| Refusal::Proxy(400))?;
    req.insert_header(http::header::HOST, "localhost")
        .map_err(|_| Refusal::Proxy(400))?;
    Ok(req)
}

#[cfg(test)]
mod tests;
