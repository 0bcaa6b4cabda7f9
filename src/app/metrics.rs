//! The Prometheus `/metrics` port: its own accept loop, with the same rules as the service port (a request
//! head within a bound, a cap on connections that evicts the one waiting longest), so silent or slow sockets
//! cannot keep a scraper out.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, oneshot},
};

use crate::telemetry::metric;

/// Serves `GET /metrics` on `listener` until the task is dropped. A deliberately small HTTP/1.x responder:
/// Prometheus scrapes need nothing more, and it keeps a second web framework out of the binary.
pub async fn serve_metrics(listener: TcpListener, handle: PrometheusHandle) {
    // `install_recorder` spawns no upkeep task: without one, histogram samples pile up between scrapes
    // (about 16 MB per million calls when nobody scrapes). Draining them every few seconds bounds memory.
    let upkeep = handle.clone();
    let _upkeep = AbortOnDrop(tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    }));
    // A scraper needs one connection at a time and sends its request at once. A connection must bring its
    // request within METRICS_HEAD_TIMEOUT; at the cap, a new one evicts the one that has waited longest for
    // its request (40 slow or 175 silent sockets once made scrapes wait 5 s, and fail).
    let open = Arc::new(Semaphore::new(METRICS_MAX_CONNECTIONS));
    let waiting = Arc::new(Mutex::new(BTreeMap::<u64, oneshot::Sender<()>>::new()));
    let mut backoff = Duration::ZERO;
    for id in 0u64.. {
        let (stream, _) = crate::transport::connections::accept(&listener, &mut backoff).await;
        let permit = match open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest = waiting.lock().unwrap_or_else(PoisonError::into_inner).pop_first();
                if let Some((_, evict)) = oldest {
                    let _ = evict.send(());
                }
                // Evicted connections drop their permit at once; without one, a scrape in progress is about to.
                match tokio::time::timeout(METRICS_HEAD_TIMEOUT, open.clone().acquire_owned()).await {
                    Ok(permit) => permit.expect("never closed"),
                    Err(_) => continue,
                }
            }
        };
        let (evict, evicted) = oneshot::channel();
        waiting.lock().unwrap_or_else(PoisonError::into_inner).insert(id, evict);
        let (handle, waiting) = (handle.clone(), waiting.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let head = tokio::select! {
                _ = evicted => Err("evicted"),
                head = tokio::time::timeout(METRICS_HEAD_TIMEOUT, read_head(&mut stream)) => head.map_err(|_| "head_timeout"),
            };
            waiting.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            match head {
                Ok(head) => {
                    let _ = tokio::time::timeout(METRICS_TIMEOUT, answer(&mut stream, &head, &handle)).await;
                }
                Err(cause) => metrics::counter!(metric::METRICS_CONNECTIONS_CLOSED, "cause" => cause).increment(1),
            }
        });
    }
}

/// Connections open at once; past it a new one evicts the one waiting longest for its request.
const METRICS_MAX_CONNECTIONS: usize = 16;
/// The request head must arrive within this.
const METRICS_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// The answer must be written within this.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// The request head (or the first 4 KiB of it, or what came before the client closed).
async fn read_head(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

async fn answer(stream: &mut TcpStream, head: &str, handle: &PrometheusHandle) {
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) =
        if head.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", handle.render())
        } else {
            (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "metrics are at /metrics\n".to_string(),
            )
        };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Stops the upkeep task together with the metrics server that owns it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
