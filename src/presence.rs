//! Cluster-wide `user.online` / `user.offline` (with `cluster.webhooks` that want either).
//!
//! The decision is made in Redis, atomically, by Lua scripts that the directory writer runs in
//! its batches in place of the plain writes (so it stays off the request path):
//!
//! ```text
//! P:{uid}:online   STRING  the id of the uid's user.online (exists while the uid is "online")
//! P:offline        ZSET    uid → unix ms at which its user.offline is due (pending offline checks)
//! ```
//!
//! * [`OPEN`] (a connection written): `HSET` it, cancel any pending offline check of the uid, and
//!   `SET P:{uid}:online <id> NX`: the one agent whose `SET` succeeds emits `user.online`.
//! * [`CLOSE`] / [`REAP`] (a connection deleted; a dead agent's, or this agent's own at a stop or
//!   resync): when the uid's hash is left empty and it is online, schedule its offline check at
//!   `now + offline_after` (never earlier than one already scheduled: a stopping agent schedules
//!   its users' checks past its grace period, as their tunnels still drain).
//! * [`OFFLINE`] (every agent, once a second, for the checks that are due, [`sweep`]): if the
//!   check is still pending, remove it; if the uid still has no connection, `DEL` the online key
//!   and answer its id: only that agent emits `user.offline`.
//!
//! The pending checks live in Redis, not in the agent that scheduled them, so a stopped or crashed
//! agent's checks are run by the others. The online id is derived from the connection that made
//! the uid online ([`online_id`]), so when that agent re-publishes its table after a write whose
//! answer was lost (it may have run in Redis), the same connection finds its own id and the event
//! is sent then, with that id (at least once; receivers de-duplicate). A connection whose
//! `user.online` was queued already is re-published without asking (no duplicate at every Redis
//! outage). `user.offline`'s id is the online id + `-off`.

use crate::webhooks::Webhooks;
use redis::aio::MultiplexedConnection;
use std::time::Duration;

/// Schedules the offline check of uid `ARGV[2]` at `ARGV[3]` (ms) when its hash `KEYS[1]` is
/// empty: drops it from the index `KEYS[2]`, and if it is online (`KEYS[3]`) adds it to the
/// pending checks `KEYS[4]`, keeping a later deadline already there.
macro_rules! when_empty {
    () => {
        "if redis.call('HLEN', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) \
if redis.call('EXISTS', KEYS[3]) == 1 then local d = redis.call('ZSCORE', KEYS[4], ARGV[2]) \
if not d or tonumber(d) < tonumber(ARGV[3]) then redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2]) end \
end end return 0"
    };
}

/// `KEYS`: conns, online, pending; `ARGV`: field, entry JSON, uid, online id, retry (1 when
/// re-publishing). Answers the online id when this call made the uid online, or (retry) when the
/// uid's online key is this very connection's: then its `user.online` may never have been sent.
pub const OPEN: &str = "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) \
redis.call('ZREM', KEYS[3], ARGV[3]) \
if redis.call('SET', KEYS[2], ARGV[4], 'NX') then return ARGV[4] end \
if ARGV[5] == '1' and redis.call('GET', KEYS[2]) == ARGV[4] then return ARGV[4] end \
return false";

/// `KEYS`: conns, users, online, pending; `ARGV`: field, uid, deadline (ms).
pub const CLOSE: &str = concat!("redis.call('HDEL', KEYS[1], ARGV[1]) ", when_empty!());

/// `KEYS`: conns, users, online, pending; `ARGV`: field prefix `<agent>/`, uid, deadline (ms).
pub const REAP: &str = concat!(
    "for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do \
if string.sub(f, 1, #ARGV[1]) == ARGV[1] then redis.call('HDEL', KEYS[1], f) end end ",
    when_empty!()
);

