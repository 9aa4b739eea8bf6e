//! Pushing into a Socket.IO cluster from outside it, through the Redis that its Node
//! `@socket.io/redis-adapter` uses, in exactly the format of the official
//! `@socket.io/redis-emitter` (v5), so that unmodified Node backends deliver it:
//!
//! * an event: msgpack `["emitter", {type: 2, data: [event, data?], nsp}, {rooms, flags: {},
//!   except: []}]` published on `socket.io#<nsp>#` (every socket), or on
//!   `socket.io#<nsp>#<room>#` when it targets one room (only nodes that have that room decode
//!   it). `"emitter"` is the emitter's own id: no Node adapter uses it, so every node delivers;
//! * a disconnect: JSON `{"type": 4, "opts": {"rooms": [room], "except": []}, "close": bool}`
//!   on `socket.io-request#<nsp>#` (REMOTE_DISCONNECT; each node disconnects its matching sockets).
//!
//! With `push.adapter: sharded` the backends use `createShardedAdapter` (Redis 7 sharded pub/sub),
//! which speaks socket.io-adapter's cluster protocol instead: JSON `{uid, nsp, type, data}`
//! published with `SPUBLISH` on `socket.io#<nsp>#`, or, for a push to one room under the
//! adapter's `dynamic` subscription modes, on that room's own channel `socket.io#<nsp>#<room>#`
//! (only the nodes that have the room subscribe to it). A BROADCAST (type 3) carries the packet
//! and `{rooms, except, flags}`; DISCONNECT_SOCKETS (type 6) the same options and `close`. The
//! `uid` is the sender's, [`EMITTER_ID`]: no node has it, so every node acts on the message.
//!
//! The encoders are pure functions (unit-tested, and compared byte for byte with the Node
//! emitter in the end-to-end suite); [`Publisher`] owns the Redis connection: to one server
//! (`push.redis`) or to a Redis Cluster (`push.redis_cluster`), where each publish goes to the
//! primary owning its channel's slot.

use crate::config::{PushAdapter, PushConfig, SubscriptionMode};
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use serde::Serialize;

/// The emitter id of `@socket.io/redis-emitter`; a Node adapter drops messages carrying its own
/// (random) id only.
pub const EMITTER_ID: &str = "emitter";

/// Event names Socket.IO reserves for itself: no push (and no demo room event) may use them.
pub const RESERVED_EVENTS: &[&str] = &[
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// socket.io-parser's EVENT packet type.
const PACKET_EVENT: u8 = 2;

/// The adapter's REMOTE_DISCONNECT request type.
const REMOTE_DISCONNECT: u8 = 4;

#[derive(Serialize)]
struct Packet<'a> {
    #[serde(rename = "type")]
    kind: u8,
    data: &'a [serde_json::Value],
    nsp: &'a str,
}

/// Empty, like the emitter's default flags (`{}`: not volatile, not local).
#[derive(Serialize)]
struct Flags {}

/// Key order as the emitter writes it: rooms, flags, except.
#[derive(Serialize)]
struct BroadcastOpts<'a> {
    rooms: &'a [&'a str],
    flags: Flags,
    except: [&'a str; 0],
}

/// An encoded event and the channel to publish it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The Redis channel.
    pub channel: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Sharded pub/sub (`SPUBLISH`) rather than classic (`PUBLISH`).
    pub sharded: bool,
}

/// The event push for the configured adapter.
pub fn event(
    cfg: &PushConfig,
    nsp: &str,
    room: Option<&str>,
    data: &[serde_json::Value],
) -> Result<Message, String> {
    match cfg.adapter {
        PushAdapter::Classic => encode_event(&cfg.key, nsp, room, data).map_err(|e| e.to_string()),
        PushAdapter::Sharded => sharded_event(&cfg.key, cfg.subscription_mode, nsp, room, data)
            .map_err(|e| e.to_string()),
    }
}

