//! Closed-loop gRPC load generator for `make bench`: C concurrent callers, each sending one unary call after
//! another, spread over a few HTTP/2 connections. It speaks HTTP/2 directly (the `h2` crate that tonic itself
//! runs on) and sends pre-encoded gRPC request bodies (5-byte frame prefix + protobuf), so the same generator
//! drives any gRPC server — ours, the Python peer, MLServer, Triton — and spends no time encoding or decoding
//! protobuf.
//! A call counts when its response ends with `grpc-status: 0`; anything else is an error. A call belongs to the
//! window it ends in, whenever it started: counting only calls that both start and end inside the window
//! would leave out about latency / window of a loaded server's calls (a quarter of them at 0.8 s latency in a
//! 3 s window) and make long queues look like lost throughput.
//!
//! It runs on one thread, so it never takes more than one of the cores it shares with the server, and reports
//! its own CPU time beside the server's. Around the measured window it reads the server's CPU time
//! (/proc/<pid>/stat), its peak RSS (/proc/<pid>/status VmHWM; both summed over the processes given, for a
//! server that runs its model in a child process, as Triton's Python backend does) and, when given a
//! Prometheus endpoint, the sum and count of a batch-size histogram (or any two counters), so the average
//! formed batch covers exactly the window.
//!
//!     cargo run --release --example loadgen -- --addr 127.0.0.1:50051 \
//!         --path /fashion_mnist.v1.Classifier/Classify --bodies bench/results/tmp/cnn-raw.bin \
//!         --concurrency 64 --seconds 5 --server-pid 1234 --metrics 127.0.0.1:9090
//!
//! Bodies file: a sequence of (u32 little-endian length, gRPC-framed request) records; callers cycle through
//! them. Prints one JSON object.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Parser;
use h2::client::SendRequest;
use http::{Method, Request};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[derive(Parser, Clone)]
struct Args {
    /// Server address (plaintext HTTP/2, prior knowledge).
    #[arg(long)]
    addr: SocketAddr,
    /// gRPC method path, e.g. /fashion_mnist.v1.Classifier/Classify.
    #[arg(long)]
    path: String,
    /// Pre-encoded request bodies (see the module docs).
    #[arg(long)]
    bodies: PathBuf,
    /// Images per request, to report images/s.
    #[arg(long, default_value_t = 1)]
    images_per_request: usize,
    /// Concurrent callers (each has at most one call in flight).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// HTTP/2 connections the callers are spread over (capped at --concurrency).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Warm-up before the measured window, seconds (calls made then are not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Measured window, seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Server process(es) to account CPU time and peak RSS for (repeat, or separate with commas, for a server
    /// made of several processes: their CPU times and peak RSS are summed).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Prometheus endpoint (host:port, path /metrics) to read the batch-size histogram from.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Histogram whose _sum/_count give the average formed batch (summed over label sets); or two counters
    /// as `images/batches`, e.g. Triton's `nv_inference_count/nv_inference_exec_count`.
    #[arg(long, default_value = "fmnist_batch_size_images")]
    batch_metric: String,
    /// Keep retrying the first connection for this long (the server may still be starting).
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
}

/// A call still unanswered after this counts as an error (and the run still ends).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How failures a server sheds under overload (grpc-status 8, RESOURCE_EXHAUSTED) are told apart.
const SHED: &str = "RESOURCE_EXHAUSTED";
/// Pause after a shed call before the caller tries again.
const SHED_BACKOFF: Duration = Duration::from_millis(10);

/// What one caller saw in the measured window.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// Calls answered RESOURCE_EXHAUSTED (load shed by the server) in the window.
    shed: u64,
    response_bytes: u64,
}

