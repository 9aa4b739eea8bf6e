//! What a JavaScript uid hook costs per request, next to the declarative cookie source it
//! replaces (and a signed-token source for scale). Run: `cargo bench --bench hook_cost`.
//!
//! Each case resolves the uid of the same realistic Socket.IO polling request head (eight
//! headers, the uid in a cookie). The hook cases include building the frozen `req` object, which
//! is the bulk of a hook call's cost.

use criterion::{criterion_group, criterion_main, Criterion};
use gopush::config::Config;
use gopush::hooks::{HookRequest, Hooks, Program};
use gopush::uid::UidResolver;
use pingora::http::RequestHeader;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

const SECRET: &str = "bench-secret-bench-secret-bench-secret";

fn request() -> RequestHeader {
    let mut r = RequestHeader::build(
        "GET",
        b"/socket.io/?EIO=4&transport=polling&t=P9x2kLm&product=chat",
        None,
    )
    .expect("request head");
    for (k, v) in [
        ("host", "push.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0",
        ),
        ("accept", "*/*"),
        ("accept-language", "en-US,en;q=0.9"),
        ("accept-encoding", "gzip, deflate, br"),
        ("referer", "https://app.example.com/chat"),
        (
            "cookie",
            "_ga=GA1.2.1234567890.1700000000; theme=dark; uid=user-48151623; lang=en",
        ),
        ("connection", "keep-alive"),
    ] {
        r.append_header(k, v).expect("header");
    }
    r
}

fn hooks(dir: &Path, source: &str) -> Hooks {
    std::fs::create_dir_all(dir.join("conf")).expect("bench dir");
    std::fs::write(dir.join("uid.js"), source).expect("hook file");
    let yaml = "pools: {default: {backends: [\"127.0.0.1:4000\"]}}\nhooks: {uid: ../uid.js}\n";
    let config = Config::from_str_named(yaml, &dir.join("conf/bench.yaml")).expect("config");
    let program = Program::load(&config.hooks, config.dir())
        .expect("hook loads")
        .expect("program");
    Hooks::new(Arc::new(program))
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("gopush-bench-{}", std::process::id()));
    let req = request();
    let hook_req = HookRequest {
        header: &req,
        ip: Some("203.0.113.7".parse().expect("ip")),
        product: Some("chat"),
    };

    let config = Config::from_str_named(
        "pools: {default: {backends: [\"127.0.0.1:4000\"]}}\nuid: {sources: [{cookie: uid}, {query: uid}]}\n",
        Path::new("bench.yaml"),
    )
    .expect("config");
    let resolver = UidResolver::build(&config.uid, config.dir()).expect("resolver");
    c.bench_function("uid: declarative cookie source", |b| {
        b.iter(|| black_box(resolver.next(black_box(&req), 0).expect("uid")))
    });

    let cookie_hook = hooks(
        &dir.join("cookie"),
        "module.exports = (req) => req.cookies.uid || req.query.uid || null;",
    );
    c.bench_function("uid: JS hook reading the cookie", |b| {
        b.iter(|| black_box(cookie_hook.uid(black_box(&hook_req)).expect("uid")))
    });

    let const_hook = hooks(&dir.join("const"), "module.exports = (req) => 'fixed';");
    c.bench_function("uid: JS hook returning a constant", |b| {
        b.iter(|| black_box(const_hook.uid(black_box(&hook_req)).expect("uid")))
    });

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "user-48151623", "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token");
    let jwt_config = Config::from_str_named(
        &format!(
            "pools: {{default: {{backends: [\"127.0.0.1:4000\"]}}}}\nuid: {{sources: [{{jwt: {{from: query, name: token, key: \"{SECRET}\", alg: HS256}}}}]}}\n"
        ),
        Path::new("bench.yaml"),
    )
    .expect("config");
    let jwt_resolver = UidResolver::build(&jwt_config.uid, jwt_config.dir()).expect("resolver");
    let jwt_req = RequestHeader::build(
        "GET",
        format!("/socket.io/?EIO=4&transport=websocket&token={token}").as_bytes(),
        None,
    )
    .expect("request head");
    c.bench_function("uid: signed token (HS256) in the query", |b| {
        b.iter(|| black_box(jwt_resolver.next(black_box(&jwt_req), 0).expect("uid")))
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
