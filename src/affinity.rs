//! Session continuity: a live Engine.IO session keeps reaching the backend that created it.
//!
//! Engine.IO puts `sid=<id>` in the query of every request after the handshake (long-polls, posts
//! and the WebSocket upgrade). The ring's answer for a uid can change while a session lives (its
//! backend failed and recovered, a backend was added); without this memory every polling client
//! created during the change would get `400 Session ID unknown` afterwards.
//!
//! The agent learns `sid → (uid, backend)` from a real Engine.IO polling handshake it relays
//! ([`is_polling_handshake`], [`sid_in_open_packet`]) and prefers that backend for the session's
//! later requests *of the same uid* while it is healthy. Keyed by sid but checked against the
//! uid: a request of another uid never uses an entry, and a handshake never replaces the entry of
//! another uid, so knowing a victim's sid is not enough to move the victim's session. The memory
//! is bounded (a TinyUFO cache from Pingora, evicting the least useful entries) and entries
//! expire. It is per agent: with several agents, requests of one session normally agree anyway
//! because their rings agree; the memory only matters in the window where a ring's answer changed.

use pingora::lb::Backend;
use pingora_memory_cache::MemoryCache;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Bounded `sid → (uid, backend)` memory.
pub struct Affinity {
    cache: MemoryCache<String, Entry>,
    ttl: Duration,
}

#[derive(Clone)]
struct Entry {
    uid: Arc<str>,
    backend: Backend,
}

impl Affinity {
    /// Remembers at most about `capacity` sessions, each for `ttl` after its handshake.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Affinity {
            cache: MemoryCache::new(capacity),
            ttl,
        }
    }

    /// The backend that created session `sid` for `uid` (the canonical uid), if remembered.
    pub fn lookup(&self, sid: &str, uid: &str) -> Option<Backend> {
        self.cache
            .get(sid)
            .0
            .filter(|e| &*e.uid == uid)
            .map(|e| e.backend)
    }

    /// Records that `backend` created session `sid` for `uid`, unless the sid is remembered for
    /// another uid (that entry stays: a handshake cannot take over another user's session).
    pub fn learn(&self, sid: &str, uid: &str, backend: Backend) {
        if let Some(other) = self.cache.get(sid).0 {
            if &*other.uid != uid {
                tracing::warn!(
                    sid,
                    "a handshake named a sid remembered for another uid; kept the first"
                );
                return;
            }
        }
        let entry = Entry {
            uid: uid.into(),
            backend,
        };
        self.cache.put(sid, entry, Some(self.ttl));
    }
}

/// The Engine.IO open packet of a polling handshake: `0{"sid":…,"upgrades":…,"pingInterval":…,
/// "pingTimeout":…}` (EIO 4), or the same behind a `<length>:` prefix (EIO 3).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenPacket<'a> {
    sid: &'a str,
    #[allow(dead_code)] // required: its presence is what makes this an open packet
    upgrades: Vec<&'a str>,
    ping_interval: u64,
    ping_timeout: u64,
}

/// What an open packet says about its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open<'a> {
    pub sid: &'a str,
    /// `pingInterval + pingTimeout`: a polling session with no request for this long is gone.
    pub idle_ms: u64,
}

/// The `sid` of an Engine.IO polling handshake response, if `body` is exactly one open packet
/// (anything else, a page that merely contains `"sid":"…"` included, is not a handshake). A
/// handshake body is a few hundred bytes, so it arrives in the first chunk.
pub fn sid_in_open_packet(body: &[u8]) -> Option<&str> {
    open_packet(body).map(|o| o.sid)
}

/// [`sid_in_open_packet`], with the session's idle bound.
pub fn open_packet(body: &[u8]) -> Option<Open<'_>> {
    let text = std::str::from_utf8(body).ok()?;
    // EIO 3 frames the packet as `<length>:<packet>`.
    let packet = match text.split_once(':') {
        Some((len, rest)) if !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) => {
            (len.parse::<usize>().ok()? == rest.chars().count()).then_some(rest)?
        }
        _ => text,
    };
    let open: OpenPacket = serde_json::from_str(packet.strip_prefix('0')?).ok()?;
    let sid = open.sid;
    plausible_sid(sid).then_some(Open {
        sid,
        idle_ms: open.ping_interval.saturating_add(open.ping_timeout),
    })
}

