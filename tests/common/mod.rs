//! Shared helpers for the integration tests: temp dirs, free ports, the `gopush` child process
//! (killed on drop), bounded command runs, a raw HTTP/1.1 echo backend and a raw HTTP/1.1 client.
//!
//! Everything is loopback-only and bounded: every wait has an attempt count and a deadline.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Path of the binary under test.
pub const GOPUSH: &str = env!("CARGO_BIN_EXE_gopush");

/// The crate root (for `conf/*.yaml`).
pub fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------------------
// Temp dirs and ports
// ------------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/gopush-it-<tag>-<pid>-<nanos>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "gopush-it-{tag}-{}-{nanos}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Writes `text` to `rel` inside the directory and returns its path.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A loopback port that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// `n` distinct free ports (all held while choosing, so they differ).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<_> = (0..n)
        .map(|_| StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    ls.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Child processes
// ------------------------------------------------------------------------------------------------

/// A child process that is killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl ChildGuard {
    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `Some(status)` once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (polling) at most `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        for _ in 0..100_000 {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Its log so far (stdout + stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`QUIT`, `TERM`, ...) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `gopush ARGS`, stdout and stderr appended to `log`.
pub fn spawn_gopush(args: &[&str], log: &Path, envs: &[(&str, &str)]) -> ChildGuard {
    let out = File::create(log).expect("create log file");
    let err = out.try_clone().expect("clone log file");
    let mut cmd = Command::new(GOPUSH);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .env("RUST_LOG", "info");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn gopush");
    ChildGuard {
        child: Some(child),
        log: log.to_path_buf(),
    }
}

/// What a finished short-lived command printed.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Exit code 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `gopush ARGS` to completion within `limit` (killed and panics otherwise).
pub fn run_gopush(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(GOPUSH);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("GOPUSH_ENV");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn gopush");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gopush {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        code: status.code(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

// ------------------------------------------------------------------------------------------------
// The agent
// ------------------------------------------------------------------------------------------------

/// A YAML configuration for a test agent on `127.0.0.1:port` with the given pools (`name`,
/// backend ports). `extra` is appended verbatim (e.g. `health_check: ...`). The server section
/// keeps the upgrade socket and pid file inside `dir`.
pub fn agent_config(
    dir: &TempDir,
    port: u16,
    pools: &[(&str, &[u16])],
    extra: &str,
    server_extra: &str,
) -> String {
    let mut y = format!("listen: \"127.0.0.1:{port}\"\n");
    y.push_str(
        "uid:\n  sources:\n    - cookie: uid\n    - query: uid\n    - header: x-user-id\n  \
         forward: {header: x-gopush-uid, query: uid}\n",
    );
    y.push_str("pools:\n");
    for (name, ports) in pools {
        let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        y.push_str(&format!("  {name}:\n    backends: [{}]\n", list.join(", ")));
    }
    y.push_str(extra);
    if !extra.is_empty() && !extra.ends_with('\n') {
        y.push('\n');
    }
    if !extra.contains("admin:") {
        // Each agent its own admin listener: agents of tests running side by side would share
        // the default 127.0.0.1:6004.
        y.push_str(&format!(
            "admin: {{listen: \"127.0.0.1:{}\"}}\n",
            free_port()
        ));
    }
    y.push_str(&format!(
        "server:\n  threads: 2\n  upgrade_sock: {}\n  pid_file: {}\n",
        dir.join("upgrade.sock").display(),
        dir.join("gopush.pid").display()
    ));
    y.push_str(server_extra);
    y
}

/// A running `gopush run` on `port`.
pub struct Agent {
    /// The process (killed on drop).
    pub child: ChildGuard,
    /// The listen port.
    pub port: u16,
}

impl Agent {
    /// Writes `yaml` to `dir/NAME.yaml`, starts `gopush run -c FILE` and waits until the port
    /// accepts connections.
    pub fn start(dir: &TempDir, name: &str, port: u16, yaml: &str) -> Agent {
        let conf = dir.write(&format!("{name}.yaml"), yaml);
        let log = dir.join(&format!("{name}.log"));
        let conf_s = conf.to_string_lossy().into_owned();
        let mut child = spawn_gopush(&["run", "-c", &conf_s], &log, &[]);
        wait_listening(&mut child, port, Duration::from_secs(20));
        Agent { child, port }
    }
}

/// Polls (bounded) until `127.0.0.1:port` accepts a TCP connection; panics with the child's log
/// if the child exits or the deadline passes.
pub fn wait_listening(child: &mut ChildGuard, port: u16, limit: Duration) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + limit;
    for _ in 0..10_000 {
        if let Some(status) = child.try_wait() {
            panic!(
                "gopush exited ({status}) before listening on {port}; log:\n{}",
                child.log_text()
            );
        }
        if StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "gopush not listening on {port} after {limit:?}; log:\n{}",
        child.log_text()
    );
}

// ------------------------------------------------------------------------------------------------
// Raw HTTP/1.1: parsing shared by the client and the backend
// ------------------------------------------------------------------------------------------------

/// Reads from `stream` into `buf` until `buf` holds a complete head (`\r\n\r\n`); returns the
/// head's length including the terminator, or `None` on a clean EOF before any byte.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    for _ in 0..100_000 {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        if buf.len() > 1 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF inside a head after {} bytes", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Err(io::Error::other("read_head: too many reads"))
}

/// Makes sure `buf` holds at least `n` bytes.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    for _ in 0..1_000_000 {
        if buf.len() >= n {
            return Ok(());
        }
        let mut chunk = [0u8; 8192];
        let got = stream.read(&mut chunk).await?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF inside a body: have {} of {n} bytes", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..got]);
    }
    Err(io::Error::other("fill: too many reads"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits a head into its first line and `(lower-case name, value)` pairs.
fn parse_head(head: &[u8]) -> io::Result<(String, Vec<(String, String)>)> {
    let text = std::str::from_utf8(head)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once(':').ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header line {line:?}"),
            )
        })?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok((first, headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

// ------------------------------------------------------------------------------------------------
// Raw HTTP/1.1 client
// ------------------------------------------------------------------------------------------------

/// One parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Reason phrase as sent.
    pub reason: String,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Body (chunked decoded).
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The server said it will close the connection.
    pub fn closes(&self) -> bool {
        has_token(&self.headers, "connection", "close")
    }

    /// The echo backend's JSON (panics if the body is not it).
    pub fn echo(&self) -> Echo {
        Echo::parse(&self.body).unwrap_or_else(|| {
            panic!(
                "not an echo body (status {}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// A raw keep-alive HTTP/1.1 connection.
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    /// Connects to `127.0.0.1:port`.
    pub async fn connect(port: u16) -> io::Result<HttpConn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends a `GET path` with the given extra headers (a `Host` is added) and reads the response.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
        self.send_raw(&get_request(path, headers), false).await
    }

    /// Sends raw request bytes and reads one response (`head_only`: the request was a HEAD).
    pub async fn send_raw(&mut self, raw: &str, head_only: bool) -> io::Result<Response> {
        self.stream.write_all(raw.as_bytes()).await?;
        self.read_response(head_only).await
    }

    /// Reads one response.
    pub async fn read_response(&mut self, head_only: bool) -> io::Result<Response> {
        let Some(head_len) = read_head(&mut self.stream, &mut self.buf).await? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before any response byte",
            ));
        };
        let head: Vec<u8> = self.buf.drain(..head_len).collect();
        let (first, headers) = parse_head(&head)?;
        let mut parts = first.splitn(3, ' ');
        let _version = parts.next();
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {first:?}"),
            )
        })?;
        let reason = parts.next().unwrap_or("").to_string();
        let body = if head_only || status / 100 == 1 || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(cl) = header(&headers, "content-length") {
            let n: usize = cl
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
            fill(&mut self.stream, &mut self.buf, n).await?;
            self.buf.drain(..n).collect()
        } else if has_token(&headers, "transfer-encoding", "chunked") {
            self.read_chunked().await?
        } else {
            // Delimited by EOF.
            let mut rest = std::mem::take(&mut self.buf);
            self.stream.read_to_end(&mut rest).await?;
            rest
        };
        Ok(Response {
            status,
            reason,
            headers,
            body,
        })
    }

    async fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        for _ in 0..100_000 {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                let want = self.buf.len() + 1;
                fill(&mut self.stream, &mut self.buf, want).await?;
            };
            let line: Vec<u8> = self.buf.drain(..line_end + 2).collect();
            let size_txt = String::from_utf8_lossy(&line[..line_end]).to_string();
            let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {size_txt:?}"),
                )
            })?;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                for _ in 0..1000 {
                    let end = loop {
                        if let Some(i) = find(&self.buf, b"\r\n") {
                            break i;
                        }
                        let want = self.buf.len() + 1;
                        fill(&mut self.stream, &mut self.buf, want).await?;
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                }
                return Err(io::Error::other("too many trailers"));
            }
            fill(&mut self.stream, &mut self.buf, size + 2).await?;
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
        Err(io::Error::other("too many chunks"))
    }

    /// Waits (at most `limit`) for the server to close the connection; returns the bytes that
    /// arrived before the EOF, or an error on timeout.
    pub async fn wait_closed(&mut self, limit: Duration) -> io::Result<Vec<u8>> {
        let mut rest = std::mem::take(&mut self.buf);
        match tokio::time::timeout(limit, self.stream.read_to_end(&mut rest)).await {
            Ok(Ok(_)) => Ok(rest),
            // A reset is a close too.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ok(rest),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connection still open after {limit:?}"),
            )),
        }
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// A raw `GET` request with `Host` and the extra headers.
pub fn get_request(path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// One request on a fresh connection, bounded by `limit`.
pub async fn get_once(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    limit: Duration,
) -> io::Result<Response> {
    let fut = async {
        let mut c = HttpConn::connect(port).await?;
        c.get(path, headers).await
    };
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")))
}

// ------------------------------------------------------------------------------------------------
// Echo backend
// ------------------------------------------------------------------------------------------------

/// What the echo backend saw, as it reports it in its JSON body.
#[derive(Debug, Clone)]
pub struct Echo {
    /// The backend's own port.
    pub port: u16,
    /// Request method.
    pub method: String,
    /// Request target as received.
    pub uri: String,
    /// Headers as received (lower-case names, in order, duplicates kept).
    pub headers: Vec<(String, String)>,
}

impl Echo {
    fn parse(body: &[u8]) -> Option<Echo> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let headers = v
            .get("headers")?
            .as_array()?
            .iter()
            .filter_map(|p| {
                let p = p.as_array()?;
                Some((
                    p.first()?.as_str()?.to_string(),
                    p.get(1)?.as_str()?.to_string(),
                ))
            })
            .collect();
        Some(Echo {
            port: u16::try_from(v.get("port")?.as_u64()?).ok()?,
            method: v.get("method")?.as_str()?.to_string(),
            uri: v.get("uri")?.as_str()?.to_string(),
            headers,
        })
    }

    /// Every value of a header.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every value of a raw query parameter.
    pub fn query_all(&self, name: &str) -> Vec<String> {
        let q = self.uri.split_once('?').map_or("", |(_, q)| q);
        q.split('&')
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then(|| v.to_string())
            })
            .collect()
    }
}

/// A raw HTTP/1.1 backend answering every request with [`Echo`] JSON (keep-alive).
///
/// Special requests: `GET /delay/MS...` answers after MS milliseconds; a request carrying
/// `Upgrade:` is refused with `400` and a body (`/refuse-close...` also closes the connection).
/// Dropping or [`EchoBackend::stop`]ping it closes the listener and every open connection.
pub struct EchoBackend {
    /// Its port.
    pub port: u16,
    task: Option<JoinHandle<()>>,
}

/// Body of the backend's refusal of an upgrade.
pub const REFUSED_UPGRADE_BODY: &str = "backend: no websocket here\n";

impl EchoBackend {
    /// Starts on a free port.
    pub async fn start() -> EchoBackend {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve(l)
    }

    /// Starts on `port` (retrying the bind a bounded number of times: the port was just freed).
    pub async fn start_on(port: u16) -> EchoBackend {
        let mut last = None;
        for _ in 0..100 {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => return Self::serve(l),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot bind backend on {port}: {last:?}");
    }

    fn serve(listener: TcpListener) -> EchoBackend {
        let port = listener.local_addr().expect("local addr").port();
        let task = tokio::spawn(async move {
            // Dropping this future (abort) drops the JoinSet, which aborts every connection.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            conns.spawn(serve_conn(stream, port));
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        EchoBackend {
            port,
            task: Some(task),
        }
    }

    /// Closes the listener and every connection; returns once the listener is gone.
    pub async fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn serve_conn(mut stream: TcpStream, port: u16) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    for _ in 0..1_000_000 {
        let head_len = match read_head(&mut stream, &mut buf).await {
            Ok(Some(n)) => n,
            _ => return,
        };
        let head: Vec<u8> = buf.drain(..head_len).collect();
        let Ok((first, headers)) = parse_head(&head) else {
            return;
        };
        let mut parts = first.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let uri = parts.next().unwrap_or("").to_string();
        // Discard a framed body.
        if let Some(n) = header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok()) {
            if fill(&mut stream, &mut buf, n).await.is_err() {
                return;
            }
            buf.drain(..n);
        } else if has_token(&headers, "transfer-encoding", "chunked") {
            let _ = stream
                .write_all(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            return;
        }
        let client_closes = has_token(&headers, "connection", "close");

        if header(&headers, "upgrade").is_some() {
            let close = uri.starts_with("/refuse-close");
            let resp = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{}",
                REFUSED_UPGRADE_BODY.len(),
                if close { "connection: close\r\n" } else { "" },
                REFUSED_UPGRADE_BODY
            );
            if stream.write_all(resp.as_bytes()).await.is_err() || close || client_closes {
                return;
            }
            continue;
        }

        if let Some(ms) = uri
            .strip_prefix("/delay/")
            .and_then(|r| r.split(['?', '/']).next())
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        }

        let pairs: Vec<serde_json::Value> = headers
            .iter()
            .map(|(k, v)| serde_json::json!([k, v]))
            .collect();
        let body = serde_json::json!({
            "port": port,
            "method": method,
            "uri": uri,
            "headers": pairs,
        })
        .to_string();
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            body.len(),
            body
        );
        if stream.write_all(resp.as_bytes()).await.is_err() || client_closes {
            return;
        }
    }
}
