use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A small real HTTP/1.1 app on loopback: answers by the `cookie` header it gets, counts the
/// requests it served. `session=a` → 200 `x-uid: alice`; `session=j` → 200 JSON `{"uid": 7}`;
/// `session=bad` → 401; `session=boom` → 500; `session=slow` → never answers.
struct App {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn app() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                // Keep-alive: one request after the other on the connection (bounded).
                for _ in 0..100 {
                    let mut cookie = String::new();
                    let mut any = false;
                    while let Ok(Some(line)) = lines.next_line().await {
                        any = true;
                        if line.is_empty() {
                            break;
                        }
                        if let Some(v) = line.strip_prefix("cookie: ") {
                            cookie = v.to_string();
                        }
                    }
                    if !any {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let resp = match cookie.as_str() {
                        "session=a" => "HTTP/1.1 200 OK\r\nx-uid: alice\r\ncontent-length: 0\r\n\r\n".to_string(),
                        "session=j" => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"uid\": 7}".to_string(),
                        "session=bad" => "HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\nno".to_string(),
                        // The app's answer carries a user-controlled value unsanitised: a
                        // folded header or a second header line.
                        "session=fold" => "HTTP/1.1 200 OK\r\nx-uid: alice\r\n victim\r\ncontent-length: 0\r\n\r\n".to_string(),
                        "session=foldtab" => "HTTP/1.1 200 OK\r\nX-Uid : alice\r\n\tvictim\r\ncontent-length: 0\r\n\r\n".to_string(),
                        "session=twice" => "HTTP/1.1 200 OK\r\nx-uid: alice\r\nx-uid: victim\r\ncontent-length: 0\r\n\r\n".to_string(),
                        "session=otherfold" => "HTTP/1.1 200 OK\r\nx-uid: alice, bob\r\nx-note: a\r\n b\r\ncontent-length: 0\r\n\r\n".to_string(),
                        "session=empty" => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_string(),
                        "session=slow" => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        _ => "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".to_string(),
                    };
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    App { addr, hits }
}

fn source(addr: SocketAddr, extra: &str) -> CallbackSource {
    serde_yaml::from_str(&format!(
        "{{url: \"http://{addr}/whoami\", forward: [cookie, authorization]{extra}}}"
    ))
    .unwrap()
}

fn req(headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/socket.io/", None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

#[test]
fn urls_must_be_http_with_a_literal_address() {
    let u = parse_url("http://127.0.0.1:3000/whoami?x=1").unwrap();
    assert_eq!(u.addr, "127.0.0.1:3000".parse().unwrap());
    assert_eq!(u.path, "/whoami?x=1");
    assert_eq!(u.host, "127.0.0.1:3000");
    let u = parse_url("http://[::1]/").unwrap();
    assert_eq!(u.addr, "[::1]:80".parse().unwrap());
    assert!(parse_url("https://127.0.0.1/").is_err());
    assert!(parse_url("http://auth.local/")
        .unwrap_err()
        .contains("literal IP"));
    assert!(parse_url("not a url").is_err());
}

#[test]
fn config_shape_and_defaults() {
    let s = source("127.0.0.1:1".parse().unwrap(), "");
    assert_eq!(s.timeout, Duration::from_millis(500));
    assert_eq!(s.cache, Duration::from_secs(30));
    assert_eq!(s.on_error, 503);
    assert_eq!(s.uid_header, "x-uid");
    let e = serde_yaml::from_str::<CallbackSource>("{url: \"http://127.0.0.1/\", forward: []}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least one header"), "{e}");
    let e = serde_yaml::from_str::<CallbackSource>(
        "{url: \"http://127.0.0.1/\", forward: [cookie], on_error: 200}",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not an error status"), "{e}");
}

#[test]
fn credentials_are_the_exact_forwarded_headers() {
    let c = CallbackClient::new(&source("127.0.0.1:1".parse().unwrap(), ""));
    assert_eq!(c.credentials(&req(&[("x-other", "1")])), None);
    let a = c.credentials(&req(&[("cookie", "session=a")])).unwrap();
    let b = c.credentials(&req(&[("cookie", "session=b")])).unwrap();
    let a2 = c
        .credentials(&req(&[("cookie", "session=a"), ("x-other", "2")]))
        .unwrap();
    assert_ne!(a.key(), b.key());
    assert_eq!(
        a.key(),
        a2.key(),
        "headers that are not forwarded do not matter"
    );
    // The same bytes under another header are other credentials.
    let auth = c
        .credentials(&req(&[("authorization", "session=a")]))
        .unwrap();
    assert_ne!(a.key(), auth.key());
    // Two header lines are not one line holding both values.
    let two = c
        .credentials(&req(&[("cookie", "x"), ("cookie", "y")]))
        .unwrap();
    let one = c.credentials(&req(&[("cookie", "x, y")])).unwrap();
    let joined = c.credentials(&req(&[("cookie", "xy")])).unwrap();
    assert_ne!(one.key(), two.key());
    assert_ne!(joined.key(), two.key());
}

#[tokio::test]
async fn answers_are_cached_per_credential_and_never_across() {
    let app = app().await;
    let c = CallbackClient::new(&source(app.addr, ""));
    let a = c.credentials(&req(&[("cookie", "session=a")])).unwrap();
    let j = c.credentials(&req(&[("cookie", "session=j")])).unwrap();
    assert_eq!(c.ask(&a).await, Answer::Uid("alice".into()));
    assert_eq!(app.hits.load(Ordering::SeqCst), 1);
    assert_eq!(c.ask(&a).await, Answer::Uid("alice".into()));
    assert_eq!(
        app.hits.load(Ordering::SeqCst),
        1,
        "second ask is a cache hit"
    );
    assert_eq!(
        c.ask(&j).await,
        Answer::Uid("7".into()),
        "JSON body, numeric uid"
    );
    assert_eq!(
        app.hits.load(Ordering::SeqCst),
        2,
        "other credentials are asked"
    );

    // A hash collision must not hand out another credential's answer: store an entry for
    // `a`'s hash whose full key is someone else's.
    let cache = c.cache.as_ref().unwrap();
    cache.put(
        a.key(),
        Arc::new(Cached {
            key: b"someone else".to_vec(),
            answer: Answer::Uid("mallory".into()),
        }),
        Some(Duration::from_secs(60)),
    );
    assert_eq!(c.cached(&a), None);
    assert_eq!(c.ask(&a).await, Answer::Uid("alice".into()));
    assert_eq!(app.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn refusals_are_cached_errors_are_not() {
    let app = app().await;
    let c = CallbackClient::new(&source(app.addr, ""));
    let bad = c.credentials(&req(&[("cookie", "session=bad")])).unwrap();
    assert_eq!(c.ask(&bad).await, Answer::Rejected);
    assert_eq!(c.ask(&bad).await, Answer::Rejected);
    assert_eq!(app.hits.load(Ordering::SeqCst), 1);
    let boom = c.credentials(&req(&[("cookie", "session=boom")])).unwrap();
    assert_eq!(c.ask(&boom).await, Answer::Failed);
    assert_eq!(c.ask(&boom).await, Answer::Failed);
    assert_eq!(
        app.hits.load(Ordering::SeqCst),
        3,
        "failures are asked again"
    );
    let empty = c.credentials(&req(&[("cookie", "session=empty")])).unwrap();
    assert_eq!(c.ask(&empty).await, Answer::Failed, "200 without a uid");
}

#[tokio::test]
async fn no_cache_when_disabled() {
    let app = app().await;
    let c = CallbackClient::new(&source(app.addr, ", cache: 0s"));
    let a = c.credentials(&req(&[("cookie", "session=a")])).unwrap();
    for n in 1..=3 {
        assert_eq!(c.ask(&a).await, Answer::Uid("alice".into()));
        assert_eq!(app.hits.load(Ordering::SeqCst), n);
    }
}

#[tokio::test]
async fn a_silent_or_absent_app_fails_within_the_timeout() {
    let app = app().await;
    let c = CallbackClient::new(&source(app.addr, ", timeout: 200ms"));
    let slow = c.credentials(&req(&[("cookie", "session=slow")])).unwrap();
    let t = std::time::Instant::now();
    assert_eq!(c.ask(&slow).await, Answer::Failed);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Nothing listens on a port we just freed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = CallbackClient::new(&source(port, ", timeout: 300ms"));
    let a = c.credentials(&req(&[("cookie", "session=a")])).unwrap();
    assert_eq!(c.ask(&a).await, Answer::Failed);
}

#[tokio::test]
async fn folded_or_repeated_uid_headers_are_refused() {
    // Issue 11: `x-uid: alice` + `\r\n victim` (obs-fold) was accepted as `alice victim`, and
    // of two `x-uid` lines the first silently won.
    let app = app().await;
    let c = CallbackClient::new(&source(app.addr, ""));
    for session in ["session=fold", "session=foldtab", "session=twice"] {
        let creds = c.credentials(&req(&[("cookie", session)])).unwrap();
        assert_eq!(c.ask(&creds).await, Answer::Failed, "{session}");
        assert_eq!(c.cached(&creds), None, "{session}: a failure is not cached");
    }
    // One line is validated as before (a comma is part of the uid); a fold in another header
    // does not matter.
    let ok = c
        .credentials(&req(&[("cookie", "session=otherfold")]))
        .unwrap();
    assert_eq!(c.ask(&ok).await, Answer::Uid("alice, bob".into()));
}
