//! The admin listener of the real `gopush` binary, in front of two built-in Socket.IO backends
//! (the demo's socketioxide servers, started in this test process): authentication, metrics
//! (parsed with `prometheus-parse`), status and route, drain, reload, bad input, Redis down,
//! JSON access log lines, and the refusal of an unauthenticated public admin listener.
//!
//! The Node suite (tests/e2e/test/admin.test.js) covers push and disconnect through a real
//! Redis adapter; here Redis is deliberately absent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "rust-admin-token";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One HTTP/1.1 exchange (`Connection: close`); answers status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    // `Host: ADDR` unless the caller names another (a DNS-rebinding page's own name).
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read response");
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Polls `f` every 50 ms until it answers `Some`, for at most `secs` seconds.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Agent {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    conf: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("gopush-admin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn config(
    proxy: SocketAddr,
    admin: SocketAddr,
    backends: &[SocketAddr],
    dir: &TempDir,
    extra: &str,
) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"listen: "{proxy}"
pools:
  default:
    backends: [{}]
health_check: {{kind: tcp, interval: 200ms}}
admin: {{listen: "{admin}", token: "{TOKEN}"}}
push: {{redis: "redis://127.0.0.1:{}", timeout: 1s}}
access_log: {{format: json}}
server:
  threads: 2
  pid_file: "{}/gopush.pid"
  upgrade_sock: "{}/upgrade.sock"
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
{extra}"#,
        list.join(", "),
        free_port(), // nothing listens there: Redis is "down"
        dir.0.display(),
        dir.0.display(),
    )
}

