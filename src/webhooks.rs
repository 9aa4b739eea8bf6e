//! Presence webhooks (`cluster.webhooks`): `connection.open`, `connection.close`, `user.online`
//! and `user.offline` as seen by this agent's directory, POSTed as JSON to each receiver and
//! signed with HMAC-SHA256 over the exact body.
//!
//! The request path never waits: the directory pushes an event into each receiver's bounded
//! queue (drop oldest past `queue`, counted in `gopush_webhook_dropped_total`) and one background
//! task per receiver sends them in order, retrying the head with backoff until the receiver
//! answers 2xx (at least once; the `id` lets the receiver drop duplicates).
//!
//! `user.offline` is emitted only after `cluster.offline_after` without any connection of the
//! uid on this agent, and `user.online` not again if the uid came back within that grace: an
//! upgrade, a hand-over or a quick reconnect does not flap.

use crate::callback::{parse_url, CallbackUrl};
use crate::metrics::counters;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use serde::{de, Deserialize, Deserializer, Serialize};
use sha2::Sha256;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// First retry delay; it doubles up to [`MAX_BACKOFF`].
const BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Budget of one delivery attempt, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The four presence events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Event {
    #[serde(rename = "user.online")]
    UserOnline,
    #[serde(rename = "user.offline")]
    UserOffline,
    #[serde(rename = "connection.open")]
    ConnectionOpen,
    #[serde(rename = "connection.close")]
    ConnectionClose,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::UserOnline => "user.online",
            Event::UserOffline => "user.offline",
            Event::ConnectionOpen => "connection.open",
            Event::ConnectionClose => "connection.close",
        }
    }
}

fn all_events() -> Vec<Event> {
    vec![
        Event::UserOnline,
        Event::UserOffline,
        Event::ConnectionOpen,
        Event::ConnectionClose,
    ]
}

fn default_queue() -> usize {
    10_000
}

/// One receiver as configured.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://IP[:port]/path` (a literal address: no DNS, no TLS yet).
    #[serde(deserialize_with = "hook_url")]
    pub url: CallbackUrl,
    /// The events sent to it (absent: all four).
    #[serde(default = "all_events")]
    pub events: Vec<Event>,
    /// The HMAC-SHA256 key.
    pub secret: String,
    /// Most deliveries kept while the receiver is down; past it the oldest are dropped.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

// The secret never reaches a log.
impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url.to_string())
            .field("events", &self.events)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

