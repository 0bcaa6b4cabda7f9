//! The layers every call goes through, whatever its service (classifier, OIP, health, reflection, gRPC-Web
//! calls of the page, and the OIP's REST routes): [`RpcLayer`] gives it a request id, a span, duration and
//! status metrics and its deadline; [`CallLimitsLayer`] holds it to its connection's share of calls and
//! request bytes and to a minimum body rate, and counts it in flight on its connection. A REST call is
//! refused in its own protocol (JSON, an HTTP status), a gRPC call with a status.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tonic::{Status, body::Body};
use tracing::Instrument;

use crate::{
    core::batching::ActiveCalls,
    error::{AdmissionError, ErrorKind, ServiceError},
    telemetry::metric,
    traces,
    transport::connections::{AnswerInFlight, CloseCause, ConnectionInfo, Slot, StreamInFlight},
    transport::failure_log::{Decision, FailureLog},
    transport::status,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The caller's deadline, from its `grpc-timeout` header; handlers find it in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// One for the process: a peer's failures are rate-limited across all its connections.
static FAILURE_LOG: std::sync::LazyLock<FailureLog> = std::sync::LazyLock::new(FailureLog::default);

/// See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Rpc<S> {
        Rpc { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Rpc<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for Rpc<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let rpc = if is_grpc(request.headers()) {
            rpc_label(path)
        } else if let Some(route) = rest_label(path) {
            route
        } else {
            // The page's own files: no call to count.
            return Box::pin(self.inner.call(request));
        };
        let id = request_id(request.headers());
        let peer = request
            .extensions()
            .get::<ConnectionInfo>()
            .and_then(|c| c.remote)
            .map(|a| a.ip());
        if let Some(deadline) = grpc_deadline(request.headers()) {
            request.extensions_mut().insert(Deadline(deadline));
        }
        let span = tracing::info_span!(
            "rpc",
            rpc = %rpc,
            request_id = %id,
            model = tracing::field::Empty,
            version = tracing::field::Empty,
            images = tracing::field::Empty
        );
        if traces::enabled() {
            traces::continue_trace(&span, request.headers());
        }
        // The duration counts from the request's last byte: how long a client sends its body (a slow link, a
        // connection shared with many calls) is not the server's handling time.
        let started = Instant::now();
        let received = Arc::new(AtomicU64::new(0));
        let request = request.map(|inner| {
            Body::new(TimedBody {
                inner,
                started,
                received: received.clone(),
            })
        });
        let response = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let mut result = response.await;
            if let Ok(response) = &mut result {
                let received = started + Duration::from_nanos(received.load(Ordering::Relaxed));
                let elapsed = received.elapsed();
                // A failed unary call answers "trailers-only": its status is in the headers. A REST call's
                // failure carries its kind (`status::http_response`), counted under the same code names.
                let status = match response.extensions().get::<ErrorKind>() {
                    Some(&kind) => {
                        let message = response
                            .extensions()
                            .get::<status::ErrorMessage>()
                            .map_or_else(|| response.status().to_string(), |m| m.0.clone());
                        Some(Status::new(status::code(kind), message))
                    }
                    None => Status::from_header_map(response.headers()),
                };
                let code = status.as_ref().map_or(tonic::Code::Ok, Status::code);
                let (calls, durations) = call_metrics(rpc, code);
                calls.increment(1);
                durations.record(elapsed.as_secs_f64());
                // A served call is a DEBUG line (a line per call at INFO was a measurable share of a small
                // machine's CPU); failures stay at WARN, at a bounded rate per peer. The span carries the
                // request id either way.
                span.in_scope(|| match &status {
                    None => tracing::debug!(outcome = "ok", duration_ms = elapsed.as_secs_f64() * 1e3, "call finished"),
                    Some(status) => match FAILURE_LOG.decide(peer, Instant::now()) {
                        Decision::Log { left_out: 0 } => tracing::warn!(outcome = ?code, duration_ms = elapsed.as_secs_f64() * 1e3, error = status.message(), "call failed"),
                        Decision::Log { left_out } => tracing::warn!(outcome = ?code, duration_ms = elapsed.as_secs_f64() * 1e3, error = status.message(), failures_not_logged_before = left_out, "call failed"),
                        Decision::LeaveOut => metrics::counter!(metric::FAILURES_NOT_LOGGED).increment(1),
                    },
                });
                if let Ok(value) = HeaderValue::from_str(&id) {
                    response.headers_mut().insert("x-request-id", value);
                }
            }
            result
        })
    }
}

