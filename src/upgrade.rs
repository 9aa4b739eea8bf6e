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
//!
//! Apart from the guard, one rule for every upgrade request, guarded or not ([`close_upstream`]):
//! the backend connection that carried it is never reused. A backend that refuses an upgrade
//! with a framed answer (say `403` with `Content-Length`, no `Connection: close`) may still have
//! the socket in its upgrade handler; reused, that connection would carry another user's next
//! request (cookies included) into it. Pingora 0.9.1 decides reuse in `release_http_session`
//! (`respect_keepalive`) from the headers as they crossed the wire, the *request written* first:
//! a `close` token there turns keep-alive off whatever the backend answers, and the connection is
//! shut down instead of pooled. So the upstream request says `Connection: Upgrade, close`
//! (the `upgrade` token kept: the 101 still happens; Node's `http` server, `ws` and Socket.IO
//! accept it). Changing the *response* header in a filter would not do: Pingora filters a copy.

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

/// For every upstream request carrying `Upgrade` (guarded or not): add a `close` token to its
/// `Connection` header, so its backend connection is closed after the exchange, never pooled.
/// A `keep-alive` token is dropped (it would contradict); the other tokens are kept.
pub fn close_upstream(req: &mut RequestHeader) -> pingora::Result<()> {
    if !req.headers.contains_key(http::header::UPGRADE) {
        return Ok(());
    }
    let mut connection = String::new();
    for value in req.headers.get_all(http::header::CONNECTION) {
        let Ok(value) = value.to_str() else {
            continue; // not a list of tokens; the close below still applies
        };
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close") {
                connection.push_str(token);
                connection.push_str(", ");
            }
        }
    }
    connection.push_str("close");
    req.insert_header(http::header::CONNECTION, connection)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(connection: &[&str], upgrade: bool) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/ws", None).unwrap();
        for c in connection {
            req.append_header("connection", *c).unwrap();
        }
        if upgrade {
            req.insert_header("upgrade", "websocket").unwrap();
        }
        req
    }

    fn connection(req: &RequestHeader) -> Vec<&str> {
        req.headers
            .get_all("connection")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn an_upgrade_request_closes_its_backend_connection() {
        let mut req = upstream(&["Upgrade"], true);
        close_upstream(&mut req).unwrap();
        assert_eq!(connection(&req), ["Upgrade, close"]);

        // Firefox sends `keep-alive, Upgrade`; repeated headers are merged.
        let mut req = upstream(&["keep-alive, Upgrade", "close"], true);
        close_upstream(&mut req).unwrap();
        assert_eq!(connection(&req), ["Upgrade, close"]);
    }

    #[test]
    fn other_requests_are_left_alone() {
        let mut req = upstream(&["keep-alive"], false);
        close_upstream(&mut req).unwrap();
        assert_eq!(connection(&req), ["keep-alive"]);
    }
}
