//! The admin listener: a JSON API, Prometheus metrics and an embedded web page, served by a
//! Pingora `ServeHttp` service on its own address (`admin.listen`, loopback by default), in the
//! same process as the proxy. Everything but the page itself needs authentication
//! (`auth::authorize`, the one authentication seam).
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
//! GET  /api/users/{uid}               presence: the uid's connections across the cluster
//! GET  /api/users?cursor=C&limit=N    presence: uids online with connection counts, paged
//! ```
//!
//! The API only reads the live snapshot and the shared drain set and metrics; it is never on the
//! proxy's request path.
//!
//! `auth` decides who may ask, `api` routes a path to its handler in `handlers`, `push` encodes
//! what `/api/push` and `/api/disconnect` publish.

mod api;
mod auth;
mod handlers;
pub(crate) mod push;

use crate::live::Live;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use push::Publisher;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// The admin page, embedded in the binary.
pub(crate) const PAGE_HTML: &str = include_str!("page.html");

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