fn read_bodies(path: &PathBuf) -> Result<Vec<Bytes>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bodies = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| format!("{}: truncated record header", path.display()))?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(format!("{}: truncated record", path.display()));
        }
        bodies.push(Bytes::copy_from_slice(&tail[..len]));
        rest = &tail[len..];
    }
    if bodies.is_empty() {
        return Err(format!("{}: no request bodies", path.display()));
    }
    Ok(bodies)
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Bytes>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One unary call; returns the response body size or why the call failed.
async fn call(client: &SendRequest<Bytes>, uri: &http::Uri, body: Bytes) -> Result<u64, String> {
    let mut client = client.clone().ready().await.map_err(|e| format!("connection: {e}"))?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut send) = client.send_request(request, false).map_err(|e| format!("send: {e}"))?;
    send.send_data(body, true).map_err(|e| format!("send body: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let (head, mut recv) = response.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(format!("HTTP status {}", head.status));
    }
    // A trailers-only response carries grpc-status in the headers.
    if let Some(status) = head.headers.get("grpc-status") {
        return grpc_status(status, &head.headers).map(|()| 0);
    }
    let mut bytes = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(|e| format!("response body: {e}"))?;
        bytes += chunk.len() as u64;
        let _ = recv.flow_control().release_capacity(chunk.len());
    }
    let trailers = recv
        .trailers()
        .await
        .map_err(|e| format!("trailers: {e}"))?
        .ok_or("response without trailers")?;
    let status = trailers.get("grpc-status").ok_or("trailers without grpc-status")?;
    grpc_status(status, &trailers)?;
    if bytes == 0 {
        return Err("empty response body".into());
    }
    Ok(bytes)
}

fn grpc_status(status: &http::HeaderValue, headers: &http::HeaderMap) -> Result<(), String> {
    if status.as_bytes() == b"0" {
        return Ok(());
    }
    if status.as_bytes() == b"8" {
        return Err(SHED.into());
    }
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).unwrap_or("");
    Err(format!("grpc-status {status:?}: {message}"))
}

/// (user + system CPU seconds, VmHWM kB, VmRSS kB) of a process ("self" for this one).
fn process_usage(pid: &str) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state); utime and stime
    // are fields 14 and 15, in clock ticks (USER_HZ = 100 on Linux).
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Some((ticks as f64 / 100.0, kb("VmHWM:"), kb("VmRSS:")))
}

/// CPU seconds the whole machine spent busy (every process, user + system + interrupts), from /proc/stat.
fn machine_busy() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy as f64 / 100.0)
}

/// (user + system CPU seconds, VmHWM kB, VmRSS kB) summed over processes; None if any cannot be read.
fn processes_usage(pids: &[String]) -> Option<(f64, u64, u64)> {
    pids.iter().try_fold((0.0, 0, 0), |acc, pid| {
        let (cpu, hwm, rss) = process_usage(pid)?;
        Some((acc.0 + cpu, acc.1 + hwm, acc.2 + rss))
    })
}

/// Sum of `<metric>_sum` and `<metric>_count` over every label set, from a Prometheus text endpoint; for
/// `<a>/<b>`, the sums of the two metrics `a` and `b`.
async fn histogram_totals(addr: SocketAddr, metric: &str) -> Option<(f64, f64)> {
    let (sum_name, count_name) = match metric.split_once('/') {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => (format!("{metric}_sum"), format!("{metric}_count")),
    };
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name.split('{').next().unwrap_or(name);
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if name == sum_name {
            sum += value;
        } else if name == count_name {
            count += value;
        }
    }
    Some((sum, count))
}

