use super::*;

fn conn(uid: &str, transport: Transport, idle: Duration, last_seen: Instant) -> Conn {
    Conn {
        uid: uid.into(),
        backend: "127.0.0.1:4000".into(),
        transport,
        since_ms: 1,
        client: None,
        sid: transport == Transport::Polling,
        idle,
        last_seen,
        eio: 4,
        cut: None,
        announced: false,
    }
}

#[test]
fn polling_sessions_expire_after_their_idle_bound_and_tunnels_never() {
    let mut st = State::new(100);
    let t0 = Instant::now();
    let idle = Duration::from_secs(45);
    st.put("a", "s1", conn("alice", Transport::Polling, idle, t0));
    st.put(
        "a",
        "w0",
        conn("alice", Transport::Websocket, Duration::MAX, t0),
    );
    st.put(
        "a",
        "s2",
        conn(
            "bob",
            Transport::Polling,
            idle,
            t0 + Duration::from_secs(30),
        ),
    );
    st.queue.clear();
    assert_eq!(st.expire(t0 + Duration::from_secs(44)), 0);
    // s1 is past 45 s without a request; bob's s2 was seen 30 s later.
    assert_eq!(st.expire(t0 + Duration::from_secs(46)), 1);
    assert!(!st.conns.contains_key("s1"));
    assert_eq!(st.by_uid.get("alice"), Some(&1));
    // Not alice's last connection: her uid stays in the agent's set.
    assert_eq!(
        st.queue.pop_front(),
        Some(Write::Del {
            id: "s1".into(),
            uid: "alice".into(),
            last: false,
            sid: true
        })
    );
    assert_eq!(st.expire(t0 + Duration::from_secs(3600)), 1);
    assert!(
        st.conns.contains_key("w0"),
        "a tunnel ends when it closes, not by idleness"
    );
    assert_eq!(
        st.queue.pop_front(),
        Some(Write::Del {
            id: "s2".into(),
            uid: "bob".into(),
            last: true,
            sid: true
        })
    );
}

#[test]
fn an_upgrade_keeps_one_connection_and_the_uid_is_counted_once() {
    let mut st = State::new(100);
    let t0 = Instant::now();
    st.put(
        "a",
        "s1",
        conn("alice", Transport::Polling, Duration::from_secs(1), t0),
    );
    st.put(
        "a",
        "s1",
        conn("alice", Transport::Websocket, Duration::MAX, t0),
    );
    assert_eq!(st.conns.len(), 1);
    assert_eq!(st.by_uid.get("alice"), Some(&1));
    assert_eq!(st.counts(), (1, 0));
    assert!(st.remove("s1"));
    assert!(
        !st.remove("s1"),
        "a second close of the same id writes nothing"
    );
    assert!(st.by_uid.is_empty());
    let writes: Vec<_> = st.queue.drain(..).collect();
    assert_eq!(writes.len(), 3);
    assert!(matches!(&writes[2], Write::Del { last: true, .. }));
}

#[test]
fn the_queue_is_bounded_drops_the_oldest_and_asks_for_a_resync() {
    let mut st = State::new(4);
    st.resync = false;
    let t0 = Instant::now();
    for i in 0..10 {
        st.put(
            "a",
            &format!("w{i}"),
            conn("u", Transport::Websocket, Duration::MAX, t0),
        );
    }
    assert_eq!(st.queue.len(), 4);
    assert_eq!(st.dropped, 6);
    assert!(
        st.resync,
        "lost writes are repaired by publishing the whole table"
    );
    // The newest stay, in order; the local table itself lost nothing.
    let ids: Vec<_> = st
        .queue
        .iter()
        .map(|w| match w {
            Write::Put { id, .. } => id.clone(),
            _ => String::new(),
        })
        .collect();
    assert_eq!(ids, ["w6", "w7", "w8", "w9"]);
    assert_eq!(st.conns.len(), 10);
    assert_eq!(st.by_uid.get("u"), Some(&10));
}