/// `KEYS`: conns, online, pending; `ARGV`: uid, now (ms). Answers the online id when this call
/// took the uid offline (exactly one caller can).
pub const OFFLINE: &str = "local d = redis.call('ZSCORE', KEYS[3], ARGV[1]) \
if not d or tonumber(d) > tonumber(ARGV[2]) then return false end \
redis.call('ZREM', KEYS[3], ARGV[1]) \
if redis.call('HLEN', KEYS[1]) > 0 then return false end \
local id = redis.call('GET', KEYS[2]) \
if id then redis.call('DEL', KEYS[2]) end \
return id";

/// Most due checks run per pipeline.
const SWEEP_BATCH: usize = 1024;

/// Most pipelines per sweep (the rest wait for the next sweep, a second later): after an agent
/// with many users died, its users' checks are due at once.
const SWEEP_ROUNDS: usize = 16;

pub fn online_key(key: &str, uid: &str) -> String {
    format!("{key}:{{{uid}}}:online")
}

pub fn pending_key(key: &str) -> String {
    format!("{key}:offline")
}

/// The id of the `user.online` a connection causes: `prefix` is unique per process (see
/// [`Webhooks::id_prefix`]), `conn` per connection of the process.
pub fn online_id(prefix: &str, conn: &str) -> String {
    format!("{prefix}-on-{conn}")
}

/// The id of the `user.offline` that ends the online period `online`.
pub fn offline_id(online: &str) -> String {
    format!("{online}-off")
}

/// Runs the offline checks due at `now_ms` and emits a `user.offline` for each uid this agent
/// took offline; answers how many.
pub async fn sweep(
    conn: &mut MultiplexedConnection,
    key: &str,
    now_ms: i64,
    timeout: Duration,
    hooks: &Webhooks,
) -> Result<usize, String> {
    let mut n = 0;
    for _ in 0..SWEEP_ROUNDS {
        let (taken, offline) = sweep_batch(conn, key, now_ms, timeout, hooks).await?;
        n += offline;
        if taken < SWEEP_BATCH {
            break;
        }
    }
    Ok(n)
}

/// One pipeline of [`sweep`]: answers how many due checks it ran and how many took a uid
/// offline. Each run removes its check, so the next batch reads the following ones (agents
/// sweeping at the same moment may run the same checks: one wins each, the others get nil).
async fn sweep_batch(
    conn: &mut MultiplexedConnection,
    key: &str,
    now_ms: i64,
    timeout: Duration,
    hooks: &Webhooks,
) -> Result<(usize, usize), String> {
    let pending = pending_key(key);
    let run = async {
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&pending)
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(SWEEP_BATCH)
            .query_async(conn)
            .await?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for uid in &due {
            pipe.cmd("EVAL")
                .arg(OFFLINE)
                .arg(3)
                .arg(format!("{key}:{{{uid}}}:conns"))
                .arg(online_key(key, uid))
                .arg(&pending)
                .arg(uid)
                .arg(now_ms);
        }
        let ids: Vec<Option<String>> = pipe.query_async(conn).await?;
        Ok::<_, redis::RedisError>(due.into_iter().zip(ids).collect())
    };
    let results = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| "redis did not answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    let taken = results.len();
    let mut n = 0;
    for (uid, id) in results {
        if let Some(id) = id {
            hooks.user_event(crate::webhooks::Event::UserOffline, &uid, &offline_id(&id));
            n += 1;
        }
    }
    Ok((taken, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_share_the_empty_hash_tail_and_ids_pair_up() {
        assert!(CLOSE.starts_with("redis.call('HDEL'"));
        assert!(REAP.contains("HKEYS"));
        for s in [CLOSE, REAP] {
            assert!(s.ends_with("end end return 0"), "{s}");
            assert!(s.contains("ZADD', KEYS[4], ARGV[3], ARGV[2]"));
        }
        let on = online_id("ag1.5f", "w3");
        assert_eq!(on, "ag1.5f-on-w3");
        assert_eq!(offline_id(&on), "ag1.5f-on-w3-off");
        assert_eq!(online_key("gopush", "ann"), "gopush:{ann}:online");
        assert_eq!(pending_key("gopush"), "gopush:offline");
    }
}