/// The disconnect request for the configured adapter.
pub fn disconnect(cfg: &PushConfig, nsp: &str, room: &str, close: bool) -> Result<Message, String> {
    match cfg.adapter {
        PushAdapter::Classic => {
            encode_disconnect(&cfg.key, nsp, room, close).map_err(|e| e.to_string())
        }
        PushAdapter::Sharded => {
            sharded_disconnect(&cfg.key, nsp, room, close).map_err(|e| e.to_string())
        }
    }
}

/// socket.io-adapter's cluster message types used here.
const CLUSTER_BROADCAST: u8 = 3;
const CLUSTER_DISCONNECT_SOCKETS: u8 = 6;

#[derive(Serialize)]
struct ClusterMessage<'a, D> {
    uid: &'a str,
    nsp: &'a str,
    #[serde(rename = "type")]
    kind: u8,
    data: D,
}

#[derive(Serialize)]
struct ClusterOpts<'a> {
    rooms: &'a [&'a str],
    except: [&'a str; 0],
    flags: Flags,
}

#[derive(Serialize)]
struct ClusterBroadcast<'a> {
    opts: ClusterOpts<'a>,
    packet: Packet<'a>,
}

#[derive(Serialize)]
struct ClusterDisconnect<'a> {
    opts: ClusterOpts<'a>,
    close: bool,
}

/// The channel the sharded adapter reads a one-room broadcast from (its `computeChannel`): the
/// room's own under the dynamic modes (`dynamic` only for public rooms: a 20-character name looks
/// like a socket id, which it keeps on the namespace channel), else the namespace's.
fn sharded_channel(key: &str, mode: SubscriptionMode, nsp: &str, room: Option<&str>) -> String {
    let own = match (mode, room) {
        (SubscriptionMode::Dynamic, Some(r)) => r.chars().count() != 20,
        (SubscriptionMode::DynamicPrivate, Some(_)) => true,
        _ => false,
    };
    match room.filter(|_| own) {
        Some(room) => format!("{key}#{nsp}#{room}#"),
        None => format!("{key}#{nsp}#"),
    }
}

/// Encodes an event for nodes on `createShardedAdapter`.
pub fn sharded_event(
    key: &str,
    mode: SubscriptionMode,
    nsp: &str,
    room: Option<&str>,
    data: &[serde_json::Value],
) -> Result<Message, serde_json::Error> {
    let rooms: Vec<&str> = room.into_iter().collect();
    let payload = serde_json::to_vec(&ClusterMessage {
        uid: EMITTER_ID,
        nsp,
        kind: CLUSTER_BROADCAST,
        data: ClusterBroadcast {
            opts: ClusterOpts {
                rooms: &rooms,
                except: [],
                flags: Flags {},
            },
            packet: Packet {
                kind: PACKET_EVENT,
                data,
                nsp,
            },
        },
    })?;
    Ok(Message {
        channel: sharded_channel(key, mode, nsp, room),
        payload,
        sharded: true,
    })
}

/// Encodes a disconnect of every socket in `room` for nodes on `createShardedAdapter` (on the
/// namespace channel, which every node subscribes to).
pub fn sharded_disconnect(
    key: &str,
    nsp: &str,
    room: &str,
    close: bool,
) -> Result<Message, serde_json::Error> {
    let payload = serde_json::to_vec(&ClusterMessage {
        uid: EMITTER_ID,
        nsp,
        kind: CLUSTER_DISCONNECT_SOCKETS,
        data: ClusterDisconnect {
            opts: ClusterOpts {
                rooms: &[room],
                except: [],
                flags: Flags {},
            },
            close,
        },
    })?;
    Ok(Message {
        channel: format!("{key}#{nsp}#"),
        payload,
        sharded: true,
    })
}

/// Encodes `event` with its arguments `data` (the event name first, as Socket.IO packs it) for
/// namespace `nsp`, to `room` or to everyone.
pub fn encode_event(
    key: &str,
    nsp: &str,
    room: Option<&str>,
    data: &[serde_json::Value],
) -> Result<Message, rmp_serde::encode::Error> {
    let rooms: Vec<&str> = room.into_iter().collect();
    let message = (
        EMITTER_ID,
        Packet {
            kind: PACKET_EVENT,
            data,
            nsp,
        },
        BroadcastOpts {
            rooms: &rooms,
            flags: Flags {},
            except: [],
        },
    );
    let payload = rmp_serde::to_vec_named(&message)?;
    let channel = match room {
        Some(room) => format!("{key}#{nsp}#{room}#"),
        None => format!("{key}#{nsp}#"),
    };
    Ok(Message {
        channel,
        payload,
        sharded: false,
    })
}