#[test]
fn writes_are_batched_into_pipelines_of_the_right_commands() {
    let cfg = ClusterConfig {
        agent_id: Some("ag1".into()),
        ..ClusterConfig::default()
    };
    let dir = Directory::new(
        &cfg,
        "redis://127.0.0.1:1",
        Duration::from_secs(60),
        "/socket.io/",
    );
    let b = Backend::new("127.0.0.1:4000").unwrap();
    dir.open_polling("sid1", "alice", &b, 45_000, None, 4);
    let dir = Arc::new(dir);
    let tunnel = dir.open_tunnel(None, "bob", &b, "10.0.0.1".parse().ok(), 4, None);
    drop(tunnel);
    let st = dir.state();
    // handshake: Put + Sid; tunnel: Put then Del (last of bob).
    assert_eq!(st.queue.len(), 4);
    let mut pipe = redis::pipe();
    for w in &st.queue {
        dir.add_write(&mut pipe, w, None, false);
    }
    let packed = String::from_utf8_lossy(&pipe.get_packed_pipeline()).to_string();
    for want in [
        "gopush:{alice}:conns",
        "ag1/sid1",
        "gopush:{alice}:sid:sid1",
        "gopush:users",
        "gopush:agent:ag1:uids",
        "gopush:{bob}:conns",
        "ag1/w0",
        "SREM",
        "10.0.0.1",
    ] {
        assert!(packed.contains(want), "{want} missing from {packed}");
    }
    assert_eq!(dir.agent(), "ag1");
}

#[test]
fn readers_keep_only_live_agents_entries() {
    let e = |agent: &str| {
        serde_json::to_string(&Entry {
            agent: agent.into(),
            uid: "u".into(),
            backend: "b".into(),
            transport: Transport::Polling,
            since: 0,
            client: None,
        })
        .unwrap()
    };
    let all = HashMap::from([
        ("a/1".to_string(), e("a")),
        ("dead/1".to_string(), e("dead")),
        ("a/bad".to_string(), "{not json".to_string()),
    ]);
    let live = HashSet::from(["a".to_string()]);
    let got = live_entries(all, &live);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "a/1");
}

#[test]
fn default_agent_ids_differ_per_process_start() {
    let cfg = ClusterConfig::default();
    let a = Directory::new(
        &cfg,
        "redis://127.0.0.1:1",
        Duration::from_secs(1),
        "/socket.io/",
    );
    assert!(a.agent().contains(&std::process::id().to_string()));
    assert!(!a.agent().contains('/'));
}

/// The writes `dir` queued, taken.
fn queued(dir: &Directory) -> Vec<Write> {
    dir.state().queue.drain(..).collect()
}

/// A directory of agent `id` whose Redis is never reached (no writer runs in these tests).
fn agent(id: &str) -> Arc<Directory> {
    let cfg = ClusterConfig {
        agent_id: Some(id.into()),
        ..ClusterConfig::default()
    };
    Arc::new(Directory::new(
        &cfg,
        "redis://127.0.0.1:1",
        Duration::from_secs(60),
        "/socket.io/",
    ))
}