async fn caller(
    client: SendRequest<Bytes>,
    uri: http::Uri,
    bodies: std::sync::Arc<Vec<Bytes>>,
    first_body: usize,
    measure_from: Instant,
    stop_at: Instant,
) -> Tally {
    let mut tally = Tally {
        latencies_us: Vec::with_capacity(4096),
        ..Tally::default()
    };
    let mut next = first_body;
    loop {
        let started = Instant::now();
        if started >= stop_at {
            break;
        }
        let body = bodies[next % bodies.len()].clone();
        next += 1;
        let result = tokio::time::timeout(CALL_TIMEOUT, call(&client, &uri, body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {CALL_TIMEOUT:?}")));
        let finished = Instant::now();
        if let Err(e) = &result
            && e.starts_with(SHED)
        {
            // The server shed the call (queue full), as it should under overload: back off like a client
            // that follows the proto's advice, and count it apart from failures.
            if (measure_from..=stop_at).contains(&finished) {
                tally.shed += 1;
            }
            tokio::time::sleep(SHED_BACKOFF).await;
            continue;
        }
        if !(measure_from..=stop_at).contains(&finished) {
            if let Err(e) = result {
                // Errors during warm-up still fail the run: a broken setup must not look like a slow server.
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
            continue;
        }
        match result {
            Ok(bytes) => {
                tally.response_bytes += bytes;
                let us = (finished - started).as_micros();
                tally.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
    tally
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    let bodies = std::sync::Arc::new(read_bodies(&args.bodies)?);
    let uri: http::Uri = format!("http://{}{}", args.addr, args.path)
        .parse()
        .map_err(|e| format!("bad --path: {e}"))?;
    let concurrency = args.concurrency.max(1);
    let connections = args.connections.clamp(1, concurrency);

    let give_up = Instant::now() + Duration::from_secs_f64(args.connect_timeout);
    let first = loop {
        match connect(args.addr).await {
            Ok(c) => break c,
            Err(e) if Instant::now() >= give_up => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut clients = vec![first];
    for _ in 1..connections {
        clients.push(connect(args.addr).await?);
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let stop_at = measure_from + Duration::from_secs_f64(args.seconds);
    // Callers start at different bodies so concurrent calls carry different images.
    let stride = (bodies.len() / concurrency).max(1);
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            tokio::spawn(caller(
                clients[i % connections].clone(),
                uri.clone(),
                bodies.clone(),
                i * stride,
                measure_from,
                stop_at,
            ))
        })
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let pids: Vec<String> = args.server_pid.iter().map(u32::to_string).collect();
    let server_usage = || if pids.is_empty() { None } else { processes_usage(&pids) };
    let server_before = server_usage();
    let self_before = process_usage("self");
    let machine_before = machine_busy();
    let batch_before = match args.metrics {
        Some(addr) => histogram_totals(addr, &args.batch_metric).await,
        None => None,
    };
    let window_start = Instant::now();
    tokio::time::sleep_until(stop_at.into()).await;
    let window = window_start.elapsed().as_secs_f64();
    let server_after = server_usage();
    let self_after = process_usage("self");
    let machine_after = machine_busy();
    let batch_after = match args.metrics {
        Some(addr) => histogram_totals(addr, &args.batch_metric).await,
        None => None,
    };

    let mut latencies = Vec::new();
    let (mut errors, mut first_error, mut response_bytes, mut shed) = (0, None, 0, 0);
    for task in tasks {
        let tally = task.await.map_err(|e| format!("caller task: {e}"))?;
        latencies.extend(tally.latencies_us);
        errors += tally.errors;
        shed += tally.shed;
        response_bytes += tally.response_bytes;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        f64::from(latencies[((latencies.len() - 1) as f64 * p).round() as usize]) / 1e3
    };
    let requests = latencies.len();
    let mean_ms = latencies.iter().map(|&l| f64::from(l)).sum::<f64>() / requests.max(1) as f64 / 1e3;
    let cpu = |before: Option<(f64, u64, u64)>, after: Option<(f64, u64, u64)>| match (before, after) {
        (Some(b), Some(a)) => serde_json::json!((a.0 - b.0) / window),
        _ => serde_json::Value::Null,
    };
    let batch_avg = match (batch_before, batch_after) {
        (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => serde_json::json!((s1 - s0) / (c1 - c0)),
        _ => serde_json::Value::Null,
    };
    Ok(serde_json::json!({
        "concurrency": concurrency,
        "connections": connections,
        "images_per_request": args.images_per_request,
        "window_s": window,
        "requests": requests,
        "errors": errors,
        "shed": shed,
        "first_error": first_error,
        "requests_per_s": requests as f64 / window,
        "images_per_s": (requests * args.images_per_request) as f64 / window,
        "latency_mean_ms": mean_ms,
        "latency_p50_ms": pct(0.50),
        "latency_p90_ms": pct(0.90),
        "latency_p99_ms": pct(0.99),
        "latency_max_ms": pct(1.0),
        "response_bytes_per_request": response_bytes as f64 / requests.max(1) as f64,
        "server_cpu_cores": cpu(server_before, server_after),
        "server_peak_rss_kb": server_after.map(|a| a.1),
        "server_rss_kb": server_after.map(|a| a.2),
        "loadgen_cpu_cores": cpu(self_before, self_after),
        // Busy time of the whole machine: what the server and the load generator do not account for is
        // somebody else (a compile, a training job) disturbing the measurement.
        "machine_busy_cores": match (machine_before, machine_after) {
            (Some(b), Some(a)) => serde_json::json!((a - b) / window),
            _ => serde_json::Value::Null,
        },
        "batch_avg": batch_avg,
    }))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime starts");
    match runtime.block_on(run(args)) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
