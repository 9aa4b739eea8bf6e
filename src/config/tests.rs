use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_str_named(yaml, Path::new("conf/x.yaml"))
}

/// What production does after parsing: build the snapshot (hook files, JWT keys, rings).
fn build(c: Config) -> Result<std::sync::Arc<crate::live::Snapshot>, ConfigError> {
    crate::live::Live::new(c, None).map(|live| live.load())
}

/// A file loaded and built; the error as text.
fn load_built(path: &Path) -> Result<std::sync::Arc<crate::live::Snapshot>, String> {
    Config::load(path)
        .and_then(build)
        .map_err(|e| e.to_string())
}

fn err(yaml: &str) -> String {
    parse(yaml).unwrap_err().to_string()
}

const MIN: &str = "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MIN).unwrap();
    assert_eq!(c.listen.addrs(), vec!["0.0.0.0:6003".parse().unwrap()]);
    assert_eq!(c.product_param, "product");
    assert_eq!(
        c.uid.sources,
        vec![
            UidSource::Cookie("uid".into()),
            UidSource::Query("uid".into())
        ]
    );
    assert_eq!(c.uid.forward.header.as_ref().unwrap(), "x-gopush-uid");
    assert_eq!(c.uid.forward.query.as_deref(), Some("uid"));
    assert_eq!(c.health_check.kind, HealthCheckKind::Tcp);
    assert_eq!(
        c.upstream.connect_timeout,
        std::time::Duration::from_secs(2)
    );
    assert_eq!((c.health_check.fall, c.health_check.rise), (2, 1));
    assert_eq!(c.pools["default"].backends[0].weight, 1);
}

/// Every default, as the README's configuration table documents it: a section that is absent,
/// empty or only partly given gets them (the structs default at container level).
#[test]
fn every_default_is_the_documented_one() {
    use std::time::Duration;
    let secs = Duration::from_secs;
    let sections = [
        "uid",
        "health_check",
        "upstream",
        "affinity",
        "access_log",
        "limits",
        "server",
        "hooks",
        "admin",
        "push",
    ];
    let empty: String = sections.iter().map(|s| format!("{s}: {{}}\n")).collect();
    for yaml in [MIN.to_string(), format!("{MIN}{empty}")] {
        let c = parse(&yaml).unwrap();
        assert_eq!(c.listen.addrs(), vec!["0.0.0.0:6003".parse().unwrap()]);
        assert_eq!(c.product_param, "product");
        assert_eq!(
            c.uid.sources,
            vec![
                UidSource::Cookie("uid".into()),
                UidSource::Query("uid".into())
            ]
        );
        assert_eq!(c.uid.forward.header.as_ref().unwrap(), "x-gopush-uid");
        assert_eq!(c.uid.forward.query.as_deref(), Some("uid"));
        assert_eq!(c.uid.max_len, 256);
        let hc = &c.health_check;
        assert_eq!(hc.kind, HealthCheckKind::Tcp);
        assert_eq!((hc.interval, hc.timeout), (secs(1), secs(2)));
        assert_eq!((hc.fall, hc.rise), (2, 1));
        assert_eq!((hc.path.as_str(), hc.host.as_str()), ("/", "localhost"));
        assert_eq!(c.upstream.connect_timeout, secs(2));
        let a = &c.affinity;
        assert!(a.enabled);
        assert_eq!((a.max_sessions, a.ttl), (100_000, secs(24 * 3600)));
        assert_eq!(a.path, "/socket.io/");
        assert!(c.access_log.enabled);
        assert_eq!(c.access_log.format, LogFormat::Text);
        let l = &c.limits;
        assert_eq!((l.max_header_bytes, l.max_tunnels), (16384, 100_000));
        assert_eq!(l.header_timeout, secs(10));
        assert_eq!(l.per_ip, RateLimit::default());
        assert_eq!(l.per_uid, UidLimit::default());
        assert_eq!(l.per_uid.max_connections, 0);
        assert_eq!(l.per_uid.on_exceed, OnExceed::Reject);
        assert_eq!(
            (l.per_ip.requests_per_second, l.per_ip.max_concurrent),
            (0, 0)
        );
        let s = &c.server;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(s.threads, cpus);
        assert!(!s.work_stealing && !s.daemon && s.daemon_wait_for_ready && s.spread_tunnel_closes);
        assert_eq!(s.pid_file, "/tmp/gopush.pid");
        assert_eq!(s.upgrade_sock, "/tmp/gopush_upgrade.sock");
        assert_eq!((&s.error_log, &s.user, &s.group), (&None, &None, &None));
        assert_eq!(
            (s.grace_period_seconds, s.graceful_shutdown_timeout_seconds),
            (30, 5)
        );
        assert_eq!(
            (s.upstream_keepalive_pool_size, s.read_buffer_bytes),
            (128, 0)
        );
        let h = &c.hooks;
        assert!(h.uid.is_none() && h.route.is_none() && h.admin.is_none());
        assert_eq!(
            (h.timeout, h.memory_limit),
            (Duration::from_millis(50), 16 << 20)
        );
        assert_eq!((h.on_throw.uid, h.on_throw.route), (430, 500));
        assert!(c.trusted_proxies.is_empty());
        assert!(c.admin.enabled);
        assert_eq!(c.admin.listen, "127.0.0.1:6004".parse().unwrap());
        assert!(c.admin.token.is_none());
        let p = &c.push;
        assert_eq!(p.redis_url(), "redis://127.0.0.1:6379");
        assert!(p.redis.is_none() && p.redis_cluster.is_empty());
        assert_eq!(
            (p.uid_room.as_str(), p.key.as_str()),
            ("uid:{uid}", "socket.io")
        );
        assert_eq!((p.max_payload, p.timeout), (65536, secs(2)));
        assert_eq!(p.adapter, PushAdapter::Classic);
        assert_eq!(p.subscription_mode, SubscriptionMode::Dynamic);
    }
    // One key given: the rest of its section keeps the defaults.
    let c = parse(&format!(
        "{MIN}health_check: {{kind: http}}\nserver: {{daemon: true}}\nhooks: {{on_throw: {{uid: 503}}}}\n"
    ))
    .unwrap();
    assert_eq!(c.health_check.kind, HealthCheckKind::Http);
    assert_eq!((c.health_check.fall, c.health_check.rise), (2, 1));
    assert!(c.server.daemon && !c.server.work_stealing);
    assert_eq!(c.server.grace_period_seconds, 30);
    assert_eq!((c.hooks.on_throw.uid, c.hooks.on_throw.route), (503, 500));
    // The discovery sections default their optional keys.
    let c = parse(
        "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\n    dns: {name: svc.local, port: 4000}\n    file: {path: /tmp/backends}\n",
    )
    .unwrap();
    let dns = c.pools["default"].dns.as_ref().unwrap();
    assert_eq!((dns.weight, dns.interval, dns.resolver), (1, secs(5), None));
    assert_eq!(c.pools["default"].file.as_ref().unwrap().interval, secs(5));
}