/// The call counter and duration histogram of (`rpc`, `code`), looked up in the recorder (labels allocated,
/// key hashed) once per pair rather than once per call.
fn call_metrics(rpc: &'static str, code: tonic::Code) -> (metrics::Counter, metrics::Histogram) {
    type Handles = HashMap<(&'static str, i32), (metrics::Counter, metrics::Histogram)>;
    // Bounded: `rpc` comes from a closed set and `code` has 17 values.
    static HANDLES: OnceLock<RwLock<Handles>> = OnceLock::new();
    let handles = HANDLES.get_or_init(RwLock::default);
    let key = (rpc, code as i32);
    if let Some(found) = handles.read().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return found.clone();
    }
    let label = format!("{code:?}");
    let made = (
        metrics::counter!(metric::REQUESTS, "rpc" => rpc, "code" => label.clone()),
        metrics::histogram!(metric::REQUEST_DURATION, "rpc" => rpc, "code" => label),
    );
    handles
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_insert(made)
        .clone()
}

/// The methods the server serves; anything else is counted as "unknown". The label must come from a closed
/// set: a client could otherwise mint a new metric series per made-up path and grow the recorder without end.
const RPCS: [&str; 16] = [
    "Classify",
    "GetModelInfo",
    "Check",
    "Watch",
    "ServerReflectionInfo",
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
];

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The Open Inference Protocol's REST routes (`rest`), each a closed label; `None` for other paths.
fn rest_label(path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/v2")?;
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    Some(match segments.as_slice() {
        [""] => "v2/server_metadata",
        ["health", "live" | "ready"] => "v2/health",
        ["models", "stats"] => "v2/model_statistics",
        ["models", _] | ["models", _, "versions", _] => "v2/model_metadata",
        ["models", _, "config"] | ["models", _, "versions", _, "config"] => "v2/model_config",
        ["models", _, "stats"] | ["models", _, "versions", _, "stats"] => "v2/model_statistics",
        ["models", _, "drift"] | ["models", _, "versions", _, "drift"] => "v2/model_drift",
        ["models", _, "captures"] => "v2/model_captures",
        ["models", _, "ready"] | ["models", _, "versions", _, "ready"] => "v2/model_ready",
        ["models", _, "infer"] | ["models", _, "versions", _, "infer"] => "v2/infer",
        ["repository", "index"] => "v2/repository_index",
        ["repository", "models", _, "load" | "unload"] => "v2/repository_load",
        _ => "v2/unknown",
    })
}

/// "/fashion_mnist.v1.Classifier/Classify" -> "Classify".
fn rpc_label(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("unknown")
}

