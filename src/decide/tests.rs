//! The decision over plain request heads: every refusal, every source, hook answers, product,
//! sid memory, drain and health, without sockets. These call what production calls
//! ([`resolve_uid`] and [`route`]).

use super::*;
use crate::config::Config;
use crate::live::Live;
use std::net::SocketAddr;
use std::path::PathBuf;

const A: &str = "127.0.0.1:4000";
const B: &str = "127.0.0.1:4001";

/// A configuration in its own directory, with hook files beside it.
struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("gopush-decide-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("hooks")).unwrap();
        Setup { dir }
    }

    fn hook(&self, kind: &str, source: &str) -> &Self {
        std::fs::write(self.dir.join(format!("hooks/{kind}.js")), source).unwrap();
        self
    }

    fn live(&self, extra: &str) -> Live {
        // The uid hook replaces the sources.
        let sources = if extra.contains("uid: hooks/") {
            ""
        } else {
            "uid:\n  sources: [{cookie: uid}, {query: uid}, {header: x-user-id}]\n"
        };
        let yaml = format!(
            "pools:\n  default: {{backends: [\"{A}\", \"{B}\"]}}\n  test: {{backends: [\"127.0.0.1:4002\"]}}\nhealth_check: {{kind: none}}\n{sources}{extra}"
        );
        let path = self.dir.join("gopush.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        Live::new(config, Some(path)).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn head(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

/// resolve_uid then route, as the proxy does (limits aside).
fn decide(live: &Live, req: &RequestHeader) -> Result<(Uid, Decision), Refusal> {
    let snap = live.load();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let uid = rt.block_on(resolve_uid(&snap, req, None))?;
    let d = route(&snap, live.sessions(), req, None, &uid)?;
    Ok((uid, d))
}

fn addr(b: &Backend) -> String {
    b.addr.as_inet().map(|a| a.to_string()).unwrap_or_default()
}

/// The ring's choice for a uid key in pool `default`.
fn ring(live: &Live, key: &str) -> String {
    let snap = live.load();
    let pool = snap.router.pool(None).unwrap();
    addr(&pool.select(key.as_bytes()).unwrap())
}

#[test]
fn refusals() {
    let s = Setup::new("refusals");
    let live = s.live("");
    let long = format!("/?uid={}", "a".repeat(300));
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Refusal);
    let table: &[Case] = &[
        ("/", &[], Refusal::MissingUid),
        ("/?uid=", &[("cookie", "uid=")], Refusal::MissingUid),
        (
            "/?uid=%ff",
            &[],
            Refusal::InvalidUid("not UTF-8 once percent-decoded"),
        ),
        (
            "/?uid=a%0Ab",
            &[],
            Refusal::InvalidUid("contains control characters"),
        ),
        (&long, &[], Refusal::InvalidUid("too long")),
        ("/?uid=alice&product=nope", &[], Refusal::UnknownProduct),
    ];
    for (uri, headers, want) in table {
        assert_eq!(
            decide(&live, &head(uri, headers)).err().as_ref(),
            Some(want),
            "{uri}"
        );
    }
    // Every refusal has a status and a body that says why.
    let snap = live.load();
    let (status, _, body) = Refusal::MissingUid.response(&snap);
    assert_eq!(status, 430);
    assert!(String::from_utf8_lossy(&body).contains("cookie `uid`, query `uid`"));
    assert_eq!(Refusal::UnknownProduct.response(&snap).0, 404);
    assert_eq!(Refusal::NoHealthyBackend.response(&snap).0, 503);
    assert_eq!(
        Refusal::Limit(Exceeded::HeaderTooLarge).response(&snap).0,
        431
    );
    assert_eq!(Refusal::Proxy(502).response(&snap).1, "Bad Gateway");
}

#[test]
fn sources_in_order_and_one_canonical_uid() {
    let s = Setup::new("sources");
    let live = s.live("");
    let (uid, d) = decide(
        &live,
        &head("/?uid=q", &[("cookie", "uid=c"), ("x-user-id", "h")]),
    )
    .unwrap();
    assert_eq!((uid.as_str(), uid.source()), ("c", Some(0)));
    assert_eq!(addr(d.target.backend()), ring(&live, "c"));
    let (uid, _) = decide(&live, &head("/?uid=q", &[("x-user-id", "h")])).unwrap();
    assert_eq!((uid.as_str(), uid.source()), ("q", Some(1)));
    let (uid, _) = decide(&live, &head("/", &[("x-user-id", " h ")])).unwrap();
    assert_eq!((uid.as_str(), uid.source()), ("h", Some(2)));
    // Decoded for everything but the ring, which hashes the value as sent (nginx parity).
    let (uid, d) = decide(&live, &head("/?uid=b%6Fb", &[])).unwrap();
    assert_eq!(uid.as_str(), "bob");
    assert_eq!(addr(d.target.backend()), ring(&live, "b%6Fb"));
}

#[test]
fn product_picks_the_pool() {
    let s = Setup::new("product");
    let live = s.live("");
    let (_, d) = decide(&live, &head("/?uid=alice&product=test", &[])).unwrap();
    assert_eq!(addr(d.target.backend()), "127.0.0.1:4002");
    assert_eq!(d.target.via(), "ring");
    let (_, d) = decide(&live, &head("/?uid=alice&product=", &[])).unwrap();
    assert_eq!(addr(d.target.backend()), ring(&live, "alice"));
}

#[test]
fn uid_hook_answers() {
    let s = Setup::new("uidhook");
    s.hook(
        "uid",
        "module.exports = function (req) {\n  if (req.query.who === 'none') return null;\n  if (req.query.who === 'throw') throw new Error('no');\n  return req.query.who;\n};\n",
    );
    let live = s.live("hooks: {uid: hooks/uid.js}\n");
    let (uid, _) = decide(&live, &head("/?who=a%20b", &[])).unwrap();
    assert_eq!(uid.as_str(), "a b", "the hook's value is used as it is");
    assert_eq!(uid.ring_key(), b"a b");
    assert_eq!(
        decide(&live, &head("/?who=none", &[])).err(),
        Some(Refusal::MissingUid)
    );
    assert_eq!(
        decide(&live, &head("/?who=throw", &[])).err(),
        Some(Refusal::Failed(430, "the uid hook failed")),
        "hooks.on_throw.uid"
    );
}

#[test]
fn route_hook_answers() {
    let s = Setup::new("routehook");
    s.hook(
        "route",
        "module.exports = function (req, uid) {\n  if (uid === 'pinned') return '127.0.0.1:4999';\n  if (uid === 'canary') return 'test';\n  if (uid === 'ghost') return 'no-such-pool';\n  if (uid === 'boom') throw new Error('boom');\n  return null;\n};\n",
    );
    let live = s.live("hooks: {route: hooks/route.js}\n");
    let (_, d) = decide(&live, &head("/?uid=pinned", &[])).unwrap();
    assert_eq!(d.target.pool(), None);
    assert_eq!(
        (addr(d.target.backend()).as_str(), d.target.via()),
        ("127.0.0.1:4999", "hook")
    );
    let (_, d) = decide(&live, &head("/?uid=canary", &[])).unwrap();
    assert_eq!(addr(d.target.backend()), "127.0.0.1:4002");
    let (_, d) = decide(&live, &head("/?uid=alice", &[])).unwrap();
    assert_eq!(addr(d.target.backend()), ring(&live, "alice"));
    assert_eq!(
        decide(&live, &head("/?uid=ghost", &[])).err(),
        Some(Refusal::Failed(500, "the route hook failed"))
    );
    assert_eq!(
        decide(&live, &head("/?uid=boom", &[])).err(),
        Some(Refusal::Failed(500, "the route hook failed"))
    );
    // The hook sees the canonical uid.
    let (_, d) = decide(&live, &head("/?uid=pinn%65d", &[])).unwrap();
    assert_eq!(d.target.via(), "hook");
}

/// The other backend of pool `default`.
fn other(b: &str) -> &'static str {
    if b == A {
        B
    } else {
        A
    }
}