#[test]
fn header_timeout_defaults_to_10s_and_can_be_turned_off() {
    let c = parse(MIN).unwrap();
    assert_eq!(c.limits.header_timeout, std::time::Duration::from_secs(10));
    let c = parse(&format!("{MIN}limits: {{header_timeout: 2500ms}}\n")).unwrap();
    assert_eq!(
        c.limits.header_timeout,
        std::time::Duration::from_millis(2500)
    );
    let c = parse(&format!("{MIN}limits: {{header_timeout: 0s}}\n")).unwrap();
    assert!(c.limits.header_timeout.is_zero());
    assert!(err(&format!("{MIN}limits: {{header_timeout: soon}}\n")).contains("header_timeout"));
}

#[test]
fn full_config_parses() {
    let c = parse(
        r#"
listen: ["127.0.0.1:6003", "[::1]:6003"]
uid:
  sources: [{cookie: sid}, {query: user}, {header: X-User-Id}]
  forward: {header: x-uid, query: null}
  max_len: 64
product_param: app
pools:
  default: {backends: ["127.0.0.1:4000", {addr: "127.0.0.1:4001", weight: 3}]}
health_check: {kind: http, path: /health, interval: 500ms, timeout: 2s}
upstream: {connect_timeout: 1500ms}
affinity: {max_sessions: 10, ttl: 1h}
server: {threads: 3, grace_period_seconds: 7}
"#,
    )
    .unwrap();
    assert_eq!(c.listen.0.len(), 2);
    assert_eq!(
        c.uid.sources[2],
        UidSource::Header(http::HeaderName::from_static("x-user-id"))
    );
    assert!(c.uid.forward.query.is_none());
    assert_eq!(c.pools["default"].backends[1].weight, 3);
    assert_eq!(
        c.health_check.interval,
        std::time::Duration::from_millis(500)
    );
    let p = c.server.to_pingora();
    assert_eq!((p.threads, p.grace_period_seconds), (3, Some(7)));
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let e = err("listn: 1\npools: {}\n");
    assert!(e.starts_with("conf/x.yaml:1:"), "{e}");
    assert!(e.contains("listn"), "{e}");
    let e = err("pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\n    weight: 2\n");
    assert!(e.contains("pools.default"), "{e}");
    assert!(e.contains("weight"), "{e}");
}

#[test]
fn affinity_path_defaults_to_socket_io_and_must_be_absolute() {
    let c = parse("pools: {default: {backends: [\"127.0.0.1:4000\"]}}\n").unwrap();
    assert_eq!(c.affinity.path, "/socket.io/");
    let c = parse("pools: {default: {backends: [\"127.0.0.1:4000\"]}}\naffinity: {path: /app/}\n")
        .unwrap();
    assert_eq!(c.affinity.path, "/app/");
    let e = err("pools: {default: {backends: [\"127.0.0.1:4000\"]}}\naffinity: {path: app}\n");
    assert!(
        e.contains("affinity.path") && e.contains("must start with `/`"),
        "{e}"
    );
}

