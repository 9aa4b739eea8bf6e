//! Graceful binary upgrade: `gopush run -u` takes the listening socket over from a running
//! gopush (SIGQUIT), and clients hammering the port see no failed request.
//!
//! Pingora's order (pingora-core `server/mod.rs`, `server/transfer_fd`): the new process, started
//! with `-u`, binds `upgrade_sock` and waits (about 5 s) for the fds; the old one, on SIGQUIT,
//! connects to that socket and sends its listening fds, keeps accepting for 5 s, then stops
//! listening, waits `grace_period_seconds` for open requests, and gives its runtimes
//! `graceful_shutdown_timeout_seconds` before it exits.

mod common;

use common::{agent_config, spawn_gopush, wait_listening, EchoBackend, HttpConn, TempDir};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Phases of the run, for counting.
const A_ONLY: usize = 0;
const UPGRADING: usize = 1;
const B_ONLY: usize = 2;
const PHASES: [&str; 3] = ["A only", "A and B (upgrade)", "B only"];

#[derive(Default)]
struct Tally {
    ok: [AtomicU64; 3],
    failures: Mutex<Vec<String>>,
    /// New connections the old process accepted but dropped unread at its shutdown broadcast
    /// (a Pingora 0.9.1 race no `ProxyHttp` hook can reach; see docs/RELIABILITY.md). Counted
    /// apart, and bounded, so any other failure still fails the test.
    dropped_unread: Mutex<Vec<(Duration, String)>>,
}

impl Tally {
    fn ok_in(&self, phase: usize) -> u64 {
        self.ok[phase].load(Ordering::Relaxed)
    }
}

const KEEPALIVE_WORKERS: usize = 10;
const FRESH_WORKERS: usize = 10;
const REQ_LIMIT: Duration = Duration::from_secs(10);
/// Hard bound of the whole load (the test itself needs about 15 s).
const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// One keep-alive client: requests back to back on one connection, reconnecting only when the
/// server announced `Connection: close`.
async fn keepalive_worker(
    id: usize,
    port: u16,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    t0: Instant,
) {
    let mut conn: Option<HttpConn> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < LOAD_LIMIT {
        n += 1;
        let p = phase.load(Ordering::Relaxed);
        let reused = conn.is_some();
        let fut = async {
            if conn.is_none() {
                conn = Some(HttpConn::connect(port).await?);
            }
            let c = conn.as_mut().expect("connected");
            c.get(&format!("/ka?uid=ka{id}-{n}"), &[]).await
        };
        let result = tokio::time::timeout(REQ_LIMIT, fut)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("timed out")));
        match result {
            Ok(r) if r.status == 200 => {
                tally.ok[p.max(phase.load(Ordering::Relaxed))].fetch_add(1, Ordering::Relaxed);
                if r.closes() {
                    conn = None;
                }
            }
            Ok(r) => {
                tally.failures.lock().unwrap().push(format!(
                    "{:?} keep-alive #{id} ({}): status {} {}",
                    t0.elapsed(),
                    PHASES[p],
                    r.status,
                    r.text()
                ));
                conn = None;
            }
            Err(e) => {
                tally.failures.lock().unwrap().push(format!(
                    "{:?} keep-alive #{id} ({}, {} connection): {e}",
                    t0.elapsed(),
                    PHASES[p],
                    if reused { "reused" } else { "new" }
                ));
                conn = None;
            }
        }
    }
}

