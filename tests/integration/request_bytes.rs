//! The request-byte pool: uploads that fill it and stall are charged as they arrive, and calls past the pool are
//! refused, but an eighth of it stays for small calls, so ordinary callers are still served. It reads
//! the process-wide bytes-in-flight gauge: tests run one at a time (see main.rs).

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, config, encoded, fixture, grpc_call, metric, padded_grpc_message, png, raw, request};
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

/// A reflection request's `list_services = ""`.
const LIST_SERVICES: &[u8] = &[0x3a, 0x00];

/// Issue #35: reflection streams that sent one padded request, read the answer and stayed open kept every byte
/// they had sent charged, so a few dozen of them refused every other call with RESOURCE_EXHAUSTED. A
/// streaming call's message is charged until the server has read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_reflection_streams_left_open_hold_no_request_bytes() {
    let mut config = config();
    config.max_request_bytes_in_flight = 16 << 20;
    config.max_request_bytes_per_connection = 16 << 20;
    let server = TestServer::start(config).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut streams = Vec::new();
        for _ in 0..40 {
            let mut client = client.clone().ready().await.unwrap();
            let path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
            let (response, mut send) = client.send_request(grpc_call(path), false).unwrap();
            // 40 x 4 x 120 kB: more than the 16 MiB all calls may hold.
            if send
                .send_data(padded_grpc_message(LIST_SERVICES, 120_000), false)
                .is_ok()
            {
                streams.push((response, send));
            }
        }
        for (response, send) in streams {
            let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(5), response).await else {
                continue;
            };
            let mut body = response.into_body();
            let answered = tokio::time::timeout(Duration::from_secs(5), body.data()).await;
            if let Ok(Some(Ok(answer))) = answered {
                let _ = body.flow_control().release_capacity(answer.len());
                open.push((send, body));
            }
        }
    }
    assert!(
        open.len() >= 100,
        "only {} of 160 reflection streams were answered",
        open.len()
    );
    let in_flight = metric(&server.metrics().await, "fmnist_request_bytes_in_flight");
    assert!(
        in_flight < 1e6,
        "{in_flight} request bytes held by streams whose messages were read"
    );
    let mut client = server.client.clone();
    let (pixels, _) = fixture()[0];
    let served = client.classify(request(vec![raw(&pixels)])).await;
    assert!(served.is_ok(), "a polite call beside the open streams: {served:?}");
    drop(open);
}
