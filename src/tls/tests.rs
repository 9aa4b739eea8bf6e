use super::*;
use crate::config::ConfigError;
use rcgen::{CertificateParams, KeyPair};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh directory for one test's files.
fn dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "gopush-tls-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a self-signed ECDSA P-256 certificate for `names` (and its key) as `stem`.pem/.key.
fn write_cert(dir: &Path, stem: &str, names: &[&str], expired: bool) -> CertificateFiles {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let cert = params.self_signed(&key).unwrap();
    let files = CertificateFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

fn now() -> i64 {
    crate::live::unix_seconds(std::time::SystemTime::now())
}

/// The table of a listener with `certs` (loaded as `CertTable::load` does) and `default`.
fn table_of(certs: &[CertificateFiles], default: Option<&str>) -> Result<CertTable, String> {
    let tls = TlsListen {
        certificates: certs.to_vec(),
        default: default.map(str::to_string),
        h2: true,
        handshake_timeout: Duration::from_secs(10),
        watch: Duration::from_secs(60),
    };
    let loaded = certs
        .iter()
        .map(|f| Arc::new(load_cert(f, Path::new(""), now()).unwrap()))
        .collect();
    CertTable::new(&tls, loaded)
}

/// Which certificate (by its first name) `table` serves for `sni`.
fn served(table: &CertTable, sni: Option<&str>) -> Option<String> {
    let key = table.lookup(sni)?;
    table
        .certs
        .iter()
        .find(|c| Arc::ptr_eq(&c.key, &key))
        .map(|c| c.names[0].clone())
}

#[test]
fn names_come_from_the_san_and_pick_exact_then_wildcard() {
    let d = dir("lookup");
    let a = write_cert(&d, "a", &["a.example.com", "www.example.com"], false);
    let w = write_cert(&d, "w", &["*.example.com"], false);
    let o = write_cert(&d, "o", &["other.test"], false);
    let table = table_of(&[a, w, o], None).unwrap();
    assert_eq!(
        served(&table, Some("a.example.com")).as_deref(),
        Some("a.example.com")
    );
    assert_eq!(
        served(&table, Some("WWW.Example.com.")).as_deref(),
        Some("a.example.com")
    );
    assert_eq!(
        served(&table, Some("b.example.com")).as_deref(),
        Some("*.example.com")
    );
    assert_eq!(
        served(&table, Some("other.test")).as_deref(),
        Some("other.test")
    );
    // A wildcard covers one label: not the apex, not two labels.
    assert_eq!(served(&table, Some("example.com")), None);
    assert_eq!(served(&table, Some("x.y.example.com")), None);
    // No SNI: the first certificate. An unknown name without `default`: no certificate.
    assert_eq!(served(&table, None).as_deref(), Some("a.example.com"));
    assert_eq!(served(&table, Some("unknown.test")), None);
}

#[test]
fn a_configured_default_answers_no_sni_and_unknown_names() {
    let d = dir("default");
    let a = write_cert(&d, "a", &["a.example.com"], false);
    let w = write_cert(&d, "w", &["*.example.net"], false);
    let table = table_of(&[a.clone(), w.clone()], Some("x.example.net")).unwrap();
    assert_eq!(served(&table, None).as_deref(), Some("*.example.net"));
    assert_eq!(
        served(&table, Some("unknown.test")).as_deref(),
        Some("*.example.net")
    );
    assert_eq!(
        served(&table, Some("a.example.com")).as_deref(),
        Some("a.example.com")
    );
    let err = table_of(&[a, w], Some("nobody.test")).unwrap_err();
    assert_eq!(err, "no certificate covers `nobody.test`");
}

#[test]
fn the_first_listed_certificate_wins_a_shared_name() {
    let d = dir("first");
    let one = write_cert(&d, "one", &["same.test", "one.test"], false);
    let two = write_cert(&d, "two", &["two.test", "same.test"], false);
    let table = table_of(&[one, two], None).unwrap();
    assert_eq!(
        served(&table, Some("same.test")).as_deref(),
        Some("same.test")
    );
    assert_eq!(
        served(&table, Some("two.test")).as_deref(),
        Some("two.test")
    );
}

#[test]
fn the_resolver_serves_the_swapped_table() {
    let d = dir("swap");
    let a = write_cert(&d, "a", &["a.test"], false);
    let b = write_cert(&d, "b", &["b.test"], false);
    let resolver = CertResolver::new(table_of(&[a], None).unwrap());
    assert!(resolver.table().lookup(Some("a.test")).is_some());
    resolver.store(table_of(&[b], None).unwrap());
    assert!(resolver.table().lookup(Some("a.test")).is_none());
    assert!(resolver.table().lookup(Some("b.test")).is_some());
}

#[test]
fn bad_certificates_are_named_with_the_problem() {
    let d = dir("bad");
    let good = write_cert(&d, "good", &["good.test"], false);
    let other = write_cert(&d, "other", &["other.test"], false);
    let expired = write_cert(&d, "old", &["old.test"], true);
    let check = |files: &CertificateFiles| load_cert(files, Path::new(""), now()).unwrap_err();

    let missing = CertificateFiles {
        cert: d.join("nope.pem"),
        key: good.key.clone(),
    };
    let (field, msg) = check(&missing);
    assert_eq!(field, "cert");
    assert!(
        msg.starts_with(&format!("cannot read {}", d.join("nope.pem").display())),
        "{msg}"
    );

    let garbage = d.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let (field, msg) = check(&CertificateFiles {
        cert: garbage.clone(),
        key: good.key.clone(),
    });
    assert_eq!(field, "cert");
    assert_eq!(msg, format!("{}: no CERTIFICATE block", garbage.display()));

    let (field, msg) = check(&CertificateFiles {
        cert: good.cert.clone(),
        key: garbage.clone(),
    });
    assert_eq!(field, "key");
    assert!(
        msg.starts_with(&format!("{}: no private key", garbage.display())),
        "{msg}"
    );

    let (field, msg) = check(&CertificateFiles {
        cert: good.cert.clone(),
        key: other.key.clone(),
    });
    assert_eq!(field, "key");
    assert_eq!(
        msg,
        format!(
            "{} does not match the certificate {}",
            other.key.display(),
            good.cert.display()
        )
    );

    let (field, msg) = check(&expired);
    assert_eq!(field, "cert");
    assert_eq!(
        msg,
        format!(
            "{}: the certificate expired on 2020-01-01T00:00:00Z",
            expired.cert.display()
        )
    );
    assert!(load_cert(&good, Path::new(""), now()).is_ok());
}

/// `yaml` written as `d/gopush.yaml`, parsed and built as `gopush check` does (certificates are
/// read when the listeners are built, not when the file is parsed).
fn config_in(d: &Path, yaml: &str) -> Result<Config, ConfigError> {
    let path = d.join("gopush.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = Config::load(&path)?;
    crate::live::Live::new(config.clone(), None)?;
    Ok(config)
}

const POOLS: &str = "pools:\n  default:\n    backends: [\"127.0.0.1:4000\"]\n";

#[test]
fn listen_accepts_plain_strings_and_tls_maps_with_paths_relative_to_the_file() {
    let d = dir("config");
    write_cert(&d, "site", &["site.test", "*.site.test"], false);
    let yaml = format!(
        "listen:\n  - \"127.0.0.1:21080\"\n  - addr: \"127.0.0.1:21081\"\n    redirect_https: true\n    https_port: 21443\n  - addr: \"127.0.0.1:21443\"\n    tls:\n      certificates:\n        - {{cert: site.pem, key: site.key}}\n      h2: false\n      handshake_timeout: 3s\n{POOLS}"
    );
    let c = config_in(&d, &yaml).unwrap_or_else(|e| panic!("{e}"));
    let listeners = Listeners::new(&c).unwrap();
    let l = &c.listen.0;
    assert_eq!(l.len(), 3);
    assert!(l[0].tls.is_none() && !l[0].redirect_https);
    assert!(l[1].redirect_https && l[1].https_port == Some(21443));
    let tls = l[2].tls.as_ref().unwrap();
    assert!(!tls.h2);
    assert_eq!(tls.handshake_timeout, Duration::from_secs(3));
    let table = listeners.tls().next().unwrap().resolver.table();
    assert_eq!(table.certs[0].names, vec!["site.test", "*.site.test"]);
    assert_eq!(table.certs[0].cert_file, d.join("site.pem"));
    let local = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
    assert!(listeners.tls_for(local("127.0.0.1:21443")).is_some());
    assert!(listeners.tls_for(local("127.0.0.1:21080")).is_none());
    assert!(
        entry_for(&c, local("127.0.0.1:21081"))
            .unwrap()
            .redirect_https
    );
}

#[test]
fn an_unspecified_listen_address_matches_any_local_address_on_its_port() {
    let addrs: Vec<SocketAddr> = vec![
        "127.0.0.2:443".parse().unwrap(),
        "0.0.0.0:443".parse().unwrap(),
    ];
    let at = |s: &str| index_for(addrs.iter().copied(), s.parse().unwrap());
    assert_eq!(at("127.0.0.2:443"), Some(0));
    assert_eq!(at("10.1.2.3:443"), Some(1));
    assert_eq!(at("10.1.2.3:80"), None);
}

#[test]
fn bad_tls_config_names_file_key_and_problem() {
    let d = dir("config-bad");
    let good = write_cert(&d, "good", &["good.test"], false);
    write_cert(&d, "other", &["other.test"], false);
    write_cert(&d, "old", &["old.test"], true);
    let file = d.join("gopush.yaml");
    let tls = |certs: &str, extra: &str| {
        format!("listen:\n  - addr: \"127.0.0.1:21443\"\n    tls:\n      certificates: {certs}\n{extra}{POOLS}")
    };
    let cases = [
        (
            tls("[{cert: missing.pem, key: good.key}]", ""),
            "listen[0].tls.certificates[0].cert",
            format!("cannot read {}", d.join("missing.pem").display()),
        ),
        (
            tls("[{cert: good.pem, key: other.key}]", ""),
            "listen[0].tls.certificates[0].key",
            format!(
                "{} does not match the certificate {}",
                d.join("other.key").display(),
                good.cert.display()
            ),
        ),
        (
            tls(
                "[{cert: good.pem, key: good.key}, {cert: old.pem, key: old.key}]",
                "",
            ),
            "listen[0].tls.certificates[1].cert",
            format!(
                "{}: the certificate expired on 2020-01-01",
                d.join("old.pem").display()
            ),
        ),
        (
            tls("[]", ""),
            "listen[0].tls.certificates",
            "needs at least one certificate".into(),
        ),
        (
            tls(
                "[{cert: good.pem, key: good.key}]",
                "      default: nobody.test\n",
            ),
            "listen[0].tls.default",
            "no certificate covers `nobody.test`".into(),
        ),
        (
            tls("[{cert: good.pem, key: good.key}]", "      ciphers: all\n"),
            "listen[0].tls.ciphers",
            "unknown field `ciphers`".into(),
        ),
    ];
    for (yaml, key, problem) in cases {
        let e = config_in(&d, &yaml).unwrap_err().to_string();
        assert!(e.starts_with(&file.display().to_string()), "{e}");
        assert!(e.contains(&format!("{key}: ")), "{key}: {e}");
        assert!(e.contains(&problem), "{problem}: {e}");
    }
    // TLS and redirect_https on one entry make no sense.
    let e = config_in(
        &d,
        &format!("listen:\n  - addr: \"127.0.0.1:21443\"\n    redirect_https: true\n    tls:\n      certificates: [{{cert: good.pem, key: good.key}}]\n{POOLS}"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`redirect_https` is for a plain listener"),
        "{e}"
    );
}

#[test]
fn the_acme_certificate_answers_its_names_and_survives_a_table_swap() {
    let d = dir("acme");
    let site = write_cert(&d, "site", &["site.test"], false);
    let other = write_cert(&d, "other", &["other.test"], false);
    let acme_files = write_cert(&d, "acme", &["a.acme.test", "www.a.acme.test"], false);
    let acme = Arc::new(load_cert(&acme_files, Path::new(""), now()).unwrap());
    let is = |got: Option<Arc<CertifiedKey>>, want: &Arc<CertifiedKey>| {
        got.is_some_and(|k| Arc::ptr_eq(&k, want))
    };

    // A listener with no configured certificate: nothing until ACME has one, then it for its
    // names and for clients without SNI, and still nothing for other names.
    let empty = CertResolver::new(table_of(&[], None).unwrap());
    assert!(empty.lookup(Some("a.acme.test")).is_none());
    empty.set_acme(acme.clone());
    assert!(is(empty.lookup(Some("A.acme.test.")), &acme.key));
    assert!(is(empty.lookup(Some("www.a.acme.test")), &acme.key));
    assert!(is(empty.lookup(None), &acme.key));
    assert!(empty.lookup(Some("site.test")).is_none());

    // Beside configured certificates: each answers its own names; no SNI gets the table's.
    let mixed = CertResolver::new(table_of(&[site], None).unwrap());
    mixed.set_acme(acme.clone());
    assert!(is(mixed.lookup(Some("a.acme.test")), &acme.key));
    let site_key = mixed.lookup(Some("site.test")).unwrap();
    assert!(!Arc::ptr_eq(&site_key, &acme.key));
    assert!(is(mixed.lookup(None), &site_key));
    // A reload swaps the table; the ACME certificate stays.
    mixed.store(table_of(&[other], None).unwrap());
    assert!(is(mixed.lookup(Some("a.acme.test")), &acme.key));
    assert!(mixed.lookup(Some("site.test")).is_none());
}

#[test]
fn watched_files_load_when_they_change_and_a_bad_pair_is_reported_once() {
    let d = dir("watch");
    write_cert(&d, "site", &["site.test"], false);
    let yaml = format!(
        "listen:\n  - addr: \"127.0.0.1:21443\"\n    tls:\n      certificates:\n        - {{cert: site.pem, key: site.key}}\n      watch: 5s\n{POOLS}"
    );
    let c = config_in(&d, &yaml).unwrap_or_else(|e| panic!("{e}"));
    let listeners = Listeners::new(&c).unwrap();
    let l = listeners.tls().next().unwrap();
    assert_eq!(l.resolver.table().watch(), Some(Duration::from_secs(5)));
    let mut failed = None;
    assert_eq!(listeners.check_files(l, &mut failed), FilesCheck::Unchanged);

    // A renewal written over the files (its name tells it apart).
    write_cert(&d, "site", &["renewed.test"], false);
    assert_eq!(listeners.check_files(l, &mut failed), FilesCheck::Loaded);
    assert_eq!(
        served(&l.resolver.table(), None).as_deref(),
        Some("renewed.test")
    );
    assert_eq!(listeners.check_files(l, &mut failed), FilesCheck::Unchanged);

    // Half written: the next certificate beside the current key. Reported once; served: the
    // loaded one.
    let next = write_cert(&d, "next", &["next.test"], false);
    std::fs::copy(&next.cert, d.join("site.pem")).unwrap();
    match listeners.check_files(l, &mut failed) {
        FilesCheck::Failed(key, message) => {
            assert_eq!(key, "listen[0].tls.certificates[0].key");
            assert!(
                message.contains("does not match the certificate"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listeners.check_files(l, &mut failed), FilesCheck::Unchanged);
    assert_eq!(
        served(&l.resolver.table(), None).as_deref(),
        Some("renewed.test")
    );

    // The key follows: the pair loads.
    std::fs::copy(&next.key, d.join("site.key")).unwrap();
    assert_eq!(listeners.check_files(l, &mut failed), FilesCheck::Loaded);
    assert_eq!(
        served(&l.resolver.table(), None).as_deref(),
        Some("next.test")
    );
}

#[test]
fn watch_zero_is_off_and_defaults_to_a_minute() {
    let d = dir("watch-off");
    write_cert(&d, "site", &["site.test"], false);
    let entry = |watch: &str| {
        format!(
            "listen:\n  - addr: \"127.0.0.1:21443\"\n    tls:\n      certificates:\n        - {{cert: site.pem, key: site.key}}\n{watch}{POOLS}"
        )
    };
    let watch_of = |yaml: String| {
        let c = config_in(&d, &yaml).unwrap_or_else(|e| panic!("{e}"));
        let listeners = Listeners::new(&c).unwrap();
        let w = listeners.tls().next().unwrap().resolver.table().watch();
        w
    };
    assert_eq!(watch_of(entry("      watch: 0s\n")), None);
    assert_eq!(watch_of(entry("")), Some(Duration::from_secs(60)));
}

#[test]
fn watched_files_behind_swapped_symlinks_load() {
    // certbot's `live/NAME/*.pem` and a Kubernetes secret's `..data` are symlinks that a renewal
    // points at new files; the files themselves are never rewritten.
    let d = dir("watch-links");
    let first = write_cert(&d, "first", &["first.test"], false);
    let second = write_cert(&d, "second", &["second.test"], false);
    let link = |target: &Path, name: &str| {
        let tmp = d.join(format!("{name}.tmp"));
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, d.join(name)).unwrap();
    };
    link(&first.cert, "site.pem");
    link(&first.key, "site.key");
    let yaml = format!(
        "listen:\n  - addr: \"127.0.0.1:21443\"\n    tls:\n      certificates:\n        - {{cert: site.pem, key: site.key}}\n{POOLS}"
    );
    let c = config_in(&d, &yaml).unwrap_or_else(|e| panic!("{e}"));
    let listeners = Listeners::new(&c).unwrap();
    let l = listeners.tls().next().unwrap();
    let mut failed = None;
    assert_eq!(listeners.check_files(l, &mut failed), FilesCheck::Unchanged);
    link(&second.cert, "site.pem");
    link(&second.key, "site.key");
    assert_eq!(listeners.check_files(l, &mut failed), FilesCheck::Loaded);
    assert_eq!(
        served(&l.resolver.table(), None).as_deref(),
        Some("second.test")
    );
}
