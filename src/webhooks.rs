//! Presence webhooks (`cluster.webhooks`): `connection.open`, `connection.close`, `user.online`
//! and `user.offline` as seen by this agent's directory, POSTed as JSON to each receiver and
//! signed with HMAC-SHA256 over the exact body.
//!
//! The request path never waits: the directory pushes an event into each receiver's bounded
//! queue (drop oldest past `queue`, counted in `gopush_webhook_dropped_total`) and one background
//! task per receiver sends them in order, retrying the head with backoff until the receiver
//! answers 2xx (at least once; the `id` lets the receiver drop duplicates).
//!
//! `connection.*` come from this agent's directory as its connections open and close;
//! `user.online` / `user.offline` are decided cluster-wide in Redis ([`crate::presence`]) and
//! sent by the one agent that made the change.

use crate::callback::{parse_url, CallbackUrl};
use crate::metrics::counters;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use serde::{de, Deserialize, Deserializer, Serialize};
use sha2::Sha256;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// First retry delay; it doubles up to [`MAX_BACKOFF`].
const BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Budget of one delivery attempt, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Between two sweeps of the pending offline checks: the lateness of a `user.offline`.
const SWEEP: Duration = Duration::from_secs(1);

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
    /// Unique per process (see [`Webhooks::new`]): event ids never repeat across restarts.
    prefix: String,
    targets: Vec<Arc<Target>>,
    offline_after: Duration,
    /// How long this process's tunnels may still drain once it stops (ms; its grace period).
    hand_over_ms: AtomicU64,
    seq: AtomicU64,
    /// When the pending offline checks were last swept.
    swept: Mutex<Option<Instant>>,
    connector: Connector,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Webhooks {
    /// `None` without receivers. `prefix` starts every event id: unique per process (a
    /// configured agent id is the same after a restart, so it needs the start time added).
    pub fn new(
        agent: &str,
        prefix: &str,
        hooks: &[WebhookConfig],
        offline_after: Duration,
    ) -> Option<Self> {
        if hooks.is_empty() {
            return None;
        }
        Some(Webhooks {
            agent: agent.to_string(),
            prefix: prefix.to_string(),
            hand_over_ms: AtomicU64::new(0),
            swept: Mutex::new(None),
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
            connector: Connector::new(None),
        })
    }

    /// Does any receiver want `user.online` or `user.offline` (then the directory runs the
    /// presence scripts, [`crate::presence`])?
    pub fn presence(&self) -> bool {
        self.targets.iter().any(|t| {
            t.cfg.events.contains(&Event::UserOnline) || t.cfg.events.contains(&Event::UserOffline)
        })
    }

    /// The start of this process's event ids.
    pub fn id_prefix(&self) -> &str {
        &self.prefix
    }

    /// This process's grace period: a stopping agent's users get that much longer before their
    /// offline check, since its tunnels close only during it (and their clients reconnect then).
    pub fn set_hand_over(&self, grace: Duration) {
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.hand_over_ms.store(ms, Ordering::Relaxed);
    }

    /// How long after a uid's last connection left the directory its offline check is due:
    /// `offline_after`, plus the grace period when this agent is stopping.
    pub fn offline_delay(&self, stopping: bool) -> Duration {
        let extra = if stopping {
            Duration::from_millis(self.hand_over_ms.load(Ordering::Relaxed))
        } else {
            Duration::ZERO
        };
        self.offline_after.saturating_add(extra)
    }

    /// At most once a second: is it time to sweep the pending offline checks?
    pub fn sweep_due(&self, now: Instant) -> bool {
        let mut s = self.swept.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_some_and(|t| now.duration_since(t) < SWEEP) {
            return false;
        }
        *s = Some(now);
        true
    }

    /// Queues `event` for every receiver that wants it (never waits).
    pub fn emit(&self, event: Event, uid: &str, conn: Option<(&str, &str)>) {
        if !self.wants(event) {
            return;
        }
        // Process prefix and sequence: unique, and stable across retries.
        let id = format!(
            "{}-{}",
            self.prefix,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        self.enqueue(event, uid, &id, conn);
    }

    /// Queues a `user.*` event whose id the cluster decided ([`crate::presence`]).
    pub fn user_event(&self, event: Event, uid: &str, id: &str) {
        if self.wants(event) {
            self.enqueue(event, uid, id, None);
        }
    }

    fn wants(&self, event: Event) -> bool {
        self.targets.iter().any(|t| t.cfg.events.contains(&event))
    }

    fn enqueue(&self, event: Event, uid: &str, id: &str, conn: Option<(&str, &str)>) {
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
                    id: id.to_string(),
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
    fn ids_are_prefixed_user_events_keep_theirs_and_a_stop_lengthens_the_grace() {
        let cfg = |events| WebhookConfig {
            url: parse_url("http://127.0.0.1:1/").unwrap(),
            events,
            secret: "s".into(),
            queue: 10,
        };
        let h = Webhooks::new("a", "a.1f", &[cfg(all_events())], Duration::from_secs(5)).unwrap();
        assert!(h.presence());
        h.emit(Event::ConnectionOpen, "u", Some(("w0", "websocket")));
        h.user_event(Event::UserOnline, "u", "a.1f-on-w0");
        let ids: Vec<String> = h.targets[0]
            .queue()
            .items
            .iter()
            .map(|d| d.id.clone())
            .collect();
        assert_eq!(ids, ["a.1f-0", "a.1f-on-w0"]);
        assert_eq!(h.offline_delay(false), Duration::from_secs(5));
        h.set_hand_over(Duration::from_secs(30));
        assert_eq!(h.offline_delay(false), Duration::from_secs(5));
        assert_eq!(h.offline_delay(true), Duration::from_secs(35));
        let t0 = Instant::now();
        assert!(h.sweep_due(t0));
        assert!(!h.sweep_due(t0 + Duration::from_millis(500)));
        assert!(h.sweep_due(t0 + SWEEP));
        // Receivers of connection events only: no presence scripts.
        let c = Webhooks::new(
            "a",
            "a",
            &[cfg(vec![Event::ConnectionOpen])],
            Duration::ZERO,
        )
        .unwrap();
        assert!(!c.presence());
        c.user_event(Event::UserOnline, "u", "x");
        assert!(c.targets[0].queue().is_empty());
    }
}
