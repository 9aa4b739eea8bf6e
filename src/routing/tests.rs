use super::*;
use crate::config::Config;
use std::path::Path;

fn config(yaml: &str) -> Config {
    Config::from_str_named(yaml, Path::new("test.yaml")).unwrap()
}

fn offline(c: &Config) -> Router {
    Router::offline(c).unwrap()
}

fn addr(b: &Backend) -> String {
    backend_addr(b).unwrap().to_string()
}

/// Answers recorded from nginx 1.22 (`hash $arg_uid consistent` over the same servers and
/// weights, read back through `$upstream_addr`): the ring must stay nginx's.
#[test]
fn ring_matches_nginx_vectors() {
    let router = offline(&config(
        r#"
pools:
  default:
    backends: ["127.0.0.1:4100", "127.0.0.1:4101", {addr: "127.0.0.1:4102", weight: 2}]
health_check: {kind: none}
"#,
    ));
    let vectors = [
        ("alice", "127.0.0.1:4101"),
        ("bob", "127.0.0.1:4102"),
        ("carol", "127.0.0.1:4102"),
        ("dave", "127.0.0.1:4100"),
        ("eve", "127.0.0.1:4102"),
        ("frank", "127.0.0.1:4101"),
        ("grace", "127.0.0.1:4101"),
        ("heidi", "127.0.0.1:4101"),
        ("ivan", "127.0.0.1:4102"),
        ("judy", "127.0.0.1:4102"),
        ("mallory", "127.0.0.1:4102"),
        ("42", "127.0.0.1:4101"),
        ("user-1", "127.0.0.1:4102"),
        ("user-2", "127.0.0.1:4102"),
        ("a%20b", "127.0.0.1:4102"),
        ("550e8400-e29b-41d4-a716-446655440000", "127.0.0.1:4101"),
    ];
    for (uid, expected) in vectors {
        let (_, b) = router.route(None, uid).unwrap();
        assert_eq!(addr(&b), expected, "uid {uid}");
    }
}

#[test]
fn same_config_same_answers_in_separate_routers() {
    let yaml = r#"
pools:
  default:
    backends: ["10.0.0.1:4000", "10.0.0.2:4000", "10.0.0.3:4000"]
health_check: {kind: none}
"#;
    let (a, b) = (offline(&config(yaml)), offline(&config(yaml)));
    for i in 0..1000 {
        let uid = format!("user-{i}");
        assert_eq!(
            addr(&a.route(None, &uid).unwrap().1),
            addr(&b.route(None, &uid).unwrap().1)
        );
    }
}

#[test]
fn removing_one_of_five_moves_only_its_uids() {
    let five = offline(&config(
        r#"
pools:
  default:
    backends: ["10.0.0.1:4000", "10.0.0.2:4000", "10.0.0.3:4000", "10.0.0.4:4000", "10.0.0.5:4000"]
health_check: {kind: none}
"#,
    ));
    let four = offline(&config(
        r#"
pools:
  default:
    backends: ["10.0.0.1:4000", "10.0.0.2:4000", "10.0.0.4:4000", "10.0.0.5:4000"]
health_check: {kind: none}
"#,
    ));
    let n = 10_000;
    let mut on_removed = 0;
    for i in 0..n {
        let uid = format!("uid-{i}");
        let before = addr(&five.route(None, &uid).unwrap().1);
        let after = addr(&four.route(None, &uid).unwrap().1);
        if before == "10.0.0.3:4000" {
            on_removed += 1;
            assert_ne!(after, before);
        } else {
            assert_eq!(after, before, "uid {uid} moved although its backend stayed");
        }
    }
    let share = on_removed as f64 / n as f64;
    assert!(
        (0.12..0.28).contains(&share),
        "removed backend held {share:.3} of uids"
    );
}

#[test]
fn weights_shift_the_share() {
    let router = offline(&config(
        r#"
pools:
  default:
    backends: [{addr: "10.0.0.1:4000", weight: 3}, "10.0.0.2:4000"]
health_check: {kind: none}
"#,
    ));
    let heavy = (0..4000)
        .filter(|i| addr(&router.route(None, &format!("u{i}")).unwrap().1) == "10.0.0.1:4000")
        .count();
    let share = heavy as f64 / 4000.0;
    assert!(
        (0.65..0.85).contains(&share),
        "weight-3 backend share {share:.3}"
    );
}

