//! Accepting connections on the gRPC port: a global cap on open connections, a backoff when `accept` fails
//! (file descriptors run out), TLS with a handshake timeout and ALPN `h2` + `http/1.1`, an idle timeout on
//! every connection, and the per-connection share of the server's work ([`ConnectionShare`]) that handlers
//! find in their request's extensions.
//!
//! Why our own acceptor: tonic's `TcpIncoming` accepts without bound and its TLS acceptor offers only `h2`
//! and never times a handshake out, so 2,000 silent sockets or stalled handshakes stayed open for good.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    admission::{ConnectionShare, SharePolicy},
    telemetry::metric,
};

/// How connections are accepted and when they are closed; from the config, validated there.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; past it the server stops accepting until one closes.
    pub max_connections: usize,
    /// A connection on which nothing was read or written for this long is closed.
    pub idle_timeout: Duration,
    /// A TLS handshake that has not finished by then is abandoned.
    pub tls_handshake_timeout: Duration,
}

/// What a handler knows about the connection its call came on (a request extension).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote: Option<SocketAddr>,
    pub share: Arc<ConnectionShare>,
}

/// The accepted connections as tonic's `serve_with_incoming_shutdown` wants them. Accepting stops, and the
/// listening socket closes, when tonic drops the stream at shutdown.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    shares: SharePolicy,
    tls: Option<TlsAcceptor>,
) -> ReceiverStream<io::Result<Connection>> {
    // Handshakes run in their own tasks: one slow client must not hold up the accept loop.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, limits, shares, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    limits: ConnectionLimits,
    shares: SharePolicy,
    tls: Option<TlsAcceptor>,
    tx: mpsc::Sender<io::Result<Connection>>,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = Duration::ZERO;
    loop {
        let permit = tokio::select! {
            () = tx.closed() => return,
            permit = open.clone().acquire_owned() => permit.expect("the connection semaphore is never closed"),
        };
        let (tcp, remote) = tokio::select! {
            () = tx.closed() => return,
            accepted = accept(&listener, &mut backoff) => accepted,
        };
        // Responses that follow a WINDOW_UPDATE otherwise wait for the client's delayed ACK (40 ms per
        // multi-image call, bench/README.md).
        let _ = tcp.set_nodelay(true);
        let info = ConnectionInfo {
            remote: Some(remote),
            share: Arc::new(ConnectionShare::new(&shares)),
        };
        match &tls {
            None => {
                let connection = Connection::new(Transport::Plain(tcp), info, limits.idle_timeout, permit);
                if tx.send(Ok(connection)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let transport = Transport::Tls(Box::new(stream));
                            let connection = Connection::new(transport, info, limits.idle_timeout, permit);
                            let _ = tx.send(Ok(connection)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            metrics::counter!(metric::CONNECTIONS_CLOSED, "cause" => "tls_handshake_failed")
                                .increment(1);
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            metrics::counter!(metric::CONNECTIONS_CLOSED, "cause" => "tls_handshake_timeout")
                                .increment(1);
                        }
                    }
                });
            }
        }
    }
}

/// The next connection on `listener`. When `accept` fails (EMFILE and friends) it waits, doubling `backoff`
/// from 5 ms to 1 s: retrying at once would spin a core while nothing can change.
pub async fn accept(listener: &TcpListener, backoff: &mut Duration) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                *backoff = Duration::ZERO;
                return accepted;
            }
            Err(e) => {
                *backoff = (*backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                metrics::counter!(metric::ACCEPT_ERRORS).increment(1);
                tokio::time::sleep(*backoff).await;
            }
        }
    }
}

/// The byte stream under a connection.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection: closed with a `TimedOut` error once idle for too long, and counted against the
/// connection cap until dropped.
pub struct Connection {
    transport: Transport,
    info: ConnectionInfo,
    idle_timeout: Duration,
    /// Progress in either direction moves this; the timer is re-armed lazily, only when it fires.
    last_active: Instant,
    idle: Pin<Box<Sleep>>,
    _open: OwnedSemaphorePermit,
    _gauge: OpenGauge,
}

impl Connection {
    fn new(transport: Transport, info: ConnectionInfo, idle_timeout: Duration, permit: OwnedSemaphorePermit) -> Self {
        let now = Instant::now();
        Connection {
            transport,
            info,
            idle_timeout,
            last_active: now,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            _open: permit,
            _gauge: OpenGauge::new(),
        }
    }

    /// Called when the transport is not ready: an error once the connection has been idle for too long.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            let due = self.last_active + self.idle_timeout;
            if self.idle.deadline() != due {
                self.idle.as_mut().reset(due);
            }
            match self.idle.as_mut().poll(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(()) if Instant::now() >= self.last_active + self.idle_timeout => {
                    metrics::counter!(metric::CONNECTIONS_CLOSED, "cause" => "idle_timeout").increment(1);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle timeout"));
                }
                Poll::Ready(()) => continue,
            }
        }
    }

    fn progress<T>(&mut self, result: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.last_active = Instant::now();
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        this.progress(result, cx)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.progress(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.progress(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.progress(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        })?;
        Poll::Ready(Ok(()))
    }
}

/// Keeps the open-connections gauge right however a connection ends.
struct OpenGauge;

impl OpenGauge {
    fn new() -> Self {
        metrics::gauge!(metric::CONNECTIONS_OPEN).increment(1.0);
        OpenGauge
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!(metric::CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// A rustls acceptor from PEM files, offering `h2` (gRPC) and `http/1.1` (the page, gRPC-Web); with a client
/// CA, clients must present a certificate it signed (mutual TLS).
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8], client_ca_pem: Option<&[u8]>) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio_rustls::rustls::{self, RootCertStore, server::WebPkiClientVerifier};

    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("certificate: no PEM certificate found".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(ca_pem) {
                roots
                    .add(ca.map_err(|e| format!("client CA: {e}"))?)
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