/// A request body that notes when its last frame arrived (nanoseconds after `started`).
struct TimedBody {
    inner: Body,
    started: Instant,
    received: Arc<AtomicU64>,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            let nanos = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.received.store(nanos, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The caller's deadline from the `grpc-timeout` header (e.g. "250m" = 250 ms), if any.
fn grpc_deadline(headers: &HeaderMap) -> Option<Instant> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    // A millisecond early: tonic's own timer for the same header would otherwise answer first, with CANCELLED.
    Instant::now().checked_add(timeout.saturating_sub(Duration::from_millis(1)))
}

/// The caller's `x-request-id` when it is a plain token (letters, digits and `-._:`, at most 128), or a fresh
/// one: an id is written into every log line of the call, so it must not be able to forge fields or lines.
fn request_id(headers: &HeaderMap) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok())
        && is_safe_request_id(id)
    {
        return id.to_string();
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{started:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn is_safe_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

/// Caps the calls of one connection in progress, and the request bytes held by calls in flight, across the
/// server and per connection. A call past the connection's call share is refused at once; each body frame is
/// charged as it arrives, and the charge lasts until the call's response is ready. Past any cap the call
/// fails with RESOURCE_EXHAUSTED instead of waiting or buffering more.
///
/// Refusing, not queueing, is deliberate: a call held back before its handler runs leaves its body unread in
/// the connection's HTTP/2 flow-control window, and enough of them stall the calls that are running (tonic's
/// `concurrency_limit_per_connection` deadlocked a greedy connection until its calls timed out).
///
/// An eighth of the bytes is kept for small calls (whose body so far is at most [`SMALL_CALL_BYTES`]): a few
/// uploads stalled at 15 MiB can fill the rest, but not refuse everyone else's ordinary calls for the 30 s
/// before the idle or request timeout ends them.
///
/// A request body must also arrive at [`MinBodyRate`] until the call is answered: one sent a byte every few
/// seconds otherwise held its call, and so its connection's slot, for the whole request timeout. Below it the
/// call fails. On HTTP/2 that ends its stream alone (hyper resets a stream whose response ends before its
/// body): the connection may carry other users' calls, as it does behind Envoy or an ingress. On HTTP/1.1 the
/// unread body blocks the connection, so it is closed too. A call answered before its body ends (a
/// bidirectional stream such as reflection) is not held to it.
#[derive(Debug, Clone)]
pub struct CallLimitsLayer {
    pools: Arc<BytePools>,
    rate: MinBodyRate,
    calls: ActiveCalls,
}

/// The slowest a request body may arrive: after `grace`, at least `bytes_per_s` on average since the call
/// began (nginx's client_body_timeout as a rate); from the config, validated there.
#[derive(Debug, Clone, Copy)]
pub struct MinBodyRate {
    pub grace: Duration,
    pub bytes_per_s: u64,
}

impl MinBodyRate {
    /// When a body that began at `started` and has brought `received` bytes falls below the rate.
    fn due(&self, started: tokio::time::Instant, received: usize) -> tokio::time::Instant {
        let earned = Duration::from_secs_f64(received as f64 / self.bytes_per_s as f64);
        started + self.grace + earned.min(Duration::from_secs(86_400))
    }
}

/// A call whose body has reached this many bytes no longer counts as small.
pub const SMALL_CALL_BYTES: usize = 256 << 10;

#[derive(Debug)]
struct BytePools {
    /// Every call's bytes, while there are any.
    shared: Arc<Semaphore>,
    /// Then small calls' bytes only.
    small_calls: Arc<Semaphore>,
}

impl BytePools {
    /// Takes `n` more bytes for a call into `held`: from its connection's share, then the shared pool, then
    /// (for a call of at most [`SMALL_CALL_BYTES`] so far) the small calls' reserve.
    fn charge(
        &self,
        connection: Option<&Arc<Semaphore>>,
        held: &mut Held,
        n: u32,
        small: bool,
    ) -> Result<(), ServiceError> {
        if let Some(connection) = connection {
            held.permits.push(
                connection
                    .clone()
                    .try_acquire_many_owned(n)
                    .map_err(|_| ServiceError::from(AdmissionError::ConnectionRequestBytes))?,
            );
        }
        let permit = match self.shared.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(_) if small => self
                .small_calls
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| ServiceError::from(AdmissionError::RequestBytes))?,
            Err(_) => return Err(ServiceError::from(AdmissionError::RequestBytes)),
        };
        held.permits.push(permit);
        held.bytes += u64::from(n);
        held.gauge.increment(f64::from(n));
        Ok(())
    }
}

impl CallLimitsLayer {
    /// `calls` counts every call but the long-lived streams from its head until its answer is ready.
    pub fn new(max_request_bytes_in_flight: usize, rate: MinBodyRate, calls: ActiveCalls) -> Self {
        let small = max_request_bytes_in_flight / 8;
        CallLimitsLayer {
            pools: Arc::new(BytePools {
                shared: Arc::new(Semaphore::new(max_request_bytes_in_flight - small)),
                small_calls: Arc::new(Semaphore::new(small)),
            }),
            rate,
            calls,
        }
    }
}

impl<S> tower::Layer<S> for CallLimitsLayer {
    type Service = CallLimits<S>;

