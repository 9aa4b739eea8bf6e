//! `limits.header_timeout`: a deadline for the request head, against slowloris.
//!
//! Pingora 0.9.1 times out reading a request head only *per read* (the 60 s keep-alive timeout
//! is applied to each `read()`, so every byte renews it): a client that sends one header byte
//! every few seconds holds its connection until it reaches Pingora's 1 MiB head cap, i.e.
//! practically forever. Enough such clients would hold all of the agent's file descriptors.
//!
//! [`HeadDeadline`] wraps each accepted connection. While a head is awaited and the deadline has
//! passed, a read no longer completes: it signals [`HeadDeadlineApp`], which drops the
//! connection's processing (a head that was not complete is never proxied), closes the socket
//! and counts it in `gopush_header_timeouts_total`. Cutting it there rather than failing the read
//! keeps the log quiet: Pingora logs every failed head read at error level, one line per slow
//! client, which an attack would turn into a flood. The deadline runs from the accept for the first request,
//! and from the first byte of the next request on a kept-alive connection (the idle time
//! between requests stays governed by Pingora's keep-alive timeout). Once the head is in, the
//! agent lifts the deadline ([`HeadDeadline::head_read`], from `early_request_filter`): bodies,
//! long-polls and WebSocket tunnels are not affected.
//!
//! Costs: a timer and an [`Expiry`] per connection, allocated at the accept; per request, two
//! relaxed atomic stores and the timer reset — no allocation, no lock. The proxy drives the
//! state: [`HeadDeadline::head_read`] from `early_request_filter`, [`HeadDeadline::request_done`]
//! from `logging` (which Pingora runs for every request before it keeps a connection alive), so
//! no wrapper around Pingora's per-request processing is polled on each wake-up of a tunnel.
//!
//! The wrapper is also where a connection that proves long-lived (a WebSocket upgrade, a second
//! request) is moved to its serving thread's I/O driver (`crate::local_tcp`): between two of
//! its I/O calls, which only it sees.

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The first head is awaited; reads fail once the deadline has passed.
const ARMED: u8 = 0;
/// The head is in: reads pass through.
const PASSING: u8 = 1;
/// Between requests: the first byte read arms the deadline again.
const IDLE: u8 = 2;
/// The deadline passed while a head was awaited: reads never complete again.
const EXPIRED: u8 = 3;
/// A later head (the connection was kept alive) is awaited: as [`ARMED`].
const REARMED: u8 = 4;

/// A connection whose request heads must arrive within a deadline.
pub struct HeadDeadline {
    inner: Stream,
    timeout: Duration,
    state: AtomicU8,
    timer: Pin<Box<Sleep>>,
    /// Told when the deadline passes; without it (tests) the read fails with `TimedOut`.
    expired: Option<Arc<Expiry>>,
    /// Moving the socket to the serving thread's I/O driver ([`crate::local_tcp`]): not wanted,
    /// wanted once the connection proves long-lived, or due at the next read or write.
    rehome: AtomicU8,
}

/// The connection stays on the driver it was accepted on (moved already, or not to be moved).
const REHOME_NO: u8 = 0;
/// To be moved if it turns out long-lived: a WebSocket upgrade, or a second request.
const REHOME_LATER: u8 = 1;
/// To be moved at the next read or write.
const REHOME_DUE: u8 = 2;

/// Set once a connection's head deadline passed; checked by the app serving the connection.
///
/// A flag, not a waker: it is set only inside a read of the connection, and only the
/// connection's own task reads it (HTTP/1.1; HTTP/2 is not wrapped), so the app sees it as soon
/// as the poll in which it was set returns.
#[derive(Default)]
pub struct Expiry(AtomicBool);