#[test]
fn live_sessions_stay_on_their_backend_for_their_uid_only() {
    let s = Setup::new("sessions");
    let live = s.live("");
    let home = ring(&live, "alice");
    let away: SocketAddr = other(&home).parse().unwrap();
    // A handshake is recognised, and its backend remembered (as the proxy does from the answer).
    let (_, d) = decide(
        &live,
        &head("/socket.io/?EIO=4&transport=polling&uid=alice", &[]),
    )
    .unwrap();
    assert!(d.learn_sid);
    let (_, d) = decide(
        &live,
        &head("/other/?EIO=4&transport=polling&uid=alice", &[]),
    )
    .unwrap();
    assert!(!d.learn_sid, "only under affinity.path");
    let memory = live.sessions().unwrap();
    memory.learn("S1", "alice", Backend::new(&away.to_string()).unwrap());
    let (_, d) = decide(
        &live,
        &head("/socket.io/?EIO=4&transport=polling&sid=S1&uid=alice", &[]),
    )
    .unwrap();
    assert_eq!(
        (d.target.via(), addr(d.target.backend())),
        ("session", away.to_string())
    );
    assert!(!d.learn_sid);
    // The same canonical uid sent encoded is the same user.
    let (_, d) = decide(&live, &head("/socket.io/?sid=S1&uid=%61lice", &[])).unwrap();
    assert_eq!(d.target.via(), "session");
    // Another uid with alice's sid gets its own ring answer.
    let (_, d) = decide(&live, &head("/socket.io/?sid=S1&uid=mallory", &[])).unwrap();
    assert_eq!(
        (d.target.via(), addr(d.target.backend())),
        ("ring", ring(&live, "mallory"))
    );
    // A draining backend keeps its live sessions but takes no new ones.
    live.drain().set(away, true);
    let (_, d) = decide(&live, &head("/socket.io/?sid=S1&uid=alice", &[])).unwrap();
    assert_eq!(d.target.via(), "session");
    let snap = live.load();
    for i in 0..50 {
        let u = Uid::from_raw(&format!("u{i}"), 64).unwrap();
        let d = route(&snap, None, &head("/", &[]), None, &u).unwrap();
        assert_ne!(
            addr(d.target.backend()),
            away.to_string(),
            "a draining backend got a new uid"
        );
    }
}

