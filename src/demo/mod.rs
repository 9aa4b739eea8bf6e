//! Built-in demo: two in-process Socket.IO backends and a browser page.
//!
//! `gopush demo` starts, in one process, the gopush agent (Pingora, listening on `:6003`) and
//! the two backends built here (`127.0.0.1:4000` and `127.0.0.1:4001`). The agent serves
//! [`PAGE_HTML`] at `GET /`; everything else (notably `/socket.io/…` and `/whoami`) is proxied
//! to the backend that the Ketama ring picks for the request's uid:
//!
//! ```text
//!  browser ──(cookie uid=alice)──▶ agent :6003 ──(x-gopush-uid: alice, ?uid=alice)──▶ backend :4000 or :4001
//!     ▲  GET /  = PAGE_HTML          (uid → Ketama ring → backend)                   (this module)
//! ```
//!
//! Open the page in two browsers (or change the uid in the page) to watch different uids land on
//! different backends, and use the room chat to see messages cross from one backend to the other.
//!
//! # What each backend does
//!
//! Each backend is a [`socketioxide`] (Socket.IO v5 / Engine.IO v4) server on the default path
//! `/socket.io/`, websocket and long-polling transports. On connect a socket:
//!
//! * resolves its uid from the handshake query parameter `uid` (the agent forwards it), falling
//!   back to the `x-gopush-uid` header (also set by the agent);
//! * receives `port` (the backend's port number, e.g. `4000`) and `hello` (`{"port": 4000,
//!   "uid": "alice"}`, `uid` is `null` if none was given);
//! * joins the room `uid:<uid>`, so every connection of one user can be addressed together.
//!
//! Events handled:
//!
//! * `echo`: acknowledges with its (first) argument unchanged.
//! * `room` (the original gopush's room event), payload `{"room": R, "event": E, ...data}`: the
//!   socket joins room `R`; if `event` is present, event `E` is emitted with the **whole payload,
//!   unchanged** (including the `room` and `event` keys, so receivers know where it came from) to
//!   every OTHER member of `R`, on **both** backends. The sender itself does not receive it. If the
//!   client asked for an ack it gets `{"ok": true, "room": R, "event": E, "recipients": N}` (N =
//!   sockets the event was emitted to) or `{"ok": false, "error": "..."}`.
//!
//! There is no Redis in the demo: because both backends live in this process, "rooms across
//! backends" is done by broadcasting on every backend's [`SocketIo`] handle (on the sender's own
//! backend with the sender excluded). A real deployment would use a shared adapter (e.g. Redis).
//!
//! Plain HTTP routes (anything that is not `/socket.io/`):
//!
//! * `GET /whoami` → `{"port": 4000, "uid": "alice"}` (uid resolved like for sockets: query
//!   `uid`, else header `x-gopush-uid`; `null` if none), handy to see where the agent routes a plain HTTP request;
//! * `GET /healthz` → `ok`;
//! * `GET /` → [`PAGE_HTML`] as well, so the page also works when opened on a backend directly
//!   (bypassing the agent; the page then passes its uid as the `uid` query parameter itself);
//! * anything else → 404.
//!
//! # Threading
//!
//! [`spawn_backends`] runs the backends on a dedicated OS thread with its own single-worker
//! tokio runtime, independent of Pingora's runtimes. Listening sockets are bound before it
//! returns, so a port already in use is reported to the caller.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::service::SocketIoService;
use socketioxide::SocketIo;
use tokio::sync::oneshot;

/// The demo page (plain HTML/CSS/JS, one file, no external resources).
///
/// It contains a minimal hand-written Engine.IO v4 / Socket.IO v5 client over a native WebSocket
/// connecting to the same origin at `/socket.io/`, a uid cookie editor, connection details
/// (state, transport, backend port, uid) and a small room chat. The agent serves it at `GET /`
/// in demo mode; the demo backends serve it at `GET /` too.
pub const PAGE_HTML: &str = include_str!("page.html");

/// Header carrying the uid resolved by the agent (see the `uid.forward` configuration).
const UID_HEADER: &str = "x-gopush-uid";

/// Query parameter carrying the uid resolved by the agent.
const UID_QUERY: &str = "uid";