/// Could `sid` be an Engine.IO session id (what an open packet must name to be learnt)?
pub fn plausible_sid(sid: &str) -> bool {
    !sid.is_empty()
        && sid.len() <= 64
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Does a polling payload (packets separated by `\x1e`, EIO 4) carry a close packet (`1`)? A
/// chunk boundary inside a payload can hide one; the idle bound ends such a session anyway.
pub fn has_close_packet(body: &[u8]) -> bool {
    body.split(|&b| b == 0x1e).any(|p| p == b"1")
}

/// Is this request an Engine.IO handshake that opens a session over long-polling: a `GET` under
/// the Socket.IO path (`affinity.path`) with `EIO` and `transport=polling` and no `sid`? Only
/// those responses are read for a new sid; WebSocket-only sessions live on one connection and
/// need no memory.
pub fn is_polling_handshake(req: &pingora::http::RequestHeader, path: &str) -> bool {
    if req.method != http::Method::GET || !req.uri.path().starts_with(path) {
        return false;
    }
    let mut eio = false;
    let mut polling = false;
    // Names and values decoded as Engine.IO decodes them, so `s%69d=…` counts as a sid.
    for (name, value) in form_urlencoded::parse(req.uri.query().unwrap_or("").as_bytes()) {
        match &*name {
            "sid" => return false,
            "EIO" => eio = true,
            "transport" => polling = value == "polling",
            _ => {}
        }
    }
    eio && polling
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::RequestHeader;

    const OPEN: &[u8] = br#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;

    #[test]
    fn reads_the_sid_of_an_open_packet_only() {
        assert_eq!(sid_in_open_packet(OPEN), Some("lv_VI97HAXpY6yYWAAAC"));
        let packet =
            r#"0{"sid":"abc","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000}"#;
        let eio3 = format!("{}:{packet}", packet.chars().count());
        assert_eq!(sid_in_open_packet(eio3.as_bytes()), Some("abc"));
        assert_eq!(sid_in_open_packet(format!("1:{packet}").as_bytes()), None);
        // Reflected or partial content that merely contains a sid is not a handshake.
        for body in [
            &b"ok"[..],
            br#"0{"sid":""}"#,
            br#"0{"sid":"unterminated"#,
            br#"<p>0{"sid":"victim","upgrades":[],"pingInterval":1,"pingTimeout":1}</p>"#,
            br#"{"sid":"victim","upgrades":[],"pingInterval":1,"pingTimeout":1}"#,
            br#"0{"sid":"victim"}"#,
            br#"0{"sid":"a\"b","upgrades":[],"pingInterval":1,"pingTimeout":1}"#,
            br#"0{"sid":"x","upgrades":[],"pingInterval":1,"pingTimeout":1}trailing"#,
        ] {
            assert_eq!(
                sid_in_open_packet(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn reads_the_idle_bound_and_close_packets() {
        assert_eq!(
            open_packet(OPEN),
            Some(Open {
                sid: "lv_VI97HAXpY6yYWAAAC",
                idle_ms: 45_000
            })
        );
        assert!(has_close_packet(b"1"));
        assert!(has_close_packet(b"4hello\x1e1"));
        assert!(!has_close_packet(b"41"));
        assert!(!has_close_packet(b"6"));
    }

    fn get(uri: &str) -> RequestHeader {
        RequestHeader::build("GET", uri.as_bytes(), None).unwrap()
    }

    #[test]
    fn recognises_polling_handshakes_under_the_socket_io_path_only() {
        let p = "/socket.io/";
        assert!(is_polling_handshake(
            &get("/socket.io/?EIO=4&transport=polling&t=abc&uid=1"),
            p
        ));
        assert!(!is_polling_handshake(
            &get("/socket.io/?EIO=4&transport=polling&sid=x"),
            p
        ));
        assert!(!is_polling_handshake(
            &get("/socket.io/?EIO=4&transport=polling&s%69d=x"),
            p
        ));
        assert!(!is_polling_handshake(
            &get("/socket.io/?EIO=4&transport=websocket"),
            p
        ));
        assert!(!is_polling_handshake(
            &get("/socket.io/?transport=polling"),
            p
        ));
        assert!(!is_polling_handshake(
            &get("/reflect?EIO=4&transport=polling"),
            p
        ));
        assert!(is_polling_handshake(
            &get("/app/?EIO=4&transport=polling"),
            "/app/"
        ));
        let post =
            RequestHeader::build("POST", b"/socket.io/?EIO=4&transport=polling", None).unwrap();
        assert!(!is_polling_handshake(&post, p));
    }

    #[test]
    fn remembers_per_uid() {
        let a = Affinity::new(16, Duration::from_secs(60));
        let b = Backend::new("127.0.0.1:4000").unwrap();
        let other = Backend::new("127.0.0.1:4001").unwrap();
        assert!(a.lookup("s1", "alice").is_none());
        a.learn("s1", "alice", b.clone());
        assert_eq!(
            a.lookup("s1", "alice").map(|x| x.addr),
            Some(b.addr.clone())
        );
        // Another uid neither uses nor replaces alice's session.
        assert!(a.lookup("s1", "mallory").is_none());
        a.learn("s1", "mallory", other);
        assert_eq!(a.lookup("s1", "alice").map(|x| x.addr), Some(b.addr));
    }

    #[test]
    fn forgets_after_the_ttl() {
        let a = Affinity::new(16, Duration::from_millis(1));
        a.learn("s1", "alice", Backend::new("127.0.0.1:4000").unwrap());
        // Expiry compares against the clock: wait until the entry is past its TTL.
        let start = std::time::Instant::now();
        while a.lookup("s1", "alice").is_some() {
            assert!(start.elapsed() < Duration::from_secs(5), "never expired");
            std::thread::yield_now();
        }
    }

    #[test]
    fn is_bounded() {
        let a = Affinity::new(8, Duration::from_secs(60));
        let b = Backend::new("127.0.0.1:4000").unwrap();
        for i in 0..1000 {
            a.learn(&format!("s{i}"), "u", b.clone());
        }
        let kept = (0..1000)
            .filter(|i| a.lookup(&format!("s{i}"), "u").is_some())
            .count();
        assert!(kept <= 16, "kept {kept} of 1000 with capacity 8");
    }
}
