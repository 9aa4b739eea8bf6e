//! An accepted connection moved onto the I/O driver of the thread that serves it.
//!
//! With `server.work_stealing: false` Pingora runs one single-threaded tokio runtime per thread,
//! accepts each listener's connections on one of them and spawns every connection onto a
//! random one. The accepted socket stays registered with the accepting runtime's I/O driver, so
//! for the connections spawned elsewhere every readiness event is taken by one thread and
//! handed to another through its eventfd: measured, 0.46 cross-thread wake-ups per Socket.IO
//! ack (an `eventfd` write and a wake of the other thread's `epoll_wait`), all from the thread
//! that runs the listener. [`rehome_in_place`] registers a duplicate of the socket with the
//! current runtime and closes the original, so a connection's events arrive on the thread that
//! serves it. It costs five syscalls (`fcntl` dup, `getpeername`, `epoll_ctl` add and delete,
//! `close`), which a connection serving one request would spend for nothing, so only
//! connections that prove long-lived are moved ([`crate::limits::head_deadline::HeadDeadline`]
//! decides).
//!
//! [`LocalTcp`] is what Pingora's own TCP stream would be, minus what gopush does not use
//! (rewind buffer, receive timestamps, pending-time accounting, a read buffer: connections are
//! moved only without one): the same 1460-byte write buffer, so a response head and a small
//! body, or several TLS records, leave in one `write`.

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::net::TcpStream;

/// An accepted TCP connection registered with the runtime that serves it.
pub struct LocalTcp {
    io: BufWriter<TcpStream>,
    digest: Arc<SocketDigest>,
    established: SystemTime,
}

/// `stream` (as Pingora accepted it) registered with the current runtime. A stream that is not
/// a TCP connection, or whose socket cannot be duplicated (out of descriptors), is returned as
/// it was: it works, only with the cross-thread hand-off.
fn rehome(stream: Stream) -> Stream {
    match LocalTcp::new(&stream) {
        Ok(local) => {
            // Deregisters the original from the accepting runtime and closes it; the socket
            // lives on in the duplicate.
            drop(stream);
            Box::new(local)
        }
        Err(e) => {
            tracing::debug!("connection left on the accepting thread's driver: {e}");
            stream
        }
    }
}

/// Moves the TCP connection in `slot` to the current runtime's I/O driver, in place.
pub fn rehome_in_place(slot: &mut Stream) {
    let stream = std::mem::replace(slot, stand_in());
    *slot = rehome(stream);
}

/// Moves the connection in `slot` (Pingora's TCP stream, or a [`crate::tls::TlsConn`] over
/// one: then only its transport) to the current runtime's I/O driver; anything else stays as
/// it is.
pub fn rehome_connection(slot: &mut Stream) {
    if !slot.as_any().is::<crate::tls::TlsConn>() {
        return rehome_in_place(slot);
    }
    let stream = std::mem::replace(slot, stand_in());
    *slot = match stream.into_any().downcast::<crate::tls::TlsConn>() {
        Ok(mut tls) => {
            tls.rehome_transport();
            tls
        }
        // `is` said it is one: not reached.
        Err(_) => stand_in(),
    };
}

/// What holds a connection's place for the moment of its move: no socket (a small box).
fn stand_in() -> Stream {
    Box::new(std::io::Cursor::new(Vec::new()))
}

/// A number for the current thread, the same at every call on it: the group key that keeps
/// backend connections pooled per thread (`Agent::with_pools_per_thread`).
pub fn thread_key() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static KEY: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    KEY.with(|k| *k)
}

impl LocalTcp {
    fn new(stream: &Stream) -> io::Result<LocalTcp> {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied())
            .ok_or_else(|| io::Error::other("not a TCP connection"))?;
        // SAFETY: Pingora's TCP stream reports its socket's descriptor as its id
        // (`UniqueID for l4::Stream`), and `stream` keeps it open for this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.id()) };
        let std = std::net::TcpStream::from(fd.try_clone_to_owned()?);
        // The id is the descriptor only by Pingora's convention: make sure it is this socket.
        if std.peer_addr()? != peer {
            return Err(io::Error::other(
                "descriptor is not the connection's socket",
            ));
        }
        // Non-blocking already: the flag belongs to the open file, which the duplicate shares.
        let tcp = TcpStream::from_std(std)?;
        let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
        let _ = digest.peer_addr.set(Some(peer.into()));
        let established = stream
            .get_timing_digest()
            .first()
            .and_then(|d| d.as_ref().map(|d| d.established_ts))
            .unwrap_or_else(SystemTime::now);
        Ok(LocalTcp {
            io: BufWriter::with_capacity(pingora::listeners::DEFAULT_L4_WRITE_BUFFER_SIZE, tcp),
            digest: Arc::new(digest),
            established,
        })
    }
}