/// Handle to the demo backends started by [`spawn_backends`].
///
/// The backends run on their own OS thread (named `gopush-demo`) with a dedicated tokio runtime.
/// Dropping this handle does **not** stop them: the thread is detached and keeps serving until
/// the process exits (which is what `gopush demo` wants). Call [`DemoBackends::shutdown`] to stop
/// them explicitly (closes the listeners and all connections, then joins the thread).
#[derive(Debug)]
pub struct DemoBackends {
    /// Actual bound addresses, in the order given to [`spawn_backends`].
    addrs: Vec<SocketAddr>,
    /// Sending `()` stops the runtime; dropping it without sending leaves the backends running.
    stop: Option<oneshot::Sender<()>>,
    /// The thread running the backends' tokio runtime.
    thread: Option<JoinHandle<()>>,
}

impl DemoBackends {
    /// The addresses the backends actually listen on (same order as requested; a requested
    /// port `0` is replaced by the port the OS picked).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops every backend (listeners and open connections) and waits for the thread to end.
    ///
    /// # Errors
    /// Fails if the backend thread panicked.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            // The receiver is gone only if the thread already ended; nothing to signal then.
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the demo backend thread panicked")),
            None => Ok(()),
        }
    }
}

/// Starts one Socket.IO demo backend per address on a dedicated thread (see the module docs).
///
/// All addresses are bound before this returns; rooms are shared between all the backends
/// started by one call.
///
/// # Errors
/// Fails, naming the address, if an address cannot be bound (e.g. already in use); fails if the
/// runtime or the thread cannot be created. Nothing keeps running after an error.
pub fn spawn_backends(addrs: &[SocketAddr]) -> anyhow::Result<DemoBackends> {
    // Bind synchronously first so that "address in use" reaches the caller.
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("demo backend: cannot listen on {addr}"))?;
        listener
            .set_nonblocking(true)
            .with_context(|| format!("demo backend: cannot configure listener on {addr}"))?;
        let local = listener
            .local_addr()
            .with_context(|| format!("demo backend: no local address for {addr}"))?;
        listeners.push((local, listener));
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gopush-demo-rt")
        .enable_all()
        .build()
        .context("demo backend: cannot build the tokio runtime")?;

    // One Socket.IO server per address. All `SocketIo` handles are created first so that every
    // backend's `room` handler can broadcast on all of them.
    let servers: Vec<(SocketAddr, SocketIoService<HttpRoutes>, SocketIo)> = listeners
        .iter()
        .map(|(local, _)| {
            let (svc, io) = SocketIo::builder()
                .ping_interval(Duration::from_secs(10))
                .ping_timeout(Duration::from_secs(10))
                .build_with_inner_svc(HttpRoutes { port: local.port() });
            (*local, svc, io)
        })
        .collect();
    let peers: Arc<Vec<SocketIo>> = Arc::new(servers.iter().map(|(_, _, io)| io.clone()).collect());

    let mut bound = Vec::with_capacity(servers.len());
    {
        // Registering the listeners with the runtime's reactor needs its context.
        let _enter = runtime.enter();
        for (index, ((local, svc, io), (_, std_listener))) in
            servers.into_iter().zip(listeners).enumerate()
        {
            let ctx = Backend {
                index,
                port: local.port(),
                peers: peers.clone(),
            };
            io.ns("/", move |socket: SocketRef| {
                on_connect(socket, ctx.clone())
            });
            let listener = tokio::net::TcpListener::from_std(std_listener)
                .with_context(|| format!("demo backend: cannot register listener on {local}"))?;
            runtime.spawn(accept_loop(listener, svc, local));
            tracing::info!("demo backend listening on {local}");
            bound.push(local);
        }
    }

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("gopush-demo".into())
        .spawn(move || {
            runtime.block_on(async {
                // Sender dropped without a signal = handle dropped: keep serving forever.
                if stop_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            });
            // Dropping the runtime here cancels the accept loops and every connection.
            drop(runtime);
        })
        .context("demo backend: cannot spawn the backend thread")?;

    Ok(DemoBackends {
        addrs: bound,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Accepts connections forever and serves each with hyper (HTTP/1.1 + upgrades for websocket).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    svc: SocketIoService<HttpRoutes>,
    local: SocketAddr,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // E.g. too many open files: back off instead of spinning.
                tracing::warn!("demo backend {local}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("demo backend {local}: connection error: {e}");
            }
        });
    }
}

