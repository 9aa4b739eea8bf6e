//! WebSocket upgrades through the agent: the pingora#946 regression (no tunnel torn down right
//! after its 101), a refused upgrade, and an idle tunnel that outlives Pingora's 60 s default.

mod common;

use common::{agent_config, Agent, EchoBackend, HttpConn, TempDir, REFUSED_UPGRADE_BODY};
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

/// What the WebSocket backend does with an accepted connection.
#[derive(Clone, Copy)]
enum WsMode {
    /// Send "hello" right after the handshake, then wait for the client to close.
    Hello,
    /// Echo every text or binary message.
    Echo,
}

/// A local tokio-tungstenite WebSocket server; aborted (with its connections) on drop.
struct WsBackend {
    port: u16,
    task: JoinHandle<()>,
}

impl WsBackend {
    async fn start(mode: WsMode) -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws backend");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let _ = stream.set_nodelay(true);
                            conns.spawn(serve_ws(stream, mode));
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        WsBackend { port, task }
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_ws(stream: tokio::net::TcpStream, mode: WsMode) {
    // Health-check probes connect and leave without a handshake: that is not an error here.
    let Ok(Ok(mut ws)) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::accept_async(stream),
    )
    .await
    else {
        return;
    };
    if let WsMode::Hello = mode {
        if ws.send(Message::text("hello")).await.is_err() {
            return;
        }
    }
    // Bounded by the connection: ends on close, error or EOF (an idle test waits 90 s).
    for _ in 0..1_000_000 {
        match ws.next().await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                if let WsMode::Echo = mode {
                    if ws.send(m).await.is_err() {
                        return;
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

fn start_agent(dir: &TempDir, backend_port: u16) -> Agent {
    let port = common::free_port();
    let yaml = agent_config(dir, port, &[("default", &[backend_port])], "", "");
    tokio::task::block_in_place(|| Agent::start(dir, "agent", port, &yaml))
}

/// One connect through the agent; `Ok(())` if the first frame is "hello". Close-phase problems
/// are returned separately in the second slot.
async fn connect_once(url: &str) -> (Result<(), String>, Option<String>) {
    let step = Duration::from_secs(10);
    let (mut ws, _) = match tokio::time::timeout(
        step,
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await
    {
        Err(_) => return (Err("connect timed out".into()), None),
        Ok(Err(e)) => return (Err(format!("connect error: {e}")), None),
        Ok(Ok(pair)) => pair,
    };
    let first = match tokio::time::timeout(step, ws.next()).await {
        Err(_) => Err("no first frame within 10 s".to_string()),
        Ok(None) => Err("stream ended before the first frame".into()),
        Ok(Some(Err(e))) => Err(format!("error before the first frame: {e}")),
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "hello" => Ok(()),
        Ok(Some(Ok(Message::Close(f)))) => Err(format!(
            "closed before the first frame: code {:?}",
            f.map(|f| u16::from(f.code))
        )),
        Ok(Some(Ok(other))) => Err(format!("unexpected first message {other:?}")),
    };
    if first.is_err() {
        return (first, None);
    }
    // Clean close: send ours, read until the server's close and the end of the stream.
    let mut close_problem = None;
    if let Err(e) = tokio::time::timeout(step, ws.close(None))
        .await
        .unwrap_or_else(|_| {
            Err(tokio_tungstenite::tungstenite::Error::Io(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "close send timed out"),
            ))
        })
    {
        close_problem = Some(format!("sending close: {e}"));
    }
    for _ in 0..100 {
        match tokio::time::timeout(step, ws.next()).await {
            Err(_) => {
                close_problem = Some("no end of stream within 10 s after close".into());
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed))) => break,
            Ok(Some(Err(e))) => {
                close_problem.get_or_insert(format!("during close: {e}"));
                break;
            }
        }
    }
    (first, close_problem)
}

/// Shortens an error message to its kind, for counting.
fn kind(msg: &str) -> String {
    msg.chars().take(90).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_946_ten_thousand_connects_all_get_the_first_frame() {
    const TASKS: usize = 4;
    const PER_TASK: usize = 2_500;
    let dir = TempDir::new("ws-946");
    let backend = WsBackend::start(WsMode::Hello).await;
    let agent = start_agent(&dir, backend.port);
    let port = agent.port;
    let failures: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Default::default();
    let close_problems: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Default::default();
    let started = Instant::now();
    let run = async {
        let mut tasks = JoinSet::new();
        for t in 0..TASKS {
            let failures = failures.clone();
            let close_problems = close_problems.clone();
            tasks.spawn(async move {
                let mut ok = 0usize;
                for i in 0..PER_TASK {
                    let url = format!("ws://127.0.0.1:{port}/ws?uid=u{}", t * PER_TASK + i);
                    let (first, close) = connect_once(&url).await;
                    match first {
                        Ok(()) => ok += 1,
                        Err(e) => *failures.lock().unwrap().entry(kind(&e)).or_default() += 1,
                    }
                    if let Some(c) = close {
                        *close_problems.lock().unwrap().entry(kind(&c)).or_default() += 1;
                    }
                }
                ok
            });
        }
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            ok += r.expect("client task panicked");
        }
        ok
    };
    let ok = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .unwrap_or_else(|_| panic!("10,000 connects did not finish within 240 s"));
    let elapsed = started.elapsed();
    let total = TASKS * PER_TASK;
    let failures = failures.lock().unwrap().clone();
    let close_problems = close_problems.lock().unwrap().clone();
    println!(
        "#946: {ok}/{total} connects got their first frame in {elapsed:.1?} ({:.0} connects/s); \
         failures {failures:?}; close-phase problems {close_problems:?}",
        total as f64 / elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty() && ok == total,
        "{} of {total} WebSocket connects lost the first frame: {failures:?}",
        total - ok
    );
    assert!(
        close_problems.is_empty(),
        "close handshakes went wrong: {close_problems:?}"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrade_reaches_the_client_and_the_connection_closes() {
    let dir = TempDir::new("ws-refused");
    let backend = EchoBackend::start().await;
    let agent = start_agent(&dir, backend.port);
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    for round in 0..3 {
        for path in ["/refuse?uid=alice", "/refuse-close?uid=bob"] {
            let mut conn = HttpConn::connect(agent.port).await.expect("connect");
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                conn.send_raw(&upgrade(path), false),
            )
            .await
            .unwrap_or_else(|_| panic!("{path}: no response within 10 s"))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(r.status, 400, "{path}: {}", r.text());
            assert_eq!(r.text(), REFUSED_UPGRADE_BODY, "{path}");
            let t = Instant::now();
            let extra = conn
                .wait_closed(Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("{path}: connection not closed: {e}"));
            assert!(
                extra.is_empty(),
                "{path}: bytes after the response: {extra:?}"
            );
            println!(
                "round {round} {path}: 400 then closed after {:?}",
                t.elapsed()
            );

            // The agent keeps serving.
            let r = common::get_once(agent.port, "/next?uid=carol", &[], Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("request after a refused upgrade failed: {e}"));
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echo().port, backend.port);
        }
    }
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websocket_survives_90_seconds() {
    let dir = TempDir::new("ws-idle");
    let backend = WsBackend::start(WsMode::Echo).await;
    let agent = start_agent(&dir, backend.port);
    let url = format!("ws://127.0.0.1:{}/ws?uid=idle-user", agent.port);
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url.as_str(), None, true),
    )
    .await
    .expect("connect timed out")
    .expect("connect failed");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("before")).await.expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no echo");
    assert!(
        matches!(&echo, Some(Ok(Message::Text(t))) if t.as_str() == "before"),
        "{echo:?}"
    );
    // 90 s without any traffic: nothing may arrive (a close or an error would).
    let started = Instant::now();
    if let Ok(ev) = tokio::time::timeout(Duration::from_secs(90), ws.next()).await {
        panic!(
            "the idle WebSocket saw {ev:?} after {:?} of silence",
            started.elapsed()
        );
    }
    ws.send(Message::text("after 90 s"))
        .await
        .expect("send after idle");
    let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no echo after idle");
    assert!(
        matches!(&echo, Some(Ok(Message::Text(t))) if t.as_str() == "after 90 s"),
        "after 90 s idle: {echo:?}"
    );
    let _ = ws.close(None).await;
    drop(agent);
}
