//! One view of the cluster through Redis: the connection directory, presence and the shared sid
//! memory (`cluster:` in the configuration; absent, none of this exists).
//!
//! Every WebSocket tunnel and every long-polling session is a *connection*. Each agent keeps its
//! own in a local table ([`Directory`]), updated on the request path under one short lock, and
//! a background service ([`DirectoryService`]) writes the table's changes to Redis in batches:
//! the request path never waits for the directory. The one exception is the shared sid memory:
//! a request carrying a sid that this agent does not know asks Redis once, bounded by
//! `cluster.sid_lookup_timeout` ([`Directory::lookup_sid`]), before [`crate::decide::route`].
//!
//! Keys (`P` = `cluster.key`; `{uid}` is a Redis Cluster hash tag, so one user's keys share a
//! slot; the global index keys and the Lua scripts that touch both need a single primary,
//! which is what is tested):
//!
//! ```text
//! P:{uid}:conns        HASH  "<agent>/<id>" → {"agent","uid","backend","transport","since","client"}
//! P:{uid}:sid:<sid>    STRING "<backend> <agent> <idle ms>", PX affinity.ttl (deleted when the
//!                             session ends)
//! P:users              ZSET  uid → 0 (lexicographic index of uids with connections)
//! P:agents             ZSET  agent → deadline (unix ms): alive while the deadline is ahead
//! P:agentinfo          HASH  agent → {"connections","websocket","polling","started"}
//! P:agent:<agent>:uids SET   uids the agent has connections of (what to reap when it dies)
//! P:agent:<agent>:cmd  pub/sub channel: {"id","reason"} asks the agent to close a connection;
//!                      "seen" / "closed": a request / the end of its polling session through
//!                      another agent (which learnt the agent from the sid key)
//! P:bye                pub/sub channel: {"agent","sid","eio"} a polling session was closed
//! ```
//!
//! A polling session closed on purpose leaves, instead of its `sid` key, the marker
//! `bye:<eio>` (for [`KICKED_FOR`]), and its agent announces it on `P:bye` before it ends the
//! session on the backend: whichever agent the session's polls reach answers them with the
//! goodbye ([`Directory::goodbye`]), also when the client's polls alternate between agents.
//!
//! Closing a connection on purpose (`limits.per_uid.on_exceed: close_oldest`, the admin's
//! `DELETE /api/connections/{agent}/{id}`) is done by the agent that holds it: directly when
//! that is this one ([`Directory::kick_local`]), else by a command on that agent's channel,
//! which each agent reads from a dedicated pub/sub connection ([`CommandService`]).
//!
//! With webhooks that want `user.online` / `user.offline`, the connection writes go through the
//! presence scripts instead ([`crate::presence`], which adds two keys).
//!
//! Readers ignore connections of agents whose deadline passed (`cluster.ttl` after their last
//! heartbeat), so a crashed agent's connections leave the view within the TTL; the next
//! heartbeat of any agent then deletes them (reaping). A process's agent id is new at every
//! start unless configured, and a configured one reaps its own old entries first, so a
//! restarted agent leaves no ghosts. When a write fails or the queue overflows, the agent
//! re-publishes its whole table once Redis answers again (after deleting its old entries).

use crate::config::ClusterConfig;
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use pingora::lb::Backend;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Deletes one connection and, when it was the uid's last, the uid from the index (atomically,
/// so that a concurrent open on another agent cannot lose its uid from the index).
const CLOSE_SCRIPT: &str = "redis.call('HDEL', KEYS[1], ARGV[1]) \
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end return 0";

/// Deletes every connection of one agent (field prefix `<agent>/`) of one uid, then as above.
const REAP_SCRIPT: &str = "for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do \
if string.sub(f, 1, #ARGV[1]) == ARGV[1] then redis.call('HDEL', KEYS[1], f) end end \
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end return 0";

/// Most writes per pipeline.
const BATCH: usize = 1024;

/// How often the writer wakes up when nothing happens (idle polling sessions are expired then).
const TICK: Duration = Duration::from_secs(1);

/// Between attempts to reach Redis while it is down.
const RECONNECT: Duration = Duration::from_millis(500);

/// WebSocket or long-polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Websocket,
    Polling,
}

/// One connection in the local table.
#[derive(Debug, Clone)]
struct Conn {
    uid: Arc<str>,
    backend: String,
    transport: Transport,
    since_ms: i64,
    client: Option<IpAddr>,
    /// The id is an Engine.IO sid (its shared memory key goes with it).
    sid: bool,
    /// A polling session ends after this long without a request (`pingInterval + pingTimeout`).
    idle: Duration,
    last_seen: Instant,
    /// The Engine.IO protocol version of the connection (`EIO` in its query; 0: none).
    eio: u8,
    /// A tunnel's way to be closed from outside its request.
    cut: Option<Arc<crate::kick::Cut>>,
    /// This connection made its uid online and its `user.online` was queued: a re-publish does
    /// not send it again.
    announced: bool,
}

/// A connection as stored in Redis and shown by the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub agent: String,
    pub uid: String,
    pub backend: String,
    pub transport: Transport,
    /// Unix ms.
    pub since: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// One queued write.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Put {
        id: String,
        uid: Arc<str>,
        json: String,
    },
    Del {
        id: String,
        uid: Arc<str>,
        /// It was the uid's last connection on this agent.
        last: bool,
        sid: bool,
    },
    Sid {
        uid: Arc<str>,
        sid: String,
        backend: String,
        /// The session's idle bound (how often another agent reports its requests).
        idle_ms: u64,
    },
    /// To the agent that holds polling session `id`, whose requests reach this one: `seen` (a
    /// request: its idle clock restarts) or `closed` (the client's close, or its upgrade here).
    Notify {
        agent: String,
        id: String,
        what: &'static str,
    },
    /// A polling session closed on purpose: its sid key becomes the goodbye marker.
    Bye { uid: Arc<str>, sid: String, eio: u8 },
}

/// The local table and the writes not yet sent.
struct State {
    conns: HashMap<String, Conn>,
    by_uid: HashMap<Arc<str>, u32>,
    queue: VecDeque<Write>,
    cap: usize,
    /// Writes were lost (dropped, or failed): publish the whole table again.
    resync: bool,
    dropped: u64,
    /// Presence webhooks (`cluster.webhooks`), fed under this lock so events keep its order.
    hooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// Polling sessions this agent closed, until the client's polls got the goodbye (or for
    /// [`KICKED_FOR`], if they never come).
    kicked: HashMap<String, Kicked>,
    /// Polling sessions other agents hold whose requests reach this one (learnt from the shared
    /// sid memory), so that their agent hears of them.
    foreign: HashMap<String, Foreign>,
}

/// A polling session another agent holds.
struct Foreign {
    agent: String,
    /// Its idle bound: its agent hears of its requests at least three times per bound.
    idle: Duration,
    seen: Instant,
    reported: Option<Instant>,
}

/// A polling session this agent closed.
struct Kicked {
    at: Instant,
    eio: u8,
    /// The Socket.IO DISCONNECT was sent (the next poll gets the Engine.IO close).
    disconnect_sent: bool,
    /// The Engine.IO close was sent too: the session's later requests go to the backend (which
    /// answers 400), and the shared sid marker does not start the goodbye again.
    done: bool,
}

/// How long a closed polling session's goodbye waits for the client's next poll.
const KICKED_FOR: Duration = Duration::from_secs(120);

/// The notices an agent sends the holder of a polling session it serves (`Write::Notify`,
/// read by [`Directory::noticed`]): a request came, or the session ended or was upgraded here.
const SEEN: &str = "seen";
const CLOSED: &str = "closed";

