//! Accepting connections on the gRPC port: a global cap on open connections, a backoff when `accept` fails
//! (file descriptors run out), TLS with a handshake timeout and ALPN `h2` + `http/1.1`, the timeouts that
//! close a connection (idle, no call in flight, request head, stalled writes), and the per-connection share of
//! the server's work ([`ConnectionShare`]) that handlers find in their request's extensions.
//!
//! Why our own acceptor: tonic's `TcpIncoming` accepts without bound and its TLS acceptor offers only `h2`
//! and never times a handshake out, so 2,000 silent sockets or stalled handshakes stayed open for good.
//!
//! Why "no call in flight" and eviction: a client that only answers HTTP/2 pings, or sends a request head a
//! byte a second, is never idle in bytes, and 300 of them held all 256 slots while a polite caller got 11 of
//! 92 calls through. Every connection's [`Slot`] counts its calls in flight (`grpc::layers::CallLimits`);
//! one without a call for `--max-connection-idle-s` is closed whatever it sends (gRPC's MAX_CONNECTION_IDLE),
//! and at the cap a new connection evicts the one idle the longest (Envoy's overload manager), never one with
//! a call in flight. A streamed response (a health `Watch`, reflection) is work too: its connection is not
//! idle while the stream is open, and is evicted only when every connection holds a stream.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    core::admission::{ConnectionShare, SharePolicy},
    telemetry::metric,
};

/// How connections are accepted and when they are closed; from the config, validated there.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; past it a new connection evicts the one idle the longest, or waits until
    /// one is idle or closes.
    pub max_connections: usize,
    /// A connection on which nothing was read or written for this long is closed.
    pub idle_timeout: Duration,
    /// A connection with no call in flight for this long is closed, whatever it reads or writes.
    pub max_idle: Duration,
    /// An HTTP/1.1 request head must arrive in full within this long of its first byte (of the connection's
    /// opening, for the first request).
    pub head_timeout: Duration,
    /// A connection whose writes have been blocked (the client does not read) for this long is closed.
    pub write_stall_timeout: Duration,
    /// A TLS handshake that has not finished by then is abandoned.
    pub tls_handshake_timeout: Duration,
}

/// What a handler knows about the connection its call came on (a request extension).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote: Option<SocketAddr>,
    pub share: Arc<ConnectionShare>,
    /// Its calls in flight, and the way to have it closed.
    pub slot: Arc<Slot>,
}

/// A connection a new one may evict only once its last call ended this long ago: between the calls of a
/// caller in use it is not idle.
const IN_USE: Duration = Duration::from_secs(1);
/// One that has had no call yet only once it is this old: time for a new client to send its first request,
/// and a bound on how fast reconnecting clients can evict each other.
const FRESH: Duration = Duration::from_millis(250);
/// One whose last call ended only once it ended this long ago: its answer leaves the service's buffers for the
/// socket after the call has ended, and an eviction at once cut it off (the client read EOF instead).
const ANSWERED: Duration = Duration::from_millis(100);
/// At the cap with no connection to evict, how often the accept loop looks again.
const EVICTION_RETRY: Duration = Duration::from_millis(50);

/// Why the server asked a connection to close (see [`Slot::close`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseCause {
    /// Made room for a new connection at the cap; ignored if a call has started meanwhile.
    Evicted = 1,
    /// A request body arrived slower than the minimum rate.
    BodyTooSlow = 2,
}

impl CloseCause {
    fn label(self) -> &'static str {
        match self {
            CloseCause::Evicted => "evicted",
            CloseCause::BodyTooSlow => "body_too_slow",
        }
    }
}

/// What the accept loop and the call layers know of one open connection: its calls in flight, since when it
/// has had none, and a request to close it, which the connection sees at its next read or write.
#[derive(Debug)]
pub struct Slot {
    opened: Instant,
    calls: AtomicUsize,
    calls_started: AtomicU64,
    /// Answers handed to the connection and not yet all taken by the client ([`Slot::answer_started`]).
    answers: AtomicUsize,
    /// Its streamed responses still open (a health `Watch`, a reflection stream): work in progress, though
    /// no call waits for an answer.
    streams: AtomicUsize,
    /// When its last call or stream ended (or it opened), in nanoseconds after `opened`.
    idle_since: AtomicU64,
    close: AtomicU8,
    waker: Mutex<Option<Waker>>,
    /// Set while a TLS handshake runs: not yet anyone's connection, so the first to go under pressure.
    handshaking: AtomicBool,
    /// Set once the client's first handshake bytes have arrived: from then on the handshake is in progress,
    /// and a slow network gets [`IN_USE`] to finish it before a newcomer may evict it, not [`FRESH`].
    heard_from: AtomicBool,
    /// Wakes a handshake in progress when the connection is asked to close (no read or write sees it then).
    closing: Notify,
}