impl std::fmt::Debug for LocalTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTcp")
            .field("fd", &self.io.get_ref().as_raw_fd())
            .field("peer", &self.digest.peer_addr())
            .finish()
    }
}

impl AsyncRead for LocalTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LocalTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for LocalTcp {
    async fn shutdown(&mut self) {
        // Flushes the write buffer, then shuts the write side; a peer already gone is routine.
        if let Err(e) = AsyncWriteExt::shutdown(self).await {
            tracing::debug!("connection shutdown: {e}");
        }
    }
}

impl UniqueID for LocalTcp {
    fn id(&self) -> UniqueIDType {
        self.io.get_ref().as_raw_fd()
    }
}

impl Ssl for LocalTcp {}

impl GetTimingDigest for LocalTcp {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![Some(TimingDigest {
            established_ts: self.established,
            establishment_duration: None,
            offload_wait_duration: None,
        })]
    }

    fn get_read_pending_time(&self) -> Duration {
        Duration::ZERO
    }

    fn get_write_pending_time(&self) -> Duration {
        Duration::ZERO
    }
}

/// A downstream connection reached no proxy of ours: no CONNECT digest.
impl GetProxyDigest for LocalTcp {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for LocalTcp {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(self.digest.clone())
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.digest = Arc::new(digest);
    }
}