/// The shared sid memory's value for a session closed on purpose (then its Engine.IO version).
const BYE: &str = "bye:";

fn bye_marker(eio: u8) -> String {
    format!("{BYE}{eio}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl State {
    fn new(cap: usize) -> Self {
        State {
            conns: HashMap::new(),
            by_uid: HashMap::new(),
            queue: VecDeque::new(),
            cap,
            resync: true,
            dropped: 0,
            hooks: None,
            kicked: HashMap::new(),
            foreign: HashMap::new(),
        }
    }

    fn push(&mut self, w: Write) {
        if self.queue.len() >= self.cap {
            self.queue.pop_front();
            self.dropped += 1;
            self.resync = true;
            crate::metrics::counters().cluster_dropped.inc();
        }
        self.queue.push_back(w);
    }

    fn put(&mut self, agent: &str, id: &str, mut conn: Conn) {
        let json = entry_json(agent, &conn);
        let uid = conn.uid.clone();
        let transport = conn.transport;
        if let Some(old) = self.conns.get(id) {
            conn.announced = old.announced;
        }
        let existed = if let Some(old) = self.conns.insert(id.to_string(), conn) {
            // Same id again (an upgrade of a polling session): the uid is counted once.
            if let Some(n) = self.by_uid.get_mut(&old.uid) {
                *n = n.saturating_sub(1);
            }
            true
        } else {
            false
        };
        let n = self.by_uid.entry(uid.clone()).or_insert(0);
        *n += 1;
        // An upgrade is the same connection: no event (no open, no online).
        if let (Some(h), false) = (&self.hooks, existed) {
            h.emit(
                crate::webhooks::Event::ConnectionOpen,
                &uid,
                Some((id, transport_name(transport))),
            );
        }
        self.push(Write::Put {
            id: id.to_string(),
            uid,
            json,
        });
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(conn) = self.conns.remove(id) else {
            return false;
        };
        let last = match self.by_uid.get_mut(&conn.uid) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                self.by_uid.remove(&conn.uid);
                true
            }
        };
        if let Some(h) = &self.hooks {
            h.emit(
                crate::webhooks::Event::ConnectionClose,
                &conn.uid,
                Some((id, transport_name(conn.transport))),
            );
        }
        self.push(Write::Del {
            id: id.to_string(),
            uid: conn.uid,
            last,
            sid: conn.sid,
        });
        true
    }

    /// Ends the polling sessions idle past their bound; answers how many.
    fn expire(&mut self, now: Instant) -> usize {
        let idle: Vec<String> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.transport == Transport::Polling && now.duration_since(c.last_seen) > c.idle
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &idle {
            self.remove(id);
        }
        self.kicked
            .retain(|_, k| now.duration_since(k.at) < KICKED_FOR);
        // Requests of another agent's session stopped coming here (it ended, or they go
        // elsewhere): forgotten.
        self.foreign
            .retain(|_, f| now.duration_since(f.seen) <= f.idle.saturating_mul(2));
        idle.len()
    }

    fn counts(&self) -> (usize, usize) {
        let ws = self
            .conns
            .values()
            .filter(|c| c.transport == Transport::Websocket)
            .count();
        (ws, self.conns.len() - ws)
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Websocket => "websocket",
        Transport::Polling => "polling",
    }
}