impl Expiry {
    fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the deadline passed.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl HeadDeadline {
    /// Wraps `inner`, armed: the first head must be complete within `timeout` from now.
    /// `expired` is notified when a deadline passes (and reads stop completing); without it a
    /// read after the deadline fails with `TimedOut`.
    pub fn new(inner: Stream, timeout: Duration, expired: Option<Arc<Expiry>>) -> Self {
        Self::armed_until(inner, timeout, Instant::now() + timeout, expired)
    }

    fn armed_until(
        inner: Stream,
        timeout: Duration,
        deadline: Instant,
        expired: Option<Arc<Expiry>>,
    ) -> Self {
        HeadDeadline {
            inner,
            timeout,
            state: AtomicU8::new(ARMED),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            expired,
            rehome: AtomicU8::new(REHOME_NO),
        }
    }

    /// Once the connection proves long-lived ([`Self::upgrading`], or a second request), its
    /// socket moves to the I/O driver of the thread serving it (see [`crate::local_tcp`]).
    pub fn rehome_when_long_lived(self) -> Self {
        self.rehome.store(REHOME_LATER, Ordering::Relaxed);
        self
    }

    /// The request just read is a protocol upgrade (a WebSocket): the connection will be a
    /// long-lived tunnel.
    pub fn upgrading(&self) {
        self.rehome_soon();
    }

    fn rehome_soon(&self) {
        let _ = self.rehome.compare_exchange(
            REHOME_LATER,
            REHOME_DUE,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The move, if due: done between two I/O calls, where nothing is buffered in the
    /// transport (Pingora has flushed its last response; no read buffer, see
    /// [`HeadDeadlineApp::with_rehome`]).
    fn rehome_if_due(&mut self, cx: &Context<'_>) {
        if self.rehome.load(Ordering::Relaxed) != REHOME_DUE {
            return;
        }
        self.rehome.store(REHOME_NO, Ordering::Relaxed);
        crate::local_tcp::rehome_connection(&mut self.inner);
        // Interest registered with the old socket (a read waiting while this is a write, say)
        // went with it: a wake-up has every pending operation polled, and registered, again.
        cx.waker().wake_by_ref();
    }

    /// The deadline of `stream`, if it was accepted through [`HeadDeadlineApp`].
    pub fn of(stream: &Stream) -> Option<&HeadDeadline> {
        stream.as_ref().as_any().downcast_ref::<HeadDeadline>()
    }

    /// The request head has been read: reads pass through until the request is done. A head
    /// after the first one means the connection was kept alive: it is long-lived, and moves
    /// (at the next read or write: the previous response is flushed, the next not begun).
    pub fn head_read(&self) {
        if matches!(self.state.swap(PASSING, Ordering::Relaxed), REARMED | IDLE) {
            self.rehome_soon();
        }
    }

    /// The request is done (the proxy's `logging`): if the connection is kept alive, the
    /// deadline starts again with the first byte of the next request. (Does nothing before
    /// the first head is in.)
    pub fn request_done(&self) {
        let _ = self
            .state
            .compare_exchange(PASSING, IDLE, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The read after the deadline: pending for good once the app was told (it drops the
    /// connection), else an error.
    fn expire(&self) -> Poll<io::Result<()>> {
        match &self.expired {
            Some(expiry) => {
                expiry.set();
                Poll::Pending
            }
            None => Poll::Ready(Err(self.timed_out())),
        }
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "request head not complete within limits.header_timeout ({})",
                humantime::format_duration(self.timeout)
            ),
        )
    }
}

impl std::fmt::Debug for HeadDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadDeadline")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .field("state", &self.state.load(Ordering::Relaxed))
            .finish()
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.rehome_if_due(cx);
        match this.state.load(Ordering::Relaxed) {
            ARMED | REARMED => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.state.store(EXPIRED, Ordering::Relaxed);
                    return this.expire();
                }
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
            EXPIRED => this.expire(),
            IDLE => {
                let before = buf.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                    this.timer.as_mut().reset(Instant::now() + this.timeout);
                    this.state.store(REARMED, Ordering::Relaxed);
                }
                read
            }
            _ => Pin::new(&mut this.inner).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.rehome_if_due(cx);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.rehome_if_due(cx);
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// The proxy's server application with [`HeadDeadline`] on every accepted connection.
///
/// `A` is Pingora's `HttpProxy`; everything but the wrapping is delegated to it.
pub struct HeadDeadlineApp<A> {
    app: Arc<A>,
    timeout: Box<dyn Fn() -> Duration + Send + Sync>,
    /// Which listeners are TLS: their connections are handshaken here first.
    listeners: Option<Arc<crate::tls::Listeners>>,
    /// Move long-lived connections onto the serving thread's I/O driver (see
    /// [`crate::local_tcp`]).
    rehome: bool,
}

impl<A> HeadDeadlineApp<A> {
    /// `timeout` is asked at each accept (so a reload applies to new connections); a zero
    /// duration leaves the connection unwrapped.
    pub fn new(app: A, timeout: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        HeadDeadlineApp {
            app: Arc::new(app),
            timeout: Box::new(timeout),
            listeners: None,
            rehome: false,
        }
    }

    /// A connection that proves long-lived (a WebSocket upgrade, a second request) moves to
    /// the I/O driver of the runtime that serves it (see [`crate::local_tcp`]). Only without a
    /// listener read buffer: the move leaves the old socket's buffers behind, and only a write
    /// buffer is known to be empty between requests.
    pub fn with_rehome(mut self) -> Self {
        self.rehome = true;
        self
    }

    /// Connections to the TLS listeners among `listeners` get their TLS handshake here, within
    /// its `tls.handshake_timeout` (see [`crate::tls`]).
    pub fn with_listeners(mut self, listeners: Arc<crate::tls::Listeners>) -> Self {
        self.listeners = Some(listeners);
        self
    }
}

/// The TLS handshake of an accepted connection, bounded; `None` (connection dropped) on a failed
/// or late handshake, which is counted and logged at debug level only: scanners and floods of
/// half-open handshakes are routine on a public port.
async fn tls_handshake(tls: &crate::tls::TlsListener, stream: Stream) -> Option<Stream> {
    match tokio::time::timeout(
        tls.handshake_timeout,
        crate::tls::TlsConn::accept(&tls.acceptor, stream),
    )
    .await
    {
        Ok(Ok(mut conn)) if conn.is_acme_validation() => {
            Shutdown::shutdown(&mut conn).await;
            None
        }
        Ok(Ok(conn)) => Some(Box::new(conn)),
        Ok(Err(e)) => {
            crate::metrics::counters().tls_handshake_errors.inc();
            tracing::debug!(listen = %tls.addr, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            crate::metrics::counters().tls_handshake_timeouts.inc();
            tracing::debug!(listen = %tls.addr, "TLS handshake not complete within tls.handshake_timeout: connection closed");
            None
        }
    }
}

/// The local address a connection was accepted on.
fn local_addr(stream: &Stream) -> Option<std::net::SocketAddr> {
    stream
        .get_socket_digest()
        .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())
}

#[async_trait]
impl<A> ServerApp for HeadDeadlineApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream = stream;
        // Plain listeners only (the usual case): no address lookup per accept.
        let tls = self
            .listeners
            .as_ref()
            .and_then(|l| l.tls().next().and_then(|_| l.tls_for(local_addr(&stream))));
        if let Some(tls) = tls {
            // Boxed: the handshake's state (a rustls ServerConnection, kilobytes) would otherwise
            // be part of this future, which every connection, plain ones included, keeps for its
            // whole life (measured: +7 kB per idle WebSocket).
            stream = Box::pin(tls_handshake(tls, stream)).await?;
            if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
                // HTTP/2 frames its headers and the h2 crate bounds them; the deadline below
                // reads HTTP/1.1 heads (one request per connection at a time) and would cut a
                // multiplexed connection whose streams never lift it.
                return self.app.process_new(stream, shutdown).await;
            }
        }
        let timeout = (self.timeout)();
        if timeout.is_zero() {
            return self.app.process_new(stream, shutdown).await;
        }
        let expired = Arc::new(Expiry::default());
        let mut deadline = HeadDeadline::new(stream, timeout, Some(expired.clone()));
        if self.rehome {
            deadline = deadline.rehome_when_long_lived();
        }
        let stream: Stream = Box::new(deadline);
        let mut serving = self.app.process_new(stream, shutdown);
        std::future::poll_fn(|cx| match serving.as_mut().poll(cx) {
            // Set in a read of this very poll (see `Expiry`): stop serving. Dropping the
            // processing closes the connection; nothing was proxied.
            Poll::Pending if expired.is_set() => {
                crate::metrics::counters().header_timeouts.inc();
                tracing::debug!(
                    "request head not complete within limits.header_timeout: connection closed"
                );
                Poll::Ready(None)
            }
            polled => polled,
        })
        .await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BOUND: Duration = Duration::from_secs(5);

    /// A wrapped connection whose deadline has already passed, and its client end.
    fn expired(timeout: Duration) -> (HeadDeadline, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        (
            HeadDeadline::armed_until(Box::new(ours), timeout, past, None),
            theirs,
        )
    }

    async fn read_until_error(d: &mut HeadDeadline) -> io::Error {
        let mut buf = [0u8; 64];
        let outcome = tokio::time::timeout(BOUND, async {
            loop {
                match d.read(&mut buf).await {
                    Ok(0) => return io::Error::other("EOF instead of the deadline"),
                    Ok(_) => continue,
                    Err(e) => return e,
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| io::Error::other("no error within 5 s"))
    }

    #[tokio::test]
    async fn an_expired_head_deadline_fails_the_read_even_with_data_waiting() {
        let (mut d, mut client) = expired(Duration::from_secs(10));
        client.write_all(b"GET / HT").await.unwrap();
        let err = read_until_error(&mut d).await;
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            err.to_string().contains("limits.header_timeout (10s)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn with_a_watcher_the_expired_read_sets_it_and_never_completes() {
        let (ours, mut client) = tokio::io::duplex(1024);
        let expiry = Arc::new(Expiry::default());
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        let mut d = HeadDeadline::armed_until(
            Box::new(ours),
            Duration::from_secs(10),
            past,
            Some(expiry.clone()),
        );
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 64];
        let read = d.read(&mut buf);
        tokio::pin!(read);
        // One poll: the app checks the flag right after the poll that set it.
        assert!(
            futures::poll!(read.as_mut()).is_pending(),
            "the read stays pending"
        );
        assert!(expiry.is_set(), "the watcher is told in the same poll");
    }

    #[tokio::test]
    async fn a_head_dribbled_byte_by_byte_is_cut_at_the_deadline() {
        let (ours, mut client) = tokio::io::duplex(1024);
        let mut d = HeadDeadline::new(Box::new(ours), Duration::from_millis(300), None);
        let started = std::time::Instant::now();
        let writer = tokio::spawn(async move {
            // One byte every 50 ms for at most 5 s: each byte would renew a per-read timeout.
            for _ in 0..100 {
                if client.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let err = read_until_error(&mut d).await;
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "cut after {took:?}");
        writer.abort();
    }

    #[tokio::test]
    async fn reads_pass_once_the_head_is_in_and_rearm_on_the_next_request() {
        let (mut d, mut client) = expired(Duration::from_millis(20));
        d.head_read();
        client.write_all(b"body").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            d.read(&mut buf).await.unwrap(),
            4,
            "the body is not subject to it"
        );
        // Next request on the kept-alive connection: idle until its first byte, which arms the
        // deadline (20 ms) again.
        d.request_done();
        client.write_all(b"GET").await.unwrap();
        assert_eq!(
            d.read(&mut buf).await.unwrap(),
            3,
            "the first byte is delivered"
        );
        let err = read_until_error(&mut d).await;
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }

    #[tokio::test]
    async fn request_done_before_the_first_head_keeps_the_accept_deadline() {
        let (mut d, mut client) = expired(Duration::from_secs(10));
        d.request_done();
        client.write_all(b"G").await.unwrap();
        let err = read_until_error(&mut d).await;
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    }

    #[tokio::test]
    async fn a_connection_is_due_to_move_at_an_upgrade_or_a_second_head_only() {
        let due = |d: &HeadDeadline| d.rehome.load(Ordering::Relaxed) == REHOME_DUE;
        let (ours, mut client) = tokio::io::duplex(1024);
        let d = HeadDeadline::new(Box::new(ours), Duration::from_secs(10), None);
        let mut d = d.rehome_when_long_lived();
        // A first request, done: a one-request connection (most TLS handshakes) stays put.
        d.head_read();
        d.request_done();
        assert!(!due(&d), "not after the first request");
        // The kept-alive connection's second head: long-lived.
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(d.read(&mut buf).await.unwrap(), 3);
        assert!(!due(&d), "not before the second head is in");
        d.head_read();
        assert!(due(&d), "due at the second head");

        let (ours, _client) = tokio::io::duplex(1024);
        let d = HeadDeadline::new(Box::new(ours), Duration::from_secs(10), None);
        let d = d.rehome_when_long_lived();
        d.head_read();
        assert!(!due(&d), "not at the first head");
        d.upgrading();
        assert!(due(&d), "due at an upgrade");
    }
}