#[tokio::test]
async fn close_oldest_without_redis_closes_this_agents_oldest_and_the_poll_says_goodbye() {
    // Redis never connected (no writer): the policy sees this agent's own connections only.
    let dir = agent("ag1");
    // Nothing listens there: the Engine.IO close to the backend fails (logged), which must not
    // change what the client is told.
    let b = Backend::new("127.0.0.1:1").unwrap();
    dir.open_polling("zz-old", "u", &b, 45_000, None, 4);
    dir.open_polling("aa-new", "u", &b, 45_000, None, 3);
    dir.open_polling("other", "v", &b, 45_000, None, 4);
    // Age decides, not the id's order.
    dir.state().conns.get_mut("zz-old").unwrap().since_ms = 1;
    assert_eq!(dir.close_oldest("u", 3).await, 0, "room for a third");
    assert_eq!(dir.close_oldest("u", 2).await, 1);
    assert_eq!(dir.local_count("u"), 1, "the oldest left the table at once");
    assert!(dir.state().conns.contains_key("aa-new"));
    // Its polls: a POST is acknowledged, the first poll gets the DISCONNECT, the next the close,
    // then the agent forgets the session.
    assert_eq!(dir.goodbye("zz-old", false).as_deref(), Some(&b"ok"[..]));
    assert_eq!(dir.goodbye("zz-old", true).as_deref(), Some(&b"41"[..]));
    assert_eq!(dir.goodbye("zz-old", true).as_deref(), Some(&b"1"[..]));
    assert_eq!(dir.goodbye("zz-old", true), None);
    assert_eq!(dir.goodbye("aa-new", true), None);
    // One session per user: the remaining one goes too (Engine.IO 3 payload encoding).
    assert_eq!(dir.close_oldest("u", 1).await, 1);
    assert_eq!(dir.goodbye("aa-new", true).as_deref(), Some(&b"2:41"[..]));
    assert_eq!(dir.local_count("v"), 1, "another uid untouched");
    // A close command for a connection not here changes nothing.
    dir.command(br#"{"id": "nope", "reason": "admin"}"#);
    dir.command(b"garbage");
    assert_eq!(dir.local_count("v"), 1);
    dir.command(br#"{"id": "other", "reason": "admin"}"#);
    assert_eq!(dir.local_count("v"), 0);
}

#[tokio::test]
async fn a_closed_polling_session_leaves_its_marker_and_other_agents_answer_its_goodbye() {
    let (a, b) = (agent("ag-a"), agent("ag-b"));
    let backend = Backend::new("127.0.0.1:1").unwrap();
    a.open_polling("sid-1", "u", &backend, 45_000, None, 3);
    a.state().queue.clear();
    assert!(a.kick_local("sid-1", crate::kick::Reason::Admin));
    // The sid key is not deleted with the connection: it becomes the marker.
    let writes = queued(&a);
    assert!(
        matches!(&writes[0], Write::Del { sid: false, .. }),
        "{writes:?}"
    );
    assert_eq!(
        writes[1],
        Write::Bye {
            uid: "u".into(),
            sid: "sid-1".into(),
            eio: 3
        }
    );
    let mut pipe = redis::pipe();
    a.add_write(&mut pipe, &writes[1], None, false);
    let cmd = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
    assert!(
        cmd.contains("bye:3") && cmd.contains("gopush:{u}:sid:sid-1"),
        "{cmd}"
    );
    // Another agent's message: b answers the session's polls with the goodbye, once each.
    assert_eq!(b.goodbye("sid-1", true), None);
    b.farewell(br#"{"agent": "ag-a", "sid": "sid-1", "eio": 3}"#);
    assert_eq!(b.goodbye("sid-1", true).as_deref(), Some(&b"2:41"[..]));
    assert_eq!(b.goodbye("sid-1", true).as_deref(), Some(&b"1:1"[..]));
    assert_eq!(b.goodbye("sid-1", true), None);
    // Its own message, garbage and an implausible sid change nothing.
    b.farewell(br#"{"agent": "ag-b", "sid": "sid-2", "eio": 4}"#);
    b.farewell(b"garbage");
    b.farewell(br#"{"agent": "ag-a", "sid": "a b", "eio": 4}"#);
    assert_eq!(b.goodbye("sid-2", true), None);
    assert_eq!(b.goodbye("a b", true), None);
}

#[test]
fn another_agents_session_is_reported_to_its_holder_a_few_times_per_idle_bound() {
    let (a, b) = (agent("ag-a"), agent("ag-b"));
    let backend = Backend::new("127.0.0.1:1").unwrap();
    a.open_polling("s1", "u", &backend, 45_000, None, 4);
    // The sid key names the backend, the holder and the idle bound.
    let sid_write = a.state().queue.pop_back().unwrap();
    let mut pipe = redis::pipe();
    a.add_write(&mut pipe, &sid_write, None, false);
    let cmd = String::from_utf8_lossy(&pipe.get_packed_pipeline()).into_owned();
    assert!(cmd.contains("127.0.0.1:1 ag-a 45000"), "{cmd}");
    // b learnt it (as lookup_sid does): requests there are reported once per third of the bound.
    b.state().foreign.insert(
        "s1".into(),
        Foreign {
            agent: "ag-a".into(),
            idle: Duration::from_secs(45),
            seen: Instant::now(),
            reported: None,
        },
    );
    b.touch("s1");
    b.touch("s1");
    b.touch("unknown");
    let notices = queued(&b);
    assert_eq!(
        notices,
        vec![Write::Notify {
            agent: "ag-a".into(),
            id: "s1".into(),
            what: "seen"
        }]
    );
    // The holder restarts its idle clock on the notice.
    let old = Instant::now() - Duration::from_secs(40);
    a.state().conns.get_mut("s1").unwrap().last_seen = old;
    a.command(br#"{"id": "s1", "reason": "seen"}"#);
    assert!(a.state().conns["s1"].last_seen > old);
    // The client's close through b: b tells the holder, once, and forgets the session.
    b.close_sid("s1");
    b.close_sid("s1");
    let notices = queued(&b);
    assert_eq!(
        notices,
        vec![Write::Notify {
            agent: "ag-a".into(),
            id: "s1".into(),
            what: "closed"
        }]
    );
    // A notice never ends a tunnel, only a polling session.
    let t = a.open_tunnel(None, "u", &backend, None, 4, None);
    let wid = a
        .state()
        .conns
        .keys()
        .find(|k| k.starts_with('w'))
        .cloned()
        .unwrap();
    a.command(format!(r#"{{"id": "{wid}", "reason": "closed"}}"#).as_bytes());
    assert!(a.state().conns.contains_key(&wid));
    a.command(br#"{"id": "s1", "reason": "closed"}"#);
    assert!(!a.state().conns.contains_key("s1"));
    drop(t);
}

#[test]
fn with_user_webhooks_opens_and_closes_go_through_the_presence_scripts() {
    let cfg: ClusterConfig = serde_yaml::from_str(
        "{agent_id: ag1, webhooks: [{url: \"http://127.0.0.1:9/h\", secret: s, events: [user.offline]}]}",
    )
    .unwrap();
    let dir = Arc::new(Directory::new(
        &cfg,
        "redis://127.0.0.1:1",
        Duration::from_secs(60),
        "/socket.io/",
    ));
    let hooks = dir
        .presence()
        .expect("user.offline wants the presence scripts");
    let b = Backend::new("127.0.0.1:4000").unwrap();
    drop(dir.open_tunnel(None, "bob", &b, None, 4, None));
    let st = dir.state();
    assert_eq!(st.queue.len(), 2, "Put then Del");
    let mut pipe = redis::pipe();
    for w in &st.queue {
        dir.add_write(&mut pipe, w, Some(&hooks), false);
    }
    let packed = String::from_utf8_lossy(&pipe.get_packed_pipeline()).to_string();
    // The open script with the uid's online key, the shared pending checks and an online id
    // unique to this process (a configured agent id gets the start time).
    let online_id = format!("ag1.{:x}-on-w0", dir.started_ms);
    for want in [
        crate::presence::OPEN,
        crate::presence::CLOSE,
        "gopush:{bob}:online",
        "gopush:offline",
        online_id.as_str(),
    ] {
        assert!(packed.contains(want), "{want} missing from {packed}");
    }
    assert!(!packed.contains("\r\nHSET\r\n"), "no plain HSET: {packed}");
    // Connection events only: the plain writes.
    let cfg: ClusterConfig = serde_yaml::from_str(
        "{webhooks: [{url: \"http://127.0.0.1:9/h\", secret: s, events: [connection.open]}]}",
    )
    .unwrap();
    let plain = Directory::new(
        &cfg,
        "redis://127.0.0.1:1",
        Duration::from_secs(60),
        "/socket.io/",
    );
    assert!(plain.presence().is_none());
}