/// One client opening a new connection per request.
async fn fresh_worker(
    id: usize,
    port: u16,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    t0: Instant,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < LOAD_LIMIT {
        n += 1;
        let p = phase.load(Ordering::Relaxed);
        let path = format!("/fresh?uid=fr{id}-{n}");
        match common::get_once(port, &path, &[("connection", "close")], REQ_LIMIT).await {
            Ok(r) if r.status == 200 => {
                tally.ok[p.max(phase.load(Ordering::Relaxed))].fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => tally.failures.lock().unwrap().push(format!(
                "{:?} fresh #{id} ({}): status {} {}",
                t0.elapsed(),
                PHASES[p],
                r.status,
                r.text()
            )),
            // Closed unread (no data had arrived) or reset (the request arrived after the accept
            // but was never read): the same race, two shapes.
            Err(e)
                if e.to_string().contains("before any response byte")
                    || e.to_string().contains("Connection reset by peer") =>
            {
                let at = t0.elapsed();
                let what = format!("{at:?} fresh #{id} ({}): {e}", PHASES[p]);
                tally.dropped_unread.lock().unwrap().push((at, what));
            }
            Err(e) => tally.failures.lock().unwrap().push(format!(
                "{:?} fresh #{id} ({}): {e}",
                t0.elapsed(),
                PHASES[p]
            )),
        }
    }
}

/// Watches a growing log file for `needle` (reading only what was appended since the last look,
/// every 10 ms) and returns `t0.elapsed()` at the first look that found it; `None` after `limit`.
async fn first_seen(
    path: std::path::PathBuf,
    needle: &'static str,
    t0: Instant,
    limit: Duration,
) -> Option<Duration> {
    use std::io::{Read, Seek, SeekFrom};
    let deadline = Instant::now() + limit;
    let mut offset = 0u64;
    let mut carry = String::new();
    while Instant::now() < deadline {
        if let Ok(mut f) = std::fs::File::open(&path) {
            let mut buf = Vec::new();
            if f.seek(SeekFrom::Start(offset)).is_ok() && f.read_to_end(&mut buf).is_ok() {
                offset += buf.len() as u64;
                carry.push_str(&String::from_utf8_lossy(&buf));
                if carry.contains(needle) {
                    return Some(t0.elapsed());
                }
                // Keep a needle's length, in case it is split between two reads.
                let keep = carry.len().saturating_sub(needle.len());
                let keep = (keep..=carry.len())
                    .find(|i| carry.is_char_boundary(*i))
                    .unwrap_or(carry.len());
                carry.drain(..keep);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `limit`.
async fn poll_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: too many polls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_loses_no_request() {
    let dir = TempDir::new("upgrade");
    let backend = EchoBackend::start().await;
    let port = common::free_port();
    let yaml = agent_config(
        &dir,
        port,
        &[("default", &[backend.port])],
        "",
        "  grace_period_seconds: 2\n  graceful_shutdown_timeout_seconds: 1\n",
    );
    let conf = dir.write("agent.yaml", &yaml);
    let conf = conf.to_string_lossy().into_owned();
    let sock = dir.join("upgrade.sock");

    let mut a = spawn_gopush(&["run", "-c", &conf], &dir.join("a.log"), &[]);
    tokio::task::block_in_place(|| wait_listening(&mut a, port, Duration::from_secs(20)));

    let t0 = Instant::now();
    let phase = Arc::new(AtomicUsize::new(A_ONLY));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = tokio::task::JoinSet::new();
    for id in 0..KEEPALIVE_WORKERS {
        workers.spawn(keepalive_worker(
            id,
            port,
            phase.clone(),
            stop.clone(),
            tally.clone(),
            t0,
        ));
    }
    for id in 0..FRESH_WORKERS {
        workers.spawn(fresh_worker(
            id,
            port,
            phase.clone(),
            stop.clone(),
            tally.clone(),
            t0,
        ));
    }
    poll_until(Duration::from_secs(20), "200 requests served by A", || {
        tally.ok_in(A_ONLY) >= 200
    })
    .await;

    // B waits for the fds on the upgrade socket; only then is A told to hand them over.
    let mut b = spawn_gopush(&["run", "-u", "-c", &conf], &dir.join("b.log"), &[]);
    let mut b_exited = None;
    poll_until(
        Duration::from_secs(10),
        "B created the upgrade socket",
        || {
            b_exited = b.try_wait();
            sock.exists() || b_exited.is_some()
        },
    )
    .await;
    assert!(
        b_exited.is_none(),
        "B exited early ({b_exited:?}); log:\n{}",
        b.log_text()
    );
    phase.store(UPGRADING, Ordering::Relaxed);
    // Pingora logs this in A when, 5 s after handing the listening sockets over, it tells its
    // services to stop: the one instant the accept/shutdown race can drop a new connection.
    let broadcast = tokio::spawn(first_seen(
        dir.join("a.log"),
        "Broadcasting graceful shutdown",
        t0,
        Duration::from_secs(40),
    ));
    let quit_at = t0.elapsed();
    a.signal("QUIT");

    let mut a_status = None;
    poll_until(Duration::from_secs(30), "A exited after SIGQUIT", || {
        a_status = a.try_wait();
        a_status.is_some()
    })
    .await;
    let a_exit_at = t0.elapsed();
    phase.store(B_ONLY, Ordering::Relaxed);
    let broadcast_at = broadcast.await.expect("log watcher");
    // One more second of B-only traffic (and at least 100 requests).
    let b_only_from = Instant::now();
    poll_until(Duration::from_secs(20), "B-only traffic", || {
        b_only_from.elapsed() >= Duration::from_secs(1) && tally.ok_in(B_ONLY) >= 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let joined = tokio::time::timeout(REQ_LIMIT * 2, async {
        while let Some(r) = workers.join_next().await {
            r.expect("worker panicked");
        }
    })
    .await;
    assert!(joined.is_ok(), "workers did not stop");

    let failures = tally.failures.lock().unwrap().clone();
    let dropped_unread = tally.dropped_unread.lock().unwrap().clone();
    let counts: Vec<u64> = (0..3).map(|p| tally.ok_in(p)).collect();
    println!(
        "SIGQUIT at {quit_at:?}, shutdown broadcast seen at {broadcast_at:?}, A exited at {a_exit_at:?} ({a_status:?}); served: \
         A only {}, during the upgrade {}, B only {}; failures: {}",
        counts[A_ONLY],
        counts[UPGRADING],
        counts[B_ONLY],
        failures.len()
    );
    for f in failures.iter().take(30) {
        println!("  failure: {f}");
    }
    for (_, f) in &dropped_unread {
        println!("  new connection dropped unread by the old process (Pingora race): {f}");
    }
    let b_alive = b.try_wait().is_none();
    let a_log = a.log_text();
    let b_log = b.log_text();
    assert!(b_alive, "B is not running after the upgrade; log:\n{b_log}");
    assert!(
        a_status.is_some_and(|s| s.success()),
        "A did not exit cleanly: {a_status:?}; log:\n{a_log}"
    );
    assert!(
        failures.is_empty(),
        "{} requests failed across the upgrade (first: {:?})\nA log tail:\n{}\nB log tail:\n{}",
        failures.len(),
        failures.first(),
        tail(&a_log, 15),
        tail(&b_log, 15)
    );
    // The race hits only connections the old process had accepted but not read at the one
    // instant it broadcast its shutdown: at most one per fresh-connection worker, all together.
    let (first, last) = (
        dropped_unread.iter().map(|d| d.0).min(),
        dropped_unread.iter().map(|d| d.0).max(),
    );
    assert!(
        dropped_unread.len() <= FRESH_WORKERS
            && first.zip(last).is_none_or(|(f, l)| l - f < Duration::from_millis(100)),
        "{} new connections dropped unread, not at one instant: more than the accept/shutdown race explains",
        dropped_unread.len()
    );
    // ... and that instant is the shutdown broadcast, nowhere else: a reset in any other phase
    // (or long before or after it) is a failure. (Both times are taken by this process, a little
    // late under load: 1 s either side.)
    for (at, what) in &dropped_unread {
        let bc = broadcast_at.unwrap_or_else(|| {
            panic!(
                "a new connection was dropped ({what}), but A never logged its shutdown broadcast"
            )
        });
        assert!(
            at.abs_diff(bc) <= Duration::from_secs(1),
            "a new connection dropped unread at {at:?}, not at A's shutdown broadcast ({bc:?}): {what}"
        );
    }
    assert!(
        counts.iter().all(|c| *c > 0),
        "a phase served nothing: {counts:?}"
    );

    // B alone still serves after A is gone.
    let r = common::get_once(port, "/final?uid=alice", &[], REQ_LIMIT)
        .await
        .expect("request to B after the upgrade");
    assert_eq!(r.status, 200);
    drop(b);
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("gopush::access"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