fn entry_json(agent: &str, c: &Conn) -> String {
    serde_json::to_string(&Entry {
        agent: agent.to_string(),
        uid: c.uid.to_string(),
        backend: c.backend.clone(),
        transport: c.transport,
        since: c.since_ms,
        client: c.client.map(|a| a.to_string()),
    })
    .unwrap_or_default()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The last cluster totals the writer read (at its heartbeat).
#[derive(Debug, Clone, Default)]
struct Totals {
    agents: usize,
    connections: u64,
    users: u64,
}

/// This agent's connections and its link to the cluster's directory.
pub struct Directory {
    agent: String,
    key: String,
    cfg: ClusterConfig,
    url: String,
    /// The sid memory's TTL (`affinity.ttl`), for the shared sid keys.
    sid_ttl: Duration,
    started_ms: i64,
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    /// The writer's connection, shared with sid lookups and the presence API (`None` while
    /// Redis is unreachable: lookups are skipped at no cost).
    conn: ArcSwapOption<MultiplexedConnection>,
    /// Everything this agent holds is in Redis.
    synced: AtomicBool,
    /// The current outage was logged (once per outage, not every retry).
    warned: AtomicBool,
    /// When it last was (unix ms).
    as_of: AtomicI64,
    next_id: AtomicU64,
    totals: Mutex<Totals>,
    /// The live agents as of the last heartbeat (for counting a uid's connections).
    live: Mutex<HashSet<String>>,
    /// The Socket.IO path (`affinity.path`), for the Engine.IO close posted to a backend.
    eio_path: String,
    /// How many polling sessions this agent closed and still answers (`State::kicked`), kept
    /// beside the table so that every poll need not take the lock to learn it is none.
    kicked: AtomicUsize,
}

/// A WebSocket tunnel in the directory until it is dropped.
pub struct TunnelEntry {
    dir: Arc<Directory>,
    id: String,
    cut: Option<Arc<crate::kick::Cut>>,
}

impl TunnelEntry {
    /// Why the agent closed this tunnel, if it did.
    pub fn kicked(&self) -> Option<crate::kick::Reason> {
        self.cut.as_ref().and_then(|c| c.reason())
    }
}

impl Drop for TunnelEntry {
    fn drop(&mut self) {
        self.dir.close(&self.id);
        if let Some(c) = &self.cut {
            c.release();
        }
    }
}

impl Directory {
    /// A directory for this process. `url` is the Redis URL (validated by the configuration).
    pub fn new(cfg: &ClusterConfig, url: &str, sid_ttl: Duration, eio_path: &str) -> Self {
        let started_ms = now_ms();
        let agent = cfg.agent_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| {
                    h.trim()
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                        .take(40)
                        .collect::<String>()
                })
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "gopush".into());
            // The start time makes a restarted process (same pid after a reboot) a new agent.
            format!("{host}-{}-{:x}", std::process::id(), started_ms)
        });
        let mut state = State::new(cfg.queue);
        // A configured id is the same after a restart: the start time keeps event ids unique.
        let prefix = match cfg.agent_id {
            Some(_) => format!("{agent}.{started_ms:x}"),
            None => agent.clone(),
        };
        state.hooks =
            crate::webhooks::Webhooks::new(&agent, &prefix, &cfg.webhooks, cfg.offline_after)
                .map(Arc::new);
        Directory {
            agent,
            key: cfg.key.clone(),
            cfg: cfg.clone(),
            url: url.to_string(),
            sid_ttl,
            started_ms,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
            conn: ArcSwapOption::empty(),
            synced: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            as_of: AtomicI64::new(0),
            next_id: AtomicU64::new(0),
            totals: Mutex::new(Totals::default()),
            live: Mutex::new(HashSet::new()),
            eio_path: eio_path.to_string(),
            kicked: AtomicUsize::new(0),
        }
    }

    /// This process's agent id.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The process's grace period, by which a stop postpones its users' offline checks.
    pub fn set_hand_over(&self, grace: Duration) {
        if let Some(h) = &self.state().hooks {
            h.set_hand_over(grace);
        }
    }

    /// The webhooks, when they want the cluster-wide `user.*` events.
    fn presence(&self) -> Option<Arc<crate::webhooks::Webhooks>> {
        self.state().hooks.clone().filter(|h| h.presence())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent-enough table: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.wake.notify_one();
    }

    /// A polling handshake answered `sid` for `uid` on `backend`.
    pub fn open_polling(
        &self,
        sid: &str,
        uid: &str,
        backend: &Backend,
        idle_ms: u64,
        client: Option<IpAddr>,
        eio: u8,
    ) {
        let backend = backend_string(backend);
        let conn = Conn {
            uid: uid.into(),
            backend: backend.clone(),
            transport: Transport::Polling,
            since_ms: now_ms(),
            client,
            sid: true,
            idle: Duration::from_millis(idle_ms.max(1000)),
            last_seen: Instant::now(),
            eio,
            cut: None,
            announced: false,
        };
        let mut st = self.state();
        let uid = conn.uid.clone();
        let idle_ms = millis(conn.idle);
        st.put(&self.agent, sid, conn);
        st.push(Write::Sid {
            uid,
            sid: sid.to_string(),
            backend,
            idle_ms,
        });
        drop(st);
        self.changed();
    }

    /// A request of polling session `sid` (its idle clock restarts; for another agent's
    /// session, that agent hears of it, at most three times per idle bound).
    pub fn touch(&self, sid: &str) {
        let now = Instant::now();
        let mut st = self.state();
        if let Some(c) = st.conns.get_mut(sid) {
            c.last_seen = now;
            return;
        }
        let Some(f) = st.foreign.get_mut(sid) else {
            return;
        };
        f.seen = now;
        if f.reported
            .is_some_and(|r| now.duration_since(r) < f.idle / 3)
        {
            return;
        }
        f.reported = Some(now);
        let agent = f.agent.clone();
        st.push(Write::Notify {
            agent,
            id: sid.to_string(),
            what: SEEN,
        });
        drop(st);
        self.changed();
    }

    /// Session `sid` ended (an Engine.IO close, or the backend no longer knows it); another
    /// agent's session: that agent is told.
    pub fn close_sid(&self, sid: &str) {
        if self.close(sid) {
            tracing::debug!(sid, "cluster: polling session closed");
        } else {
            self.leave_foreign(sid);
        }
    }

    /// Another agent's session `sid` ended here, or became a WebSocket tunnel here.
    fn leave_foreign(&self, sid: &str) {
        let mut st = self.state();
        if let Some(f) = st.foreign.remove(sid) {
            st.push(Write::Notify {
                agent: f.agent,
                id: sid.to_string(),
                what: CLOSED,
            });
            drop(st);
            self.changed();
        }
    }

    /// The holder's notice from another agent (`seen`, `closed`) about its polling session `id`.
    fn noticed(&self, id: &str, what: &str) {
        let mut st = self.state();
        let Some(c) = st.conns.get_mut(id) else {
            return;
        };
        if c.transport != Transport::Polling {
            return;
        }
        match what {
            SEEN => c.last_seen = Instant::now(),
            CLOSED => {
                st.remove(id);
                drop(st);
                self.changed();
                tracing::debug!(id, "cluster: polling session closed through another agent");
            }
            _ => {}
        }
    }

    fn close(&self, id: &str) -> bool {
        let removed = self.state().remove(id);
        if removed {
            self.changed();
        }
        removed
    }

    /// A WebSocket tunnel opened (for session `sid` when it is an upgrade); it stays in the
    /// directory until the returned entry is dropped. `cut` closes it on purpose.
    pub fn open_tunnel(
        self: &Arc<Self>,
        sid: Option<&str>,
        uid: &str,
        backend: &Backend,
        client: Option<IpAddr>,
        eio: u8,
        cut: Option<crate::kick::Cut>,
    ) -> TunnelEntry {
        let cut = cut.map(Arc::new);
        if let Some(s) = sid {
            // Another agent's polling session upgraded here: it is this agent's now.
            self.leave_foreign(s);
        }
        let mut st = self.state();
        // An upgraded polling session is the same connection, now a WebSocket.
        let (id, since_ms) = match sid.and_then(|s| st.conns.get(s).map(|c| (s, c.since_ms))) {
            Some((s, since)) => (s.to_string(), since),
            None => (
                format!("w{}", self.next_id.fetch_add(1, Ordering::Relaxed)),
                now_ms(),
            ),
        };
        let conn = Conn {
            uid: uid.into(),
            backend: backend_string(backend),
            transport: Transport::Websocket,
            since_ms,
            client,
            sid: sid.is_some_and(|s| s == id),
            idle: Duration::MAX,
            last_seen: Instant::now(),
            eio,
            cut: cut.clone(),
            announced: false,
        };
        st.put(&self.agent, &id, conn);
        drop(st);
        self.changed();
        TunnelEntry {
            dir: self.clone(),
            id,
            cut,
        }
    }

    /// How many connections `uid` has on this agent.
    pub fn local_count(&self, uid: &str) -> u32 {
        self.state().by_uid.get(uid).copied().unwrap_or(0)
    }

    /// How many connections `uid` holds in the cluster, for `limits.per_uid.max_connections`:
    /// the directory's entries of live agents (asked within `cluster.sid_lookup_timeout`), and
    /// never fewer than this agent holds itself (its newest may not be written yet). With Redis
    /// unreachable or slow, this agent's own count: the limit falls back to per agent.
    pub async fn count_uid(&self, uid: &str) -> usize {
        let local = self.local_count(uid) as usize;
        let Some(conn) = self.conn.load_full() else {
            return local;
        };
        let mut conn = (*conn).clone();
        let cmd = redis::cmd("HGETALL").arg(self.conns_key(uid)).clone();
        let read = cmd.query_async::<HashMap<String, String>>(&mut conn);
        let Ok(Ok(all)) = tokio::time::timeout(self.cfg.sid_lookup_timeout, read).await else {
            return local;
        };
        let live = self.live.lock().map(|l| l.clone()).unwrap_or_default();
        let cluster = all
            .values()
            .filter_map(|json| serde_json::from_str::<Entry>(json).ok())
            .filter(|e| e.agent != self.agent && live.contains(&e.agent))
            .count();
        cluster + local
    }

    // ------------------------------------------------------------------------------------
    // closing connections on purpose

    /// `limits.per_uid.on_exceed: close_oldest`: a new connection of `uid` is about to open;
    /// closes the uid's oldest connections so that `max` remain, the new one included. The
    /// uid's connections are read as [`Directory::count_uid`] reads them (bounded; this agent's
    /// own alone while Redis is down or slow: the policy falls back to per agent); the closing
    /// is never waited for. Answers how many it asked to close.
    pub async fn close_oldest(self: &Arc<Self>, uid: &str, max: usize) -> usize {
        // (since, agent, id), this agent's own from its table (its newest may not be written).
        let mut all: Vec<(i64, String, String)> = self
            .state()
            .conns
            .iter()
            .filter(|(_, c)| &*c.uid == uid)
            // A tunnel being closed is on its way out: not a candidate again.
            .filter(|(_, c)| c.cut.as_ref().is_none_or(|k| k.reason().is_none()))
            .map(|(id, c)| (c.since_ms, self.agent.clone(), id.clone()))
            .collect();
        if let Some(conn) = self.conn.load_full() {
            let mut conn = (*conn).clone();
            let cmd = redis::cmd("HGETALL").arg(self.conns_key(uid)).clone();
            let read = cmd.query_async::<HashMap<String, String>>(&mut conn);
            if let Ok(Ok(map)) = tokio::time::timeout(self.cfg.sid_lookup_timeout, read).await {
                let live = self.live.lock().map(|l| l.clone()).unwrap_or_default();
                for (field, json) in map {
                    let Ok(e) = serde_json::from_str::<Entry>(&json) else {
                        continue;
                    };
                    let id = field.split_once('/').map(|(_, id)| id.to_string());
                    if let (Some(id), true) = (id, e.agent != self.agent && live.contains(&e.agent))
                    {
                        all.push((e.since, e.agent, id));
                    }
                }
            }
        }
        let over = all.len().saturating_sub(max.saturating_sub(1));
        if over == 0 {
            return 0;
        }
        all.sort();
        for (_, agent, id) in all.into_iter().take(over) {
            tracing::info!(
                uid,
                agent,
                id,
                "limits.per_uid.max_connections: closing the oldest connection"
            );
            if agent == self.agent {
                self.kick_local(&id, crate::kick::Reason::CloseOldest);
            } else {
                let dir = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = dir
                        .publish(&agent, &id, crate::kick::Reason::CloseOldest)
                        .await
                    {
                        tracing::warn!(agent, id, "close_oldest: could not ask the agent: {e}");
                    }
                });
            }
        }
        over
    }

    /// Closes connection `id` of agent `agent` (the admin's DELETE): `Ok(true)` when this agent
    /// closed it or the agent's command channel has a listener, `Ok(false)` when it is not
    /// there (no such local connection, or no agent listening), `Err` when Redis is unreachable.
    pub async fn kick(
        self: &Arc<Self>,
        agent: &str,
        id: &str,
        reason: crate::kick::Reason,
    ) -> Result<bool, String> {
        if agent == self.agent {
            return Ok(self.kick_local(id, reason));
        }
        self.publish(agent, id, reason).await.map(|n| n > 0)
    }

    /// Asks `agent` to close `id`; answers how many listeners got the command (0 or 1).
    async fn publish(
        &self,
        agent: &str,
        id: &str,
        reason: crate::kick::Reason,
    ) -> Result<i64, String> {
        let msg = json!({"id": id, "reason": reason.label()}).to_string();
        self.publish_now(&self.cmd_channel(agent), msg).await
    }

    /// `PUBLISH` at once (not through the writer's queue), within `cluster.timeout`; answers
    /// how many listeners got it.
    async fn publish_now(&self, channel: &str, msg: String) -> Result<i64, String> {
        let Some(conn) = self.conn.load_full() else {
            return Err("redis unavailable".into());
        };
        let mut conn = (*conn).clone();
        let cmd = redis::cmd("PUBLISH").arg(channel).arg(msg).clone();
        match tokio::time::timeout(self.cfg.timeout, cmd.query_async::<i64>(&mut conn)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    /// Closes this agent's connection `id`; `false` when it has none by that id (or the tunnel
    /// is already being closed). A tunnel leaves the directory when it has ended; a polling
    /// session at once (see [`crate::kick`] for what the client and the backend see).
    pub fn kick_local(self: &Arc<Self>, id: &str, reason: crate::kick::Reason) -> bool {
        let mut st = self.state();
        let Some(c) = st.conns.get(id) else {
            return false;
        };
        let done = match c.transport {
            Transport::Websocket => {
                let cut = c.cut.clone();
                drop(st);
                cut.is_some_and(|k| k.fire(reason))
            }
            Transport::Polling => {
                let (backend, eio, uid) = (c.backend.clone(), c.eio, c.uid.clone());
                self.remember_kicked(&mut st, id, eio);
                // Its sid key becomes the goodbye marker (not deleted with the connection).
                if let Some(c) = st.conns.get_mut(id) {
                    c.sid = false;
                }
                st.remove(id);
                st.push(Write::Bye {
                    uid,
                    sid: id.to_string(),
                    eio,
                });
                drop(st);
                self.changed();
                // The other agents learn of it first (one may hold the session's pending
                // poll); then the backend's session ends with an Engine.IO close, as if the
                // client had posted it. Its answer to a pending poll is rewritten into the
                // goodbye (see `goodbye`), a later poll is answered by the agent itself.
                let (path, sid, timeout) =
                    (self.eio_path.clone(), id.to_string(), self.cfg.timeout);
                let dir = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = dir.announce_bye(&sid, eio).await {
                        tracing::warn!(sid, "kick: could not tell the other agents: {e}");
                    }
                    if let Err(e) = post_close(&backend, &path, &sid, eio, timeout).await {
                        tracing::warn!(
                            backend,
                            sid,
                            "kick: could not close the session on its backend: {e}"
                        );
                    }
                });
                true
            }
        };
        if done {
            crate::metrics::counters().connection_closed(reason);
            tracing::info!(
                id,
                reason = reason.label(),
                "connection closed by the agent"
            );
        }
        done
    }

    /// Answers the polls of session `sid` with the goodbye from now on (until they got it; the
    /// state is kept for [`KICKED_FOR`]); a session already answered so keeps its state.
    fn remember_kicked(&self, st: &mut State, sid: &str, eio: u8) {
        st.kicked.entry(sid.to_string()).or_insert(Kicked {
            at: Instant::now(),
            eio,
            disconnect_sent: false,
            done: false,
        });
        self.kicked.store(st.kicked.len(), Ordering::Relaxed);
    }

    /// Another agent closed polling session `sid` (its `P:bye` message, or the marker the
    /// shared sid memory holds instead of a backend).
    pub fn kicked_elsewhere(&self, sid: &str, eio: u8) {
        if !crate::affinity::plausible_sid(sid) {
            return;
        }
        let mut st = self.state();
        if st.conns.contains_key(sid) {
            // Not a session another agent may close (ids are the agent's own).
            return;
        }
        self.remember_kicked(&mut st, sid, eio);
    }

    /// Tells every agent that this one closed polling session `sid` (`P:bye`).
    async fn announce_bye(&self, sid: &str, eio: u8) -> Result<(), String> {
        let msg = json!({"agent": self.agent, "sid": sid, "eio": eio}).to_string();
        self.publish_now(&self.bye_channel(), msg).await.map(|_| ())
    }

    /// The backend no longer knows session `sid` (its 400 to a poll through this agent). If
    /// another agent closed it on purpose and its `P:bye` has not reached this one yet (or was
    /// lost), the marker in the shared sid memory says so, and the poll gets the goodbye rather
    /// than the 400. One bounded lookup, only for a session this agent served for another
    /// agent (not for any sid a client makes up) and does not already say goodbye to.
    pub async fn learn_closed(&self, uid: &str, sid: &str) {
        let ask = {
            let st = self.state();
            st.foreign.contains_key(sid) && !st.kicked.contains_key(sid)
        };
        if ask {
            let _ = self.lookup_sid(uid, sid).await;
        }
    }

    /// The agent's own answer to a request of polling session `sid` if this agent closed it:
    /// to a poll (`poll`), the goodbye of [`crate::kick::polling_goodbye`] (the first, then
    /// the close, after which the backend answers again); to a POST, `ok`.
    pub fn goodbye(&self, sid: &str, poll: bool) -> Option<bytes::Bytes> {
        if self.kicked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut st = self.state();
        let k = st.kicked.get_mut(sid).filter(|k| !k.done)?;
        if !poll {
            return Some(bytes::Bytes::from_static(b"ok"));
        }
        if !k.disconnect_sent {
            k.disconnect_sent = true;
            return Some(crate::kick::polling_goodbye(k.eio, true));
        }
        // Kept (until KICKED_FOR) so that the marker cannot start it again.
        k.done = true;
        Some(crate::kick::polling_goodbye(k.eio, false))
    }

    fn cmd_channel(&self, agent: &str) -> String {
        format!("{}:agent:{agent}:cmd", self.key)
    }

    fn bye_channel(&self) -> String {
        format!("{}:bye", self.key)
    }

    fn sid_key(&self, uid: &str, sid: &str) -> String {
        format!("{}:{{{uid}}}:sid:{sid}", self.key)
    }

    fn conns_key(&self, uid: &str) -> String {
        format!("{}:{{{uid}}}:conns", self.key)
    }

    fn users_key(&self) -> String {
        format!("{}:users", self.key)
    }

    fn agents_key(&self) -> String {
        format!("{}:agents", self.key)
    }

    fn info_key(&self) -> String {
        format!("{}:agentinfo", self.key)
    }

    fn agent_uids_key(&self, agent: &str) -> String {
        format!("{}:agent:{agent}:uids", self.key)
    }

    /// The backend another agent learned for session `sid` of `uid`: asked only on a local
    /// miss, bounded by `cluster.sid_lookup_timeout`; `None` when Redis is unreachable, slow or
    /// does not know the session (the ring decides then).
    pub async fn lookup_sid(&self, uid: &str, sid: &str) -> Option<Backend> {
        let counters = crate::metrics::counters();
        if !crate::affinity::plausible_sid(sid) {
            // Never a sid a handshake taught (and keeps key names unambiguous).
            return None;
        }
        let Some(conn) = self.conn.load_full() else {
            counters.cluster_sid_lookup("unavailable");
            return None;
        };
        let mut conn = (*conn).clone();
        let cmd = redis::cmd("GET").arg(self.sid_key(uid, sid)).clone();
        let get = cmd.query_async::<Option<String>>(&mut conn);
        match tokio::time::timeout(self.cfg.sid_lookup_timeout, get).await {
            Ok(Ok(Some(value))) if value.starts_with(BYE) => {
                // Closed by its agent: this one answers its polls with the goodbye.
                counters.cluster_sid_lookup("closed");
                let eio = value[BYE.len()..].parse().unwrap_or(4);
                self.kicked_elsewhere(sid, eio);
                None
            }
            Ok(Ok(Some(value))) => {
                // "<backend> <agent> <idle ms>" (the backend alone from an older agent).
                let mut parts = value.split(' ');
                let b = parts.next().and_then(|addr| Backend::new(addr).ok());
                if let (Some(_), Some(agent), Some(idle)) = (
                    &b,
                    parts.next().filter(|a| *a != self.agent),
                    parts.next().and_then(|i| i.parse::<u64>().ok()),
                ) {
                    self.state().foreign.insert(
                        sid.to_string(),
                        Foreign {
                            agent: agent.to_string(),
                            idle: Duration::from_millis(idle.max(1000)),
                            seen: Instant::now(),
                            reported: None,
                        },
                    );
                }
                counters.cluster_sid_lookup(if b.is_some() { "hit" } else { "error" });
                b
            }
            Ok(Ok(None)) => {
                counters.cluster_sid_lookup("miss");
                None
            }
            Ok(Err(_)) | Err(_) => {
                counters.cluster_sid_lookup("error");
                None
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // the presence API

    /// Is this agent's view current: everything it holds written, Redis answering.
    fn stale(&self) -> bool {
        !self.synced.load(Ordering::Relaxed)
    }

    fn as_of(&self) -> Value {
        let ms = self.as_of.load(Ordering::Relaxed);
        if ms == 0 {
            return Value::Null;
        }
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        json!(humantime::format_rfc3339_millis(t).to_string())
    }

    async fn reader(&self) -> Option<MultiplexedConnection> {
        self.conn.load_full().map(|c| (*c).clone())
    }

    async fn live_agents(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> redis::RedisResult<Vec<String>> {
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.agents_key())
            .arg(now_ms())
            .arg("+inf")
            .query_async(conn)
            .await
    }

    /// The live agents, as a set (`Err` when Redis cannot be read).
    async fn live_set(&self, conn: &mut MultiplexedConnection) -> Result<HashSet<String>, ()> {
        Ok(self
            .live_agents(conn)
            .await
            .map_err(|_| ())?
            .into_iter()
            .collect())
    }

    /// `GET /api/users/{uid}`.
    pub async fn user(&self, uid: &str) -> Value {
        let read = async {
            let mut conn = self.reader().await.ok_or(())?;
            let live = self.live_set(&mut conn).await?;
            let all: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.conns_key(uid))
                .query_async(&mut conn)
                .await
                .map_err(|_| ())?;
            Ok::<_, ()>(live_entries(all, &live))
        };
        let (conns, stale) = match tokio::time::timeout(self.cfg.timeout, read).await {
            Ok(Ok(c)) => (c, self.stale()),
            _ => (self.local_entries(uid), true),
        };
        json!({
            "uid": uid,
            "online": !conns.is_empty(),
            "connections": conns.iter().map(|(id, e)| entry_value(id, e)).collect::<Vec<_>>(),
            "stale": stale,
            "as_of": self.as_of(),
        })
    }

    /// This agent's own connections of `uid` (the view while Redis cannot be read).
    fn local_entries(&self, uid: &str) -> Vec<(String, Entry)> {
        let st = self.state();
        let mut v: Vec<(String, Entry)> = st
            .conns
            .iter()
            .filter(|(_, c)| &*c.uid == uid)
            .map(|(id, c)| {
                let e = serde_json::from_str(&entry_json(&self.agent, c)).ok();
                (format!("{}/{id}", self.agent), e)
            })
            .filter_map(|(id, e)| e.map(|e| (id, e)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// `GET /api/users?cursor=C&limit=N`: uids with live connections, in byte order after `C`.
    pub async fn users(&self, cursor: Option<&str>, limit: usize) -> Value {
        let read = async {
            let mut conn = self.reader().await.ok_or(())?;
            let live = self.live_set(&mut conn).await?;
            let start = cursor.map_or("-".to_string(), |c| format!("({c}"));
            let uids: Vec<String> = redis::cmd("ZRANGEBYLEX")
                .arg(self.users_key())
                .arg(start)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(|_| ())?;
            let mut pipe = redis::pipe();
            for u in &uids {
                pipe.cmd("HGETALL").arg(self.conns_key(u));
            }
            let maps: Vec<HashMap<String, String>> = if uids.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut conn).await.map_err(|_| ())?
            };
            let next = (uids.len() == limit)
                .then(|| uids.last().cloned())
                .flatten();
            let users: Vec<Value> = uids
                .iter()
                .zip(maps)
                .filter_map(|(u, m)| {
                    let n = live_entries(m, &live).len();
                    (n > 0).then(|| json!({"uid": u, "connections": n}))
                })
                .collect();
            Ok::<_, ()>((users, next))
        };
        match tokio::time::timeout(self.cfg.timeout, read).await {
            Ok(Ok((users, next))) => json!({
                "users": users, "next_cursor": next, "stale": self.stale(), "as_of": self.as_of(),
            }),
            _ => {
                let st = self.state();
                let mut local: Vec<(&Arc<str>, &u32)> = st
                    .by_uid
                    .iter()
                    .filter(|(u, _)| cursor.is_none_or(|c| &***u > c))
                    .collect();
                local.sort();
                local.truncate(limit);
                let next = (local.len() == limit)
                    .then(|| local.last().map(|(u, _)| u.to_string()))
                    .flatten();
                let users: Vec<Value> = local
                    .iter()
                    .map(|(u, n)| json!({"uid": &***u, "connections": n}))
                    .collect();
                json!({"users": users, "next_cursor": next, "stale": true, "as_of": self.as_of()})
            }
        }
    }

    /// The `cluster` object of `/api/status` (totals as of the last heartbeat).
    pub fn status(&self) -> Value {
        let t = self.totals.lock().map(|t| t.clone()).unwrap_or_default();
        let (ws, polling) = self.state().counts();
        json!({
            "agent": self.agent,
            "stale": self.stale(),
            "as_of": self.as_of(),
            "agents": t.agents,
            "connections": t.connections,
            "users": t.users,
            "local": {"connections": ws + polling, "websocket": ws, "polling": polling},
        })
    }

    // ------------------------------------------------------------------------------------
    // the writer

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let client = redis::Client::open(self.url.as_str()).map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.cfg.timeout, client.get_multiplexed_async_connection())
            .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// Sends `cmds` as one pipeline within the timeout.
    async fn send(
        &self,
        conn: &mut MultiplexedConnection,
        pipe: &redis::Pipeline,
    ) -> Result<(), String> {
        match tokio::time::timeout(self.cfg.timeout, pipe.query_async::<()>(conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }

    /// Sends `writes` in one pipeline; with presence, emits the `user.online` events the open
    /// scripts answered (`resync`: this agent is re-publishing its table).
    async fn send_writes(
        &self,
        conn: &mut MultiplexedConnection,
        writes: &[Write],
        resync: bool,
    ) -> Result<(), String> {
        let hooks = self.presence();
        // Re-published connections whose user.online may not have been queued: their open
        // script answers their own online id again (once more, not at every re-publish).
        let retry: HashSet<&str> = if resync && hooks.is_some() {
            let st = self.state();
            writes
                .iter()
                .filter_map(|w| match w {
                    Write::Put { id, .. } if st.conns.get(id).is_none_or(|c| !c.announced) => {
                        Some(id.as_str())
                    }
                    _ => None,
                })
                .collect()
        } else {
            HashSet::new()
        };
        let mut pipe = redis::pipe();
        for w in writes {
            let again = matches!(w, Write::Put { id, .. } if retry.contains(id.as_str()));
            self.add_write(&mut pipe, w, hooks.as_deref(), again);
        }
        let Some(h) = hooks else {
            return self.send(conn, &pipe).await;
        };
        // Only the open scripts are not ignored: one answer per Put, in order.
        let ids = match tokio::time::timeout(
            self.cfg.timeout,
            pipe.query_async::<Vec<Option<String>>>(conn),
        )
        .await
        {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("redis did not answer in time".into()),
        };
        let puts = writes.iter().filter_map(|w| match w {
            Write::Put { id, uid, .. } => Some((id, uid)),
            _ => None,
        });
        let mut st = self.state();
        for ((conn_id, uid), id) in puts.zip(ids) {
            if let Some(id) = id {
                h.user_event(crate::webhooks::Event::UserOnline, uid, &id);
                if let Some(c) = st.conns.get_mut(conn_id) {
                    c.announced = true;
                }
            }
        }
        Ok(())
    }

    /// Adds `w`'s commands; with `presence`, the presence scripts' (see [`crate::presence`]);
    /// `retry`: a re-published open whose `user.online` may not have been queued.
    fn add_write(
        &self,
        pipe: &mut redis::Pipeline,
        w: &Write,
        presence: Option<&crate::webhooks::Webhooks>,
        retry: bool,
    ) {
        if let (Write::Put { id, uid, json }, Some(h)) = (w, presence) {
            // Not ignored: its answer is the user.online to send, if any.
            pipe.cmd("EVAL")
                .arg(crate::presence::OPEN)
                .arg(3)
                .arg(self.conns_key(uid))
                .arg(crate::presence::online_key(&self.key, uid))
                .arg(crate::presence::pending_key(&self.key))
                .arg(format!("{}/{id}", self.agent))
                .arg(json)
                .arg(&**uid)
                .arg(crate::presence::online_id(h.id_prefix(), id))
                .arg(if retry { "1" } else { "0" });
            self.index_uid(pipe, uid);
            return;
        }
        match w {
            Write::Put { id, uid, json } => {
                pipe.cmd("HSET")
                    .arg(self.conns_key(uid))
                    .arg(format!("{}/{id}", self.agent))
                    .arg(json)
                    .ignore();
                self.index_uid(pipe, uid);
            }
            Write::Del { id, uid, last, sid } => {
                self.delete_script(
                    pipe,
                    (CLOSE_SCRIPT, crate::presence::CLOSE),
                    uid,
                    &format!("{}/{id}", self.agent),
                    presence.map(|h| (h, false)),
                );
                if *last {
                    pipe.cmd("SREM")
                        .arg(self.agent_uids_key(&self.agent))
                        .arg(&**uid)
                        .ignore();
                }
                if *sid {
                    pipe.cmd("DEL").arg(self.sid_key(uid, id)).ignore();
                }
            }
            Write::Sid {
                uid,
                sid,
                backend,
                idle_ms,
            } => {
                let ms = millis(self.sid_ttl).max(1);
                pipe.cmd("SET")
                    .arg(self.sid_key(uid, sid))
                    .arg(format!("{backend} {} {idle_ms}", self.agent))
                    .arg("PX")
                    .arg(ms)
                    .ignore();
            }
            Write::Notify { agent, id, what } => {
                pipe.cmd("PUBLISH")
                    .arg(self.cmd_channel(agent))
                    .arg(json!({"id": id, "reason": what}).to_string())
                    .ignore();
            }
            Write::Bye { uid, sid, eio } => {
                pipe.cmd("SET")
                    .arg(self.sid_key(uid, sid))
                    .arg(bye_marker(*eio))
                    .arg("PX")
                    .arg(millis(KICKED_FOR))
                    .ignore();
            }
        }
    }

    /// One call of a script that deletes `uid`'s connections `member` (one connection's field,
    /// or an agent's field prefix) and drops the uid from the index when its hash is left empty:
    /// `scripts.0`, or with presence webhooks `scripts.1`, which also schedules the offline
    /// check (`presence`: the webhooks, and whether this agent is stopping).
    fn delete_script(
        &self,
        pipe: &mut redis::Pipeline,
        scripts: (&str, &str),
        uid: &str,
        member: &str,
        presence: Option<(&crate::webhooks::Webhooks, bool)>,
    ) {
        let conns = self.conns_key(uid);
        let users = self.users_key();
        match presence {
            Some((h, stopping)) => pipe
                .cmd("EVAL")
                .arg(scripts.1)
                .arg(4)
                .arg(conns)
                .arg(users)
                .arg(crate::presence::online_key(&self.key, uid))
                .arg(crate::presence::pending_key(&self.key))
                .arg(member)
                .arg(uid)
                .arg(offline_deadline(h, stopping))
                .ignore(),
            None => pipe
                .cmd("EVAL")
                .arg(scripts.0)
                .arg(2)
                .arg(conns)
                .arg(users)
                .arg(member)
                .arg(uid)
                .ignore(),
        };
    }

    /// A uid in the index and in this agent's set (with each of its connections' writes).
    fn index_uid(&self, pipe: &mut redis::Pipeline, uid: &str) {
        pipe.cmd("ZADD")
            .arg(self.users_key())
            .arg(0)
            .arg(uid)
            .ignore();
        pipe.cmd("SADD")
            .arg(self.agent_uids_key(&self.agent))
            .arg(uid)
            .ignore();
    }

    /// Deletes every entry of `agent` (a dead one, or this process before it re-publishes, or
    /// as it stops: `stopping`, which postpones its users' offline checks by its grace period).
    async fn reap(
        &self,
        conn: &mut MultiplexedConnection,
        agent: &str,
        stopping: bool,
    ) -> Result<(), String> {
        let hooks = self.presence();
        let uids_key = self.agent_uids_key(agent);
        let uids: Vec<String> = tokio::time::timeout(
            self.cfg.timeout,
            redis::cmd("SMEMBERS").arg(&uids_key).query_async(conn),
        )
        .await
        .map_err(|_| "redis did not answer in time".to_string())?
        .map_err(|e| e.to_string())?;
        let prefix = format!("{agent}/");
        for chunk in uids.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for uid in chunk {
                self.delete_script(
                    &mut pipe,
                    (REAP_SCRIPT, crate::presence::REAP),
                    uid,
                    &prefix,
                    hooks.as_deref().map(|h| (h, stopping)),
                );
            }
            self.send(conn, &pipe).await?;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&uids_key).ignore();
        if agent != self.agent {
            pipe.cmd("ZREM").arg(self.agents_key()).arg(agent).ignore();
            pipe.cmd("HDEL").arg(self.info_key()).arg(agent).ignore();
        }
        self.send(conn, &pipe).await?;
        if !uids.is_empty() {
            tracing::info!(
                agent,
                uids = uids.len(),
                "cluster: reaped the directory entries of an agent"
            );
        }
        Ok(())
    }

    /// Says this agent is alive, reaps dead agents and reads the totals.
    async fn heartbeat(&self, conn: &mut MultiplexedConnection) -> Result<(), String> {
        let (ws, polling) = self.state().counts();
        let now = now_ms();
        let ttl = i64::try_from(self.cfg.ttl.as_millis()).unwrap_or(i64::MAX);
        let info = json!({
            "connections": ws + polling, "websocket": ws, "polling": polling,
            "started": self.started_ms,
        })
        .to_string();
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(self.agents_key())
            .arg(now.saturating_add(ttl))
            .arg(&self.agent)
            .ignore();
        pipe.cmd("HSET")
            .arg(self.info_key())
            .arg(&self.agent)
            .arg(info)
            .ignore();
        self.send(conn, &pipe).await?;
        let dead: Vec<String> = tokio::time::timeout(
            self.cfg.timeout,
            redis::cmd("ZRANGEBYSCORE")
                .arg(self.agents_key())
                .arg("-inf")
                .arg(format!("({now}"))
                .query_async(conn),
        )
        .await
        .map_err(|_| "redis did not answer in time".to_string())?
        .map_err(|e| e.to_string())?;
        for agent in dead.iter().filter(|a| **a != self.agent) {
            self.reap(conn, agent, false).await?;
        }
        let read = async {
            let live = self.live_agents(conn).await?;
            let info: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.info_key())
                .query_async(conn)
                .await?;
            let users: u64 = redis::cmd("ZCARD")
                .arg(self.users_key())
                .query_async(conn)
                .await?;
            Ok::<_, redis::RedisError>((live, info, users))
        };
        let (live, info, users) = tokio::time::timeout(self.cfg.timeout, read)
            .await
            .map_err(|_| "redis did not answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        let connections: u64 = live
            .iter()
            .filter_map(|a| info.get(a))
            .filter_map(|s| serde_json::from_str::<Value>(s).ok())
            .filter_map(|v| v.get("connections").and_then(Value::as_u64))
            .sum();
        let totals = Totals {
            agents: live.len(),
            connections,
            users,
        };
        let c = crate::metrics::counters();
        c.cluster_agents
            .set(i64::try_from(totals.agents).unwrap_or(i64::MAX));
        c.cluster_connections
            .set(i64::try_from(totals.connections).unwrap_or(i64::MAX));
        c.cluster_users
            .set(i64::try_from(totals.users).unwrap_or(i64::MAX));
        if let Ok(mut t) = self.totals.lock() {
            *t = totals;
        }
        if let Ok(mut l) = self.live.lock() {
            *l = live.into_iter().collect();
        }
        Ok(())
    }

    /// One round of the writer: connect if needed, re-publish if needed, flush the queue,
    /// heartbeat when due. Any error drops the connection; the next round starts over.
    async fn round(&self, beat_due: bool) -> Result<bool, String> {
        let mut conn = match self.conn.load_full() {
            Some(c) => (*c).clone(),
            None => {
                let c = self.connect().await?;
                self.conn.store(Some(Arc::new(c.clone())));
                tracing::info!(agent = %self.agent, "cluster: connected to redis; publishing this agent's connections");
                self.state().resync = true;
                c
            }
        };
        let mut beat = beat_due;
        let resync = {
            let mut st = self.state();
            if st.resync {
                st.resync = false;
                st.queue.clear();
                let all: Vec<(String, Conn)> = st
                    .conns
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Some(all)
            } else {
                None
            }
        };
        if let Some(all) = resync {
            // Alive first, so readers keep what is about to be written.
            self.heartbeat(&mut conn).await?;
            beat = false;
            self.reap(&mut conn, &self.agent.clone(), false).await?;
            let writes: Vec<Write> = all
                .into_iter()
                .flat_map(|(id, c)| {
                    let mut w = vec![Write::Put {
                        json: entry_json(&self.agent, &c),
                        uid: c.uid.clone(),
                        id: id.clone(),
                    }];
                    if c.sid {
                        w.push(Write::Sid {
                            uid: c.uid,
                            sid: id,
                            backend: c.backend,
                            idle_ms: millis(c.idle),
                        });
                    }
                    w
                })
                .collect();
            for chunk in writes.chunks(BATCH) {
                self.send_writes(&mut conn, chunk, true).await?;
            }
        }
        let mut sent = 0;
        loop {
            let batch: Vec<Write> = {
                let mut st = self.state();
                let n = st.queue.len().min(BATCH);
                st.queue.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            sent += batch.len();
            self.send_writes(&mut conn, &batch, false).await?;
        }
        if sent >= BATCH {
            self.after_burst();
        }
        if beat {
            self.heartbeat(&mut conn).await?;
        }
        if let Some(h) = self.presence().filter(|h| h.sweep_due(Instant::now())) {
            crate::presence::sweep(&mut conn, &self.key, now_ms(), self.cfg.timeout, &h).await?;
        }
        Ok(beat)
    }

    /// After a burst (a connect storm, a resync): the queue gives back the capacity it grew to
    /// (a `VecDeque` keeps it otherwise: ~100 bytes per connection of the burst, for good).
    fn after_burst(&self) {
        let mut st = self.state();
        if st.queue.is_empty() {
            st.queue.shrink_to(BATCH);
        }
    }

    fn failed(&self, why: &str) {
        crate::metrics::counters().cluster_errors.inc();
        self.synced.store(false, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(agent = %self.agent, "cluster: redis unavailable ({why}); proxying goes on, the cluster view is stale until it answers");
        }
        self.conn.store(None);
        // What was queued is lost with the connection: publish everything when it is back.
        self.state().resync = true;
        crate::metrics::counters().cluster_stale.set(1);
    }
}

/// Posts the Engine.IO close of session `sid` to `backend` (`host:port`), as its client would
/// (`POST <path>?EIO=..&transport=polling&sid=..` with the close packet), within `timeout`.
async fn post_close(
    backend: &str,
    path: &str,
    sid: &str,
    eio: u8,
    timeout: Duration,
) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = crate::kick::polling_close(eio);
    let sid = percent_encoding::utf8_percent_encode(sid, percent_encoding::NON_ALPHANUMERIC);
    let eio = if eio == 0 { 4 } else { eio };
    let req = format!(
        "POST {path}?EIO={eio}&transport=polling&sid={sid} HTTP/1.1\r\nHost: {backend}\r\n\
         Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(backend)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        // The status line is enough ("HTTP/1.1 200 OK").
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "not an HTTP answer".to_string())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(200)) => Ok(200),
        Ok(Ok(code)) => Err(format!("HTTP {code}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer in time".into()),
    }
}

/// When the offline check of a uid whose last connection leaves now is due (unix ms).
fn offline_deadline(h: &crate::webhooks::Webhooks, stopping: bool) -> i64 {
    let ms = i64::try_from(h.offline_delay(stopping).as_millis()).unwrap_or(i64::MAX);
    now_ms().saturating_add(ms)
}

fn backend_string(b: &Backend) -> String {
    crate::routing::backend_addr(b).map_or_else(|| format!("{:?}", b.addr), |a| a.to_string())
}

/// The entries of `all` (field → JSON) whose agent is alive, in field order.
fn live_entries(all: HashMap<String, String>, live: &HashSet<String>) -> Vec<(String, Entry)> {
    let mut v: Vec<(String, Entry)> = all
        .into_iter()
        .filter_map(|(id, json)| serde_json::from_str::<Entry>(&json).ok().map(|e| (id, e)))
        .filter(|(_, e)| live.contains(&e.agent))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn entry_value(id: &str, e: &Entry) -> Value {
    let since = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(e.since).unwrap_or(0));
    json!({
        "id": id,
        "agent": e.agent,
        "backend": e.backend,
        "transport": e.transport,
        "since": humantime::format_rfc3339_millis(since).to_string(),
        "client": e.client,
    })
}

/// The background writer of the directory.
pub struct DirectoryService(pub Arc<Directory>);

#[async_trait]
impl BackgroundService for DirectoryService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let dir = &self.0;
        tracing::info!(agent = %dir.agent, "cluster: directory writer started");
        let hooks = dir.state().hooks.clone();
        if let Some(h) = hooks {
            h.spawn();
        }
        let mut last_beat: Option<Instant> = None;
        let mut last_tick: Option<Instant> = None;
        let mut next_connect = Instant::now();
        loop {
            // Once a second, not at every wake-up (a connect storm wakes the writer often): the
            // idle scan and the local gauge walk the whole table.
            if last_tick.is_none_or(|t| t.elapsed() >= TICK) {
                last_tick = Some(Instant::now());
                let expired = {
                    let mut st = dir.state();
                    let n = st.expire(Instant::now());
                    dir.kicked.store(st.kicked.len(), Ordering::Relaxed);
                    n
                };
                if expired > 0 {
                    tracing::debug!(expired, "cluster: idle polling sessions ended");
                }
                let (ws, polling) = dir.state().counts();
                crate::metrics::counters()
                    .cluster_local
                    .set(i64::try_from(ws + polling).unwrap_or(i64::MAX));
            }
            if dir.conn.load().is_some() || Instant::now() >= next_connect {
                let due = last_beat.is_none_or(|t| t.elapsed() >= dir.cfg.heartbeat);
                match dir.round(due).await {
                    Ok(beat) => {
                        if beat || last_beat.is_none() {
                            last_beat = Some(Instant::now());
                        }
                        let pending = dir.state().resync;
                        if !pending {
                            dir.warned.store(false, Ordering::Relaxed);
                            if !dir.synced.swap(true, Ordering::Relaxed) {
                                tracing::info!(agent = %dir.agent, "cluster: directory in sync");
                            }
                            dir.as_of.store(now_ms(), Ordering::Relaxed);
                            crate::metrics::counters().cluster_stale.set(0);
                        }
                    }
                    Err(why) => {
                        dir.failed(&why);
                        // Reconnect attempts: often enough to converge quickly, rarely enough
                        // not to hammer a Redis that is coming back (whatever wakes the writer).
                        next_connect = Instant::now() + RECONNECT;
                    }
                }
            }
            let wait = if dir.conn.load().is_some() {
                TICK.min(dir.cfg.heartbeat)
            } else {
                next_connect
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10))
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = dir.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // A clean stop leaves the view at once rather than after the TTL.
        if let Some(c) = dir.conn.load_full() {
            let mut conn = (*c).clone();
            let agent = dir.agent.clone();
            if dir.reap(&mut conn, &agent, true).await.is_ok() {
                let mut pipe = redis::pipe();
                pipe.cmd("ZREM").arg(dir.agents_key()).arg(&agent).ignore();
                pipe.cmd("HDEL").arg(dir.info_key()).arg(&agent).ignore();
                let _ = dir.send(&mut conn, &pipe).await;
            }
        }
    }
}