fn start_agent(name: &str, backends: &[SocketAddr]) -> Agent {
    let dir = temp_dir(name);
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let conf = dir.0.join("gopush.yaml");
    std::fs::write(&conf, config(proxy, admin, backends, &dir, "")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gopush"))
        .args(["run", "-c"])
        .arg(&conf)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gopush");
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let agent = Agent {
        child,
        proxy,
        admin,
        conf,
        log,
        _dir: dir,
    };
    wait_for(15, "the admin listener", || {
        TcpStream::connect_timeout(&agent.admin, Duration::from_millis(200)).ok()?;
        TcpStream::connect_timeout(&agent.proxy, Duration::from_millis(200)).ok()
    });
    agent
}

fn metrics(agent: &Agent) -> prometheus_parse::Scrape {
    let (status, body) = http(
        agent.admin,
        "GET",
        "/metrics",
        &[("authorization", &bearer())],
        "",
    );
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text")
}

/// The value of the sample `name` whose labels include all of `labels` (0 if absent).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn admin_api_metrics_and_access_log() {
    let backends = gopush::demo::spawn_backends(&[
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    ])
    .expect("demo backends");
    let addrs = backends.addrs().to_vec();
    let agent = start_agent("main", &addrs);
    let auth = bearer();
    let with_token: &[(&str, &str)] = &[("authorization", auth.as_str())];

    // Authentication.
    for path in ["/api/status", "/metrics", "/api/route?uid=a"] {
        assert_eq!(
            http(agent.admin, "GET", path, &[], "").0,
            401,
            "{path} without token"
        );
        assert_eq!(
            http(
                agent.admin,
                "GET",
                path,
                &[("authorization", "Bearer wrong")],
                ""
            )
            .0,
            401,
            "{path} with a wrong token"
        );
        assert_eq!(
            http(agent.admin, "GET", path, with_token, "").0,
            200,
            "{path} with the token"
        );
    }
    // A page of another site posting through an operator's browser is refused, token or not.
    let (status, body) = http(
        agent.admin,
        "POST",
        "/api/backends/127.0.0.1:1/drain",
        &[
            ("authorization", auth.as_str()),
            ("origin", "http://evil.example"),
        ],
        "",
    );
    assert_eq!(status, 403, "{body}");
    let (status, page) = http(agent.admin, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(page.contains("gopush admin"));

    // Route lookup names the backend the agent then uses.
    let (status, body) = http(agent.admin, "GET", "/api/route?uid=alice", with_token, "");
    assert_eq!(status, 200, "{body}");
    let route = json(&body);
    let alice_backend = route["backend"].as_str().unwrap().to_string();
    assert!(addrs.iter().any(|a| a.to_string() == alice_backend));
    let (status, who) = http(agent.proxy, "GET", "/whoami?uid=alice", &[], "");
    assert_eq!(status, 200, "{who}");
    let port: u16 = alice_backend.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(
        json(&who)["port"],
        port,
        "the route API agrees with the proxy"
    );

    // Counters move by exactly what was sent.
    let m0 = metrics(&agent);
    let ok_labels = [
        ("pool", "default"),
        ("backend", alice_backend.as_str()),
        ("class", "2xx"),
    ];
    let before = sample(&m0, "gopush_requests_total", &ok_labels);
    let hits0 = sample(
        &m0,
        "gopush_uid_lookups_total",
        &[("source", "query:uid"), ("result", "hit")],
    );
    let missing0 = sample(&m0, "gopush_refused_total", &[("reason", "missing_uid")]);
    for _ in 0..5 {
        assert_eq!(
            http(agent.proxy, "GET", "/whoami?uid=alice", &[], "").0,
            200
        );
    }
    assert_eq!(http(agent.proxy, "GET", "/whoami", &[], "").0, 430);
    // The counters are bumped in the logging phase, just after the response is written.
    let m1 = wait_for(5, "the request counter to grow by 5", || {
        let m = metrics(&agent);
        (sample(&m, "gopush_requests_total", &ok_labels) >= before + 5.0).then_some(m)
    });
    assert_eq!(
        sample(&m1, "gopush_requests_total", &ok_labels),
        before + 5.0
    );
    assert_eq!(
        sample(
            &m1,
            "gopush_uid_lookups_total",
            &[("source", "query:uid"), ("result", "hit")]
        ),
        hits0 + 5.0
    );
    assert_eq!(
        sample(&m1, "gopush_refused_total", &[("reason", "missing_uid")]),
        missing0 + 1.0
    );
    let healthy = sample(&m1, "gopush_backend_healthy", &[("pool", "default")]);
    assert_eq!(healthy, 2.0, "both backends healthy");
    let histogram = m1
        .samples
        .iter()
        .find(|s| s.metric == "gopush_request_duration_seconds")
        .expect("duration histogram");
    assert!(matches!(&histogram.value, prometheus_parse::Value::Histogram(b) if !b.is_empty()));
    assert!(
        !m1.samples
            .iter()
            .any(|s| s.labels.values().any(|v| v == "alice")),
        "no per-uid label"
    );

    // Status reports the same numbers.
    let (status, body) = http(agent.admin, "GET", "/api/status", with_token, "");
    assert_eq!(status, 200);
    let st = json(&body);
    let b = st["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == alice_backend.as_str())
        .unwrap()
        .clone();
    assert_eq!(b["requests"].as_f64().unwrap(), before + 5.0);
    assert_eq!(b["healthy"], true);
    assert_eq!(
        st["config"]["file"],
        std::fs::canonicalize(&agent.conf)
            .unwrap()
            .display()
            .to_string()
    );

    // Drain: alice's new requests go elsewhere; undrain brings them back.
    let (status, _) = http(
        agent.admin,
        "POST",
        &format!("/api/backends/{alice_backend}/drain"),
        with_token,
        "",
    );
    assert_eq!(status, 200);
    let (_, who) = http(agent.proxy, "GET", "/whoami?uid=alice", &[], "");
    assert_ne!(
        json(&who)["port"],
        port,
        "draining: new requests avoid the backend"
    );
    let route = json(&http(agent.admin, "GET", "/api/route?uid=alice", with_token, "").1);
    assert_eq!(route["ring"], alice_backend.as_str());
    assert_eq!(route["ring_draining"], true);
    assert_ne!(route["backend"], alice_backend.as_str());
    // Reload keeps it.
    let (status, body) = http(agent.admin, "POST", "/api/reload", with_token, "");
    assert_eq!(status, 200, "{body}");
    assert!(json(&body)["loaded_at"].is_string());
    let st = json(&http(agent.admin, "GET", "/api/status", with_token, "").1);
    assert_eq!(
        st["draining"][0],
        alice_backend.as_str(),
        "drain survives a reload"
    );
    assert_eq!(
        http(
            agent.admin,
            "POST",
            &format!("/api/backends/{alice_backend}/undrain"),
            with_token,
            ""
        )
        .0,
        200
    );
    let (_, who) = http(agent.proxy, "GET", "/whoami?uid=alice", &[], "");
    assert_eq!(json(&who)["port"], port);

    // A broken file: 400 with the error, the running configuration stays.
    let good = std::fs::read_to_string(&agent.conf).unwrap();
    std::fs::write(&agent.conf, format!("{good}\nnot_a_key: 1\n")).unwrap();
    let (status, body) = http(agent.admin, "POST", "/api/reload", with_token, "");
    assert_eq!(status, 400, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("not_a_key"));
    std::fs::write(&agent.conf, good).unwrap();
    assert_eq!(
        http(agent.proxy, "GET", "/whoami?uid=alice", &[], "").0,
        200
    );

    // Bad input and Redis down.
    let push = |body: &str| http(agent.admin, "POST", "/api/push", with_token, body);
    let (status, body) = push("{\"uid\": ");
    assert_eq!(status, 400, "{body}");
    let (status, body) = push(r#"{"uid": "a", "event": "e", "extra": 1}"#);
    assert_eq!(status, 400);
    assert!(body.contains("extra"), "{body}");
    let (status, body) = push(r#"{"event": "e"}"#);
    assert_eq!(status, 400);
    assert!(body.contains("uid"), "{body}");
    let (status, body) = push(r#"{"uid": "a", "event": "e", "data": {"x": 1}}"#);
    assert_eq!(status, 503, "{body}");
    assert!(body.to_lowercase().contains("redis"), "{body}");
    let (status, body) = http(
        agent.admin,
        "POST",
        "/api/disconnect",
        with_token,
        r#"{"uid": "a"}"#,
    );
    assert_eq!(status, 503, "{body}");
    let m2 = metrics(&agent);
    assert_eq!(
        sample(
            &m2,
            "gopush_pushes_total",
            &[("kind", "uid"), ("result", "unavailable")]
        ),
        1.0
    );

    // The access log is JSON lines.
    let access: Vec<HashMap<String, serde_json::Value>> = wait_for(5, "JSON access lines", || {
        let lines = agent.log.lock().unwrap();
        let parsed: Vec<HashMap<String, serde_json::Value>> = lines
            .iter()
            .filter(|l| l.contains("gopush::access"))
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
            })
            .collect();
        (parsed.len() >= 6).then_some(parsed)
    });
    let line = access
        .iter()
        .find(|l| l["uid"] == "alice")
        .expect("a line for alice");
    assert_eq!(line["status"], 200);
    assert!(line["ms"].is_number());
    assert_eq!(line["path"], "/whoami");

    drop(agent);
    backends.shutdown().unwrap();
}

#[test]
fn a_public_admin_listener_needs_a_token() {
    let dir = temp_dir("public");
    let conf = dir.0.join("gopush.yaml");
    std::fs::write(
        &conf,
        "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\nadmin: {listen: \"0.0.0.0:6004\"}\n",
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = Command::new(env!("CARGO_BIN_EXE_gopush"))
            .args([cmd, "-c"])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cmd} must refuse");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("admin.token"), "{cmd}: {err}");
    }
    std::fs::write(
        &conf,
        "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\nadmin: {listen: \"0.0.0.0:6004\", token: \"t\"}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gopush"))
        .args(["check", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_admin_hook_decides_with_the_token() {
    let backends =
        gopush::demo::spawn_backends(&["127.0.0.1:0".parse().unwrap()]).expect("demo backend");
    let dir = temp_dir("hook");
    std::fs::write(
        dir.0.join("admin.js"),
        "module.exports = function (req) { return req.headers['x-operator'] === 'ann'; };\n",
    )
    .unwrap();
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let extra = format!(
        "hooks: {{admin: \"{}\"}}\n",
        dir.0.join("admin.js").display()
    );
    let text = config(proxy, admin, backends.addrs(), &dir, &extra);
    let agent = spawn_agent(dir, &text, proxy, admin);
    let auth = bearer();
    let status = |headers: &[(&str, &str)]| http(agent.admin, "GET", "/api/status", headers, "").0;
    assert_eq!(
        status(&[("x-operator", "ann")]),
        401,
        "the hook alone does not replace the token"
    );
    assert_eq!(
        status(&[("authorization", &auth)]),
        401,
        "the token alone does not pass the hook"
    );
    assert_eq!(
        status(&[("authorization", &auth), ("x-operator", "bob")]),
        401
    );
    assert_eq!(
        status(&[("authorization", &auth), ("x-operator", "ann")]),
        200
    );
    // The hook's calls are counted in /metrics.
    let (code, text) = http(
        agent.admin,
        "GET",
        "/metrics",
        &[("authorization", &auth), ("x-operator", "ann")],
        "",
    );
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert!(
        sample(&scrape, "gopush_hooks_total", &[("result", "call")]) >= 4.0,
        "{text}"
    );
    drop(agent);
    backends.shutdown().unwrap();
}

/// Starts the binary on `conf_text` (written to `dir`) and waits for both listeners.
fn spawn_agent(dir: TempDir, conf_text: &str, proxy: SocketAddr, admin: SocketAddr) -> Agent {
    let conf = dir.0.join("gopush.yaml");
    std::fs::write(&conf, conf_text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gopush"))
        .args(["run", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gopush");
    let agent = Agent {
        child,
        proxy,
        admin,
        conf,
        log: Arc::new(Mutex::new(Vec::new())),
        _dir: dir,
    };
    wait_for(15, "the admin listener", || {
        TcpStream::connect_timeout(&agent.admin, Duration::from_millis(200)).ok()?;
        TcpStream::connect_timeout(&agent.proxy, Duration::from_millis(200)).ok()
    });
    agent
}

/// Issue 11, item 2: with an `admin(req)` hook that admits 127.0.0.1 (what the example hook used
/// to teach), a DNS-rebinding page (its own name resolved to 127.0.0.1, so `Host` and `Origin`
/// are that name) got 200 on status, reload and drain. The `Host` check now holds unless a
/// token is configured; with a token, the name does not matter but the token does.
#[test]
fn dns_rebinding_is_refused_with_an_admin_hook_and_needs_the_token_otherwise() {
    let backends =
        gopush::demo::spawn_backends(&["127.0.0.1:0".parse().unwrap()]).expect("demo backend");
    let backend = backends.addrs()[0];
    let by_ip =
        "module.exports = function (req) { return req.ip === '127.0.0.1' || req.ip === '::1'; };\n";
    for with_token in [false, true] {
        let dir = temp_dir(if with_token {
            "rebind-token"
        } else {
            "rebind-hook"
        });
        std::fs::write(dir.0.join("admin.js"), by_ip).unwrap();
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let extra = format!(
            "hooks: {{admin: \"{}\"}}\n",
            dir.0.join("admin.js").display()
        );
        let mut text = config(proxy, admin, &[backend], &dir, &extra);
        if !with_token {
            text = text.replace(&format!(", token: \"{TOKEN}\""), "");
            assert!(!text.contains(TOKEN), "{text}");
        }
        let agent = spawn_agent(dir, &text, proxy, admin);
        let evil_host = format!("evil.example:{}", admin.port());
        let evil_origin = format!("http://{evil_host}");
        let auth = bearer();
        let calls = [
            ("GET", "/api/status".to_string()),
            ("POST", "/api/reload".to_string()),
            ("POST", format!("/api/backends/{backend}/drain")),
            ("POST", format!("/api/backends/{backend}/undrain")),
        ];
        for (method, path) in &calls {
            let mut rebound = vec![("host", evil_host.as_str())];
            if *method == "POST" {
                rebound.push(("origin", evil_origin.as_str()));
            }
            let (status, body) = http(agent.admin, method, path, &rebound, "");
            if with_token {
                assert_eq!(status, 401, "token set, none sent: {method} {path}: {body}");
                let mut with = rebound.clone();
                with.push(("authorization", auth.as_str()));
                let (status, body) = http(agent.admin, method, path, &with, "");
                assert_eq!(status, 200, "token sent: {method} {path}: {body}");
            } else {
                assert_eq!(status, 403, "rebound {method} {path}: {body}");
                assert!(body.contains("DNS rebinding"), "{body}");
                // The operator, by address, is still let in by the hook.
                let (status, body) = http(agent.admin, method, path, &[], "");
                assert_eq!(status, 200, "by IP: {method} {path}: {body}");
            }
        }
        drop(agent);
    }
    backends.shutdown().unwrap();
}
