use super::*;
use pingora::http::RequestHeader;
use std::time::Instant;

fn file(kind: HookKind, source: &str) -> HookFile {
    let name = format!("hooks/{}.js", kind.name());
    HookFile {
        kind,
        path: name.clone().into(),
        name: name.into(),
        source: source.into(),
    }
}

fn hooks_with(files: Vec<HookFile>, limits: Limits) -> Hooks {
    let program = Program::new(files, limits);
    program
        .check()
        .unwrap_or_else(|(k, e)| panic!("{k:?}: {e}"));
    Hooks::new(Arc::new(program))
}

fn uid_hook(source: &str) -> Hooks {
    hooks_with(vec![file(HookKind::Uid, source)], Limits::default())
}

fn route_hook(source: &str) -> Hooks {
    hooks_with(vec![file(HookKind::Route, source)], Limits::default())
}

fn head(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

fn hreq(h: &RequestHeader) -> HookRequest<'_> {
    HookRequest {
        header: h,
        ip: Some("203.0.113.9".parse().unwrap()),
        product: None,
    }
}

#[test]
fn req_object_has_every_field_decoded() {
    let h = uid_hook("module.exports = function (req) { return JSON.stringify(req); };");
    let head = head(
        "/socket.io/?EIO=4&a=x%20y&b=1+2&a=second&product=test&flag",
        &[
            ("cookie", "uid=al%40ice; theme=\"dark\""),
            ("cookie", "uid=ignored; extra=1"),
            ("X-Custom", "one"),
            ("x-custom", "two"),
            ("user-agent", "test-agent"),
        ],
    );
    let r = HookRequest {
        header: &head,
        ip: Some("198.51.100.7".parse().unwrap()),
        product: Some("test"),
    };
    let json = h.uid(&r).unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/socket.io/");
    assert_eq!(
        v["url"],
        "/socket.io/?EIO=4&a=x%20y&b=1+2&a=second&product=test&flag"
    );
    assert_eq!(v["query"]["a"], "x y", "first value wins, decoded");
    assert_eq!(v["query"]["b"], "1 2", "+ is a space");
    assert_eq!(v["query"]["flag"], "");
    assert_eq!(v["query"]["EIO"], "4");
    assert_eq!(v["cookies"]["uid"], "al@ice", "first cookie wins, decoded");
    assert_eq!(v["cookies"]["theme"], "dark");
    assert_eq!(v["cookies"]["extra"], "1");
    assert_eq!(v["headers"]["x-custom"], "one, two");
    assert_eq!(
        v["headers"]["cookie"],
        "uid=al%40ice; theme=\"dark\"; uid=ignored; extra=1"
    );
    assert_eq!(v["headers"]["user-agent"], "test-agent");
    assert_eq!(v["ip"], "198.51.100.7");
    assert_eq!(v["product"], "test");

    let bare = self::head("/", &[]);
    let r = HookRequest {
        header: &bare,
        ip: None,
        product: None,
    };
    let v: serde_json::Value = serde_json::from_str(&h.uid(&r).unwrap().unwrap()).unwrap();
    assert_eq!(v["ip"], serde_json::Value::Null);
    assert_eq!(v["product"], serde_json::Value::Null);
    assert_eq!(v["query"], serde_json::json!({}));
    assert_eq!(v["cookies"], serde_json::json!({}));
}