impl Peek for LocalTcp {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const BOUND: Duration = Duration::from_secs(5);

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// A connection accepted on the current runtime, as Pingora's listener hands it over, and
    /// the client's end (a blocking std socket).
    async fn accept_one() -> (Stream, std::net::TcpStream, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, peer) = listener.accept().await.unwrap();
        let mut stream = pingora::protocols::l4::stream::Stream::from(tcp);
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        let _ = digest.peer_addr.set(Some(peer.into()));
        stream.set_socket_digest(digest);
        (Box::new(stream), client, peer)
    }

    /// [`accept_one`] on a runtime dropped on return: nothing drives its I/O driver any more.
    fn accepted_elsewhere() -> (Stream, std::net::TcpStream, std::net::SocketAddr) {
        current_thread().block_on(accept_one())
    }

    #[test]
    fn a_rehomed_connection_is_served_by_the_runtime_that_moved_it() {
        let (stream, mut client, peer) = accepted_elsewhere();
        // Without the move the read below would wait on the dropped runtime's driver forever.
        let rt = current_thread();
        let mut local = rt.block_on(async { rehome(stream) });
        assert!(
            local.as_any().downcast_ref::<LocalTcp>().is_some(),
            "moved: {local:?}"
        );
        let digest = local.get_socket_digest().expect("a socket digest");
        assert_eq!(
            digest.peer_addr().and_then(|a| a.as_inet()).copied(),
            Some(peer)
        );
        std::io::Write::write_all(&mut client, b"ping").unwrap();
        let got = rt.block_on(async {
            tokio::time::timeout(BOUND, async {
                let mut buf = [0u8; 4];
                local.read_exact(&mut buf).await.map(|_| buf)
            })
            .await
        });
        assert_eq!(got.ok().and_then(Result::ok), Some(*b"ping"));
        // A small write waits in the write buffer until the flush; shutdown flushes too.
        rt.block_on(async {
            local.write_all(b"po").await.unwrap();
            local.flush().await.unwrap();
            local.write_all(b"ng").await.unwrap();
            Shutdown::shutdown(&mut *local).await;
        });
        let mut reply = Vec::new();
        std::io::Read::read_to_end(&mut client, &mut reply).unwrap();
        assert_eq!(reply, b"pong");
    }

    /// A TLS acceptor with a fresh self-signed certificate for `localhost`, and a connector
    /// that trusts it.
    fn tls_pair() -> (
        tokio_rustls::TlsAcceptor,
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    ) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der.into())
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
        )
    }

    /// Reads `n` bytes from `stream` on `rt`, bounded.
    fn read_n(rt: &tokio::runtime::Runtime, stream: &mut Stream, n: usize) -> Option<Vec<u8>> {
        rt.block_on(async {
            let mut buf = vec![0u8; n];
            match tokio::time::timeout(BOUND, stream.read_exact(&mut buf)).await {
                Ok(Ok(_)) => Some(buf),
                _ => None,
            }
        })
    }

    #[test]
    fn a_head_deadline_moves_its_connection_when_it_upgrades_and_not_before() {
        use crate::limits::head_deadline::HeadDeadline;
        let (stream, mut client, _) = accepted_elsewhere();
        let rt = current_thread();
        let mut conn: Stream = rt.block_on(async {
            Box::new(
                HeadDeadline::new(stream, Duration::from_secs(10), None).rehome_when_long_lived(),
            )
        });
        // One request, no upgrade: still on the (dropped) accepting runtime's driver.
        std::io::Write::write_all(&mut client, b"GET").unwrap();
        assert_eq!(read_n(&rt, &mut conn, 3), None, "not moved yet");
        let deadline = HeadDeadline::of(&conn).expect("a head deadline");
        deadline.head_read();
        deadline.upgrading();
        // Moved at the next read: served by this runtime.
        std::io::Write::write_all(&mut client, b"ws!").unwrap();
        assert_eq!(
            read_n(&rt, &mut conn, 6).as_deref(),
            Some(&b"GETws!"[..]),
            "moved, nothing lost"
        );
    }

    #[test]
    fn a_tls_connection_moves_under_its_session() {
        use crate::limits::head_deadline::HeadDeadline;
        let (acceptor, connector, name) = tls_pair();
        let accepting = current_thread();
        let (stream, client, _) = accepting.block_on(accept_one());
        // The client: blocking rustls on its own thread (handshake, a message, the answer).
        let client = std::thread::spawn(move || {
            let config = connector.config().clone();
            let conn = rustls::ClientConnection::new(config, name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, client);
            tls.sock.set_read_timeout(Some(BOUND)).unwrap();
            std::io::Write::write_all(&mut tls, b"over tls").unwrap();
            let mut back = [0u8; 4];
            std::io::Read::read_exact(&mut tls, &mut back)
                .map(|_| back)
                .ok()
        });
        let conn = accepting
            .block_on(crate::tls::TlsConn::accept(&acceptor, stream))
            .expect("server handshake");
        drop(accepting);
        let rt = current_thread();
        let mut conn: Stream = rt.block_on(async {
            Box::new(
                HeadDeadline::new(Box::new(conn), Duration::from_secs(10), None)
                    .rehome_when_long_lived(),
            )
        });
        let deadline = HeadDeadline::of(&conn).expect("a head deadline");
        deadline.head_read();
        deadline.upgrading();
        assert_eq!(read_n(&rt, &mut conn, 8).as_deref(), Some(&b"over tls"[..]));
        rt.block_on(async {
            conn.write_all(b"back").await.unwrap();
            conn.flush().await.unwrap();
        });
        assert_eq!(client.join().ok().flatten(), Some(*b"back"));
    }

    #[test]
    fn the_thread_key_is_one_per_thread() {
        let here = thread_key();
        assert_eq!(thread_key(), here);
        let there = std::thread::spawn(|| (thread_key(), thread_key()))
            .join()
            .ok();
        assert!(
            matches!(there, Some((a, b)) if a == b && a != here),
            "{there:?} / {here}"
        );
    }

    #[test]
    fn a_stream_without_a_tcp_peer_is_left_as_it_was() {
        let rt = current_thread();
        rt.block_on(async {
            let (ours, mut theirs) = tokio::io::duplex(64);
            let mut stream = rehome(Box::new(ours));
            assert!(stream.as_any().downcast_ref::<LocalTcp>().is_none());
            theirs.write_all(b"ok").await.unwrap();
            let mut buf = [0u8; 2];
            stream.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ok");
        });
    }
}
