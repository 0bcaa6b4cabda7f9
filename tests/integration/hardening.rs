//! Hostile clients, against real servers: refused image formats, callers that give up mid-decode, a greedy
//! connection beside a polite one, huge uploads beside a small one, silent and stalled connections, and the
//! strings a client controls. Each attack once took the server down or starved its other callers.

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, config, encoded, fixture, metric, png, raw, repo, request, spawn_binary};
use fmnist_serve::{
    app::budget::MemoryBudget,
    config::Config,
    pb::{self, classifier_client::ClassifierClient},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, transport::Channel};

/// A fresh HTTP/2 connection of its own.
async fn connect(addr: &str) -> ClassifierClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connects");
    ClassifierClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// An RGBA PNG of `width` x `height` that compresses well (a gradient), so a call can carry several images
/// at the decode limits while staying small on the wire.
fn rgba_png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([(x / 16) as u8, (y / 16) as u8, ((x + y) / 32) as u8, 255])
    });
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[tokio::test]
async fn every_refused_format_is_undecodable_naming_the_accepted_ones_and_the_server_keeps_serving() {
    let mut server = TestServer::start(config()).await;
    let mut files: Vec<_> = std::fs::read_dir(repo().join("tests/fixtures/formats"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    // scripts/make_format_fixtures.py: the EXR that killed the server and one file per refused codec.
    assert!(
        names.contains(&"exr-bomb.exr".to_string()) && names.len() >= 8,
        "{names:?}"
    );
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let result = server
            .client
            .classify(request(vec![encoded(bytes)]))
            .await
            .unwrap_or_else(|s| panic!("{}: {s:?}", path.display()))
            .into_inner()
            .results
            .remove(0);
        assert_eq!(
            result.reason,
            pb::Reason::Undecodable as i32,
            "{}: {}",
            path.display(),
            result.detail
        );
        assert!(
            result.detail.contains("send PNG, JPEG, GIF, BMP, WebP or TIFF"),
            "{}: {}",
            path.display(),
            result.detail
        );
    }
    let (pixels, label) = fixture()[0];
    let after = server
        .client
        .classify(request(vec![raw(&pixels)]))
        .await
        .expect("still serving");
    assert_eq!(
        after.into_inner().results[0].prediction.as_ref().unwrap().class_id,
        label
    );
}

/// The /proc/PID/stat CPU time (user + system) of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_give_up_leave_no_decoding_behind_and_peak_memory_stays_in_budget() {
    // The shipped defaults, in the real binary (the allocator and the blocking-pool cap are part of it).
    let server = spawn_binary(&[]);
    let budget = MemoryBudget::of(&Config::defaults());
    let big = rgba_png(4096, 3000); // 47 MiB decoded: just inside the default decode limit
    // 8 callers on their own connections, each sending 4 such images with a 300 ms deadline, for 4 s: every
    // caller has gone long before its images could be decoded.
    let until = Instant::now() + Duration::from_secs(4);
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (mut client, big) = (connect(&server.addr).await, big.clone());
        callers.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while Instant::now() < until {
                let mut call = tonic::Request::new(request(vec![encoded(big.clone()); 4]));
                call.set_timeout(Duration::from_millis(300));
                codes.push(client.classify(call).await.map(|_| ()).map_err(|s| s.code()));
            }
            codes
        }));
    }
    let mut codes = Vec::new();
    for c in callers {
        codes.extend(c.await.unwrap());
    }
    let pid = server.child.id();
    let cpu_when_callers_left = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_after = cpu_seconds(pid) - cpu_when_callers_left;
    let (peak, now) = (common::peak_rss_bytes(pid), common::rss_bytes(pid));
    let metrics = server.metrics().await;
    let abandoned = metric(&metrics, "fmnist_decodes_abandoned_total");
    eprintln!(
        "{} calls ({} deadline exceeded), {abandoned} decodes abandoned, peak RSS {} MiB (budget {budget}), \
         RSS {} MiB 3 s later, {cpu_after:.2} CPU-s in the 3 s after the callers left",
        codes.len(),
        codes.iter().filter(|c| **c == Err(Code::DeadlineExceeded)).count(),
        peak >> 20,
        now >> 20
    );
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Err(Code::DeadlineExceeded | Code::Cancelled))),
        "{codes:?}"
    );
    assert!(
        abandoned >= 1.0,
        "decodes stop between images once their caller has gone"
    );
    assert!(
        peak < budget.total,
        "peak RSS {} MiB over the budget {budget}",
        peak >> 20
    );
    // Without cancellation, 8 x 4 decodes of ~0.3 CPU-s each keep both cores busy well after the callers
    // have gone; with it, at most the images already being decoded finish.
    assert!(cpu_after < 3.0, "{cpu_after:.2} CPU-s burned after the callers left");

    let (pixels, label) = fixture()[0];
    let mut client = connect(&server.addr).await;
    let after = client
        .classify(request(vec![raw(&pixels)]))
        .await
        .expect("serves normally");
    assert_eq!(
        after.into_inner().results[0].prediction.as_ref().unwrap().class_id,
        label
    );
    // The burst's memory goes back to the OS once the server is busy again (mimalloc purges freed memory on
    // later allocations; glibc's arenas kept it).
    // When the purge runs depends on which threads allocate next, so the check gives it up to 10 s of calls.
    let busy = Instant::now();
    let mut calls = 0;
    let mut settled = common::rss_bytes(pid);
    while settled >= 256 << 20 && busy.elapsed() < Duration::from_secs(10) {
        for _ in 0..20 {
            let _ = client.classify(request(vec![encoded(png(&pixels, 28, 28)); 8])).await;
        }
        calls += 20;
        tokio::time::sleep(Duration::from_millis(250)).await;
        settled = common::rss_bytes(pid);
    }
    eprintln!("RSS {} MiB after {calls} more calls", settled >> 20);
    assert!(
        settled < 256 << 20,
        "RSS {} MiB after the burst and {calls} calls",
        settled >> 20
    );
}

