//! The command line: `check`, `route`, `init`, and `run` refusing a bad configuration.

mod common;

use common::{run_gopush, spawn_gopush, Output, TempDir};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(20);

fn check(path: &std::path::Path, envs: &[(&str, &str)]) -> Output {
    run_gopush(&["check", "-c", &path.to_string_lossy()], envs, LIMIT)
}

/// `check` on `yaml` must fail, and stderr must contain every one of `needles`.
fn assert_check_fails(name: &str, yaml: &str, needles: &[&str]) {
    let dir = TempDir::new("cli-bad");
    let file = dir.write(name, yaml);
    let out = check(&file, &[]);
    assert!(
        !out.ok() && out.code.is_some(),
        "check of {name} should fail with an exit code, got {:?}\nstdout: {}\nstderr: {}",
        out.code,
        out.stdout,
        out.stderr
    );
    let mut needles = needles.to_vec();
    let file_s = file.to_string_lossy().into_owned();
    needles.push(&file_s);
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "stderr of `check {name}` should contain {n:?}, got:\n{}",
            out.stderr
        );
    }
}

#[test]
fn check_accepts_every_shipped_config() {
    let conf = common::crate_root().join("conf");
    // conf/tls.yaml names a certificate that `gopush init` makes on the user's machine (no key
    // ships with gopush): check it where init wrote it, next to that certificate.
    let tmp = TempDir::new("cli-init-tls");
    let init_dir = tmp.path().join("project");
    let init = run_gopush(
        &["init", init_dir.to_str().expect("utf-8 temp dir")],
        &[],
        LIMIT,
    );
    assert!(init.ok(), "gopush init: {}{}", init.stdout, init.stderr);
    let mut files: Vec<_> = std::fs::read_dir(&conf)
        .expect("read conf/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            if p.file_name().is_some_and(|n| n == "tls.yaml") {
                let written = init_dir.join("conf/tls.yaml");
                assert_eq!(
                    std::fs::read_to_string(&written).expect("init wrote conf/tls.yaml"),
                    std::fs::read_to_string(&p).expect("conf/tls.yaml")
                );
                written
            } else {
                p
            }
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected conf/*.yaml files, found {files:?}"
    );
    for f in &files {
        let out = check(f, &[]);
        assert!(
            out.ok(),
            "check {} failed ({:?}):\n{}{}",
            f.display(),
            out.code,
            out.stdout,
            out.stderr
        );
        assert!(
            out.stdout.contains("pool default"),
            "{}: {}",
            f.display(),
            out.stdout
        );
    }
}

#[test]
fn check_names_an_unknown_key_and_its_line() {
    assert_check_fails(
        "unknown-key.yaml",
        "# a comment\npools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\nlistn: \"127.0.0.1:6003\"\n",
        &["listn", ":5:", "unknown field"],
    );
}

#[test]
fn check_rejects_a_host_name_backend() {
    assert_check_fails(
        "hostname.yaml",
        "pools:\n  default:\n    backends: [\"localhost:4000\"]\n",
        &["pools.default.backends[0]", "literal IP", "localhost:4000"],
    );
}

#[test]
fn check_requires_the_default_pool() {
    assert_check_fails(
        "no-default.yaml",
        "pools:\n  other:\n    backends: [\"127.0.0.1:4000\"]\n",
        &["pools", "`default`"],
    );
}

#[test]
fn check_rejects_weight_zero() {
    assert_check_fails(
        "weight0.yaml",
        "pools:\n  default:\n    backends:\n      - \"127.0.0.1:4001\"\n      - { addr: \"127.0.0.1:4000\", weight: 0 }\n",
        &["pools.default.backends[1]", "weight 0"],
    );
}

/// The line printed with a bad backend must be the backend's own line, not the list's first.
#[test]
fn check_reports_the_line_of_the_offending_backend() {
    assert_check_fails(
        "third-backend-hostname.yaml",
        "pools:\n  default:\n    backends:\n      - \"127.0.0.1:4001\"\n      - \"127.0.0.1:4002\"\n      - \"localhost:4003\"\n",
        &["pools.default.backends[2]", "literal IP", ":6:"],
    );
    assert_check_fails(
        "third-backend-weight.yaml",
        "pools:\n  default:\n    backends:\n      - \"127.0.0.1:4001\"\n      - \"127.0.0.1:4002\"\n      - { addr: \"127.0.0.1:4003\", weight: 0 }\n",
        &["pools.default.backends[2]", "weight 0", ":6:"],
    );
}

#[test]
fn check_reports_the_line_of_a_yaml_syntax_error() {
    assert_check_fails(
        "syntax.yaml",
        "listen: \"127.0.0.1:6003\"\npools:\n  default:\n    backends: [\"127.0.0.1:4000\"\n  x: [\n",
        &[":5:"],
    );
}

#[test]
fn check_names_an_unset_variable_and_its_line() {
    let var = "GOPUSH_IT_SURELY_UNSET_VAR_7F3A";
    assert!(std::env::var(var).is_err());
    assert_check_fails(
        "unset-var.yaml",
        &format!(
            "listen: \"127.0.0.1:6003\"\npools:\n  default:\n    backends: [\"${{{var}}}\"]\n"
        ),
        &[var, ":4:"],
    );
}

#[test]
fn check_substitutes_a_set_variable() {
    let dir = TempDir::new("cli-env");
    let file = dir.write(
        "env.yaml",
        "listen: \"${GOPUSH_IT_LISTEN}\"\npools:\n  default:\n    backends: [\"${GOPUSH_IT_BACKEND}\", \"${GOPUSH_IT_UNSET_X:-127.0.0.1:4999}\"]\n",
    );
    let out = check(
        &file,
        &[
            ("GOPUSH_IT_LISTEN", "127.0.0.1:6123"),
            ("GOPUSH_IT_BACKEND", "127.0.0.9:4555"),
        ],
    );
    assert!(out.ok(), "check failed: {}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("127.0.0.1:6123"), "{}", out.stdout);
    assert!(out.stdout.contains("127.0.0.9:4555"), "{}", out.stdout);
    assert!(out.stdout.contains("127.0.0.1:4999"), "{}", out.stdout);
}

fn route(args: &[&str]) -> Output {
    let conf = common::crate_root().join("conf/local.yaml");
    let conf = conf.to_string_lossy().into_owned();
    let mut all = vec!["route"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-c", &conf]);
    run_gopush(&all, &[], LIMIT)
}

fn first_line(out: &Output) -> String {
    out.stdout.lines().next().unwrap_or("").trim().to_string()
}

#[test]
fn route_prints_a_stable_backend_of_the_pool() {
    let default_pool = ["127.0.0.1:4000", "127.0.0.1:4001"];
    let first = route(&["alice"]);
    assert!(first.ok(), "route failed: {}{}", first.stdout, first.stderr);
    let addr = first_line(&first);
    assert!(
        addr.parse::<std::net::SocketAddr>().is_ok(),
        "first line is not IP:port: {addr:?}"
    );
    assert!(
        default_pool.contains(&addr.as_str()),
        "{addr} not in {default_pool:?}"
    );
    for _ in 0..3 {
        let again = route(&["alice"]);
        assert!(again.ok());
        assert_eq!(first_line(&again), addr, "route is not stable");
    }
    // Both backends get some uids (the ring is not degenerate).
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..16 {
        let out = route(&[&format!("user{i}")]);
        assert!(out.ok());
        let a = first_line(&out);
        assert!(default_pool.contains(&a.as_str()), "{a}");
        seen.insert(a);
    }
    assert_eq!(seen.len(), 2, "16 uids all on one backend: {seen:?}");

    let test = route(&["alice", "--product", "test"]);
    assert!(test.ok(), "{}{}", test.stdout, test.stderr);
    assert_eq!(first_line(&test), "127.0.0.1:4002");

    let unknown = route(&["alice", "--product", "no-such-product"]);
    assert!(
        !unknown.ok(),
        "unknown product should fail: {}",
        unknown.stdout
    );
    assert!(
        unknown.stderr.contains("no-such-product"),
        "{}",
        unknown.stderr
    );
}

#[test]
fn init_writes_valid_files_and_never_overwrites() {
    let dir = TempDir::new("cli-init");
    let target = dir.join("site");
    let target_s = target.to_string_lossy().into_owned();
    let out = run_gopush(&["init", &target_s], &[], LIMIT);
    assert!(out.ok(), "init failed: {}{}", out.stdout, out.stderr);
    let files = [
        "conf/local.yaml",
        "conf/develop.yaml",
        "conf/production.yaml",
        "hooks/README.md",
        "hooks/uid.js",
        "hooks/route.js",
        "hooks/admin.js",
    ];
    let mut before = Vec::new();
    for f in files {
        let p = target.join(f);
        let meta = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{f} not written: {e}"));
        assert!(meta.len() > 0, "{f} is empty");
        before.push((
            p.clone(),
            std::fs::read(&p).unwrap(),
            meta.modified().unwrap(),
        ));
        if f.ends_with(".yaml") {
            let c = check(&p, &[]);
            assert!(
                c.ok(),
                "written {f} does not pass check: {}{}",
                c.stdout,
                c.stderr
            );
        }
    }
    // The example hooks compile when turned on (as conf/local.yaml's comment shows).
    let hooked = target.join("conf/hooks.yaml");
    std::fs::write(
        &hooked,
        "pools: {default: {backends: [\"127.0.0.1:4000\"]}}\nhooks: {uid: ../hooks/uid.js, route: ../hooks/route.js, admin: ../hooks/admin.js}\n",
    )
    .unwrap();
    let c = check(&hooked, &[]);
    assert!(
        c.ok(),
        "the example hooks do not pass check: {}{}",
        c.stdout,
        c.stderr
    );
    for hook in ["uid", "route", "admin"] {
        assert!(
            c.stdout.contains(&format!("hook {hook}: ")) && c.stdout.contains("(compiled)"),
            "{}",
            c.stdout
        );
    }
    // A syntax error in a hook is reported with its file and line, and check fails.
    let broken = target.join("hooks/broken.js");
    std::fs::write(
        &broken,
        "module.exports = function (req) {\n  return {ip: '127.0.0.1', port: };\n};\n",
    )
    .unwrap();
    let bad = target.join("conf/broken.yaml");
    std::fs::write(
        &bad,
        "pools: {default: {backends: [\"127.0.0.1:4000\"]}}\nhooks: {route: ../hooks/broken.js}\n",
    )
    .unwrap();
    let c = check(&bad, &[]);
    assert!(!c.ok(), "a broken hook passed check: {}", c.stdout);
    assert!(
        c.stderr.contains("hooks.route") && c.stderr.contains("broken.js:2"),
        "{}",
        c.stderr
    );
    for f in [&bad, &broken] {
        std::fs::remove_file(f).unwrap();
    }
    std::fs::remove_file(&hooked).unwrap();

    // Mark one file so that an overwrite would be visible even within the mtime resolution.
    let marker = target.join("conf/local.yaml");
    let mut marked = std::fs::read(&marker).unwrap();
    marked.extend_from_slice(b"# edited by the operator\n");
    std::fs::write(&marker, &marked).unwrap();
    before[0].1 = marked;
    before[0].2 = std::fs::metadata(&marker).unwrap().modified().unwrap();

    let again = run_gopush(&["init", &target_s], &[], LIMIT);
    assert!(!again.ok(), "second init should fail: {}", again.stdout);
    assert!(!again.stderr.is_empty(), "second init failed silently");
    for (p, bytes, mtime) in before {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
        assert_eq!(
            std::fs::metadata(&p).unwrap().modified().unwrap(),
            mtime,
            "{} was rewritten",
            p.display()
        );
    }
}

#[test]
fn run_refuses_to_start_with_a_bad_config() {
    let dir = TempDir::new("cli-run-bad");
    let port = common::free_port();
    let file = dir.write(
        "bad.yaml",
        &format!("listen: \"127.0.0.1:{port}\"\npools:\n  default:\n    backends: [\"localhost:4000\"]\n"),
    );
    let log = dir.join("run.log");
    // "It never listened": the port is held here while the agent runs, so an attempt to bind it
    // would fail loudly in its log ("Address in use"), and the agent's last line before it binds
    // ("gopush agent starting") must be absent. (Connecting afterwards would prove nothing: the
    // process has exited by then either way.)
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the listen port");
    let started = Instant::now();
    let mut child = spawn_gopush(&["run", "-c", &file.to_string_lossy()], &log, &[]);
    let status = child.wait_exit(Duration::from_secs(10));
    let text = child.log_text();
    let status =
        status.unwrap_or_else(|| panic!("`run` with a bad config still running; log:\n{text}"));
    assert!(
        !status.success(),
        "`run` with a bad config exited 0; log:\n{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} to refuse",
        started.elapsed()
    );
    assert!(text.contains("pools.default.backends[0]"), "log:\n{text}");
    assert!(text.contains(&*file.to_string_lossy()), "log:\n{text}");
    // It never got to binding its listeners.
    assert!(
        !text.contains("gopush agent starting"),
        "it got as far as starting the server; log:\n{text}"
    );
    assert!(
        !text.to_lowercase().contains("in use"),
        "it tried to bind the listen port; log:\n{text}"
    );
    drop(held);
}

#[test]
fn check_names_a_bad_acme_key_and_its_problem() {
    let base = "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\nacme:\n";
    assert_check_fails(
        "acme-http.yaml",
        &format!(
            "{base}  directory: http://ca.example/dir\n  domains: [a.example]\n  storage: acme\n"
        ),
        &["acme.directory", ":5:", "https://"],
    );
    assert_check_fails(
        "acme-wildcard.yaml",
        &format!("{base}  directory: https://ca.example/dir\n  domains: [\"*.example.com\"]\n  storage: acme\n"),
        &["acme.domains", "wildcard"],
    );
    assert_check_fails(
        "acme-unknown.yaml",
        &format!("{base}  directory: https://ca.example/dir\n  domains: [a.example]\n  storage: acme\n  renew: 10d\n"),
        &["acme", "renew", "unknown field"],
    );
    assert_check_fails(
        "acme-ca.yaml",
        &format!("{base}  directory: https://ca.example/dir\n  domains: [a.example]\n  storage: acme\n  directory_ca: missing-ca.pem\n"),
        &["acme.directory_ca", "missing-ca.pem", "not a PEM certificate"],
    );
    // The default listen entry is plain: tls-alpn-01 has nowhere to be answered.
    assert_check_fails(
        "acme-alpn-no-tls.yaml",
        &format!("{base}  directory: https://ca.example/dir\n  domains: [a.example]\n  storage: acme\n  challenge: tls-alpn-01\n"),
        &["acme.challenge", "TLS listener"],
    );
    assert_check_fails(
        "acme-challenge.yaml",
        &format!("{base}  directory: https://ca.example/dir\n  domains: [a.example]\n  storage: acme\n  challenge: dns-01\n"),
        &["acme.challenge", "dns-01"],
    );
    assert_check_fails(
        "acme-http-no-plain.yaml",
        &format!("listen:\n  - addr: \"127.0.0.1:8443\"\n    tls: {{ certificates: [] }}\n{base}  directory: https://ca.example/dir\n  domains: [a.example]\n  storage: acme\n"),
        &["acme.challenge", "plain listener", "tls-alpn-01"],
    );
}
/// A self-signed ECDSA P-256 certificate for `names` and its key, written as `stem`.pem/.key.
fn write_cert(dir: &TempDir, stem: &str, names: &[&str], expired: bool) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    if expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let cert = params.self_signed(&key).expect("certificate");
    dir.write(&format!("{stem}.pem"), &cert.pem());
    dir.write(&format!("{stem}.key"), &key.serialize_pem());
}

fn tls_yaml(cert: &str, key: &str) -> String {
    format!(
        "listen:\n  - \"127.0.0.1:21090\"\n  - addr: \"127.0.0.1:21091\"\n    tls:\n      certificates:\n        - {{cert: {cert}, key: {key}}}\npools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\n"
    )
}

#[test]
fn check_names_a_bad_certificate_file_and_the_problem() {
    let dir = TempDir::new("cli-tls");
    write_cert(&dir, "good", &["good.test"], false);
    write_cert(&dir, "other", &["other.test"], false);
    write_cert(&dir, "old", &["old.test"], true);
    dir.write("garbage.pem", "not PEM at all\n");
    let cases: [(&str, &str, &str, &[&str]); 4] = [
        (
            "missing.yaml",
            "missing.pem",
            "good.key",
            &[
                "listen[1].tls.certificates[0].cert",
                "cannot read",
                "missing.pem",
            ],
        ),
        (
            "garbage.yaml",
            "garbage.pem",
            "good.key",
            &[
                "listen[1].tls.certificates[0].cert",
                "garbage.pem: no CERTIFICATE block",
            ],
        ),
        (
            "mismatch.yaml",
            "good.pem",
            "other.key",
            &[
                "listen[1].tls.certificates[0].key",
                "other.key does not match the certificate",
                "good.pem",
            ],
        ),
        (
            "expired.yaml",
            "old.pem",
            "old.key",
            &[
                "listen[1].tls.certificates[0].cert",
                "old.pem: the certificate expired on 2020-01-01T00:00:00Z",
            ],
        ),
    ];
    for (name, cert, key, needles) in cases {
        let file = dir.write(name, &tls_yaml(cert, key));
        let out = check(&file, &[]);
        assert!(!out.ok(), "{name}: check should fail\n{}", out.stdout);
        for n in needles.iter().chain([&&*file.to_string_lossy()]) {
            assert!(
                out.stderr.contains(n),
                "{name}: stderr should contain {n:?}:\n{}",
                out.stderr
            );
        }
    }
    let ok = check(
        &dir.write("good.yaml", &tls_yaml("good.pem", "good.key")),
        &[],
    );
    assert!(ok.ok(), "{}{}", ok.stdout, ok.stderr);
    assert!(
        ok.stdout.contains("127.0.0.1:21091 (tls)")
            && ok.stdout.contains("for good.test (expires "),
        "{}",
        ok.stdout
    );
}

#[test]
fn run_refuses_to_start_with_a_bad_certificate() {
    let dir = TempDir::new("cli-tls-run");
    write_cert(&dir, "good", &["good.test"], false);
    write_cert(&dir, "other", &["other.test"], false);
    let port = common::free_port();
    let yaml =
        tls_yaml("good.pem", "other.key").replace("127.0.0.1:21090", &format!("127.0.0.1:{port}"));
    let file = dir.write("bad.yaml", &yaml);
    let log = dir.join("run.log");
    let mut child = spawn_gopush(&["run", "-c", &file.to_string_lossy()], &log, &[]);
    let status = child.wait_exit(Duration::from_secs(10));
    let text = child.log_text();
    let status = status
        .unwrap_or_else(|| panic!("`run` with a bad certificate still running; log:\n{text}"));
    assert!(!status.success(), "log:\n{text}");
    assert!(
        text.contains("listen[1].tls.certificates[0].key"),
        "log:\n{text}"
    );
    assert!(
        text.contains("does not match the certificate"),
        "log:\n{text}"
    );
    assert!(!text.contains("gopush agent starting"), "log:\n{text}");
}

#[test]
fn run_refuses_to_start_when_its_admin_port_is_taken() {
    let dir = TempDir::new("cli-run-busy");
    let port = common::free_port();
    let admin = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("hold a port");
    let admin_port = admin.local_addr().expect("held port").port();
    let file = dir.write(
        "busy.yaml",
        &format!(
            "listen: \"127.0.0.1:{port}\"\npools:\n  default:\n    backends: [\"127.0.0.1:9\"]\n\
             admin: {{ listen: \"127.0.0.1:{admin_port}\" }}\n"
        ),
    );
    let log = dir.join("run.log");
    let started = Instant::now();
    let mut child = spawn_gopush(&["run", "-c", &file.to_string_lossy()], &log, &[]);
    // Pingora alone would retry for ~30 s, then lose the admin service and keep running.
    let status = child.wait_exit(Duration::from_secs(10));
    let text = child.log_text();
    let status = status.unwrap_or_else(|| panic!("`run` kept running; log:\n{text}"));
    assert!(!status.success(), "exited 0; log:\n{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} to refuse",
        started.elapsed()
    );
    assert!(
        text.contains(&format!("127.0.0.1:{admin_port}")) && text.contains("admin.listen"),
        "the message names the address and its key; log:\n{text}"
    );
    drop(admin);
}