/// Reads this agent's command channel (`P:agent:<agent>:cmd`) and the goodbyes of polling
/// sessions other agents closed (`P:bye`) on a dedicated pub/sub connection and carries them
/// out. Pub/sub is fire-and-forget: a message sent while the connection is down is lost (the
/// sender's admin answer says no agent listened; a goodbye is still in the sid marker).
pub struct CommandService(pub Arc<Directory>);

#[async_trait]
impl BackgroundService for CommandService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use futures::StreamExt;
        let dir = &self.0;
        let channel = dir.cmd_channel(&dir.agent);
        let bye = dir.bye_channel();
        loop {
            let connect = async {
                let client = redis::Client::open(dir.url.as_str()).map_err(|e| e.to_string())?;
                let mut ps = tokio::time::timeout(dir.cfg.timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(dir.cfg.timeout, ps.subscribe(&[&channel, &bye]))
                    .await
                    .map_err(|_| "subscribe timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(ps)
            };
            match connect.await {
                Ok(ps) => {
                    tracing::debug!(channel, "cluster: listening for commands");
                    let mut messages = ps.into_on_message();
                    loop {
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            m = messages.next() => match m {
                                Some(m) if m.get_channel_name() == bye => {
                                    dir.farewell(m.get_payload_bytes());
                                }
                                Some(m) => dir.command(m.get_payload_bytes()),
                                None => break,
                            },
                        }
                    }
                    tracing::debug!(channel, "cluster: command connection lost");
                }
                Err(e) => tracing::debug!(channel, "cluster: command channel: {e}"),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(RECONNECT) => {}
            }
        }
    }
}