    fn layer(&self, inner: S) -> CallLimits<S> {
        CallLimits {
            inner,
            pools: self.pools.clone(),
            rate: self.rate,
            calls: self.calls.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallLimits<S> {
    inner: S,
    pools: Arc<BytePools>,
    rate: MinBodyRate,
    calls: ActiveCalls,
}

type Charge = Arc<Mutex<Held>>;

tokio::task_local! {
    /// The account of the call whose handler is running, for what its messages take once decoded beyond
    /// their wire bytes ([`charge_decoded`]).
    static DECODING: DecodeAccount;
}

/// Where a call's decoded messages are charged: the same account, connection share and charge as its body.
struct DecodeAccount {
    pools: Arc<BytePools>,
    connection: Option<Arc<Semaphore>>,
    charge: Charge,
}

/// Charges `extra` bytes to the call being decoded, until it is answered: what the codec's scan proves a
/// message will take once decoded beyond its wire bytes (a packed varint of one byte becomes up to 16). A
/// message that finds no room is refused with RESOURCE_EXHAUSTED before it is decoded. Outside a served call
/// (a client decoding its answers) there is nothing to charge.
pub(crate) fn charge_decoded(extra: usize) -> Result<(), Status> {
    if extra == 0 {
        return Ok(());
    }
    DECODING
        .try_with(|account| {
            let n = u32::try_from(extra).map_err(|_| Status::from(ServiceError::from(AdmissionError::RequestBytes)))?;
            let mut held = account.charge.lock().expect("the charge lock is never poisoned");
            account
                .pools
                .charge(account.connection.as_ref(), &mut held, n, extra <= SMALL_CALL_BYTES)
                .map_err(Status::from)
        })
        .unwrap_or(Ok(()))
}

/// The bytes one call holds in the account: its request's (released, and taken off the gauge, when the call
/// is done with them) or its answer's (when the connection has taken the last of them).
struct Held {
    permits: Vec<OwnedSemaphorePermit>,
    bytes: u64,
    gauge: &'static metrics::Gauge,
}

impl Held {
    fn request() -> Self {
        static GAUGE: OnceLock<metrics::Gauge> = OnceLock::new();
        Held::on(GAUGE.get_or_init(|| metrics::gauge!(metric::REQUEST_BYTES_IN_FLIGHT)))
    }

    fn answer() -> Self {
        static GAUGE: OnceLock<metrics::Gauge> = OnceLock::new();
        Held::on(GAUGE.get_or_init(|| metrics::gauge!(metric::ANSWER_BYTES_WAITING)))
    }

    /// The gauge is looked up in the recorder once per process, on the first call (after the recorder is
    /// installed), not once per charge: a lookup hashes the key under a lock, several times per call.
    fn on(gauge: &'static metrics::Gauge) -> Self {
        Held {
            permits: Vec::new(),
            bytes: 0,
            gauge,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.decrement(self.bytes as f64);
    }
}

impl<S> tower::Service<http::Request<Body>> for CallLimits<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let connection = request.extensions().get::<ConnectionInfo>();
        let (share, slot) = (connection.map(|c| c.share.clone()), connection.map(|c| c.slot.clone()));
        // Until its response is ready the call keeps its connection from counting as idle; a streamed
        // response (a health Watch, reflection) keeps it busy until the stream ends.
        let in_flight = slot.as_ref().map(Slot::call_started);
        let answer_slot = slot.clone();
        let streamed = SERVER_STREAMING.contains(&request.uri().path());
        let stream = slot.as_ref().filter(|_| streamed).cloned();
        // A stream that stays open (a health Watch) is not a call in progress: counted, it would keep every
        // lone call off its own thread for as long as some probe watches.
        let active = (!streamed).then(|| self.calls.begin());
        let grpc = is_grpc(request.headers());
        let refuse = |refused: ServiceError| -> Self::Future {
            let refusal = refusal(grpc, refused);
            Box::pin(async move { Ok(refusal) })
        };
        let call = match &share {
            Some(share) => match share.calls.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return refuse(AdmissionError::ConnectionCalls.into()),
            },
            None => None,
        };
        // The request's header list is held as long as its body (HPACK lets a few wire bytes name a list of
        // up to --max-header-list-bytes): charged to the same account, refused like a body that finds no room.
        let mut head = Held::request();
        let head_bytes = u32::try_from(header_list_bytes(request.headers())).unwrap_or(u32::MAX);
        if let Err(refused) = self
            .pools
            .charge(share.as_ref().map(|s| &s.bytes), &mut head, head_bytes, true)
        {
            return refuse(refused);
        }
        let charge: Charge = Arc::new(Mutex::new(Held::request()));
        let answered = Arc::new(AtomicBool::new(false));
        let (pools, connection_bytes) = (self.pools.clone(), share.as_ref().map(|s| s.bytes.clone()));
        // HTTP/2 multiplexes calls on one connection; only an HTTP/1 call owns its connection.
        let slot = slot.filter(|_| request.version() < http::Version::HTTP_2);
        let framing = grpc.then(|| GrpcFraming {
            client_streaming: CLIENT_STREAMING.contains(&request.uri().path()),
            ..GrpcFraming::default()
        });
        let decoding = DecodeAccount {
            pools: self.pools.clone(),
            connection: connection_bytes.clone(),
            charge: charge.clone(),
        };
        let request = request.map(|inner| {
            Body::new(ChargedBody {
                inner,
                framing,
                pools: self.pools.clone(),
                connection: share.map(|s| s.bytes.clone()),
                charge: charge.clone(),
                received: 0,
                rate: self.rate,
                started: tokio::time::Instant::now(),
                too_slow: None,
                slot,
                answered: answered.clone(),
            })
        });
        let response = DECODING.scope(decoding, self.inner.call(request));
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(e) => return Err(e),
            };
            answered.store(true, Ordering::Relaxed);
            // The handler has finished with the request's bytes (a streaming response holds none of them).
            drop((charge, head, call));
            let response = match stream {
                Some(slot) => response.map(|inner| {
                    Body::new(StreamBody {
                        inner,
                        _open: slot.stream_started(),
                    })
                }),
                None => {
                    let answering = answer_slot.as_ref().map(Slot::answer_started);
                    charge_answer(response, &pools, connection_bytes.as_ref(), grpc, answering).await
                }
            };
            drop((in_flight, active));
            Ok(response)
        })
    }
}