#[test]
fn req_object_is_read_only_and_prototype_free() {
    let h = uid_hook(
        r#"function uid(req) {
             const frozen = [req, req.query, req.cookies, req.headers].every(Object.isFrozen);
             const noProto = Object.getPrototypeOf(req.query) === null;
             return frozen && noProto && req.query.__proto__ === "x" ? "ok" : "not ok";
           }"#,
    );
    let head = head("/?__proto__=x", &[]);
    assert_eq!(h.uid(&hreq(&head)).unwrap().as_deref(), Some("ok"));
    let strict = uid_hook("'use strict'; function uid(req) { req.path = '/admin'; return 'x'; }");
    match strict.uid(&hreq(&head)) {
        Err(HookError::Threw(m)) => assert!(m.contains("TypeError"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn uid_return_shapes() {
    let head = head("/", &[]);
    for (body, want) in [
        ("return 'alice';", Ok(Some("alice"))),
        ("return 42;", Ok(Some("42"))),
        ("return null;", Ok(None)),
        ("return undefined;", Ok(None)),
        ("return '';", Ok(None)),
        ("", Ok(None)),
    ] {
        let h = uid_hook(&format!("function uid(req) {{ {body} }}"));
        assert_eq!(
            h.uid(&hreq(&head)).map(|o| o.map(|s| s.to_string())),
            want.map(|o: Option<&str>| o.map(str::to_string)),
            "{body}"
        );
    }
    for body in ["return {};", "return true;", "return [1];"] {
        let h = uid_hook(&format!("function uid(req) {{ {body} }}"));
        assert!(
            matches!(h.uid(&hreq(&head)), Err(HookError::BadReturn(_))),
            "{body}"
        );
    }
}

#[test]
fn hook_files_in_every_style() {
    let head = head("/?u=x", &[]);
    for src in [
        "module.exports = (req) => req.query.u;",
        "module.exports.uid = function (req) { return req.query.u; };",
        "exports.uid = (req) => req.query.u;",
        "function uid(req) { return req.query.u; }",
        "var helper = (q) => q.u; function uid(req) { return helper(req.query); }",
    ] {
        assert_eq!(
            uid_hook(src).uid(&hreq(&head)).unwrap().as_deref(),
            Some("x"),
            "{src}"
        );
    }
}

#[test]
fn route_return_shapes() {
    let head = head("/", &[]);
    let cases: Vec<(&str, RouteDecision)> = vec![
        ("null", RouteDecision::Default),
        ("undefined", RouteDecision::Default),
        ("''", RouteDecision::Default),
        ("'canary'", RouteDecision::Pool("canary".into())),
        (
            "'127.0.0.1:4002'",
            RouteDecision::Backend("127.0.0.1:4002".parse().unwrap()),
        ),
        (
            "'[::1]:4003'",
            RouteDecision::Backend("[::1]:4003".parse().unwrap()),
        ),
        (
            "{ip: '127.0.0.1', port: 4004}",
            RouteDecision::Backend("127.0.0.1:4004".parse().unwrap()),
        ),
        (
            "{ip: '127.0.0.1', port: '4005'}",
            RouteDecision::Backend("127.0.0.1:4005".parse().unwrap()),
        ),
    ];
    for (ret, want) in cases {
        let h = route_hook(&format!("function route(req, uid) {{ return {ret}; }}"));
        assert_eq!(h.route(&hreq(&head), "u1").unwrap(), want, "{ret}");
    }
    for ret in [
        "{ip: 'example.com', port: 80}",
        "{ip: '127.0.0.1', port: 0}",
        "{ip: '127.0.0.1', port: 70000}",
        "{ip: '127.0.0.1'}",
        "'localhost:4000'",
        "42",
        "true",
        "[]",
        "function () {}",
    ] {
        let h = route_hook(&format!("function route(req, uid) {{ return {ret}; }}"));
        assert!(
            matches!(h.route(&hreq(&head), "u1"), Err(HookError::BadReturn(_))),
            "{ret}"
        );
    }
}

#[test]
fn route_receives_the_uid_and_product() {
    let h = route_hook(
        r#"module.exports = function (req, uid) {
             if (req.product === 'test') return {ip: '127.0.0.1', port: 4002};
             if (uid.startsWith('vip-')) return 'canary';
             return null;
           };"#,
    );
    let head = head("/", &[]);
    let mut r = hreq(&head);
    assert_eq!(
        h.route(&r, "vip-1").unwrap(),
        RouteDecision::Pool("canary".into())
    );
    assert_eq!(h.route(&r, "bob").unwrap(), RouteDecision::Default);
    r.product = Some("test");
    assert_eq!(
        h.route(&r, "bob").unwrap(),
        RouteDecision::Backend("127.0.0.1:4002".parse().unwrap())
    );
}

#[test]
fn admin_hook_answers_booleans_only() {
    let h = hooks_with(
        vec![file(
            HookKind::Admin,
            "module.exports = (req) => req.headers['x-admin-token'] === 's3cret';",
        )],
        Limits::default(),
    );
    let yes = head("/", &[("x-admin-token", "s3cret")]);
    let no = head("/", &[]);
    assert_eq!(h.admin(&hreq(&yes)), Ok(Some(true)));
    assert_eq!(h.admin(&hreq(&no)), Ok(Some(false)));
    let truthy = hooks_with(
        vec![file(HookKind::Admin, "function admin() { return 'yes'; }")],
        Limits::default(),
    );
    assert!(matches!(
        truthy.admin(&hreq(&no)),
        Err(HookError::BadReturn(_))
    ));
    assert_eq!(uid_hook("function uid() {}").admin(&hreq(&no)), Ok(None));
}

#[test]
fn an_infinite_loop_is_interrupted_and_the_engine_keeps_working() {
    let limits = Limits {
        timeout: Duration::from_millis(30),
        ..Limits::default()
    };
    let h = hooks_with(
        vec![file(
            HookKind::Uid,
            "function uid(req) {\n  if (req.query.spin) { while (true) {} }\n  return 'fine';\n}",
        )],
        limits,
    );
    let spin = head("/?spin=1", &[]);
    let ok = head("/", &[]);
    let before = crate::metrics::counters().hook_timeouts.get();
    for _ in 0..3 {
        let t = Instant::now();
        match h.uid(&hreq(&spin)) {
            Err(HookError::Timeout(m)) => assert!(m.contains("hooks/uid.js"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(h.uid(&hreq(&ok)).unwrap().as_deref(), Some("fine"));
    }
    assert!(crate::metrics::counters().hook_timeouts.get() >= before + 3);
    // A hook cannot swallow the interruption.
    let h = hooks_with(
        vec![file(
            HookKind::Uid,
            "function uid() { try { while (true) {} } catch (e) { return 'escaped'; } }",
        )],
        limits,
    );
    assert!(matches!(h.uid(&hreq(&ok)), Err(HookError::Timeout(_))));
}

#[test]
fn huge_allocations_and_deep_recursion_hit_the_limits() {
    let h = uid_hook(
        r#"function uid(req) {
             if (req.query.big) { const a = []; for (;;) a.push(new Array(100000).fill(1)); }
             if (req.query.str) { return 'x'.repeat(1 << 28); }
             if (req.query.deep) { const f = (n) => f(n + 1) + 1; return f(0); }
             return 'fine';
           }"#,
    );
    for q in ["/?big=1", "/?str=1", "/?deep=1"] {
        let r = head(q, &[]);
        let got = h.uid(&hreq(&r));
        assert!(
            matches!(got, Err(HookError::Memory(_)) | Err(HookError::Threw(_))),
            "{q}: {got:?}"
        );
        assert!(got.as_ref().is_err_and(|e| e.is_limit()), "{q}: {got:?}");
        assert_eq!(
            h.uid(&hreq(&head("/", &[]))).unwrap().as_deref(),
            Some("fine"),
            "after {q}"
        );
    }
}

#[test]
fn a_throw_names_the_file_and_line() {
    let h = uid_hook("function uid(req) {\n  const c = req.cookies.session;\n  if (!c) throw new Error('no session');\n  return c;\n}");
    let r = head("/", &[]);
    match h.uid(&hreq(&r)) {
        Err(HookError::Threw(m)) => {
            assert!(m.contains("hooks/uid.js:3"), "{m}");
            assert!(m.contains("Error: no session"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    let h = uid_hook("function uid() { throw 'plain string'; }");
    match h.uid(&hreq(&r)) {
        Err(HookError::Threw(m)) => assert!(m.contains("plain string"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_filesystem_network_timers_or_require() {
    let h = uid_hook(
        r#"function uid() {
             return [typeof require, typeof setTimeout, typeof setInterval, typeof fetch,
                     typeof XMLHttpRequest, typeof std, typeof os, typeof process].join(',');
           }"#,
    );
    let r = head("/", &[]);
    assert_eq!(
        h.uid(&hreq(&r)).unwrap().as_deref(),
        Some("undefined,undefined,undefined,undefined,undefined,undefined,undefined,undefined")
    );
    let h = uid_hook("function uid() { return require('fs').readFileSync('/etc/passwd'); }");
    match h.uid(&hreq(&r)) {
        Err(HookError::Threw(m)) => assert!(m.contains("ReferenceError"), "{m}"),
        other => panic!("{other:?}"),
    }
    let h = uid_hook("async function uid() { return 'a'; }");
    assert!(matches!(h.uid(&hreq(&r)), Err(HookError::BadReturn(_))));
    // console.log goes to the agent's log and does not break the hook.
    let h = uid_hook("function uid() { console.log('hello', 1, {a: 1}); return 'ok'; }");
    assert_eq!(h.uid(&hreq(&r)).unwrap().as_deref(), Some("ok"));
}

#[test]
fn load_errors_name_file_and_line() {
    let p = Program::new(
        [file(
            HookKind::Uid,
            "function uid(req) {\n  return req.\n}\n",
        )],
        Limits::default(),
    );
    let (kind, e) = p.check().unwrap_err();
    assert_eq!(kind, HookKind::Uid);
    assert!(e.detail().starts_with("hooks/uid.js:3"), "{e}");
    assert!(e.detail().contains("SyntaxError"), "{e}");

    let p = Program::new(
        [
            file(HookKind::Uid, "function uid() { return 'a'; }"),
            file(HookKind::Route, "module.exports = 42;"),
        ],
        Limits::default(),
    );
    let (kind, e) = p.check().unwrap_err();
    assert_eq!(kind, HookKind::Route);
    assert!(e.detail().contains("defines no function"), "{e}");

    let p = Program::new(
        [file(
            HookKind::Uid,
            "\n\nundefinedThing.call();\nfunction uid() {}",
        )],
        Limits::default(),
    );
    let (_, e) = p.check().unwrap_err();
    assert!(e.detail().contains("hooks/uid.js:3"), "{e}");
    assert!(e.detail().contains("ReferenceError"), "{e}");

    let p = Program::new(
        [file(HookKind::Uid, "while (true) {}\nfunction uid() {}")],
        Limits::default(),
    );
    assert!(matches!(p.check(), Err((_, HookError::Timeout(_)))));
}

#[test]
fn a_new_generation_is_recompiled_on_this_thread() {
    let r = head("/", &[]);
    let a = uid_hook("function uid() { return 'one'; }");
    let b = uid_hook("function uid() { return 'two'; }");
    assert!(b.generation() > a.generation());
    assert_eq!(a.uid(&hreq(&r)).unwrap().as_deref(), Some("one"));
    assert_eq!(b.uid(&hreq(&r)).unwrap().as_deref(), Some("two"));
    assert_eq!(a.uid(&hreq(&r)).unwrap().as_deref(), Some("one"));
    // State kept in a hook's globals lives as long as the thread's engine for that generation:
    // compiled once, not per call.
    let c = uid_hook("var calls = 0; function uid() { calls += 1; return String(calls); }");
    assert_eq!(c.uid(&hreq(&r)).unwrap().as_deref(), Some("1"));
    assert_eq!(c.uid(&hreq(&r)).unwrap().as_deref(), Some("2"));
}

#[test]
fn hooks_share_a_runtime_but_not_globals() {
    let h = hooks_with(
        vec![
            file(
                HookKind::Uid,
                "var secret = 'u'; function uid() { return secret; }",
            ),
            file(
                HookKind::Route,
                "function route() { return typeof secret === 'undefined' ? null : 'leak'; }",
            ),
        ],
        Limits::default(),
    );
    let r = head("/", &[]);
    assert_eq!(h.uid(&hreq(&r)).unwrap().as_deref(), Some("u"));
    assert_eq!(h.route(&hreq(&r), "u").unwrap(), RouteDecision::Default);
}