fn hook_url<'de, D: Deserializer<'de>>(d: D) -> Result<CallbackUrl, D::Error> {
    let text = String::deserialize(d)?;
    parse_url(&text).map_err(de::Error::custom)
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`, the `X-Gopush-Signature` header.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// One event ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub event: Event,
    pub body: Bytes,
}

/// A bounded FIFO that drops its oldest entry when full.
#[derive(Debug)]
pub struct Bounded {
    items: VecDeque<Delivery>,
    cap: usize,
    pub dropped: u64,
}

impl Bounded {
    pub fn new(cap: usize) -> Self {
        Bounded {
            items: VecDeque::new(),
            cap: cap.max(1),
            dropped: 0,
        }
    }

    /// Appends `d`; answers whether the oldest was dropped for it.
    pub fn push(&mut self, d: Delivery) -> bool {
        let full = self.items.len() >= self.cap;
        if full {
            self.items.pop_front();
            self.dropped += 1;
        }
        self.items.push_back(d);
        full
    }

    pub fn front(&self) -> Option<&Delivery> {
        self.items.front()
    }

    /// Removes the head if it is still `id` (it may have been dropped meanwhile).
    pub fn done(&mut self, id: &str) {
        if self.items.front().is_some_and(|d| d.id == id) {
            self.items.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

struct Target {
    cfg: WebhookConfig,
    queue: Mutex<Bounded>,
    wake: tokio::sync::Notify,
}

impl Target {
    fn queue(&self) -> MutexGuard<'_, Bounded> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receivers, their queues and the offline grace.
pub struct Webhooks {
    agent: String,
    targets: Vec<Arc<Target>>,
    offline_after: Duration,
    seq: AtomicU64,
    /// Uids whose last local connection closed: when their `user.offline` is due.
    pending: Mutex<HashMap<Arc<str>, Instant>>,
    connector: Connector,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Webhooks {
    /// `None` without receivers.
    pub fn new(agent: &str, hooks: &[WebhookConfig], offline_after: Duration) -> Option<Self> {
        if hooks.is_empty() {
            return None;
        }
        Some(Webhooks {
            agent: agent.to_string(),
            targets: hooks
                .iter()
                .map(|cfg| {
                    Arc::new(Target {
                        cfg: cfg.clone(),
                        queue: Mutex::new(Bounded::new(cfg.queue)),
                        wake: tokio::sync::Notify::new(),
                    })
                })
                .collect(),
            offline_after,
            seq: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            connector: Connector::new(None),
        })
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<Arc<str>, Instant>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event` for every receiver that wants it (never waits).
    pub fn emit(&self, event: Event, uid: &str, conn: Option<(&str, &str)>) {
        if !self.targets.iter().any(|t| t.cfg.events.contains(&event)) {
            return;
        }
        // Agent id and start-relative sequence: unique per process, stable across retries.
        let id = format!(
            "{}-{}",
            self.agent,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let mut v = serde_json::json!({
            "id": id,
            "type": event.name(),
            "uid": uid,
            "agent": self.agent,
            "time": now_ms(),
        });
        if let Some((cid, transport)) = conn {
            v["connection"] = cid.into();
            v["transport"] = transport.into();
        }
        let body = Bytes::from(v.to_string());
        for t in &self.targets {
            if t.cfg.events.contains(&event) {
                let dropped = t.queue().push(Delivery {
                    id: id.clone(),
                    event,
                    body: body.clone(),
                });
                if dropped {
                    counters().webhook_dropped.inc();
                }
                t.wake.notify_one();
            }
        }
    }

    /// The uid's first local connection: `user.online`, unless it only came back within the
    /// grace (then its pending `user.offline` is cancelled instead).
    pub fn online(&self, uid: &Arc<str>) {
        if self.pending().remove(uid).is_none() {
            self.emit(Event::UserOnline, uid, None);
        }
    }

    /// The uid's last local connection closed: `user.offline` after the grace.
    pub fn offline_later(&self, uid: &Arc<str>) {
        self.pending()
            .insert(uid.clone(), Instant::now() + self.offline_after);
    }

    /// Emits the `user.offline` events due at `now` (for uids `connected` does not hold again).
    /// The caller holds the directory lock, so no `online` can interleave.
    pub fn due(&self, now: Instant, connected: impl Fn(&str) -> bool) {
        let due: Vec<Arc<str>> = {
            let mut p = self.pending();
            let due: Vec<Arc<str>> = p
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(u, _)| u.clone())
                .collect();
            for u in &due {
                p.remove(u);
            }
            due
        };
        for uid in due {
            if !connected(&uid) {
                self.emit(Event::UserOffline, &uid, None);
            }
        }
    }

    /// Runs one sender per receiver until the process ends.
    pub fn spawn(self: &Arc<Self>) {
        for t in &self.targets {
            let hooks = self.clone();
            let t = t.clone();
            tokio::spawn(async move { hooks.send_loop(&t).await });
        }
    }

    async fn send_loop(&self, t: &Target) {
        let mut backoff = BACKOFF;
        loop {
            let head = t.queue().front().cloned();
            let Some(d) = head else {
                t.wake.notified().await;
                continue;
            };
            match self.post(&t.cfg, &d).await {
                Ok(()) => {
                    counters().webhook_sent.inc();
                    t.queue().done(&d.id);
                    backoff = BACKOFF;
                }
                Err(why) => {
                    counters().webhook_errors.inc();
                    tracing::debug!(url = %t.cfg.url, id = %d.id, %why, "webhook: delivery failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn post(&self, cfg: &WebhookConfig, d: &Delivery) -> Result<(), String> {
        let mut peer = HttpPeer::new(cfg.url.addr, false, String::new());
        peer.options.connection_timeout = Some(TIMEOUT);
        peer.options.read_timeout = Some(TIMEOUT);
        peer.options.write_timeout = Some(TIMEOUT);
        let (mut http, _) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", cfg.url.addr))?;
        let mut req = RequestHeader::build("POST", cfg.url.path.as_bytes(), None)
            .map_err(|e| e.to_string())?;
        let sig = sign(cfg.secret.as_bytes(), &d.body);
        for (k, v) in [
            ("host", cfg.url.host.as_str()),
            ("content-type", "application/json"),
            ("content-length", &d.body.len().to_string()),
            ("connection", "close"),
            ("x-gopush-event", d.event.name()),
            ("x-gopush-delivery", &d.id),
            ("x-gopush-signature", &sig),
        ] {
            req.insert_header(k, v).map_err(|e| e.to_string())?;
        }
        http.write_request_header(Box::new(req))
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        http.write_body(&d.body)
            .await
            .map_err(|e| format!("sending the body: {e}"))?;
        http.finish_body()
            .await
            .map_err(|e| format!("sending the body: {e}"))?;
        http.read_response()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let status = http.resp_header().map_or(0, |h| h.status.as_u16());
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: &str) -> Delivery {
        Delivery {
            id: id.into(),
            event: Event::UserOnline,
            body: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(
            sign(b"other", b"what do ya want for nothing?"),
            sign(b"Jefe", b"what do ya want for nothing?")
        );
    }

    #[test]
    fn queue_drops_oldest_when_full() {
        let mut q = Bounded::new(2);
        assert!(!q.push(d("a")));
        assert!(!q.push(d("b")));
        assert!(q.push(d("c")));
        assert_eq!(q.dropped, 1);
        assert_eq!(q.len(), 2);
        assert_eq!(q.front().map(|x| x.id.as_str()), Some("b"));
        // The head was sent but dropped meanwhile: the new head stays.
        q.done("a");
        assert_eq!(q.front().map(|x| x.id.as_str()), Some("b"));
        q.done("b");
        q.done("c");
        assert!(q.is_empty());
    }

    #[test]
    fn offline_waits_for_the_grace_and_a_return_cancels_it() {
        let h = Webhooks::new(
            "a",
            &[WebhookConfig {
                url: parse_url("http://127.0.0.1:1/").unwrap(),
                events: all_events(),
                secret: "s".into(),
                queue: 10,
            }],
            Duration::from_secs(5),
        )
        .unwrap();
        let uid: Arc<str> = "u".into();
        let count = || h.targets[0].queue().len();
        h.online(&uid);
        assert_eq!(count(), 1);
        h.offline_later(&uid);
        h.due(Instant::now(), |_| false);
        assert_eq!(count(), 1, "not before the grace");
        h.online(&uid);
        assert_eq!(count(), 1, "a quick return is not a new user.online");
        h.offline_later(&uid);
        h.due(Instant::now() + Duration::from_secs(6), |_| false);
        assert_eq!(count(), 2);
        assert_eq!(
            h.targets[0].queue().items.back().map(|x| x.event),
            Some(Event::UserOffline)
        );
    }
}