/// A call refused by a limit of this layer, in its protocol's terms: a gRPC status, or a REST error.
fn refusal(grpc: bool, refused: ServiceError) -> http::Response<Body> {
    if grpc {
        Status::from(refused).into_http()
    } else {
        status::http_response(refused).map(Body::new)
    }
}

/// Reads what of a (unary) answer is ready and charges its bytes to the account until the connection has
/// taken them: an answer waits in the server for as long as its client does not read (a zero HTTP/2 window),
/// and 100 streams on each of 256 connections, each waiting for a 60 kB answer, held 1.6 GiB. An answer that
/// finds no room is replaced by RESOURCE_EXHAUSTED (503 for REST), which frees it: the limit acts on the
/// stream that broke it.
async fn charge_answer(
    response: http::Response<Body>,
    pools: &BytePools,
    connection: Option<&Arc<Semaphore>>,
    grpc: bool,
    answering: Option<AnswerInFlight>,
) -> http::Response<Body> {
    let (parts, mut body) = response.into_parts();
    let mut ready = std::collections::VecDeque::new();
    let mut ended = false;
    // Only what is ready now: a unary answer is whole at once; anything still to come passes through.
    while let Poll::Ready(frame) = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
        match frame {
            Some(frame) => ready.push_back(frame),
            None => {
                ended = true;
                break;
            }
        }
    }
    let bytes: usize = ready
        .iter()
        .filter_map(|f| f.as_ref().ok().and_then(Frame::data_ref).map(Bytes::len))
        .sum();
    let mut held = Held::answer();
    let charged = match u32::try_from(bytes) {
        Ok(0) => Ok(()),
        Ok(n) => pools.charge(connection, &mut held, n, bytes <= SMALL_CALL_BYTES),
        Err(_) => Err(ServiceError::from(AdmissionError::AnswerBytes)),
    };
    if charged.is_err() {
        return refusal(grpc, AdmissionError::AnswerBytes.into());
    }
    let body = AnswerBody {
        ready,
        rest: (!ended).then_some(body),
        _held: held,
        _answering: answering,
    };
    http::Response::from_parts(parts, Body::new(body))
}

/// An answer whose ready frames were read (and charged) before the connection asked for them; the charge
/// goes when the body does, after its last frame.
struct AnswerBody {
    ready: std::collections::VecDeque<Result<Frame<Bytes>, Status>>,
    rest: Option<Body>,
    _held: Held,
    /// Keeps the connection from being evicted while the answer is on its way.
    _answering: Option<AnswerInFlight>,
}

impl HttpBody for AnswerBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(frame) = self.ready.pop_front() {
            return Poll::Ready(Some(frame));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let ready: u64 = self
            .ready
            .iter()
            .filter_map(|f| f.as_ref().ok().and_then(Frame::data_ref))
            .map(|d| d.len() as u64)
            .sum();
        match &self.rest {
            None => SizeHint::with_exact(ready),
            Some(rest) => {
                let mut hint = rest.size_hint();
                hint.set_lower(hint.lower() + ready);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + ready);
                }
                hint
            }
        }
    }
}

