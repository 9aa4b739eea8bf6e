//! Session continuity: a live Engine.IO session keeps reaching the backend that created it.
//!
//! Engine.IO puts `sid=<id>` in the query of every request after the handshake (long-polls, posts
//! and the WebSocket upgrade). The ring's answer for a uid can change while a session lives (its
//! backend failed and recovered, a backend was added); without this memory every polling client
//! created during the change would get `400 Session ID unknown` afterwards.
//!
//! The agent learns `sid → backend` from the handshake response it relays and prefers that backend
//! for the session's later requests while it is healthy. The memory is bounded (a TinyUFO cache
//! from Pingora, evicting the least useful entries) and entries expire. It is per agent: with
//! several agents, requests of one session normally agree anyway because their rings agree; the
//! memory only matters in the window where a ring's answer changed.

use pingora::lb::Backend;
use pingora_memory_cache::MemoryCache;
use std::time::Duration;

/// Bounded `sid → backend` memory.
pub struct Affinity {
    cache: MemoryCache<String, Backend>,
    ttl: Duration,
}

impl Affinity {
    /// Remembers at most about `capacity` sessions, each for `ttl` after its handshake.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Affinity {
            cache: MemoryCache::new(capacity),
            ttl,
        }
    }

    /// The backend that created session `sid`, if remembered.
    pub fn lookup(&self, sid: &str) -> Option<Backend> {
        self.cache.get(sid).0
    }

    /// Records that `backend` created session `sid`.
    pub fn learn(&self, sid: &str, backend: Backend) {
        self.cache.put(sid, backend, Some(self.ttl));
    }
}

/// The `sid` of an Engine.IO handshake response body (`0{"sid":"…",…}` for polling), if present
/// in this chunk. A handshake body is a few hundred bytes, so it arrives in the first chunk.
pub fn sid_in_handshake(body: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"sid\":\"";
    let start = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = body[start..].iter().position(|&b| b == b'"')?;
    let sid = std::str::from_utf8(&body[start..start + len]).ok()?;
    (!sid.is_empty() && sid.len() <= 64).then_some(sid)
}

/// Is this an Engine.IO request that opens a session over long-polling (no `sid` yet)? Only those
/// responses are scanned for a new sid; WebSocket-only sessions live on one connection and need
/// no memory.
pub fn is_polling_handshake(query: &str) -> bool {
    let mut eio = false;
    let mut polling = false;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sid", _)) => return false,
            Some(("EIO", _)) => eio = true,
            Some(("transport", "polling")) => polling = true,
            _ => {}
        }
    }
    eio && polling
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sid_in_polling_handshake() {
        let body =
            br#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000}"#;
        assert_eq!(sid_in_handshake(body), Some("lv_VI97HAXpY6yYWAAAC"));
        assert_eq!(sid_in_handshake(b"ok"), None);
        assert_eq!(sid_in_handshake(br#"0{"sid":""}"#), None);
        assert_eq!(sid_in_handshake(br#"0{"sid":"unterminated"#), None);
    }

    #[test]
    fn recognises_polling_handshakes_only() {
        assert!(is_polling_handshake("EIO=4&transport=polling&t=abc&uid=1"));
        assert!(!is_polling_handshake("EIO=4&transport=polling&sid=x"));
        assert!(!is_polling_handshake("EIO=4&transport=websocket"));
        assert!(!is_polling_handshake("transport=polling"));
    }

    #[test]
    fn remembers_and_forgets() {
        let a = Affinity::new(16, Duration::from_secs(60));
        let b = Backend::new("127.0.0.1:4000").unwrap();
        assert!(a.lookup("s1").is_none());
        a.learn("s1", b.clone());
        assert_eq!(a.lookup("s1").map(|x| x.addr), Some(b.addr));
    }
}