/// Per-backend context shared by its Socket.IO handlers.
#[derive(Clone)]
struct Backend {
    /// Index of this backend in `peers`.
    index: usize,
    /// Port this backend listens on (what `port` / `hello` report).
    port: u16,
    /// Every backend started together, this one included (for cross-backend rooms).
    peers: Arc<Vec<SocketIo>>,
}

/// Connect handler of the `/` namespace.
async fn on_connect(socket: SocketRef, ctx: Backend) {
    let parts = socket.req_parts();
    let uid = resolve_uid(&parts.uri, &parts.headers);
    tracing::info!(
        "demo backend :{}: socket {} connected (uid {:?}, {:?})",
        ctx.port,
        socket.id,
        uid,
        socket.transport_type()
    );
    if let Err(e) = socket.emit("port", &ctx.port) {
        tracing::debug!("demo backend :{}: emit port: {e}", ctx.port);
    }
    if let Err(e) = socket.emit("hello", &json!({ "port": ctx.port, "uid": uid })) {
        tracing::debug!("demo backend :{}: emit hello: {e}", ctx.port);
    }
    if let Some(uid) = &uid {
        socket.join(format!("uid:{uid}"));
    }

    socket.on("echo", async |ack: AckSender, Data(value): Data<Value>| {
        let _ = ack.send(&value);
    });

    let room_ctx = ctx.clone();
    socket.on(
        "room",
        move |socket: SocketRef, ack: AckSender, Data(payload): Data<Value>| {
            on_room(socket, ack, payload, room_ctx.clone())
        },
    );

    let port = ctx.port;
    socket.on_disconnect(move |socket: SocketRef| async move {
        tracing::info!("demo backend :{port}: socket {} disconnected", socket.id);
    });
}

/// The `room` event: join `room`, then relay `event` to the room's other members everywhere.
async fn on_room(socket: SocketRef, ack: AckSender, payload: Value, ctx: Backend) {
    {
        let reply = match room_request(&payload) {
            Err(error) => json!({ "ok": false, "error": error }),
            Ok((room, event)) => {
                socket.join(room.to_owned());
                let mut recipients = 0;
                if let Some(event) = event {
                    for (i, io) in ctx.peers.iter().enumerate() {
                        // On our own backend exclude the sender; on the others, all members.
                        let result = if i == ctx.index {
                            recipients += socket.to(room.to_owned()).sockets().len();
                            socket.to(room.to_owned()).emit(event, &payload).await
                        } else {
                            recipients += io.to(room.to_owned()).sockets().len();
                            io.to(room.to_owned()).emit(event, &payload).await
                        };
                        if let Err(e) = result {
                            tracing::debug!("demo backend :{}: room broadcast: {e}", ctx.port);
                        }
                    }
                }
                json!({ "ok": true, "room": room, "event": event, "recipients": recipients })
            }
        };
        let _ = ack.send(&reply);
    }
}

/// Validates a `room` payload; returns `(room, event)`.
fn room_request(payload: &Value) -> Result<(&str, Option<&str>), &'static str> {
    let obj = payload
        .as_object()
        .ok_or("payload must be an object {room, event?, ...}")?;
    let room = match obj.get("room") {
        Some(Value::String(room)) if !room.is_empty() => room.as_str(),
        _ => return Err("`room` must be a non-empty string"),
    };
    let event = match obj.get("event") {
        None | Some(Value::Null) => None,
        Some(Value::String(event)) if !event.is_empty() => {
            if crate::admin::push::RESERVED_EVENTS.contains(&event.as_str()) {
                return Err("`event` is a reserved Socket.IO event name");
            }
            Some(event.as_str())
        }
        Some(_) => return Err("`event` must be a non-empty string"),
    };
    Ok((room, event))
}

/// Uid of a request: query `uid` (percent-decoded), else header `x-gopush-uid`.
///
/// Through the agent both carry the same resolved uid; the query parameter also lets the page
/// work when opened on a backend directly.
fn resolve_uid(uri: &hyper::Uri, headers: &hyper::HeaderMap) -> Option<String> {
    uri.query()
        .and_then(|q| query_param(q, UID_QUERY))
        .or_else(|| header_uid(headers))
}

