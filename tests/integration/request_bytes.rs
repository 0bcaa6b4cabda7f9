//! The request-byte pool: uploads that fill it and stall are charged as they arrive, and calls past the pool are
//! refused, but an eighth of it stays for small calls, so ordinary callers are still served. It reads
//! the process-wide bytes-in-flight gauge: tests run one at a time (see main.rs).

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, config, encoded, fixture, metric, png, raw, request};
use tokio::io::AsyncWriteExt;
use tonic::Code;

#[tokio::test]
async fn stalled_uploads_that_fill_the_byte_pool_leave_room_for_ordinary_calls() {
    let mut config = config();
    config.max_message_bytes = 4 << 20;
    config.max_request_bytes_per_connection = 4 << 20;
    config.max_request_bytes_in_flight = 8 << 20; // 7 MiB for any call, 1 MiB kept for small ones
    let mut server = TestServer::start(config).await;

    // Two gRPC-Web uploads over HTTP/1.1, each one 4 MiB message, send 3.5 MiB and stall: 7 MiB held.
    let mut uploads = Vec::new();
    for _ in 0..2 {
        let mut upload = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let message = (4 << 20) - 5;
        let head = format!(
            "POST /fashion_mnist.v1.Classifier/Classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/grpc-web\r\n\
             Content-Length: {}\r\n\r\n",
            message + 5
        );
        upload.write_all(head.as_bytes()).await.unwrap();
        upload.write_all(&[0]).await.unwrap();
        upload.write_all(&(message as u32).to_be_bytes()).await.unwrap();
        upload.write_all(&vec![0u8; (7 << 20) / 2 - 5]).await.unwrap();
        uploads.push(upload);
    }
    let waiting = Instant::now();
    while metric(&server.metrics().await, "fmnist_request_bytes_in_flight") < f64::from(7 << 20) - 1.0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "the uploads were never charged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A call with more than 256 KiB of body finds no room...
    let (pixels, label) = fixture()[0];
    let noise: Vec<u8> = (0..100 * 100)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let big = request(vec![encoded(png(&noise, 100, 100)); 40]);
    let status = server.client.classify(big).await.expect_err("no room for a large call");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // ...while an ordinary one is served from the bytes kept for small calls.
    let ok = server
        .client
        .classify(request(vec![raw(&pixels)]))
        .await
        .expect("an ordinary call is served");
    assert_eq!(ok.into_inner().results[0].prediction.as_ref().unwrap().class_id, label);
    drop(uploads);
}