#[test]
fn products_pick_pools_and_failover_skips_the_primary() {
    let router = offline(&config(
        r#"
pools:
  default: {backends: ["10.0.0.1:4000", "10.0.0.2:4000"]}
  test: {backends: ["10.0.0.9:4000"]}
health_check: {kind: none}
"#,
    ));
    assert_eq!(router.pool(None).unwrap().name(), "default");
    assert_eq!(router.pool(Some("")).unwrap().name(), "default");
    assert_eq!(router.pool(Some("test")).unwrap().name(), "test");
    assert_eq!(
        router.pool(Some("nope")).err(),
        Some(RouteError::UnknownProduct)
    );
    let pool = router.pool(None).unwrap();
    let primary = pool.select(b"alice").unwrap();
    let other = pool.failover(b"alice", &primary).unwrap();
    assert_ne!(primary.addr, other.addr);
    assert_eq!(
        pool.select_avoiding(b"alice", &primary).unwrap().addr,
        other.addr
    );
    let only = router.pool(Some("test")).unwrap();
    let b = only.select(b"x").unwrap();
    assert!(only.failover(b"x", &b).is_none());
}

#[test]
fn draining_moves_new_sessions_only_and_is_not_unhealthiness() {
    let drain = Arc::new(Drain::default());
    let cfg = config(
        r#"
pools:
  default: {backends: ["10.0.0.1:4000", "10.0.0.2:4000", "10.0.0.3:4000"]}
health_check: {kind: none}
"#,
    );
    let router = Router::new(&cfg, &Arc::new(HealthRegistry::new()), &drain).unwrap();
    let pool = router.pool(None).unwrap();
    let before: Vec<Backend> = (0..300)
        .map(|i| pool.select(format!("u{i}").as_bytes()).unwrap())
        .collect();
    let victim = before[0].clone();
    let victim_addr = backend_addr(&victim).unwrap();
    assert!(drain.set(victim_addr, true));
    assert!(
        !drain.set(victim_addr, true),
        "draining twice changes nothing"
    );
    assert!(pool.is_draining(&victim));
    // Still ready (healthy): the sid memory keeps live sessions there.
    assert!(pool.is_ready(&victim));
    for (i, was) in before.iter().enumerate() {
        let now = pool.select(format!("u{i}").as_bytes()).unwrap();
        assert_ne!(
            now.addr, victim.addr,
            "a draining backend takes no new session"
        );
        if was.addr != victim.addr {
            assert_eq!(now.addr, was.addr, "uids of other backends do not move");
        }
    }
    // A router built later (a reload) sees the same drain set.
    let again = Router::new(&cfg, &Arc::new(HealthRegistry::new()), &drain).unwrap();
    assert!(again.pool(None).unwrap().is_draining(&victim));
    drain.retain(|a| *a != victim_addr);
    assert!(drain.list().is_empty());
    assert!(drain.set(victim_addr, true));
    assert!(drain.set(victim_addr, false));
    assert_eq!(
        pool.select(b"u0").unwrap().addr,
        victim.addr,
        "undrained: back on the ring"
    );
}

#[tokio::test]
async fn file_discovery_adds_and_retires_backends() {
    let dir = std::env::temp_dir().join(format!("gopush-fd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("backends.txt");
    std::fs::write(&file, "# pool\n10.0.0.1:4000\n10.0.0.2:4000 2\n\n").unwrap();
    let yaml = format!(
        "pools:\n  default:\n    backends: [\"10.0.0.9:4000\"]\n    file: {{path: {:?}, interval: 1s}}\nhealth_check: {{kind: none}}\n",
        file
    );
    let router = offline(&config(&yaml));
    let pool = router.pool(None).unwrap();
    assert!(
        pool.backends().is_empty(),
        "a dynamic pool is empty before discovery"
    );
    router.refresh().await;
    let addrs: Vec<String> = pool.backends().iter().map(addr).collect();
    assert_eq!(addrs, ["10.0.0.1:4000", "10.0.0.2:4000", "10.0.0.9:4000"]);
    assert_eq!(pool.backends()[1].weight, 2);

    let gone = pool.backends()[0].clone();
    std::fs::write(&file, "10.0.0.2:4000 2\n").unwrap();
    router.refresh().await;
    let addrs: Vec<String> = pool.backends().iter().map(addr).collect();
    assert_eq!(addrs, ["10.0.0.2:4000", "10.0.0.9:4000"]);
    assert!(
        !pool.is_ready(&gone),
        "a removed backend gets no new sessions"
    );
    assert!(
        pool.accepts_session(&gone),
        "but it is drained: live sessions may stay"
    );

    // A broken file keeps the last good membership.
    std::fs::write(&file, "not an address\n").unwrap();
    router.refresh().await;
    assert_eq!(pool.backends().len(), 2);
    std::fs::remove_file(&file).unwrap();
    router.refresh().await;
    assert_eq!(pool.backends().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn backend_lines_parse() {
    use crate::config::parse_backend_line;
    assert!(parse_backend_line("  # comment").is_none());
    assert!(parse_backend_line("").is_none());
    let b = parse_backend_line("127.0.0.1:4000 3 # x").unwrap().unwrap();
    assert_eq!((b.addr.to_string(), b.weight), ("127.0.0.1:4000".into(), 3));
    assert!(parse_backend_line("localhost:4000").unwrap().is_err());
    assert!(parse_backend_line("127.0.0.1:4000 0").unwrap().is_err());
}