#[derive(Serialize)]
struct DisconnectOpts<'a> {
    rooms: [&'a str; 1],
    except: [&'a str; 0],
}

#[derive(Serialize)]
struct DisconnectRequest<'a> {
    #[serde(rename = "type")]
    kind: u8,
    opts: DisconnectOpts<'a>,
    close: bool,
}

/// Encodes the request that disconnects every socket in `room` of namespace `nsp`, on every node.
/// `close` also closes the underlying connection (the client then reconnects by itself);
/// without it the client gets "io server disconnect" and stays disconnected.
pub fn encode_disconnect(
    key: &str,
    nsp: &str,
    room: &str,
    close: bool,
) -> Result<Message, serde_json::Error> {
    let payload = serde_json::to_vec(&DisconnectRequest {
        kind: REMOTE_DISCONNECT,
        opts: DisconnectOpts {
            rooms: [room],
            except: [],
        },
        close,
    })?;
    Ok(Message {
        channel: format!("{key}-request#{nsp}#"),
        payload,
        sharded: false,
    })
}

/// The room of one user: `template` with `{uid}` replaced.
pub fn uid_room(template: &str, uid: &str) -> String {
    template.replace("{uid}", uid)
}

/// Where push publishes: one Redis server, or a Redis Cluster known by its seed nodes. Also the
/// identity of a kept connection (a reload that changes it makes a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl Target {
    fn of(cfg: &PushConfig) -> Target {
        if cfg.redis_cluster.is_empty() {
            Target::Single(cfg.redis_url().to_string())
        } else {
            Target::Cluster(cfg.redis_cluster.clone())
        }
    }

    /// The configuration key that names this target, for error messages.
    fn key(&self) -> &'static str {
        match self {
            Target::Single(_) => "push.redis",
            Target::Cluster(_) => "push.redis_cluster",
        }
    }
}

/// A connection to either kind of target; both are multiplexed and cheap to clone.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    /// redis-rs routes a command by the slot of its first argument, which for `PUBLISH` and
    /// `SPUBLISH` is the channel (`FirstKey` in its routing table), to that slot's primary (we
    /// never enable reads from replicas), and follows `MOVED` / `ASK` with a refresh of its slot
    /// map. That is what sharded pub/sub needs: a shard channel lives on the shard owning its
    /// slot. A classic `PUBLISH` may go to any node (the cluster bus broadcasts it). Unlike the
    /// single connection, it also retries a command by itself on a node connection that broke,
    /// which can, rarely, publish twice (README says so).
    Cluster(ClusterConnection),
}

/// Publishes to Redis over one multiplexed connection (to a single server or, with
/// `push.redis_cluster`, a cluster connection holding one per node), made on first use and
/// again after an error (or when a reload changed the target).
///
/// A connection kept from an earlier push may have died since (Redis restarted): the push that
/// finds it dead is sent once more on a new connection instead of failing, so the first push
/// after a Redis restart works. A dead connection fails before anything is sent (broken pipe),
/// so the retry does not publish twice.
#[derive(Default)]
pub struct Publisher {
    conn: tokio::sync::Mutex<Option<(Target, Conn)>>,
}

impl Publisher {
    /// Publishes `message`; answers how many Redis subscribers received it (each Node instance
    /// counts once per subscription that matched; on a Redis Cluster, those connected to the
    /// node that executed the publish). The error is a sentence for the API caller.
    pub async fn publish(&self, cfg: &PushConfig, message: &Message) -> Result<i64, String> {
        let (conn, reused) = self.connection(cfg).await?;
        match self.publish_on(cfg, conn, message).await {
            Err(Failure::Dropped(_)) if reused => {
                let (conn, _) = self.connection(cfg).await?;
                self.publish_on(cfg, conn, message)
                    .await
                    .map_err(Failure::into_reason)
            }
            other => other.map_err(Failure::into_reason),
        }
    }