impl Directory {
    /// One message of `P:bye`: `{"agent": "...", "sid": "...", "eio": 4}`.
    fn farewell(&self, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Bye {
            agent: String,
            sid: String,
            eio: u8,
        }
        match serde_json::from_slice::<Bye>(payload) {
            Ok(b) if b.agent == self.agent => {}
            Ok(b) => self.kicked_elsewhere(&b.sid, b.eio),
            Err(_) => tracing::warn!("cluster: unreadable goodbye ignored"),
        }
    }

    /// One command from the channel: `{"id": "...", "reason": "close_oldest" | "admin"}`, or
    /// another agent's notice about a polling session (`"seen"`, `"closed"`).
    fn command(self: &Arc<Self>, payload: &[u8]) {
        #[derive(Deserialize)]
        struct Cmd {
            id: String,
            reason: String,
        }
        let Ok(cmd) = serde_json::from_slice::<Cmd>(payload) else {
            tracing::warn!("cluster: unreadable command ignored");
            return;
        };
        if matches!(cmd.reason.as_str(), SEEN | CLOSED) {
            return self.noticed(&cmd.id, &cmd.reason);
        }
        let Some(reason) = crate::kick::Reason::parse(&cmd.reason) else {
            tracing::warn!("cluster: unreadable command ignored");
            return;
        };
        if !self.kick_local(&cmd.id, reason) {
            tracing::debug!(
                id = cmd.id,
                "cluster: close command for a connection not (or no longer) here"
            );
        }
    }
}

#[cfg(test)]
mod tests;
