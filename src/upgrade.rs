//! WebSocket upgrades without lost handshakes (the workaround for cloudflare/pingora#946).
//!
//! The race in Pingora 0.9.1: a WebSocket `GET` has no body framing, so its downstream body reader
//! is "content-length 0", which is finished the moment it is set up. The proxy loop therefore
//! queues an empty "request body finished" task for the upstream side before the backend has
//! answered. When the backend's `101` is read first, the connection switches to tunnel mode and
//! that stale task is taken as the *end of the tunnel*: the client gets the 101 and then an
//! immediate close (code 1006). Measured at about 2 per 1,000 connects with two threads and four
//! concurrent clients.
//!
//! The guard, entirely from inside `ProxyHttp` (no patched Pingora):
//! 1. `request_filter`: for a body-less HTTP/1.1 upgrade request, make Pingora set up a *streaming*
//!    (chunked) body reader by presenting `Transfer-Encoding: chunked` while the reader is
//!    initialised, then remove the header again. A chunked reader is not finished until data
//!    arrives, so no premature "finished" task is queued; on the 101 Pingora converts it into the
//!    pass-through tunnel reader.
//! 2. `upstream_request_filter`: send `Content-Length: 0` so the backend sees an ordinary
//!    body-less request (the removed header must not make Pingora stream a body upstream).
//! 3. `response_filter`: on 101, lift the downstream read timeout (an idle WebSocket must outlive
//!    Pingora's 60 s default; socket.io pings every 25 s but raw WebSocket users may not). On a
//!    refused upgrade (any other status) the client will send no body, so the reader that waits
//!    for one is given a short timeout and the connection is closed after the response.

use pingora::http::RequestHeader;
use pingora::proxy::Session;
use std::time::Duration;

/// How long the connection of a refused upgrade may linger after its response.
const REFUSED_UPGRADE_LINGER: Duration = Duration::from_secs(1);

/// Step 1; returns whether the guard is in place for this request.
pub fn guard_request(session: &mut Session) -> bool {
    if session.is_http2() || !session.is_upgrade_req() {
        return false;
    }
    let req = session.req_header();
    if req.headers.contains_key(http::header::CONTENT_LENGTH)
        || req.headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        // Framed: Pingora's reader already behaves.
        return false;
    }
    if session
        .req_header_mut()
        .insert_header(http::header::TRANSFER_ENCODING, "chunked")
        .is_err()
    {
        return false;
    }
    // Initialises the body reader from the headers as they are now: chunked, not finished.
    let _ = session.is_body_empty();
    session
        .req_header_mut()
        .remove_header(&http::header::TRANSFER_ENCODING);
    true
}

/// Step 2.
pub fn guard_upstream_request(req: &mut RequestHeader) -> pingora::Result<()> {
    req.remove_header(&http::header::TRANSFER_ENCODING);
    req.insert_header(http::header::CONTENT_LENGTH, "0")?;
    Ok(())
}

/// Step 3.
pub fn on_response(session: &mut Session, status: u16) {
    if status == 101 {
        session.set_read_timeout(None);
    } else {
        session.set_keepalive(None);
        session.set_read_timeout(Some(REFUSED_UPGRADE_LINGER));
    }
}
