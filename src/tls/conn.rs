//! A downstream TLS connection as Pingora's HTTP code sees it.
//!
//! gopush terminates TLS itself (tokio-rustls over the accepted TCP stream) instead of through
//! Pingora's `rustls` feature: with that feature compiled in, Pingora's listener task holds its
//! TLS accept future inline, so *every* connection, plain ones included, carries room for a
//! rustls handshake for its whole life (measured: +11 kB per idle WebSocket in bare Pingora), and
//! its TLS stream type keeps the spent accept future beside the live stream. Here the handshake
//! is boxed and dropped once done, and [`TlsConn`] holds only the stream and what Pingora asks
//! of it: the ALPN choice (which sends `h2` connections to Pingora's HTTP/2 server) and a TLS
//! digest (which marks the session as TLS: `X-Forwarded-Proto: https`).

use async_trait::async_trait;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, TimingDigest,
    UniqueID, UniqueIDType, ALPN,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::server::TlsStream;

/// A handshaken server-side TLS connection over an accepted stream.
pub struct TlsConn {
    inner: TlsStream<Stream>,
    alpn: Option<ALPN>,
    digest: Arc<SslDigest>,
    established: SystemTime,
    handshake: Duration,
    acme_validation: bool,
}

impl TlsConn {
    /// The TLS handshake of `stream` (no timeout: the caller bounds it).
    pub async fn accept(acceptor: &tokio_rustls::TlsAcceptor, stream: Stream) -> io::Result<Self> {
        let started = std::time::Instant::now();
        let inner = acceptor.accept(stream).await?;
        let session = inner.get_ref().1;
        // The listener offers only these two (tls.h2 decides whether h2 is among them).
        let acme_validation = session.alpn_protocol() == Some(super::ACME_TLS_ALPN);
        let alpn = match session.alpn_protocol() {
            Some(b"h2") => Some(ALPN::H2),
            Some(b"http/1.1") => Some(ALPN::H1),
            _ => None,
        };
        let cipher = session
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("");
        let version = session
            .protocol_version()
            .and_then(|v| v.as_str())
            .unwrap_or("");
        // No client certificates are asked for, so the peer fields stay empty.
        let digest = Arc::new(SslDigest::new(cipher, version, None, None, Vec::new()));
        Ok(TlsConn {
            inner,
            alpn,
            digest,
            established: SystemTime::now(),
            handshake: started.elapsed(),
            acme_validation,
        })
    }

    /// An ACME TLS-ALPN-01 validation: the handshake was all of it (RFC 8737 3: no data
    /// follows), so the connection is closed rather than served.
    pub fn is_acme_validation(&self) -> bool {
        self.acme_validation
    }

    /// Moves the TCP connection under the TLS session to the current runtime's I/O driver
    /// ([`crate::local_tcp`]); rustls keeps its state, only the socket's registration changes.
    pub fn rehome_transport(&mut self) {
        crate::local_tcp::rehome_in_place(self.inner.get_mut().0);
    }

    fn tcp(&self) -> &Stream {
        self.inner.get_ref().0
    }
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("tcp", self.tcp())
            .field("alpn", &self.alpn)
            .field("version", &self.digest.version)
            .finish()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
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
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for TlsConn {
    async fn shutdown(&mut self) {
        // close_notify, then the TCP shutdown; a peer already gone is not an error worth a log.
        let _ = AsyncWriteExt::shutdown(&mut self.inner).await;
    }
}

impl UniqueID for TlsConn {
    fn id(&self) -> UniqueIDType {
        self.tcp().id()
    }
}

impl Ssl for TlsConn {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn.clone()
    }
}

impl GetTimingDigest for TlsConn {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        let mut digests = self.tcp().get_timing_digest();
        digests.push(Some(TimingDigest {
            established_ts: self.established,
            establishment_duration: Some(self.handshake),
            offload_wait_duration: None,
        }));
        digests
    }

    fn get_read_pending_time(&self) -> Duration {
        self.tcp().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.tcp().get_write_pending_time()
    }
}

impl GetProxyDigest for TlsConn {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.tcp().get_proxy_digest()
    }
}

impl GetSocketDigest for TlsConn {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.tcp().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.get_mut().0.set_socket_digest(digest)
    }
}

/// TLS records cannot be peeked at as plaintext.
impl Peek for TlsConn {}