impl Slot {
    fn new() -> Self {
        Slot {
            opened: Instant::now(),
            calls: AtomicUsize::new(0),
            calls_started: AtomicU64::new(0),
            answers: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            close: AtomicU8::new(0),
            waker: Mutex::new(None),
            handshaking: AtomicBool::new(false),
            heard_from: AtomicBool::new(false),
            closing: Notify::new(),
        }
    }

    /// Completes once the connection is asked to close.
    async fn close_requested_wait(&self) {
        while self.close_requested().is_none() {
            self.closing.notified().await;
        }
    }

    /// Counts an answer as on its way until the returned guard is dropped (when its last byte is taken, or
    /// its stream is reset).
    pub fn answer_started(self: &Arc<Self>) -> AnswerInFlight {
        self.answers.fetch_add(1, Ordering::SeqCst);
        AnswerInFlight(self.clone())
    }

    /// Counts a call in flight until the returned guard is dropped.
    pub fn call_started(self: &Arc<Self>) -> CallInFlight {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.calls_started.fetch_add(1, Ordering::SeqCst);
        CallInFlight(self.clone())
    }

    /// Counts a streamed response as work in progress until the returned guard is dropped (when its last
    /// message is written, or the stream is reset).
    pub fn stream_started(self: &Arc<Self>) -> StreamInFlight {
        self.streams.fetch_add(1, Ordering::SeqCst);
        StreamInFlight(self.clone())
    }

    /// Since when the connection has had no call in flight; `None` while it has one.
    fn idle_since(&self) -> Option<Instant> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.opened + Duration::from_nanos(self.idle_since.load(Ordering::SeqCst)))
    }

    /// Whether a streamed response is open on the connection.
    fn streaming(&self) -> bool {
        self.streams.load(Ordering::SeqCst) > 0
    }

    /// Since when the connection has had neither a call in flight nor an open stream: what the idle limit
    /// (`--max-connection-idle-s`) counts from, as gRPC's MAX_CONNECTION_IDLE counts outstanding RPCs.
    fn quiet_since(&self) -> Option<Instant> {
        self.idle_since().filter(|_| !self.streaming())
    }

    fn mark_idle_now(&self) {
        let nanos = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(nanos, Ordering::SeqCst);
    }

    /// Asks the connection to close: its next read or write fails (an eviction is dropped if a call has
    /// started by then).
    pub fn close(&self, cause: CloseCause) {
        self.close.store(cause as u8, Ordering::SeqCst);
        self.closing.notify_one();
        if let Some(waker) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            waker.wake();
        }
    }

    fn close_requested(&self) -> Option<CloseCause> {
        match self.close.load(Ordering::SeqCst) {
            1 => Some(CloseCause::Evicted),
            2 => Some(CloseCause::BodyTooSlow),
            _ => None,
        }
    }

    fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

/// A call counted in flight on its connection's [`Slot`].
#[derive(Debug)]
pub struct CallInFlight(Arc<Slot>);

/// An answer on its way to the client: the connection is not evicted for [`IN_USE`] after its call ended,
/// so that the answer is not cut off (it was, 0-1 ms after the call ended, when silent sockets kept every
/// other slot too new to evict). A client that does not read is evictable once that has passed.
pub struct AnswerInFlight(Arc<Slot>);