/// A header list's size as HTTP/2 counts it against SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 6.5.2): each
/// field's name and value, plus 32 bytes.
fn header_list_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// The gRPC methods whose request is a stream of messages (the rest send one): their bytes are charged per
/// message, not per call, since such a call may stay open as long as its client wants.
const CLIENT_STREAMING: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The gRPC methods whose response is a stream of messages, open as long as the client wants: the connection
/// counts as busy, not idle, until the stream ends.
const SERVER_STREAMING: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// A streamed response body, counted open on its connection until it ends or is dropped (a reset stream).
struct StreamBody {
    inner: Body,
    _open: StreamInFlight,
}

impl HttpBody for StreamBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where a gRPC request body is among its length-prefixed messages (a 5-byte prefix, then the message).
#[derive(Default)]
struct GrpcFraming {
    client_streaming: bool,
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the message in progress still to come.
    message_left: usize,
    /// When the message in progress began, and its bytes so far.
    message_started: Option<tokio::time::Instant>,
    message_bytes: usize,
    /// When the last message ended, while no other has begun.
    ended: Option<tokio::time::Instant>,
}

impl GrpcFraming {
    fn feed(&mut self, mut data: &[u8]) {
        let now = tokio::time::Instant::now();
        while !data.is_empty() {
            if self.message_started.is_none() {
                self.message_started = Some(now);
                self.message_bytes = 0;
                self.ended = None;
            }
            let n = if self.message_left > 0 {
                let n = self.message_left.min(data.len());
                self.message_left -= n;
                n
            } else {
                let n = (5 - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
                self.prefix_len += n;
                if self.prefix_len == 5 {
                    self.prefix_len = 0;
                    let len = u32::from_be_bytes(self.prefix[1..].try_into().expect("4 bytes"));
                    self.message_left = len as usize;
                }
                n
            };
            self.message_bytes += n;
            data = &data[n..];
            if self.prefix_len == 0 && self.message_left == 0 {
                self.message_started = None;
                self.ended = Some(now);
            }
        }
    }

    /// Whether the body sits between two messages (or before the first).
    fn between_messages(&self) -> bool {
        self.message_started.is_none()
    }
}

struct ChargedBody {
    inner: Body,
    /// For gRPC calls: where the body is among its messages.
    framing: Option<GrpcFraming>,
    pools: Arc<BytePools>,
    connection: Option<Arc<Semaphore>>,
    charge: Charge,
    /// Body bytes so far.
    received: usize,
    rate: MinBodyRate,
    started: tokio::time::Instant,
    /// Fires when the body falls below the rate unless more arrives first.
    too_slow: Option<Pin<Box<Sleep>>>,
    /// The call's connection when the call owns it (HTTP/1), closed when the body is too slow.
    slot: Option<Arc<Slot>>,
    /// Set once the call's response is ready: the rate no longer applies.
    answered: Arc<AtomicBool>,
}

impl ChargedBody {
    fn charge(&mut self, len: usize) -> Result<(), Status> {
        self.received = self.received.saturating_add(len);
        let Ok(n) = u32::try_from(len) else {
            return Err(ServiceError::from(AdmissionError::RequestBytes).into());
        };
        if n == 0 {
            return Ok(());
        }
        let mut held = self.charge.lock().expect("the charge lock is never poisoned");
        let small = self.received <= SMALL_CALL_BYTES;
        self.pools
            .charge(self.connection.as_ref(), &mut held, n, small)
            .map_err(Status::from)
    }
}

impl ChargedBody {
    /// Releases what the call holds: a streaming call's messages, once the server has read them.
    fn release(&mut self) {
        let mut held = self.charge.lock().expect("the charge lock is never poisoned");
        if held.bytes > 0 {
            held.gauge.decrement(held.bytes as f64);
            held.bytes = 0;
            held.permits.clear();
        }
    }