#[test]
fn host_names_are_refused_with_the_key() {
    let e = err("pools:\n  default:\n    backends: [\"127.0.0.1:4000\", \"localhost:4001\"]\n");
    assert!(e.contains("pools.default.backends[1]"), "{e}");
    assert!(e.contains("literal IP:port"), "{e}");
    assert!(e.contains("conf/x.yaml:3:"), "{e}");
}

#[test]
fn bad_values_are_refused() {
    let e = err("pools:\n  default:\n    backends: [{addr: \"127.0.0.1:1\", weight: 0}]\n");
    assert!(e.contains("weight 0"), "{e}");
    let e = err(&format!("{MIN}health_check: {{interval: soon}}\n"));
    assert!(e.contains("health_check.interval"), "{e}");
    let e = err(&format!(
        "{MIN}uid: {{sources: [{{cookie: a, query: b}}]}}\n"
    ));
    assert!(e.contains("exactly one"), "{e}");
    let e = err(&format!(
        "{MIN}uid: {{sources: [{{header: \"bad header\"}}]}}\n"
    ));
    assert!(e.contains("not a valid header name"), "{e}");
    let e = err(&format!("{MIN}health_check: {{kind: icmp}}\n"));
    assert!(e.contains("health_check.kind"), "{e}");
}

#[test]
fn cross_field_rules() {
    let e = err("pools:\n  chat:\n    backends: [\"127.0.0.1:4000\"]\n");
    assert!(e.contains("`default`"), "{e}");
    let e = err("pools:\n  default:\n    backends: []\n");
    assert!(e.contains("pools.default.backends"), "{e}");
    let e = err("pools:\n  default:\n    backends: [\"127.0.0.1:4000\", \"127.0.0.1:4000\"]\n");
    assert!(e.contains("listed twice"), "{e}");
    let e = err(&format!(
        "{MIN}uid: {{forward: {{header: null, query: null}}}}\n"
    ));
    assert!(e.contains("uid.forward"), "{e}");
    let e = err(&format!("{MIN}uid: {{sources: []}}\n"));
    assert!(e.contains("uid.sources"), "{e}");
    let e = err(&format!(
        "{MIN}health_check: {{kind: http, path: health}}\n"
    ));
    assert!(e.contains("health_check.path"), "{e}");
}

#[test]
fn yaml_syntax_errors_have_a_line() {
    let e = err("pools:\n  default:\n    backends: [\"127.0.0.1:4000\"\n");
    assert!(e.starts_with("conf/x.yaml:"), "{e}");
    assert!(
        e.chars()
            .nth("conf/x.yaml:".len())
            .unwrap()
            .is_ascii_digit(),
        "{e}"
    );
}

#[test]
fn env_substitution_errors_name_the_line() {
    let e = err(&format!(
        "{MIN}product_param: ${{GOPUSH_TEST_SURELY_UNSET}}\n"
    ));
    assert!(e.contains("conf/x.yaml:4"), "{e}");
    assert!(e.contains("GOPUSH_TEST_SURELY_UNSET"), "{e}");
    let c = parse(&format!(
        "{MIN}product_param: ${{GOPUSH_TEST_SURELY_UNSET:-app}}\n"
    ))
    .unwrap();
    assert_eq!(c.product_param, "app");
}

