//! Issue 11, items 3 and 4: `limits.max_tunnels` holds under a burst of upgrades, and a backend
//! connection that carried an upgrade request is never reused (whatever the answer).
//!
//! The backends are raw tokio listeners on loopback; every wait is bounded.

mod common;

use common::{agent_config, Agent, HttpConn, Response, TempDir};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// An upgrade request for `uid` (raw, as a browser sends it).
fn upgrade_request(path: &str, cookie: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads one request head from `stream` (bytes after it stay in `buf`); `None` at EOF.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    for _ in 0..10_000 {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..i + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 1 << 16 {
            return None;
        }
    }
    None
}

/// The value of header `name` (lower-case) in a raw head.
fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A task that accepts connections on a loopback listener, each served by `serve`; aborted
/// (with its connections) on drop.
struct RawBackend {
    port: u16,
    task: JoinHandle<()>,
}

impl RawBackend {
    async fn start<F, Fut>(serve: F) -> RawBackend
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let mut next_id = 0;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let _ = stream.set_nodelay(true);
                            conns.spawn(serve(stream, next_id));
                            next_id += 1;
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        RawBackend { port, task }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_agent(dir: &TempDir, backend: u16, extra: &str) -> Agent {
    let port = common::free_port();
    let yaml = agent_config(dir, port, &[("default", &[backend])], extra, "");
    tokio::task::block_in_place(|| Agent::start(dir, "agent", port, &yaml))
}

// ------------------------------------------------------------------------------------------------
// Item 3: max_tunnels under a burst
// ------------------------------------------------------------------------------------------------

const BURST: usize = 100;

/// Issue 11 item 3. `max_tunnels: 2`, 100 upgrades at once, the backend answering 101 only once
/// every upgrade is accounted for (it arrived at the backend, or its client got a refusal), or
/// after 5 s: at most 2 tunnels open; the others are refused with 503 naming the limit. Before
/// the fix the cap was counted only at the 101, so all 100 reached the backend and got 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tunnels_holds_under_a_burst_of_upgrades() {
    let dir = TempDir::new("tunnel-burst");
    // Upgrades that reached the backend plus upgrades refused to their client.
    let (accounted, _) = watch::channel(0usize);
    let accounted = Arc::new(accounted);
    let arrived = Arc::new(AtomicUsize::new(0));
    let backend = {
        let (accounted, arrived) = (accounted.clone(), arrived.clone());
        RawBackend::start(move |mut stream, _| {
            let (accounted, arrived) = (accounted.clone(), arrived.clone());
            async move {
                let mut buf = Vec::new();
                let Some(head) = read_head(&mut stream, &mut buf).await else {
                    return; // a health-check probe
                };
                if head_value(&head, "upgrade").is_none() {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                        .await;
                    return;
                }
                arrived.fetch_add(1, Ordering::SeqCst);
                accounted.send_modify(|n| *n += 1);
                let mut gate = accounted.subscribe();
                // The delayed answer is the condition under test; the gate only shortens it.
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    gate.wait_for(|n| *n >= BURST),
                )
                .await;
                let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                          Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if stream.write_all(ok.as_bytes()).await.is_err() {
                    return;
                }
                // The tunnel: hold it until the agent closes it.
                let mut sink = [0u8; 1024];
                for _ in 0..100_000 {
                    match stream.read(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            }
        })
        .await
    };
    let agent = start_agent(&dir, backend.port, "limits:\n  max_tunnels: 2\n");

    let mut clients = JoinSet::new();
    for i in 0..BURST {
        let (port, accounted) = (agent.port, accounted.clone());
        clients.spawn(async move {
            let mut conn = HttpConn::connect(port).await?;
            let req = upgrade_request(&format!("/ws?n={i}"), &format!("uid=user{i}"));
            let r = tokio::time::timeout(Duration::from_secs(15), conn.send_raw(&req, false))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in 15 s"))??;
            if r.status != 101 {
                accounted.send_modify(|n| *n += 1);
            }
            // A 101's connection (the tunnel) is kept open until every client has its answer.
            Ok::<(Response, HttpConn), io::Error>((r, conn))
        });
    }
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut tunnels = Vec::new();
    while let Some(joined) = clients.join_next().await {
        let (r, conn) = joined
            .expect("client task")
            .unwrap_or_else(|e| panic!("upgrade failed: {e}"));
        *statuses.entry(r.status).or_default() += 1;
        match r.status {
            101 => tunnels.push(conn),
            503 => assert!(
                r.text().contains("limits.max_tunnels"),
                "503 body does not name the limit: {:?}",
                r.text()
            ),
            other => panic!("unexpected status {other}: {:?}", r.text()),
        }
    }
    println!(
        "statuses {statuses:?}, upgrades at the backend {}",
        arrived.load(Ordering::SeqCst)
    );
    assert_eq!(
        tunnels.len(),
        2,
        "{} tunnels opened against max_tunnels 2 ({statuses:?})",
        tunnels.len()
    );
    assert_eq!(statuses.get(&503), Some(&(BURST - 2)), "{statuses:?}");
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        2,
        "refused upgrades reached the backend"
    );

    // Closing the tunnels gives their slots back.
    drop(tunnels);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = 0;
    for attempt in 0..200 {
        let mut conn = HttpConn::connect(agent.port).await.expect("connect");
        let req = upgrade_request("/ws?again", &format!("uid=again{attempt}"));
        let r = tokio::time::timeout(Duration::from_secs(10), conn.send_raw(&req, false))
            .await
            .expect("no answer within 10 s")
            .expect("upgrade after the burst");
        last = r.status;
        if r.status == 101 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        last, 101,
        "no tunnel slot came back after the tunnels closed"
    );
    drop(agent);
}