    /// When the body falls below the minimum rate, if it can now:
    /// - a message of a streaming call must arrive at the rate from its first byte; between messages the
    ///   stream may wait as long as its client likes, holding nothing;
    /// - any other call's body at the rate from the call's start, until the call is answered; once its one
    ///   message is whole, the end of the stream must follow within the grace (tonic holds the decoded
    ///   message until it comes, and a large body's credit would otherwise outlast the request timeout).
    fn due(&self) -> Option<tokio::time::Instant> {
        match &self.framing {
            Some(framing) if framing.client_streaming => {
                let started = framing.message_started?;
                Some(self.rate.due(started, framing.message_bytes))
            }
            _ if self.answered.load(Ordering::Relaxed) => None,
            Some(GrpcFraming { ended: Some(ended), .. }) => {
                Some(self.rate.due(self.started, self.received).min(*ended + self.rate.grace))
            }
            _ => Some(self.rate.due(self.started, self.received)),
        }
    }

    /// While the body is awaited: fails the call (and has an HTTP/1 call's connection closed) once the body
    /// has fallen below the minimum rate.
    fn poll_rate(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(due) = self.due() else {
            self.too_slow = None;
            return Poll::Pending;
        };
        let timer = self
            .too_slow
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if let Some(slot) = &self.slot {
            slot.close(CloseCause::BodyTooSlow);
        }
        let error = AdmissionError::BodyTooSlow {
            bytes_per_s: self.rate.bytes_per_s,
            grace_s: self.rate.grace.as_secs(),
        };
        Poll::Ready(Some(Err(ServiceError::from(error).into())))
    }
}

impl HttpBody for ChargedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        // A streaming call asks for more only once it has read every whole message it was sent (tonic's
        // decoder yields a buffered message before it polls the body again): between messages, it holds none.
        if let Some(framing) = &self.framing
            && framing.client_streaming
            && framing.between_messages()
        {
            self.release();
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return self.poll_rate(cx),
        };
        if let Some(data) = frame.data_ref() {
            if let Err(status) = self.charge(data.len()) {
                return Poll::Ready(Some(Err(status)));
            }
            if let Some(framing) = &mut self.framing {
                framing.feed(data);
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request body the test feeds frame by frame.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Result<Frame<Bytes>, Status>>);

    impl HttpBody for Fed {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            self.0.poll_recv(cx)
        }
    }

    const POOL: usize = 1 << 20;

    type Feed = tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, Status>>;

