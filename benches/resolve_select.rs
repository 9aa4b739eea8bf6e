//! Micro-benchmarks of the routing work gopush does on every request: resolving the uid from the
//! request head (`UidResolver::next`, as the agent does) and picking the backend on the pool's Ketama ring
//! (`Router::route`), separately and together.
//!
//! `cargo bench --bench resolve_select` runs them; `benches/run.sh` does too and puts the numbers
//! in docs/BENCHMARKS.md. Each benchmark cycles through 1,024 different uids so that the ring
//! lookup and the cookie scan do not see one input over and over.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gopush::config::Config;
use gopush::routing::Router;
use gopush::uid::{Step, UidResolver};
use pingora::http::RequestHeader;
use std::hint::black_box;
use std::path::Path;

/// The sources of conf/local.yaml; pool `default` has 2 backends (the harness's setup), pool
/// `large` 16, to show how the ring lookup grows with the pool (it is a binary search). Nothing
/// connects to these addresses: the benchmark only builds and reads the rings.
const CONFIG: &str = r#"
listen: "127.0.0.1:6003"
uid:
  sources:
    - cookie: uid
    - query: uid
    - header: x-user-id
pools:
  default:
    backends: ["127.0.0.1:4000", "127.0.0.1:4001"]
  large:
    backends:
      - "127.0.0.1:5000"
      - "127.0.0.1:5001"
      - "127.0.0.1:5002"
      - "127.0.0.1:5003"
      - "127.0.0.1:5004"
      - "127.0.0.1:5005"
      - "127.0.0.1:5006"
      - "127.0.0.1:5007"
      - "127.0.0.1:5008"
      - "127.0.0.1:5009"
      - "127.0.0.1:5010"
      - "127.0.0.1:5011"
      - "127.0.0.1:5012"
      - "127.0.0.1:5013"
      - "127.0.0.1:5014"
      - "127.0.0.1:5015"
health_check: { kind: none }
"#;

/// Distinct inputs per benchmark (a power of two: the index wraps with a mask).
const N: usize = 1024;

fn request(path: &str, cookie: Option<&str>) -> RequestHeader {
    let mut req = RequestHeader::build("GET", path.as_bytes(), None).expect("request head");
    req.insert_header("Host", "localhost").expect("host header");
    req.insert_header("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)")
        .expect("user-agent header");
    if let Some(cookie) = cookie {
        req.insert_header("Cookie", cookie).expect("cookie header");
    }
    req
}

fn resolve_select(c: &mut Criterion) {
    let config = Config::from_str_named(CONFIG, Path::new("benches/resolve_select.rs"))
        .expect("benchmark configuration is valid");
    let resolver = UidResolver::build(&config.uid, config.dir()).expect("resolver");
    // Every backend healthy, no probing: the ring as the request path reads it.
    let router = Router::offline(&config).expect("benchmark rings build");

    // A polling request as a browser sends it: the uid cookie among others.
    let by_cookie: Vec<RequestHeader> = (0..N)
        .map(|i| {
            request(
                "/socket.io/?EIO=4&transport=polling&t=PfX1a2b",
                Some(&format!("_ga=GA1.1.1234567890; uid=u{i}; theme=dark")),
            )
        })
        .collect();
    // No cookie: the uid is found by the second source, the query.
    let by_query: Vec<RequestHeader> = (0..N)
        .map(|i| {
            request(
                &format!("/socket.io/?EIO=4&transport=polling&t=PfX1a2b&uid=u{i}"),
                None,
            )
        })
        .collect();
    let uids: Vec<String> = (0..N).map(|i| format!("u{i}")).collect();

    let mut g = c.benchmark_group("uid");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("resolve_cookie", |b| {
        b.iter(|| {
            i = (i + 1) & (N - 1);
            black_box(resolver.next(black_box(&by_cookie[i]), 0))
        })
    });
    g.bench_function("resolve_query", |b| {
        b.iter(|| {
            i = (i + 1) & (N - 1);
            black_box(resolver.next(black_box(&by_query[i]), 0))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("route_2_backends", |b| {
        b.iter(|| {
            i = (i + 1) & (N - 1);
            black_box(router.route(None, black_box(&uids[i])))
        })
    });
    g.bench_function("route_16_backends", |b| {
        b.iter(|| {
            i = (i + 1) & (N - 1);
            black_box(router.route(Some("large"), black_box(&uids[i])))
        })
    });
    g.finish();

    // What the agent does per request before it connects upstream: uid, then backend.
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("resolve_and_route", |b| {
        b.iter(|| {
            i = (i + 1) & (N - 1);
            let Ok(Step::Found(uid)) = resolver.next(black_box(&by_cookie[i]), 0) else {
                panic!("uid present");
            };
            let key = std::str::from_utf8(uid.ring_key()).expect("utf-8");
            black_box(router.route(None, key))
        })
    });
    g.finish();
}

criterion_group!(benches, resolve_select);
criterion_main!(benches);