#[test]
fn unhealthy_backends_are_skipped_and_a_pool_without_any_refuses() {
    // Real TCP probes: one backend listening, one port closed.
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (up_addr, down_addr) = (up.local_addr().unwrap(), down.local_addr().unwrap());
    drop(down);
    let s = Setup::new("health");
    let yaml = format!(
        "pools: {{default: {{backends: [\"{up_addr}\", \"{down_addr}\"]}}}}\nhealth_check: {{kind: tcp, fall: 1, rise: 1, timeout: 1s}}\n"
    );
    let path = s.dir.join("gopush.yaml");
    std::fs::write(&path, yaml).unwrap();
    let live = Live::new(Config::load(&path).unwrap(), Some(path)).unwrap();
    let snap = live.load();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(snap.health.run_health_check(true));
    for i in 0..40 {
        let u = Uid::from_raw(&format!("u{i}"), 64).unwrap();
        let d = route(&snap, None, &head("/", &[]), None, &u).unwrap();
        assert_eq!(addr(d.target.backend()), up_addr.to_string(), "u{i}");
    }
    drop(up);
    rt.block_on(snap.health.run_health_check(true));
    let u = Uid::from_raw("alice", 64).unwrap();
    assert_eq!(
        route(&snap, None, &head("/", &[]), None, &u).err(),
        Some(Refusal::NoHealthyBackend)
    );
}

#[test]
fn probe_requests_decide_like_the_proxy() {
    let s = Setup::new("probe");
    s.hook("route", "module.exports = function (req, uid) { return req.product === 'x' ? '127.0.0.1:4998' : null; };\n");
    let live = s.live("hooks: {route: hooks/route.js}\n");
    let snap = live.load();
    let memory = live.sessions().unwrap();
    let away = other(&ring(&live, "alice"));
    memory.learn("S2", "alice", Backend::new(away).unwrap());
    let uid = Uid::from_raw("alice", 64).unwrap();
    for (product, sid) in [
        (None, None),
        (Some("x"), None),
        (None, Some("S2")),
        (Some("test"), None),
    ] {
        let probe = probe_request(&snap, product, sid).unwrap();
        let mut uri = "/socket.io/?EIO=4&transport=polling&uid=alice".to_string();
        if let Some(p) = product {
            uri.push_str(&format!("&product={p}"));
        }
        if let Some(s) = sid {
            uri.push_str(&format!("&sid={s}"));
        }
        let (_, proxy) = decide(&live, &head(&uri, &[])).unwrap();
        let probe = route(&snap, live.sessions(), &probe, None, &uid).unwrap();
        assert_eq!(probe.target, proxy.target, "{uri}");
    }
}