/// The non-empty `x-gopush-uid` header, percent-decoded (the agent percent-encodes non-ASCII,
/// space, controls and `%`: [`crate::forward::header_value`]), if valid UTF-8.
fn header_uid(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get(UID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .and_then(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .ok()
                .map(|s| s.into_owned())
        })
}

/// First non-empty value of `name` in an `application/x-www-form-urlencoded` query string.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name)
            .then(|| percent_decode(value))
            .filter(|v| !v.is_empty())
    })
}

/// Decodes `+` and `%XX` escapes; invalid escapes are kept as is, invalid UTF-8 is replaced.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The tiny hyper service behind Socket.IO: answers every request that is not `/socket.io/`.
#[derive(Clone, Copy, Debug)]
struct HttpRoutes {
    /// Port of the backend, reported by `/whoami`.
    port: u16,
}

impl hyper::service::Service<Request<Incoming>> for HttpRoutes {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        std::future::ready(Ok(self.route(&req)))
    }
}

impl HttpRoutes {
    /// Builds the response for a plain HTTP request.
    fn route<B>(&self, req: &Request<B>) -> Response<String> {
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        match (get, req.uri().path()) {
            (true, "/whoami") => {
                let uid = resolve_uid(req.uri(), req.headers());
                let body = json!({ "port": self.port, "uid": uid });
                respond(StatusCode::OK, "application/json", format!("{body}\n"))
            }
            (true, "/healthz") => {
                respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
            }
            (true, "/" | "/index.html") => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                PAGE_HTML.to_owned(),
            ),
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                format!("demo backend :{}: not found\n", self.port),
            ),
        }
    }
}

/// A response with a body and a `content-type`.
fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<String> {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_uid_is_decoded() {
        assert_eq!(
            query_param("EIO=4&uid=al%20ice+x", "uid").as_deref(),
            Some("al ice x")
        );
        assert_eq!(query_param("uid=&uid=bob", "uid").as_deref(), Some("bob"));
        assert_eq!(query_param("EIO=4", "uid"), None);
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%E2%9C%93"), "\u{2713}");
    }

    #[test]
    fn uid_prefers_query_then_header() {
        let req = Request::builder()
            .uri("/socket.io/?EIO=4&uid=q")
            .header(UID_HEADER, "h")
            .body(())
            .expect("request");
        assert_eq!(resolve_uid(req.uri(), req.headers()).as_deref(), Some("q"));
        let req = Request::builder()
            .uri("/socket.io/?EIO=4")
            .header(UID_HEADER, "h")
            .body(())
            .expect("request");
        assert_eq!(resolve_uid(req.uri(), req.headers()).as_deref(), Some("h"));
    }

    #[test]
    fn room_payload_validation() {
        let ok = json!({"room": "r", "event": "chat", "text": "hi"});
        assert_eq!(room_request(&ok), Ok(("r", Some("chat"))));
        assert_eq!(room_request(&json!({"room": "r"})), Ok(("r", None)));
        assert!(room_request(&json!({"event": "chat"})).is_err());
        assert!(room_request(&json!({"room": "r", "event": "disconnect"})).is_err());
        assert!(room_request(&json!({"room": "r", "event": 3})).is_err());
        assert!(room_request(&json!("r")).is_err());
    }

    #[test]
    fn whoami_uses_forwarded_header() {
        let routes = HttpRoutes { port: 4000 };
        let req = Request::builder()
            .uri("/whoami")
            .header(UID_HEADER, "alice")
            .body(())
            .expect("request");
        let res = routes.route(&req);
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = serde_json::from_str(res.body()).expect("json");
        assert_eq!(body, json!({"port": 4000, "uid": "alice"}));
        let req = Request::builder()
            .uri("/whoami")
            .header(UID_HEADER, "zo%C3%A9%2050%25")
            .body(())
            .expect("request");
        let body: Value = serde_json::from_str(routes.route(&req).body()).expect("json");
        assert_eq!(body, json!({"port": 4000, "uid": "zoé 50%"}));
        let req = Request::builder().uri("/nope").body(()).expect("request");
        assert_eq!(routes.route(&req).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn bind_error_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = spawn_backends(&[addr]).expect_err("port in use");
        assert!(format!("{err:#}").contains(&addr.to_string()), "{err:#}");
    }
}
