//! Routing of the admin paths to their handlers, after the browser guard and authentication.

use super::auth::{authorize, browser_guard};
use super::handlers::route;
use super::{AdminApp, Reply, PAGE_HTML};
use crate::config::Config;
use http::{Method, StatusCode};
use pingora::protocols::http::ServerSession;

impl AdminApp {
    pub(super) async fn handle(&self, session: &mut ServerSession) -> Reply {
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
            "/api/users" if get => self.users(&query).await,
            "/metrics" | "/api/status" | "/api/route" | "/api/reload" | "/api/push"
            | "/api/disconnect" | "/api/users" => method_not_allowed(),
            _ if path.starts_with("/api/users/") => match path.strip_prefix("/api/users/") {
                Some(uid) if get => self.user(uid).await,
                _ => method_not_allowed(),
            },
            _ if path.starts_with("/api/connections/") => {
                match path.strip_prefix("/api/connections/") {
                    Some(rest) if method == Method::DELETE => self.close_connection(rest).await,
                    _ => method_not_allowed(),
                }
            }
            _ => match drain_path(&path) {
                Some((addr, draining)) if post => self.drain(&snap, addr, draining),
                Some(_) => method_not_allowed(),
                None => Reply::error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
            },
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