    async fn publish_on(
        &self,
        cfg: &PushConfig,
        conn: Conn,
        message: &Message,
    ) -> Result<i64, Failure> {
        let mut cmd = redis::cmd(if message.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        cmd.arg(&message.channel).arg(&message.payload);
        let publish = async {
            match conn {
                Conn::Single(mut c) => cmd.query_async::<i64>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<i64>(&mut c).await,
            }
        };
        match tokio::time::timeout(cfg.timeout, publish).await {
            Ok(Ok(receivers)) => Ok(receivers),
            Ok(Err(e)) => {
                self.forget().await;
                let reason = format!("redis publish failed: {e}");
                Err(if e.is_connection_dropped() {
                    Failure::Dropped(reason)
                } else {
                    Failure::Other(reason)
                })
            }
            Err(_) => {
                self.forget().await;
                // The PUBLISH was sent: a Redis that was only slow still executes it.
                Err(Failure::Other(format!(
                    "redis did not answer within {} (the event may still be delivered if Redis is only slow)",
                    humantime::format_duration(cfg.timeout)
                )))
            }
        }
    }

    /// The connection, and whether it was kept from an earlier push (rather than made now).
    async fn connection(&self, cfg: &PushConfig) -> Result<(Conn, bool), String> {
        let target = Target::of(cfg);
        let mut slot = self.conn.lock().await;
        if let Some((kept, conn)) = slot.as_ref() {
            if *kept == target {
                return Ok((conn.clone(), true));
            }
        }
        let conn = match tokio::time::timeout(cfg.timeout, connect(&target, cfg)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(format!(
                    "cannot connect to redis ({}) within {}",
                    target.key(),
                    humantime::format_duration(cfg.timeout)
                ))
            }
        };
        *slot = Some((target, conn.clone()));
        Ok((conn, false))
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }
}

/// A new connection to `target`. For a cluster this reads the slot map (`CLUSTER SLOTS`) from
/// the first seed that answers and connects to every primary.
async fn connect(target: &Target, cfg: &PushConfig) -> Result<Conn, String> {
    let key = target.key();
    match target {
        Target::Single(url) => {
            let client = redis::Client::open(url.as_str())
                .map_err(|e| format!("{key} is not usable: {e}"))?;
            client
                .get_multiplexed_async_connection()
                .await
                .map(Conn::Single)
                .map_err(|e| format!("cannot connect to redis ({key}): {e}"))
        }
        Target::Cluster(seeds) => {
            let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                // Per node connection attempt; the publish itself is bounded by `publish_on`.
                .connection_timeout(cfg.timeout)
                .build()
                .map_err(|e| format!("{key} is not usable: {e}"))?;
            client
                .get_async_connection()
                .await
                .map(Conn::Cluster)
                .map_err(|e| format!("cannot connect to the redis cluster ({key}): {e}"))
        }
    }
}

/// Why a publish failed: the connection was found dead (worth one retry on a new one), or
/// anything else.
enum Failure {
    Dropped(String),
    Other(String),
}