#[test]
fn shipped_examples_load() {
    for f in ["local", "develop", "production", "demo"] {
        let path =
            std::path::PathBuf::from(format!("{}/conf/{f}.yaml", env!("CARGO_MANIFEST_DIR")));
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A scratch directory with `files` written into it; the configuration file is `conf/x.yaml`.
fn scratch(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gopush-config-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (rel, text) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

#[test]
fn hooks_load_relative_to_the_config_file() {
    let dir = scratch(
        "hooks-ok",
        &[
            ("hooks/uid.js", "module.exports = (req) => req.cookies.uid;"),
            (
                "conf/x.yaml",
                &format!(
                    "{MIN}hooks: {{uid: ../hooks/uid.js, timeout: 20ms, memory_limit: 8MiB}}\n"
                ),
            ),
        ],
    );
    let snap = load_built(&dir.join("conf/x.yaml")).unwrap();
    let c = &snap.config;
    let program = snap.hooks.as_ref().unwrap().program();
    let f = program.file(crate::hooks::HookKind::Uid).unwrap();
    assert!(f.name.ends_with("hooks/uid.js"), "{}", f.name);
    assert!(!f.name.contains(".."), "{}", f.name);
    assert_eq!(program.limits().memory, 8 << 20);
    assert_eq!(
        program.limits().timeout,
        std::time::Duration::from_millis(20)
    );
    assert!(c.hooks.route.is_none());
    // Without hooks there is no program: the request path does not look for one.
    assert!(build(parse(MIN).unwrap()).unwrap().hooks.is_none());
}

#[test]
fn hook_errors_name_the_key_file_and_line() {
    let dir = scratch(
        "hooks-bad",
        &[
            (
                "hooks/route.js",
                "function route(req) {\n  return {ip: '1.2.3.4',\n}\n",
            ),
            (
                "conf/x.yaml",
                &format!("{MIN}hooks: {{route: ../hooks/route.js}}\n"),
            ),
        ],
    );
    // Parsing alone does not read the files; building the snapshot does.
    assert!(Config::load(&dir.join("conf/x.yaml")).is_ok());
    let e = load_built(&dir.join("conf/x.yaml")).err().unwrap();
    assert!(e.contains("hooks.route"), "{e}");
    assert!(e.contains("hooks/route.js:"), "{e}");
    assert!(e.contains("SyntaxError"), "{e}");

    let dir = scratch(
        "hooks-missing",
        &[(
            "conf/x.yaml",
            &format!("{MIN}hooks: {{admin: ../hooks/nope.js}}\n"),
        )],
    );
    let e = load_built(&dir.join("conf/x.yaml")).err().unwrap();
    assert!(e.contains("hooks.admin"), "{e}");
    assert!(e.contains("nope.js"), "{e}");
}

#[test]
fn hook_settings_are_checked() {
    let e = err(&format!(
        "{MIN}uid: {{sources: [{{cookie: sid}}]}}\nhooks: {{uid: ../hooks/uid.js}}\n"
    ));
    assert!(e.contains("uid.sources"), "{e}");
    let e = err(&format!("{MIN}hooks: {{timeout: 0s}}\n"));
    assert!(e.contains("hooks.timeout"), "{e}");
    let e = err(&format!("{MIN}hooks: {{memory_limit: 12 bananas}}\n"));
    assert!(e.contains("hooks.memory_limit"), "{e}");
    let e = err(&format!("{MIN}hooks: {{memory_limit: 1000}}\n"));
    assert!(e.contains("at least 1MiB"), "{e}");
    let e = err(&format!("{MIN}hooks: {{on_throw: {{uid: 200}}}}\n"));
    assert!(e.contains("hooks.on_throw.uid"), "{e}");
    let e = err(&format!("{MIN}hooks: {{uid: a.js, wat: 1}}\n"));
    assert!(e.contains("wat"), "{e}");
    let e = err(&format!("{MIN}trusted_proxies: [\"10.0.0.0/40\"]\n"));
    assert!(e.contains("trusted_proxies"), "{e}");
    let c = parse(&format!(
        "{MIN}trusted_proxies: [\"10.0.0.0/8\", \"::1\"]\n"
    ))
    .unwrap();
    assert_eq!(c.trusted_proxies.0.len(), 2);
}

#[test]
fn jwt_and_callback_sources_parse_and_load() {
    let dir = scratch(
        "jwt",
        &[
            ("conf/secret.txt", "file-secret\n"),
            (
                "conf/x.yaml",
                &format!(
                    "{MIN}uid:\n  sources:\n    - jwt: {{from: query, name: token, key_file: secret.txt, alg: HS256}}\n    - callback: {{url: \"http://127.0.0.1:3000/whoami\", forward: [Cookie], cache: 10s}}\n    - cookie: uid\n"
                ),
            ),
        ],
    );
    let snap = load_built(&dir.join("conf/x.yaml")).unwrap();
    let c = &snap.config;
    assert!(matches!(c.uid.sources[0], UidSource::Jwt(_)));
    match &c.uid.sources[1] {
        UidSource::Callback(cb) => {
            assert_eq!(cb.forward, vec![http::header::COOKIE]);
            assert_eq!(cb.cache, std::time::Duration::from_secs(10));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        snap.resolver.describe_sources(),
        "signed token in query `token`, auth callback http://127.0.0.1:3000/whoami, cookie `uid`"
    );

    let e = build(
        parse(&format!(
            "{MIN}uid:\n  sources:\n    - jwt: {{from: query, name: t, key_file: nope.pem, alg: RS256}}\n"
        ))
        .unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.starts_with("conf/x.yaml: uid.sources[0].jwt.key_file"),
        "{e}"
    );
    let e = err(&format!(
        "{MIN}uid:\n  sources:\n    - jwt: {{from: body, name: t, key: k, alg: HS256}}\n"
    ));
    assert!(e.contains("uid.sources[0]"), "{e}");
    let e = err(&format!(
        "{MIN}uid:\n  sources:\n    - callback: {{url: \"http://app.local/\", forward: [cookie]}}\n"
    ));
    assert!(e.contains("literal IP"), "{e}");
    let e = err(&format!(
        "{MIN}uid:\n  sources:\n    - {{cookie: a, jwt: {{from: query, name: t, key: k, alg: HS256}}}}\n"
    ));
    assert!(e.contains("exactly one"), "{e}");
}

#[test]
fn shipped_hooks_load_and_behave_like_the_original_gopush() {
    use crate::hooks::{HookKind, HookRequest, RouteDecision};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let yaml = format!(
        "{MIN}hooks: {{uid: ../hooks/uid.js, route: ../hooks/route.js, admin: ../hooks/admin.js}}\n"
    );
    let c =
        Config::from_str_named(&yaml, &root.join("conf/x.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let snap = build(c).unwrap_or_else(|e| panic!("{e}"));
    let hooks = snap.hooks.as_ref().unwrap();
    for k in HookKind::ALL {
        assert!(hooks.has(k));
    }
    let mut head = pingora::http::RequestHeader::build("GET", b"/socket.io/?EIO=4", None).unwrap();
    head.append_header("cookie", "uid=alice").unwrap();
    let mut req = HookRequest {
        header: &head,
        ip: Some("127.0.0.1".parse().unwrap()),
        product: None,
    };
    assert_eq!(hooks.uid(&req).unwrap().as_deref(), Some("alice"));
    assert_eq!(hooks.route(&req, "alice").unwrap(), RouteDecision::Default);
    // The shipped admin hook admits nobody until its SECRET is set, whatever the address
    // (127.0.0.1 is also what a DNS-rebound browser on the operator's machine sends).
    assert_eq!(hooks.admin(&req), Ok(Some(false)));
    req.product = Some("test");
    assert_eq!(
        hooks.route(&req, "alice").unwrap(),
        RouteDecision::Backend("127.0.0.1:4002".parse().unwrap())
    );
    req.ip = Some("192.0.2.1".parse().unwrap());
    assert_eq!(hooks.admin(&req), Ok(Some(false)));
    let bare = pingora::http::RequestHeader::build("GET", b"/?uid=bob", None).unwrap();
    req.header = &bare;
    assert_eq!(hooks.uid(&req).unwrap().as_deref(), Some("bob"));
}

#[test]
fn shipped_admin_hook_admits_its_secret_not_an_address() {
    use crate::hooks::HookRequest;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("hooks/admin.js")).unwrap();
    assert!(shipped.contains("const SECRET = '';"), "{shipped}");
    let secret = "0123456789abcdef-operator";
    let dir = scratch(
        "admin-hook-secret",
        &[
            (
                "hooks/admin.js",
                &shipped.replace("const SECRET = '';", &format!("const SECRET = '{secret}';")),
            ),
            (
                "conf/x.yaml",
                &format!("{MIN}hooks: {{admin: ../hooks/admin.js}}\n"),
            ),
        ],
    );
    let snap = load_built(&dir.join("conf/x.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let hooks = snap.hooks.as_ref().unwrap();
    let ask = |auth: Option<&str>, ip: &str| {
        let mut head = pingora::http::RequestHeader::build("GET", b"/api/status", None).unwrap();
        if let Some(a) = auth {
            head.append_header("authorization", a).unwrap();
        }
        let req = HookRequest {
            header: &head,
            ip: Some(ip.parse().unwrap()),
            product: None,
        };
        hooks.admin(&req)
    };
    let right = format!("Bearer {secret}");
    assert_eq!(
        ask(None, "127.0.0.1"),
        Ok(Some(false)),
        "an address is not a secret"
    );
    assert_eq!(ask(Some("Bearer nope"), "127.0.0.1"), Ok(Some(false)));
    assert_eq!(ask(Some(&right[..right.len() - 1]), "::1"), Ok(Some(false)));
    assert_eq!(ask(Some(&right), "192.0.2.1"), Ok(Some(true)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn admin_and_push_sections() {
    let c = parse(MIN).unwrap();
    assert!(c.admin.enabled);
    assert_eq!(c.admin.listen, "127.0.0.1:6004".parse().unwrap());
    assert!(c.admin.token().is_none());
    assert_eq!(c.push.uid_room, "uid:{uid}");
    assert_eq!(c.push.max_payload, 65536);
    assert_eq!(c.access_log.format, LogFormat::Text);
    // A public admin listener without a token is refused, naming the key.
    let e = err(&format!("{MIN}admin: {{listen: \"0.0.0.0:6004\"}}\n"));
    assert!(e.contains("admin.token"), "{e}");
    let e = err(&format!(
        "{MIN}admin: {{listen: \"0.0.0.0:6004\", token: \"\"}}\n"
    ));
    assert!(e.contains("admin.token"), "{e}");
    let c = parse(&format!(
        "{MIN}admin: {{listen: \"0.0.0.0:6004\", token: \"s3cret\"}}\naccess_log: {{format: json}}\n"
    ))
    .unwrap();
    assert_eq!(c.admin.token(), Some("s3cret"));
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "the token never shows in Debug"
    );
    assert_eq!(c.access_log.format, LogFormat::Json);
    let e = err(&format!("{MIN}push: {{uid_room: \"user\"}}\n"));
    assert!(e.contains("push.uid_room"), "{e}");
    let e = err(&format!("{MIN}push: {{redis: \"http://x\"}}\n"));
    assert!(e.contains("push.redis"), "{e}");
    let e = err(&format!("{MIN}admin: {{listen: \"localhost:6004\"}}\n"));
    assert!(e.contains("admin.listen"), "{e}");
    let e = err(&format!("{MIN}access_log: {{format: xml}}\n"));
    assert!(e.contains("access_log.format"), "{e}");
}

#[test]
fn push_redis_cluster_takes_seed_urls_and_needs_its_own_directory_redis() {
    let seeds = "[\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]";
    let c = parse(&format!("{MIN}push: {{redis_cluster: {seeds}}}\n")).unwrap();
    assert_eq!(
        c.push.redis_cluster,
        ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
    );
    assert!(c.push.redis.is_none());
    // Each seed names its index; a database other than 0, a unix socket, mixed credentials
    // and push.redis alongside are refused.
    for (yaml, key, what) in [
        (
            "push: {redis_cluster: [\"redis://127.0.0.1:7000\", \"http://x\"]}".to_string(),
            "push.redis_cluster[1]",
            "not a Redis URL",
        ),
        (
            "push: {redis_cluster: [\"redis://127.0.0.1:7000/2\"]}".to_string(),
            "push.redis_cluster[0]",
            "only database 0",
        ),
        (
            "push: {redis_cluster: [\"unix:///tmp/r.sock\"]}".to_string(),
            "push.redis_cluster",
            "unix socket",
        ),
        (
            "push: {redis_cluster: [\"redis://:a@127.0.0.1:7000\", \"redis://:b@127.0.0.1:7001\"]}"
                .to_string(),
            "push.redis_cluster",
            "password",
        ),
        (
            format!("push: {{redis: \"redis://127.0.0.1:6379\", redis_cluster: {seeds}}}"),
            "push.redis_cluster",
            "not both",
        ),
        // The directory's default is push.redis, never the cluster: it must be named.
        (
            format!("push: {{redis_cluster: {seeds}}}\ncluster: {{}}"),
            "cluster.redis",
            "single Redis",
        ),
    ] {
        let e = err(&format!("{MIN}{yaml}\n"));
        assert!(e.contains(key) && e.contains(what), "{yaml}: {e}");
    }
    let c = parse(&format!(
        "{MIN}push: {{redis_cluster: {seeds}}}\ncluster: {{redis: \"redis://10.0.0.1:6379\"}}\n"
    ))
    .unwrap();
    assert_eq!(
        Startup::of(&c).cluster.map(|(_, url)| url).as_deref(),
        Some("redis://10.0.0.1:6379")
    );
    // A disabled directory needs nothing.
    assert!(parse(&format!(
        "{MIN}push: {{redis_cluster: {seeds}}}\ncluster: {{enabled: false}}\n"
    ))
    .is_ok());
}

#[test]
fn read_buffer_defaults_to_unbuffered_and_is_bounded() {
    let base = "pools: {default: {backends: [\"127.0.0.1:4000\"]}}\n";
    let c = parse(base).unwrap();
    assert_eq!(c.server.read_buffer_bytes, 0);
    let c = parse(&format!("{base}server: {{read_buffer_bytes: 65536}}\n")).unwrap();
    assert_eq!(c.server.read_buffer_bytes, 65536);
    let e = err(&format!("{base}server: {{read_buffer_bytes: 2000000}}\n"));
    assert!(e.contains("server.read_buffer_bytes"), "{e}");
    assert!(e.contains("at most 1048576"), "{e}");
}

/// `${VAR}` looked up in `vars` only (the tests do not touch the process environment).
fn parse_env(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    Config::from_str_with_env(yaml, Path::new("conf/x.yaml"), &lookup)
}

#[test]
fn a_variable_cannot_close_its_quotes_and_add_keys() {
    // Issue 11, item 8: `x", listen: "0.0.0.0:7118` moved the admin listener.
    let evil = "x\", listen: \"0.0.0.0:7118";
    let c = parse_env(
        &format!("{MIN}admin: {{token: \"${{GOPUSH_ADMIN_TOKEN}}\", enabled: true}}\n"),
        &[("GOPUSH_ADMIN_TOKEN", evil)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.admin.listen, "127.0.0.1:6004".parse().unwrap());
    assert_eq!(c.admin.token(), Some(evil), "the value is the one scalar");
    // Unquoted, in block style, the same.
    let c = parse_env(
        &format!("{MIN}admin:\n  token: ${{GOPUSH_ADMIN_TOKEN}}\n"),
        &[("GOPUSH_ADMIN_TOKEN", evil)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.admin.listen, "127.0.0.1:6004".parse().unwrap());
    assert_eq!(c.admin.token(), Some(evil));
}

#[test]
fn a_variable_with_a_newline_cannot_add_a_line() {
    // Issue 11, item 8: a newline in a value added `trusted_proxies: ["0.0.0.0/0"]`.
    let evil = "app\ntrusted_proxies: [\"0.0.0.0/0\"]";
    for yaml in [
        format!("{MIN}product_param: ${{P}}\n"),
        format!("{MIN}product_param: \"${{P}}\"\n"),
    ] {
        let c = parse_env(&yaml, &[("P", evil)]).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.trusted_proxies.is_empty(), "{yaml}");
        assert_eq!(c.product_param, evil, "{yaml}");
    }
}

#[test]
fn comments_are_not_expanded() {
    // Issue 11, item 8: `${X}` in a comment failed the load when X was unset.
    let c = parse_env(
        &format!(
            "# token: ${{GOPUSH_SURELY_UNSET}}\n{MIN}product_param: app # or ${{ALSO_UNSET}}\n"
        ),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.product_param, "app");
}

#[test]
fn substituted_numbers_and_booleans_resolve_like_plain_scalars() {
    let c = parse_env(
        &format!("{MIN}server:\n  threads: ${{N}}\nhealth_check: {{fall: \"${{F:-5}}\"}}\naffinity:\n  enabled: ${{A}}\nhooks: {{memory_limit: \"${{M}}\"}}\naccess_log:\n  format: ${{FMT}}\n"),
        &[("N", "3"), ("A", "false"), ("M", "8MiB"), ("FMT", "json")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.server.threads, 3);
    assert_eq!(c.health_check.fall, 5);
    assert!(!c.affinity.enabled);
    assert_eq!(c.hooks.memory_limit, 8 << 20);
    assert_eq!(c.access_log.format, LogFormat::Json);
    // A number field given something else names the key path and the line.
    let e = parse_env(
        &format!("{MIN}server:\n  threads: ${{N}}\n"),
        &[("N", "3\nx: 1")],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("conf/x.yaml:5:") && e.contains("server.threads"),
        "{e}"
    );
    // Unquoted inside a flow collection, `{` ends the plain scalar: a syntax error that says so.
    let e = parse_env(
        &format!("{MIN}server: {{threads: ${{N}}}}\n"),
        &[("N", "3")],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("conf/x.yaml:4:") && e.contains("must be quoted"),
        "{e}"
    );
    // Without a variable, a quoted number is still a string, as before.
    assert!(err(&format!("{MIN}server: {{threads: \"3\"}}\n")).contains("server.threads"));
}

#[test]
fn substitution_errors_name_the_key_path_and_keys_are_not_substituted() {
    let e = parse_env(&format!("{MIN}uid:\n  max_len: ${{UNSET_LEN}}\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conf/x.yaml:5:") && e.contains("uid.max_len") && e.contains("UNSET_LEN"),
        "{e}"
    );
    let e = parse_env(&format!("{MIN}${{K}}: 1\n"), &[("K", "product_param")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("${K}"), "a key is a name, not a value: {e}");
}

#[test]
fn hook_timeout_is_capped_at_one_second() {
    // Issue 11: a hook slow on attacker input holds its worker thread for the whole budget;
    // 10 s used to be accepted.
    for bad in ["1001ms", "2s", "10s"] {
        let e = err(&format!("{MIN}hooks: {{timeout: {bad}}}\n"));
        assert!(
            e.starts_with("conf/x.yaml: hooks.timeout: ") && e.contains("at most 1s"),
            "{bad}: {e}"
        );
    }
    let c = parse(&format!("{MIN}hooks: {{timeout: 1s}}\n")).unwrap();
    assert_eq!(c.hooks.timeout, MAX_HOOK_TIMEOUT);
    assert_eq!(
        parse(MIN).unwrap().hooks.timeout,
        std::time::Duration::from_millis(50),
        "the default stays well below the cap"
    );
}

#[test]
fn the_cluster_section_is_optional_defaults_as_documented_and_checks_its_keys() {
    use std::time::Duration;
    let c = parse(MIN).unwrap();
    assert!(c.cluster.is_none());
    assert!(Startup::of(&c).cluster.is_none());
    let c = parse(&format!("{MIN}cluster: {{}}\n")).unwrap();
    let k = c.cluster.as_ref().unwrap();
    assert!(k.enabled);
    assert_eq!((k.redis.as_deref(), k.agent_id.as_deref()), (None, None));
    assert_eq!(k.key, "gopush");
    assert_eq!(
        (k.heartbeat, k.ttl, k.timeout, k.sid_lookup_timeout),
        (
            Duration::from_secs(5),
            Duration::from_secs(15),
            Duration::from_secs(1),
            Duration::from_millis(50)
        )
    );
    assert_eq!(k.queue, 65_536);
    // The Redis URL defaults to push.redis.
    let c = parse(&format!(
        "{MIN}push: {{redis: \"redis://10.0.0.1:6380\"}}\ncluster: {{}}\n"
    ))
    .unwrap();
    assert_eq!(
        Startup::of(&c).cluster.map(|(_, url)| url).as_deref(),
        Some("redis://10.0.0.1:6380")
    );
    // Disabled: as if absent.
    let c = parse(&format!("{MIN}cluster: {{enabled: false}}\n")).unwrap();
    assert!(Startup::of(&c).cluster.is_none());
    for (yaml, key) in [
        ("cluster: {redis: \"http://x\"}", "cluster.redis"),
        ("cluster: {agent_id: \"a/b\"}", "cluster.agent_id"),
        ("cluster: {key: \"\"}", "cluster.key"),
        ("cluster: {heartbeat: 10ms}", "cluster.heartbeat"),
        ("cluster: {heartbeat: 5s, ttl: 6s}", "cluster.ttl"),
        ("cluster: {timeout: 5s}", "cluster.timeout"),
        (
            "cluster: {sid_lookup_timeout: 2s}",
            "cluster.sid_lookup_timeout",
        ),
        ("cluster: {queue: 0}", "cluster.queue"),
        ("cluster: {bogus: 1}", "cluster"),
    ] {
        let e = err(&format!("{MIN}{yaml}\n"));
        assert!(e.contains(key) && e.contains("conf/x.yaml"), "{yaml}: {e}");
    }
}

#[test]
fn on_exceed_is_reject_or_close_oldest() {
    let c = parse(&format!(
        "{MIN}cluster: {{}}\nlimits: {{per_uid: {{max_connections: 1, on_exceed: close_oldest}}}}\n"
    ))
    .unwrap();
    assert_eq!(c.limits.per_uid.on_exceed, OnExceed::CloseOldest);
    let e = err(&format!(
        "{MIN}cluster: {{}}\nlimits: {{per_uid: {{max_connections: 1, on_exceed: close_newest}}}}\n"
    ));
    assert!(e.contains("on_exceed") && e.contains("close_oldest"), "{e}");
}

#[test]
fn cluster_webhooks_default_and_check_their_keys() {
    use crate::webhooks::Event;
    use std::time::Duration;
    let c = parse(&format!("{MIN}cluster: {{}}\n")).unwrap();
    let k = c.cluster.as_ref().unwrap();
    assert!(k.webhooks.is_empty());
    assert_eq!(k.offline_after, Duration::from_secs(5));
    let c = parse(&format!(
        "{MIN}cluster: {{offline_after: 2s, webhooks: [{{url: \"http://127.0.0.1:9000/h\", secret: s}}, {{url: \"http://10.0.0.2/\", secret: t, events: [user.offline], queue: 5}}]}}\n"
    ))
    .unwrap();
    let k = c.cluster.as_ref().unwrap();
    assert_eq!(k.offline_after, Duration::from_secs(2));
    assert_eq!(k.webhooks.len(), 2);
    assert_eq!(k.webhooks[0].events.len(), 4);
    assert_eq!(k.webhooks[0].queue, 10_000);
    assert_eq!(k.webhooks[0].url.path, "/h");
    assert_eq!(k.webhooks[1].events, vec![Event::UserOffline]);
    assert_eq!(k.webhooks[1].queue, 5);
    // The secret never reaches a log.
    assert!(!format!("{:?}", k.webhooks[0]).contains("secret: \"s\""));
    for (yaml, key, what) in [
        (
            "{url: \"http://hooks.local/\", secret: s}",
            "cluster.webhooks[0].url",
            "literal IP",
        ),
        (
            "{url: \"https://127.0.0.1/\", secret: s}",
            "cluster.webhooks[0].url",
            "http://",
        ),
        (
            "{url: \"http://127.0.0.1/\", secret: \"\"}",
            "cluster.webhooks[0].secret",
            "empty",
        ),
        (
            "{url: \"http://127.0.0.1/\"}",
            "cluster.webhooks[0]",
            "secret",
        ),
        (
            "{url: \"http://127.0.0.1/\", secret: s, events: [user.away]}",
            "cluster.webhooks[0].events",
            "user.away",
        ),
        (
            "{url: \"http://127.0.0.1/\", secret: s, queue: 0}",
            "cluster.webhooks[0].queue",
            "at least 1",
        ),
    ] {
        let e = err(&format!("{MIN}cluster: {{webhooks: [{yaml}]}}\n"));
        assert!(
            e.contains(key) && e.contains(what) && e.contains("conf/x.yaml"),
            "{yaml}: {e}"
        );
    }
}