    /// A charged body of a call to `path` over a pool of [`POOL`] bytes, and the sender that feeds it.
    fn charged(path: &str) -> (ChargedBody, Feed, Arc<BytePools>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let layer = CallLimitsLayer::new(
            POOL,
            MinBodyRate {
                grace: Duration::from_secs(60),
                bytes_per_s: 1,
            },
            ActiveCalls::default(),
        );
        let body = ChargedBody {
            inner: Body::new(Fed(rx)),
            framing: Some(GrpcFraming {
                client_streaming: CLIENT_STREAMING.contains(&path),
                ..GrpcFraming::default()
            }),
            pools: layer.pools.clone(),
            connection: None,
            charge: Arc::new(Mutex::new(Held::request())),
            received: 0,
            rate: layer.rate,
            started: tokio::time::Instant::now(),
            too_slow: None,
            slot: None,
            answered: Arc::new(AtomicBool::new(false)),
        };
        (body, tx, layer.pools)
    }

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend((len as u32).to_be_bytes());
        m.extend(vec![7u8; len]);
        m
    }

    fn held(pools: &BytePools) -> usize {
        POOL - pools.shared.available_permits() - pools.small_calls.available_permits()
    }

    async fn next(body: &mut ChargedBody) -> Option<Result<Frame<Bytes>, Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[test]
    fn the_framing_finds_message_boundaries_however_the_bytes_are_split() {
        let mut framing = GrpcFraming::default();
        let two = [message(3), message(0), message(10)].concat();
        for piece in two.chunks(2) {
            framing.feed(piece);
        }
        assert!(framing.between_messages());
        framing.feed(&message(10)[..7]);
        assert!(!framing.between_messages());
        assert_eq!(framing.message_bytes, 7);
        framing.feed(&message(10)[7..]);
        assert!(framing.between_messages());
    }

    /// Issue #35: a reflection stream's messages stayed charged for as long as the stream was open, so a few
    /// hundred open streams refused every other call. Each message is charged until the server has read it.
    #[tokio::test]
    async fn a_streaming_call_holds_only_the_messages_not_yet_read() {
        let (mut body, tx, pools) = charged(CLIENT_STREAMING[0]);
        let first = message(1000);
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(&first[..600])))).unwrap();
        next(&mut body).await.unwrap().unwrap();
        assert_eq!(held(&pools), 600, "a message in progress is charged");
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(&first[600..])))).unwrap();
        next(&mut body).await.unwrap().unwrap();
        assert_eq!(held(&pools), first.len(), "whole and not yet read");
        tx.send(Ok(Frame::data(Bytes::from(message(10))))).unwrap();
        next(&mut body).await.unwrap().unwrap();
        assert_eq!(
            held(&pools),
            15,
            "the first message was read before the next was asked for"
        );
        drop(body);
        assert_eq!(held(&pools), 0, "released once, when the stream ends");
    }

    #[tokio::test]
    async fn a_unary_call_holds_its_bytes_until_the_stream_ends_then_releases_them_once() {
        let (mut body, tx, pools) = charged("/fashion_mnist.v1.Classifier/Classify");
        let charge = body.charge.clone();
        tx.send(Ok(Frame::data(Bytes::from(message(500))))).unwrap();
        tx.send(Ok(Frame::data(Bytes::from(message(500))))).unwrap();
        next(&mut body).await.unwrap().unwrap();
        next(&mut body).await.unwrap().unwrap();
        assert_eq!(
            held(&pools),
            1010,
            "a unary call's bytes are not released between messages"
        );
        // Cancelled: the body goes first, the layer's clone of the charge (the call) after.
        drop(body);
        assert_eq!(
            held(&pools),
            1010,
            "still charged while the call holds its decoded message"
        );
        drop(charge);
        assert_eq!(held(&pools), 0);
    }

    #[tokio::test]
    async fn a_stream_that_fails_releases_its_charge_when_dropped() {
        let (mut body, tx, pools) = charged(CLIENT_STREAMING[1]);
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(&message(100)[..50]))))
            .unwrap();
        tx.send(Err(Status::cancelled("reset by the client"))).unwrap();
        next(&mut body).await.unwrap().unwrap();
        assert!(next(&mut body).await.unwrap().is_err());
        assert_eq!(held(&pools), 50);
        drop(body);
        assert_eq!(held(&pools), 0);
    }

    #[test]
    fn metric_labels_come_from_the_served_methods_only() {
        assert_eq!(rpc_label("/fashion_mnist.v1.Classifier/Classify"), "Classify");
        assert_eq!(rpc_label("/grpc.health.v1.Health/Watch"), "Watch");
        assert_eq!(rpc_label("/made.up.Service/Method12345"), "unknown");
        assert_eq!(rpc_label(""), "unknown");
        assert_eq!(rpc_label("/inference.GRPCInferenceService/ModelInfer"), "ModelInfer");
    }

    #[test]
    fn rest_labels_name_the_route_not_the_model() {
        assert_eq!(rest_label("/v2"), Some("v2/server_metadata"));
        assert_eq!(rest_label("/v2/health/ready"), Some("v2/health"));
        assert_eq!(rest_label("/v2/models/cnn"), Some("v2/model_metadata"));
        // A model may be called "infer": the route, not the last word, decides.
        assert_eq!(rest_label("/v2/models/infer"), Some("v2/model_metadata"));
        assert_eq!(rest_label("/v2/models/cnn/versions/3/ready"), Some("v2/model_ready"));
        assert_eq!(rest_label("/v2/models/any-name-at-all/infer"), Some("v2/infer"));
        assert_eq!(rest_label("/v2/models/cnn/versions/2/config"), Some("v2/model_config"));
        assert_eq!(rest_label("/v2/models/stats"), Some("v2/model_statistics"));
        assert_eq!(rest_label("/v2/models/cnn/stats"), Some("v2/model_statistics"));
        assert_eq!(rest_label("/v2/models/cnn/drift"), Some("v2/model_drift"));
        assert_eq!(rest_label("/v2/models/cnn/versions/2/drift"), Some("v2/model_drift"));
        assert_eq!(rest_label("/v2/models/cnn/captures"), Some("v2/model_captures"));
        assert_eq!(rest_label("/v2/whatever/else"), Some("v2/unknown"));
        assert_eq!(rest_label("/app.js"), None);
    }

    #[test]
    fn request_ids_are_plain_tokens() {
        assert!(is_safe_request_id("abc-123_x.y:z"));
        for unsafe_id in ["", "a b", "x\" level=ERROR", "ünï", &"x".repeat(129)] {
            assert!(!is_safe_request_id(unsafe_id), "{unsafe_id:?}");
        }
    }
}