impl Failure {
    fn into_reason(self) -> String {
        match self {
            Failure::Dropped(s) | Failure::Other(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_to_a_room_matches_the_emitter_bytes() {
        // What `new Emitter(redis).to("uid:alice").emit("news", {a: 1})` publishes (v5.1.0):
        // notepack of ["emitter", {type: 2, data: ["news", {a: 1}], nsp: "/"},
        //              {rooms: ["uid:alice"], flags: {}, except: []}].
        let m = encode_event(
            "socket.io",
            "/",
            Some("uid:alice"),
            &[json!("news"), json!({"a": 1})],
        )
        .unwrap();
        assert_eq!(m.channel, "socket.io#/#uid:alice#");
        let mut want = vec![0x93, 0xa7];
        want.extend_from_slice(b"emitter");
        want.push(0x83);
        want.extend_from_slice(&[0xa4]);
        want.extend_from_slice(b"type");
        want.push(0x02);
        want.push(0xa4);
        want.extend_from_slice(b"data");
        want.extend_from_slice(&[0x92, 0xa4]);
        want.extend_from_slice(b"news");
        want.extend_from_slice(&[0x81, 0xa1, b'a', 0x01]);
        want.push(0xa3);
        want.extend_from_slice(b"nsp");
        want.extend_from_slice(&[0xa1, b'/']);
        want.push(0x83);
        want.push(0xa5);
        want.extend_from_slice(b"rooms");
        want.extend_from_slice(&[0x91, 0xa9]);
        want.extend_from_slice(b"uid:alice");
        want.push(0xa5);
        want.extend_from_slice(b"flags");
        want.push(0x80);
        want.push(0xa6);
        want.extend_from_slice(b"except");
        want.push(0x90);
        assert_eq!(m.payload, want);
    }

    #[test]
    fn sharded_messages_are_cluster_adapter_json_on_the_adapters_channels() {
        let data = [json!("news"), json!({"a": 1})];
        let m = sharded_event(
            "socket.io",
            SubscriptionMode::Dynamic,
            "/",
            Some("uid:alice"),
            &data,
        )
        .unwrap();
        assert!(m.sharded);
        assert_eq!(m.channel, "socket.io#/#uid:alice#");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            v,
            json!({"uid": "emitter", "nsp": "/", "type": 3, "data": {
                "opts": {"rooms": ["uid:alice"], "except": [], "flags": {}},
                "packet": {"type": 2, "data": ["news", {"a": 1}], "nsp": "/"}}})
        );
        // The adapter reads JSON when the first byte is `{`.
        assert_eq!(m.payload[0], b'{');
        // Everyone, a socket-id-like room under `dynamic`, and `static`: the namespace channel.
        let all =
            sharded_event("socket.io", SubscriptionMode::Dynamic, "/chat", None, &data).unwrap();
        assert_eq!(all.channel, "socket.io#/chat#");
        let sid_like = "a".repeat(20);
        let m = sharded_event("k", SubscriptionMode::Dynamic, "/", Some(&sid_like), &data).unwrap();
        assert_eq!(m.channel, "k#/#");
        let m = sharded_event(
            "k",
            SubscriptionMode::DynamicPrivate,
            "/",
            Some(&sid_like),
            &data,
        )
        .unwrap();
        assert_eq!(m.channel, format!("k#/#{sid_like}#"));
        let m = sharded_event("k", SubscriptionMode::Static, "/", Some("lobby"), &data).unwrap();
        assert_eq!(m.channel, "k#/#");
        let d = sharded_disconnect("socket.io", "/", "uid:bob", true).unwrap();
        assert_eq!(d.channel, "socket.io#/#");
        let v: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
        assert_eq!(
            v,
            json!({"uid": "emitter", "nsp": "/", "type": 6, "data": {
                "opts": {"rooms": ["uid:bob"], "except": [], "flags": {}}, "close": true}})
        );
    }

    #[test]
    fn broadcast_to_all_uses_the_namespace_channel() {
        let m = encode_event("socket.io", "/chat", None, &[json!("tick")]).unwrap();
        assert_eq!(m.channel, "socket.io#/chat#");
        let back: serde_json::Value = rmp_serde::from_slice(&m.payload).unwrap();
        assert_eq!(
            back,
            json!(["emitter", {"type": 2, "data": ["tick"], "nsp": "/chat"},
                   {"rooms": [], "flags": {}, "except": []}])
        );
    }

    #[test]
    fn disconnect_is_the_emitters_json_request() {
        let m = encode_disconnect("socket.io", "/", "uid:bob", false).unwrap();
        assert_eq!(m.channel, "socket.io-request#/#");
        assert_eq!(
            String::from_utf8(m.payload).unwrap(),
            r#"{"type":4,"opts":{"rooms":["uid:bob"],"except":[]},"close":false}"#
        );
    }

    #[test]
    fn uid_room_fills_the_template() {
        assert_eq!(uid_room("uid:{uid}", "alice"), "uid:alice");
        assert_eq!(uid_room("user-{uid}-x", "7"), "user-7-x");
    }
}