/// A greedy connection waits behind itself. Its calls past its share of the queue wait for its own earlier
/// calls (or are refused after --max-queue-wait-ms), so it holds at most its share and the spare room of the
/// queue, and a polite connection's call finds room at once and waits only for the images already queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_connection_cannot_starve_a_polite_one() {
    let server = TestServer::start(config()).await;
    let addr = server.addr.to_string();
    let images: Vec<pb::Image> = fixture().iter().take(64).map(|(p, _)| raw(p)).collect();
    // One connection, 100 callers of 64 images each: 6,400 images wanted at once, six times the queue. They
    // stop when the polite client is done.
    let greedy = connect(&addr).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..100)
        .map(|_| {
            let (mut client, images, done) = (greedy.clone(), images.clone(), done.clone());
            tokio::spawn(async move {
                let (mut served, mut refused) = (Vec::new(), 0u32);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    match client.classify(request(images.clone())).await {
                        Ok(_) => served.push(started.elapsed()),
                        Err(s) => {
                            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                            refused += 1;
                        }
                    }
                }
                (served, refused)
            })
        })
        .collect();
    // Meanwhile a polite client on its own connection: 20 calls, one at a time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut polite = connect(&addr).await;
    let (pixels, label) = fixture()[0];
    let (mut polite_times, calls, mut greedy_waiting) = (Vec::new(), 20, 0.0f64);
    for _ in 0..calls {
        let started = Instant::now();
        if let Ok(r) = polite.classify(request(vec![raw(&pixels)])).await {
            assert_eq!(r.into_inner().results[0].prediction.as_ref().unwrap().class_id, label);
            polite_times.push(started.elapsed());
        }
        let waiting = metric(
            &server.metrics().await,
            &common::served_series("fmnist_queue_waiting_images", "cnn"),
        );
        greedy_waiting = greedy_waiting.max(waiting);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut greedy_times, mut refused) = (Vec::new(), 0);
    for h in hogs {
        let (served, r) = h.await.unwrap();
        greedy_times.extend(served);
        refused += r;
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times.get(times.len() / 2).copied().unwrap_or_default()
    };
    let served = polite_times.len();
    let (polite_p50, greedy_p50) = (median(&mut polite_times), median(&mut greedy_times));
    eprintln!(
        "greedy: {} served (p50 {greedy_p50:?}), {refused} refused, up to {greedy_waiting} images waiting; polite: {served} of {calls} served (p50 {polite_p50:?})",
        greedy_times.len()
    );
    // The greedy connection asked for more than its share: its excess waited (or, past 2 s, was refused).
    assert!(
        greedy_waiting >= 64.0 || refused > 0,
        "the greedy connection never waited nor was refused"
    );
    assert!(
        served * 10 >= calls * 9,
        "the polite client got {served} of {calls} calls served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_image_is_not_kept_waiting_behind_huge_ones() {
    let server = TestServer::start(config()).await;
    let addr = server.addr.to_string();
    let big = rgba_png(4096, 3000);
    // Two connections each decoding 8 images at the decode limits: seconds of work in the large lane.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let (mut client, big) = (connect(&addr).await, big.clone());
        hogs.push(tokio::spawn(async move {
            client
                .classify(request(vec![encoded(big); 8]))
                .await
                .map(|_| Instant::now())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The browser page's case: one small PNG from another connection.
    let (pixels, label) = fixture()[0];
    let mut page = connect(&addr).await;
    let result = page
        .classify(request(vec![encoded(png(&pixels, 28, 28))]))
        .await
        .expect("served");
    let small_done = Instant::now();
    assert_eq!(
        result.into_inner().results[0].prediction.as_ref().unwrap().class_id,
        label
    );
    for hog in hogs {
        let big_done = hog.await.unwrap().expect("the huge calls are served too");
        assert!(
            small_done < big_done,
            "the small image waited for the huge ones to finish"
        );
    }
}

/// Reads until the server closes the connection; how long that took.
async fn time_until_closed(stream: &mut tokio::net::TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server never closed the connection");
    started.elapsed()
}

fn short_timeouts() -> Config {
    let mut config = config();
    config.idle_timeout_s = 2;
    config.http2_keepalive_s = 1;
    config
}

#[tokio::test]
async fn silent_connections_and_stalled_uploads_are_closed_by_the_idle_timeout() {
    let server = TestServer::start(short_timeouts()).await;

    // A socket that never says anything.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let waited = time_until_closed(&mut silent).await;
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );

    // A gRPC-Web upload over HTTP/1.1 that declares 16 MiB, sends 1 MiB and stalls.
    let mut upload = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /fashion_mnist.v1.Classifier/Classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/grpc-web\r\n\
         Content-Length: {}\r\n\r\n",
        16 << 20
    );
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(&vec![0u8; 1 << 20]).await.unwrap();
    let waited = time_until_closed(&mut upload).await;
    assert!(waited < Duration::from_secs(8), "{waited:?}");

    let closed = metric(
        &server.metrics().await,
        "fmnist_connections_closed_total{cause=\"idle_timeout\"}",
    );
    assert!(closed >= 2.0, "{closed} idle closes counted");
}

#[tokio::test]
async fn an_idle_http2_client_that_answers_pings_keeps_its_connection() {
    let server = TestServer::start(short_timeouts()).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let health = |mut client: h2::client::SendRequest<bytes::Bytes>| async move {
        let request = http::Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        client = client.ready().await.expect("the connection is still open");
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        assert_eq!(response.await.expect("answered").status(), 200);
        client
    };
    let client = health(client).await;
    // Three idle timeouts with no call: the keepalive pings (answered by the h2 client) are the activity.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = health(client).await;
    assert!(!driver.is_finished(), "the connection stayed open");
}

#[tokio::test]
async fn client_strings_are_clipped_and_unsafe_request_ids_are_replaced() {
    let mut server = TestServer::start(config()).await;
    let (pixels, _) = fixture()[0];

    let mut req = request(vec![raw(&pixels)]);
    req.model = "x".repeat(1 << 20);
    let status = server.client.classify(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().len() < 400,
        "a {}-byte status message",
        status.message().len()
    );
    assert!(status.message().contains("1048576 bytes"), "{}", status.message());

    for (sent, echoed) in [("abc-123_x.y:z", true), ("a b", false), ("x\" level=ERROR", false)] {
        let mut call = tonic::Request::new(request(vec![raw(&pixels)]));
        call.metadata_mut().insert("x-request-id", sent.parse().unwrap());
        let response = server.client.classify(call).await.unwrap();
        let id = response.metadata().get("x-request-id").unwrap().to_str().unwrap();
        assert_eq!(id == sent, echoed, "sent {sent:?}, answered with {id:?}");
    }
}

#[tokio::test]
async fn the_metrics_port_closes_connections_that_never_finish_a_request() {
    let server = TestServer::start(config()).await;
    let mut stalled = tokio::net::TcpStream::connect(server.metrics_addr).await.unwrap();
    stalled.write_all(b"GET /metr").await.unwrap();
    let waited = time_until_closed(&mut stalled).await;
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Scrapes still work meanwhile and afterwards.
    assert!(server.metrics().await.contains("fmnist_connections_open"));
}