impl Drop for AnswerInFlight {
    fn drop(&mut self) {
        self.0.mark_idle_now();
        self.0.answers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.0.mark_idle_now();
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A streamed response counted open on its connection's [`Slot`].
#[derive(Debug)]
pub struct StreamInFlight(Arc<Slot>);

impl Drop for StreamInFlight {
    fn drop(&mut self) {
        self.0.mark_idle_now();
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The open connections' slots, for choosing whom to evict.
#[derive(Debug, Default)]
struct Slots {
    open: Mutex<HashMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
}

impl Slots {
    fn register(self: &Arc<Self>, slot: Arc<Slot>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, slot);
        Registration {
            slots: self.clone(),
            id,
        }
    }

    /// Asks one connection without a call in flight to close, choosing, in order: a TLS handshake that has
    /// run past [`FRESH`] (not yet anyone's connection), silent ones first, and one whose client has sent its
    /// hello only past [`IN_USE`] (a slow network is not silence); the connection idle the longest, once idle
    /// for [`IN_USE`]; the one whose last call ended the longest ago, once [`ANSWERED`] has passed (or
    /// [`IN_USE`], while its answer is still being handed over): a connection that makes a cheap call every
    /// half second must not hold its slot for ever (issue #35), nor lose an answer it has not sent; and, only
    /// when every connection holds one, the one with a streamed response open whose last call ended longest
    /// ago (a health `Watch` is a client's work, not idleness; it goes last, not never, so that slots can
    /// always be reclaimed). A connection that has had no call yet is never chosen before it is [`FRESH`].
    /// False when none may be evicted (every one has a call in flight, is new, or is closing already).
    fn evict_longest_idle(&self) -> bool {
        let now = Instant::now();
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let candidates = || {
            open.values()
                .filter(|slot| slot.close_requested().is_none())
                .filter_map(|slot| {
                    let idle = now.saturating_duration_since(slot.idle_since()?);
                    let never_called = slot.calls_started.load(Ordering::SeqCst) == 0;
                    let heard_handshake =
                        slot.handshaking.load(Ordering::SeqCst) && slot.heard_from.load(Ordering::SeqCst);
                    let answering = slot.answers.load(Ordering::SeqCst) > 0;
                    let grace = if heard_handshake || answering {
                        IN_USE
                    } else if never_called {
                        FRESH
                    } else {
                        ANSWERED
                    };
                    (idle >= grace).then_some((idle, slot))
                })
        };
        let not_streaming = || candidates().filter(|(_, slot)| !slot.streaming());
        let victim = candidates()
            .filter(|(_, slot)| slot.handshaking.load(Ordering::SeqCst))
            .max_by_key(|(idle, slot)| (!slot.heard_from.load(Ordering::SeqCst), *idle))
            .or_else(|| {
                not_streaming()
                    .filter(|(idle, _)| *idle >= IN_USE)
                    .max_by_key(|(idle, _)| *idle)
            })
            .or_else(|| not_streaming().max_by_key(|(idle, _)| *idle))
            .or_else(|| {
                // A stream goes only when every connection holds one: a connection busy with a call, or
                // too new to evict, will be a candidate in a moment, and the accept loop looks again.
                let all_streaming = open
                    .values()
                    .filter(|slot| slot.close_requested().is_none())
                    .all(|slot| slot.streaming());
                candidates().filter(|_| all_streaming).max_by_key(|(idle, _)| *idle)
            });
        match victim {
            Some((_, slot)) => {
                slot.close(CloseCause::Evicted);
                true
            }
            None => false,
        }
    }
}

/// Takes a connection's slot off the list when the connection is dropped.
struct Registration {
    slots: Arc<Slots>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
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
    let slots = Arc::new(Slots::default());
    let mut backoff = Duration::ZERO;
    loop {
        let (tcp, remote) = tokio::select! {
            () = tx.closed() => return,
            accepted = accept(&listener, &mut backoff) => accepted,
        };
        let permit = tokio::select! {
            () = tx.closed() => return,
            permit = room(&open, &slots) => permit,
        };
        // Responses that follow a WINDOW_UPDATE otherwise wait for the client's delayed ACK (40 ms per
        // multi-image call, bench/README.md).
        let _ = tcp.set_nodelay(true);
        let info = ConnectionInfo {
            remote: Some(remote),
            share: Arc::new(ConnectionShare::new(&shares)),
            slot: Arc::new(Slot::new()),
        };
        let held = Held {
            _open: permit,
            _registration: slots.register(info.slot.clone()),
        };
        match &tls {
            None => {
                let connection = Connection::new(Transport::Plain(tcp), info, limits, held);
                if tx.send(Ok(connection)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                info.slot.handshaking.store(true, Ordering::SeqCst);
                tokio::spawn(async move {
                    let slot = info.slot.clone();
                    let handshake = async {
                        // Waits for the client's first bytes (its hello) without taking them.
                        tcp.peek(&mut [0u8; 1]).await?;
                        slot.heard_from.store(true, Ordering::SeqCst);
                        acceptor.accept(tcp).await
                    };
                    let handshake = tokio::time::timeout(limits.tls_handshake_timeout, handshake);
                    // An eviction ends a handshake at once: its slot is what the newcomer waits for.
                    let handshake = tokio::select! {
                        done = handshake => done,
                        () = slot.close_requested_wait() => {
                            tracing::debug!(%remote, "TLS handshake evicted");
                            metrics::counter!(metric::CONNECTIONS_CLOSED, "cause" => "evicted").increment(1);
                            return;
                        }
                    };
                    slot.handshaking.store(false, Ordering::SeqCst);
                    // The connection is the client's from now on: the time a new one has to send its first
                    // request before it may be evicted ([`FRESH`]) starts here, not when the handshake began.
                    slot.mark_idle_now();
                    match handshake {
                        Ok(Ok(stream)) => {
                            let transport = Transport::Tls(Box::new(stream));
                            let connection = Connection::new(transport, info, limits, held);
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

/// A place under the connection cap for a connection just accepted: free at once, or made by evicting a
/// connection ([`Slots::evict_longest_idle`]), or else waited for (no connection may be evicted while every
/// one has a call in flight or is new).
async fn room(open: &Arc<Semaphore>, slots: &Slots) -> OwnedSemaphorePermit {
    loop {
        if let Ok(permit) = open.clone().try_acquire_owned() {
            return permit;
        }
        slots.evict_longest_idle();
        // The evicted connection frees its place when it sees the request, at once unless a call started.
        if let Ok(permit) = tokio::time::timeout(EVICTION_RETRY, open.clone().acquire_owned()).await {
            return permit.expect("the connection semaphore is never closed");
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

/// What an open connection holds until it is dropped: its place under the cap and on the list of slots.
struct Held {
    _open: OwnedSemaphorePermit,
    _registration: Registration,
}

/// HTTP/2's connection preface: a connection is HTTP/2 only once all of it has arrived.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection said it speaks: HTTP/2 opens with its preface ("PRI * HTTP/2.0").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Unknown,
    Http1,
    Http2,
}

/// One accepted connection: closed with an error once one of its timeouts passes or the server asks for it
/// ([`Slot::close`]), and counted against the connection cap until dropped.
pub struct Connection {
    transport: Transport,
    info: ConnectionInfo,
    limits: ConnectionLimits,
    /// Progress in either direction moves this; the timer is re-armed lazily, only when it fires.
    last_active: Instant,
    protocol: Protocol,
    /// How much of [`HTTP2_PREFACE`] has arrived while the protocol is unknown.
    preface_matched: usize,
    /// An HTTP/1.1 request head being awaited: since when, and the connection's calls started by then.
    head: Option<(Instant, u64)>,
    /// Since when writes have been blocked.
    write_stalled: Option<Instant>,
    /// Once closed, why: every later read or write fails too.
    closed: Option<&'static str>,
    timer: Pin<Box<Sleep>>,
    _held: Held,
    _gauge: OpenGauge,
}

impl Connection {
    fn new(transport: Transport, info: ConnectionInfo, limits: ConnectionLimits, held: Held) -> Self {
        let now = Instant::now();
        Connection {
            transport,
            info,
            limits,
            last_active: now,
            protocol: Protocol::Unknown,
            preface_matched: 0,
            head: Some((now, 0)),
            write_stalled: None,
            closed: None,
            timer: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            _held: held,
            _gauge: OpenGauge::new(),
        }
    }

    /// The earliest of the connection's deadlines, or why it must close now.
    fn next_deadline(&mut self, now: Instant) -> Result<Instant, &'static str> {
        let slot = &self.info.slot;
        if let Some((_, started)) = self.head
            && slot.calls_started.load(Ordering::SeqCst) != started
        {
            self.head = None;
        }
        let deadlines = [
            (Some(self.last_active + self.limits.idle_timeout), "idle_timeout"),
            (slot.quiet_since().map(|since| since + self.limits.max_idle), "max_idle"),
            (
                self.head.map(|(since, _)| since + self.limits.head_timeout),
                "head_timeout",
            ),
            (
                self.write_stalled.map(|since| since + self.limits.write_stall_timeout),
                "write_stall",
            ),
        ];
        let mut next = None::<Instant>;
        for (deadline, cause) in deadlines {
            let Some(deadline) = deadline else { continue };
            if now >= deadline {
                return Err(cause);
            }
            next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
        Ok(next.expect("the idle timeout is always armed"))
    }

    /// Called when the transport is not ready: an error once a deadline has passed.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> Result<(), &'static str> {
        loop {
            let due = self.next_deadline(Instant::now())?;
            if self.timer.deadline() != due {
                self.timer.as_mut().reset(due);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
        }
    }

    /// The server's request to close, if one is pending and still applies.
    fn close_requested(&self) -> Option<&'static str> {
        let slot = &self.info.slot;
        match slot.close_requested()? {
            CloseCause::Evicted if slot.calls.load(Ordering::SeqCst) > 0 => {
                // A call started after the eviction was decided: the accept loop will pick another.
                slot.close.store(0, Ordering::SeqCst);
                None
            }
            cause => Some(cause.label()),
        }
    }

    fn fail<T>(&mut self, cause: &'static str) -> Poll<io::Result<T>> {
        if self.closed.is_none() {
            self.closed = Some(cause);
            tracing::debug!(remote = ?self.info.remote, cause, "closing connection");
            metrics::counter!(metric::CONNECTIONS_CLOSED, "cause" => cause).increment(1);
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connection closed by the server: {cause}"),
        )))
    }

    fn progress<T>(&mut self, result: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.last_active = Instant::now();
                if let Some(cause) = self.close_requested() {
                    return self.fail(cause);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                self.info.slot.register(cx.waker());
                if let Some(cause) = self.close_requested() {
                    return self.fail(cause);
                }
                match self.poll_deadlines(cx) {
                    Ok(()) => Poll::Pending,
                    Err(cause) => self.fail(cause),
                }
            }
        }
    }

    /// Notes what a read brought: which protocol the connection speaks, and the start of an HTTP/1.1 request
    /// head (bytes arriving while no call is in flight).
    fn on_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.protocol == Protocol::Unknown {
            // The whole preface, not its first word: a request head "PRI / HTTP/1.1" is HTTP/1 and keeps the
            // head timeout. Until the preface is complete the head timeout stays armed.
            let expected = &HTTP2_PREFACE[self.preface_matched..];
            let n = bytes.len().min(expected.len());
            if bytes[..n] != expected[..n] {
                self.protocol = Protocol::Http1;
            } else {
                self.preface_matched += n;
                if self.preface_matched == HTTP2_PREFACE.len() {
                    self.protocol = Protocol::Http2;
                }
            }
        }
        let slot = &self.info.slot;
        match self.protocol {
            Protocol::Http2 => self.head = None,
            _ if self.head.is_none() && slot.calls.load(Ordering::SeqCst) == 0 => {
                self.head = Some((Instant::now(), slot.calls_started.load(Ordering::SeqCst)));
            }
            _ => {}
        }
    }

    fn write_progress<T>(&mut self, result: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if result.is_pending() {
            self.write_stalled.get_or_insert_with(Instant::now);
        } else {
            self.write_stalled = None;
        }
        self.progress(result, cx)
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
        if let Some(cause) = this.closed {
            return this.fail(cause);
        }
        let before = buf.filled().len();
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = result {
            this.on_read(&buf.filled()[before..]);
        }
        this.progress(result, cx)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(cause) = this.closed {
            return this.fail(cause);
        }
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.write_progress(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(cause) = this.closed {
            return this.fail(cause);
        }
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.write_progress(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(cause) = this.closed {
            return this.fail(cause);
        }
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        };
        this.write_progress(result, cx)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot as a connection that has made one call, which ended [`ANSWERED`] ago (so it may be evicted at
    /// once), registered in `slots`.
    fn called(slots: &Arc<Slots>) -> (Arc<Slot>, Registration) {
        let slot = Arc::new(Slot {
            opened: Instant::now() - ANSWERED,
            ..Slot::new()
        });
        drop(slot.call_started());
        slot.idle_since.store(0, Ordering::SeqCst);
        let registration = slots.register(slot.clone());
        (slot, registration)
    }

    #[test]
    fn a_connection_with_an_open_stream_is_evicted_after_one_without_work() {
        let slots = Arc::new(Slots::default());
        let (watching, _w) = called(&slots);
        let _stream = watching.stream_started();
        let (idle, _i) = called(&slots);
        assert!(slots.evict_longest_idle());
        assert_eq!(idle.close_requested(), Some(CloseCause::Evicted));
        assert_eq!(watching.close_requested(), None);
    }

    #[test]
    fn a_stream_waits_while_a_call_in_flight_will_free_a_connection_soon() {
        let slots = Arc::new(Slots::default());
        let (watching, _w) = called(&slots);
        let _stream = watching.stream_started();
        let (busy, _b) = called(&slots);
        let _call = busy.call_started();
        assert!(!slots.evict_longest_idle(), "nothing may be evicted yet");
        assert_eq!(watching.close_requested(), None);
    }

    #[test]
    fn when_every_connection_holds_a_stream_one_is_evicted_so_slots_can_be_reclaimed() {
        let slots = Arc::new(Slots::default());
        let (first, _f) = called(&slots);
        let _first_stream = first.stream_started();
        let (second, _s) = called(&slots);
        let _second_stream = second.stream_started();
        assert!(slots.evict_longest_idle());
        let evicted = [&first, &second]
            .iter()
            .filter(|slot| slot.close_requested().is_some())
            .count();
        assert_eq!(evicted, 1);
    }

    #[test]
    fn an_answer_on_its_way_is_not_cut_off_by_an_eviction() {
        // Issue #35's TLS row: silent sockets kept every other slot too new to evict, so the connection whose
        // call had just ended went, 0-1 ms later, and its client read EOF instead of its answer.
        let slots = Arc::new(Slots::default());
        let (answering, _a) = called(&slots);
        let answer = answering.answer_started();
        assert!(
            !slots.evict_longest_idle(),
            "nothing may be evicted while the answer is on its way"
        );
        assert_eq!(answering.close_requested(), None);
        drop(answer);
        std::thread::sleep(ANSWERED);
        assert!(
            slots.evict_longest_idle(),
            "once taken and written, the connection is idle like any other"
        );
        assert_eq!(answering.close_requested(), Some(CloseCause::Evicted));
    }

    #[test]
    fn a_call_that_has_just_ended_keeps_its_connection_while_its_answer_leaves() {
        let slots = Arc::new(Slots::default());
        let slot = Arc::new(Slot::new());
        let _registration = slots.register(slot.clone());
        drop(slot.call_started());
        assert!(!slots.evict_longest_idle(), "its answer may still be in the buffers");
        std::thread::sleep(ANSWERED);
        assert!(slots.evict_longest_idle());
        assert_eq!(slot.close_requested(), Some(CloseCause::Evicted));
    }

    #[test]
    fn a_silent_handshake_goes_before_one_whose_client_has_spoken() {
        let slots = Arc::new(Slots::default());
        let handshake = |heard: bool| {
            let slot = Arc::new(Slot::new());
            slot.handshaking.store(true, Ordering::SeqCst);
            slot.heard_from.store(heard, Ordering::SeqCst);
            // Opened long enough ago for either to be evicted.
            slot.idle_since.store(0, Ordering::SeqCst);
            let registration = slots.register(slot.clone());
            (slot, registration)
        };
        let (spoken, _s) = handshake(true);
        let (silent, _q) = handshake(false);
        std::thread::sleep(IN_USE);
        assert!(slots.evict_longest_idle());
        assert_eq!(silent.close_requested(), Some(CloseCause::Evicted));
        assert_eq!(spoken.close_requested(), None);
    }

    #[test]
    fn the_idle_limit_counts_from_the_end_of_the_last_stream() {
        let slot = Arc::new(Slot::new());
        drop(slot.call_started());
        let stream = slot.stream_started();
        assert_eq!(slot.quiet_since(), None, "a connection with an open stream is not idle");
        let before = Instant::now();
        drop(stream);
        assert!(
            slot.quiet_since()
                .is_some_and(|since| since + Duration::from_millis(1) >= before)
        );
    }
}
