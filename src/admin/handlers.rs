//! The admin API's handlers: status and metrics, reload, drain, route, push and disconnect.

use super::{push, AdminApp, Reply};
use crate::decide::{self, Refusal};
use crate::live::{unix_seconds, Snapshot};
use crate::routing::backend_addr;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::SystemTime;

impl AdminApp {
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

    pub(super) fn metrics(&self, snap: &Snapshot) -> Reply {
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

    pub(super) fn status(&self, snap: &Snapshot) -> Reply {
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
                "tls": self.tls_status(),
                "cluster": self.live.directory().map(|d| d.status()),
            }),
        )
    }

    /// Each TLS listener's certificates as its handshakes serve them now.
    fn tls_status(&self) -> Vec<Value> {
        self.live
            .listeners()
            .tls()
            .map(|l| {
                let table = l.resolver.table();
                let certs: Vec<Value> = table
                    .certs
                    .iter()
                    .map(|c| {
                        json!({
                            "cert": c.cert_file.display().to_string(),
                            "key": c.key_file.display().to_string(),
                            "names": c.names,
                            "not_after": rfc3339(crate::tls::unix_to_system(c.not_after)),
                            "not_after_unix": c.not_after,
                        })
                    })
                    .collect();
                json!({
                    "listen": l.addr.to_string(),
                    "default": table.default_name,
                    "certificates": certs,
                })
            })
            .collect()
    }

    /// `GET /api/users/{uid}`: the uid's connections across the cluster. `uid` is the path
    /// segment as sent, percent-decoded once (the canonical uid).
    pub(super) async fn user(&self, raw: &str) -> Reply {
        let Some(dir) = self.live.directory() else {
            return no_cluster();
        };
        let uid = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        if uid.is_empty() || uid.chars().any(char::is_control) {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "uid: must be non-empty, without control characters",
            );
        }
        Reply::json(StatusCode::OK, &dir.user(&uid).await)
    }

    /// `GET /api/users?cursor=C&limit=N`: uids online, with their connection counts, paged.
    pub(super) async fn users(&self, query: &str) -> Reply {
        let Some(dir) = self.live.directory() else {
            return no_cluster();
        };
        let param = |name: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let limit = match param("limit").map(|l| l.parse::<usize>()) {
            None => 100,
            Some(Ok(n)) if (1..=1000).contains(&n) => n,
            Some(_) => {
                return Reply::error(StatusCode::BAD_REQUEST, "limit: a number from 1 to 1000")
            }
        };
        let cursor = param("cursor").filter(|c| !c.is_empty());
        Reply::json(StatusCode::OK, &dir.users(cursor.as_deref(), limit).await)
    }

    /// `DELETE /api/connections/{agent}/{id}` (the `id` of `GET /api/users/{uid}`, each part
    /// percent-encoded): the agent that holds the connection closes it (see [`crate::kick`]).
    pub(super) async fn close_connection(&self, rest: &str) -> Reply {
        let Some(dir) = self.live.directory() else {
            return no_cluster();
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let Some((agent, id)) = rest.split_once('/').map(|(a, i)| (decode(a), decode(i))) else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "path: /api/connections/{agent}/{id}",
            );
        };
        if agent.is_empty() || id.is_empty() || format!("{agent}{id}").chars().any(char::is_control)
        {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                "agent and id: non-empty, without control characters",
            );
        }
        match dir.kick(&agent, &id, crate::kick::Reason::Admin).await {
            Ok(true) => Reply::json(
                StatusCode::ACCEPTED,
                &json!({"agent": agent, "id": id, "closing": true}),
            ),
            Ok(false) if agent == dir.agent() => Reply::error(
                StatusCode::NOT_FOUND,
                format!("no connection {id} on this agent ({agent})"),
            ),
            Ok(false) => Reply::error(
                StatusCode::NOT_FOUND,
                format!(
                    "agent {agent} is not listening for commands (gone, or not connected to redis)"
                ),
            ),
            Err(e) => Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot reach agent {agent}: {e}"),
            ),
        }
    }

    pub(super) async fn reload(&self) -> Reply {
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

    pub(super) fn drain(&self, snap: &Snapshot, addr: &str, draining: bool) -> Reply {
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

    pub(super) async fn push(&self, snap: &Snapshot, body: &[u8]) -> Reply {
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

    pub(super) async fn disconnect(&self, snap: &Snapshot, body: &[u8]) -> Reply {
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
    if push::RESERVED_EVENTS.contains(&event) {
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

/// `GET /api/route?uid=U&product=P&sid=S`: where a request of uid `U` goes now, decided by the
/// proxy's own [`decide::route`] (route hook, product, sid memory, health, drain). `U` is the
/// uid as a client sends it (cookie or query value) and so percent-decoded once here, as any URL
/// parameter; the answer's `uid` is the canonical (decoded) uid. `sid` asks about a live session.
pub(super) fn route(
    snap: &Snapshot,
    sessions: Option<&crate::affinity::Affinity>,
    query: &str,
) -> Reply {
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

fn no_cluster() -> Reply {
    Reply::error(
        StatusCode::NOT_FOUND,
        "presence needs the `cluster` section (the connection directory in Redis)",
    )
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