// ------------------------------------------------------------------------------------------------
// Item 4: no reuse of a backend connection after a refused upgrade
// ------------------------------------------------------------------------------------------------

/// What the backend saw on one connection.
#[derive(Default, Debug, Clone)]
struct Seen {
    /// Request lines with their `Cookie`, in arrival order.
    requests: Vec<(String, String)>,
    closed: bool,
}

/// Issue 11 item 4. The backend refuses an upgrade with a framed `403` (no `Connection: close`)
/// and, like an upgrade handler that still owns the socket, never answers anything else on that
/// connection. The next user's request must go to a new backend connection and be answered at
/// once. Before the fix Pingora pooled the connection and wrote bob's request (with his cookie)
/// into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrade_connection_is_not_reused() {
    let dir = TempDir::new("tunnel-reuse");
    let seen: Arc<Mutex<BTreeMap<usize, Seen>>> = Arc::default();
    let backend = {
        let seen = seen.clone();
        RawBackend::start(move |mut stream, id| {
            let seen = seen.clone();
            async move {
                let mut buf = Vec::new();
                let mut owned_by_upgrade = false;
                for _ in 0..10_000 {
                    let Some(head) = read_head(&mut stream, &mut buf).await else {
                        break;
                    };
                    let line = head.lines().next().unwrap_or("").to_string();
                    let cookie = head_value(&head, "cookie").unwrap_or("").to_string();
                    if let Ok(mut s) = seen.lock() {
                        s.entry(id).or_default().requests.push((line, cookie));
                    }
                    if owned_by_upgrade {
                        continue; // swallowed by the "upgrade handler"
                    }
                    let answer: &[u8] = if head_value(&head, "upgrade").is_some() {
                        owned_by_upgrade = true;
                        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
                    };
                    if stream.write_all(answer).await.is_err() {
                        break;
                    }
                }
                if let Ok(mut s) = seen.lock() {
                    s.entry(id).or_default().closed = true;
                }
            }
        })
        .await
    };
    let agent = start_agent(&dir, backend.port, "");
    // As a browser sends it: the #946 guard is in place, and the agent closes the client's
    // connection after the refusal; bob comes on a new one.
    let plain = upgrade_request("/ws-0", "uid=alice");
    refused_then_next(&agent, &seen, 0, &plain).await;
    // Framed by the client (`Content-Length: 0`): no guard, the request is complete at once and
    // the client's connection stays open, as one a front proxy shares between users does; bob's
    // request follows on it (HTTP/1.1 orders it after the agent is done with the upgrade).
    let framed =
        upgrade_request("/ws-1", "uid=alice").replace("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n");
    refused_then_next(&agent, &seen, 1, &framed).await;
    drop(agent);
}

/// alice's upgrade `/ws-N` is refused; then bob's `GET /next-N` (on the same client connection
/// if the agent keeps it open, else a new one) must reach the backend on a new connection and be
/// answered at once; the refused upgrade's backend connection is closed.
async fn refused_then_next(
    agent: &Agent,
    seen: &Mutex<BTreeMap<usize, Seen>>,
    n: usize,
    upgrade: &str,
) {
    let mut alice = HttpConn::connect(agent.port).await.expect("connect");
    let r = tokio::time::timeout(Duration::from_secs(10), alice.send_raw(upgrade, false))
        .await
        .expect("no answer to the upgrade within 10 s")
        .expect("upgrade");
    assert_eq!((r.status, r.text().as_str()), (403, "no\n"), "round {n}");
    let mut bob = if r.closes() {
        // Pingora releases (or closes) the backend connection before it closes the client's.
        alice
            .wait_closed(Duration::from_secs(5))
            .await
            .expect("the refused upgrade's connection closes");
        HttpConn::connect(agent.port).await.expect("connect")
    } else {
        alice
    };

    // bob's ordinary request.
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        bob.get(&format!("/next-{n}"), &[("Cookie", "uid=bob")]),
    )
    .await;
    let seen_now = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let r = r
        .unwrap_or_else(|_| {
            panic!("round {n}: bob got no answer within 5 s; backend saw {seen_now:?}")
        })
        .expect("bob's request");
    let took = t.elapsed();
    println!(
        "round {n}: bob: {} after {took:?}; backend saw {seen_now:?}",
        r.status
    );
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"), "round {n}");
    assert!(
        took < Duration::from_secs(2),
        "round {n}: bob waited {took:?}"
    );

    let on = |path: &str| -> Vec<usize> {
        seen_now
            .iter()
            .filter(|(_, s)| s.requests.iter().any(|(line, _)| line.contains(path)))
            .map(|(id, _)| *id)
            .collect()
    };
    let (upgrade_conn, get_conn) = (on(&format!("/ws-{n}")), on(&format!("/next-{n}")));
    assert_eq!(upgrade_conn.len(), 1, "round {n}: {seen_now:?}");
    assert_eq!(get_conn.len(), 1, "round {n}: {seen_now:?}");
    assert_ne!(
        upgrade_conn, get_conn,
        "round {n}: bob's request was written into the refused upgrade's connection: {seen_now:?}"
    );
    // (The upgrade may ride a pooled connection; nothing may follow it there.)
    let last = seen_now[&upgrade_conn[0]].requests.last();
    assert!(
        last.is_some_and(|(line, _)| line.contains(&format!("/ws-{n}"))),
        "round {n}: a request followed the upgrade on its connection: {seen_now:?}"
    );

    // The agent closed that backend connection instead of pooling it.
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..500 {
        let closed = seen
            .lock()
            .map(|s| s.get(&upgrade_conn[0]).is_some_and(|c| c.closed))
            .unwrap_or(false);
        if closed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "round {n}: the refused upgrade's backend connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
