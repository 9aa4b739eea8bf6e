use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_str_named(yaml, Path::new("conf/x.yaml"))
}

fn err(yaml: &str) -> String {
    parse(yaml).unwrap_err().to_string()
}

const MIN: &str = "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MIN).unwrap();
    assert_eq!(c.listen.0, vec!["0.0.0.0:6003".parse().unwrap()]);
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
