//! The access log: one line per request, and one per WebSocket tunnel when it closes.
//!
//! Lines go through `tracing` (target `gopush::access`) to a non-blocking writer set up in
//! [`crate::logging`]: formatting happens on the worker thread, the write on a background thread,
//! so a slow terminal or disk never stalls a request. Turn it off with `access_log.enabled: false`
//! or filter it with `RUST_LOG=gopush::access=off`. With `access_log.format: json` every line
//! (this one included) is one JSON object.

use pingora::lb::Backend;
use pingora::proxy::Session;
use pingora::Error;
use std::time::Duration;

/// One finished request or tunnel.
pub struct Entry<'a> {
    /// The request (method, path, status, bytes).
    pub session: &'a Session,
    /// The resolved uid, or "".
    pub uid: &'a str,
    /// The pool name, or "-".
    pub pool: &'a str,
    /// The backend, if one was chosen.
    pub backend: Option<&'a Backend>,
    /// The backend came from the session memory rather than the ring.
    pub affinity: bool,
    /// Time from the request head to the end (for a tunnel: its lifetime).
    pub elapsed: Duration,
    /// The error that ended the request, if any.
    pub error: Option<&'a Error>,
}

/// Emits the line for `e`.
pub fn write(e: Entry<'_>) {
    let req = e.session.req_header();
    let status = e
        .session
        .response_written()
        .map_or(0, |r| r.status.as_u16());
    let backend = e.backend.and_then(|b| b.addr.as_inet());
    // A number (0.1 ms resolution) rather than a formatted string, so that the JSON log format
    // carries it as a JSON number.
    let ms = (e.elapsed.as_secs_f64() * 10_000.0).round() / 10.0;
    tracing::info!(
        target: "gopush::access",
        method = %req.method,
        path = req.uri.path(),
        status,
        uid = e.uid,
        pool = e.pool,
        backend = backend.map(tracing::field::display),
        affinity = e.affinity,
        tunnel = e.session.was_upgraded(),
        ms,
        bytes = e.session.body_bytes_sent(),
        error = e.error.map(tracing::field::display),
    );
}
