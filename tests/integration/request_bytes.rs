//! The request-byte pool: uploads that fill it and stall are charged as they arrive, and calls past the pool are
//! refused, but an eighth of it stays for small calls, so ordinary callers are still served. It reads
//! the process-wide bytes-in-flight gauge: tests run one at a time (see main.rs).

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, config, encoded, fixture, grpc_call, metric, padded_grpc_message, png, raw, request};
use tokio::io::AsyncWriteExt;
use tonic::Code;

/// Waits until the server's gauge `name` satisfies `holds`; fails with `failure` after `within`.
async fn until_gauge(server: &TestServer, name: &str, holds: impl Fn(f64) -> bool, within: Duration, failure: &str) {
    let started = Instant::now();
    while !holds(metric(&server.metrics().await, name)) {
        assert!(started.elapsed() < within, "{failure}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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
        // Each call's header list is charged too (issue #35): leave room for them.
        upload.write_all(&vec![0u8; (7 << 20) / 2 - 5 - 1024]).await.unwrap();
        uploads.push(upload);
    }
    until_gauge(
        &server,
        "fmnist_request_bytes_in_flight",
        |held| held >= f64::from((7 << 20) - 2048),
        Duration::from_secs(10),
        "the uploads were never charged",
    )
    .await;

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

/// A server whose whole request-byte account is 1 MiB (896 KiB for any call, 128 KiB kept for small ones),
/// one connection may take all of it, and a whole message may wait 30 s for the end of its stream.
async fn one_mib_account() -> TestServer {
    let mut config = config();
    config.max_message_bytes = 1 << 20;
    config.max_request_bytes_in_flight = 1 << 20;
    config.max_request_bytes_per_connection = 1 << 20;
    config.request_body_grace_s = 30;
    TestServer::start(config).await
}

/// `message` as one gRPC frame (uncompressed).
fn grpc_frame(message: Vec<u8>) -> bytes::Bytes {
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    bytes::Bytes::from(framed)
}

/// A Classify call whose header list is `pad` bytes of `x-pad` beyond the usual fields; its body never comes.
fn padded_head(pad: usize) -> http::Request<()> {
    let mut call = grpc_call("/fashion_mnist.v1.Classifier/Classify");
    call.headers_mut()
        .insert("x-pad", http::HeaderValue::from_str(&"a".repeat(pad)).unwrap());
    call
}

type Calls = Vec<(h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>)>;

/// `n` calls opened on one new HTTP/2 connection, each with the head `head()` and then, if given, `body`
/// (ending the stream or not); `receive_window`, if given, is the client's initial stream window. The calls,
/// the client (the connection stays open while it lives) and the connection's task.
async fn calls_on_one_connection(
    addr: std::net::SocketAddr,
    n: usize,
    head: impl Fn() -> http::Request<()>,
    body: Option<(&bytes::Bytes, bool)>,
    receive_window: Option<u32>,
) -> (
    Calls,
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut builder = h2::client::Builder::new();
    if let Some(window) = receive_window {
        builder.initial_window_size(window);
    }
    let (client, connection) = builder.handshake::<_, bytes::Bytes>(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut calls = Vec::new();
    for _ in 0..n {
        let mut client = client.clone().ready().await.unwrap();
        let (response, mut send) = client.send_request(head(), false).unwrap();
        if let Some((body, end_of_stream)) = body {
            send.send_data(body.clone(), end_of_stream).unwrap();
        }
        calls.push((response, send));
    }
    (calls, client, connection)
}

/// The grpc-status (from headers or trailers) of responses that arrive within `wait`; `None` for the rest.
async fn statuses_within(streams: Calls, wait: Duration) -> Vec<Option<String>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, (response, send)) in streams.into_iter().enumerate() {
        set.spawn(async move {
            let status = tokio::time::timeout(wait, async {
                let response = response.await.ok()?;
                let in_headers = response.headers().get("grpc-status").cloned();
                let trailers = response.into_body().trailers().await.ok().flatten();
                let status = trailers.and_then(|t| t.get("grpc-status").cloned()).or(in_headers)?;
                Some(status.to_str().unwrap_or("?").to_string())
            })
            .await
            .ok()
            .flatten();
            drop(send);
            (i, status)
        });
    }
    let mut statuses = vec![None; set.len()];
    while let Some(joined) = set.join_next().await {
        let (i, status) = joined.unwrap();
        statuses[i] = status;
    }
    statuses
}

/// Issue #35: header-only streams held up to 16 KiB of decoded header list each (HPACK lets a few wire bytes
/// name them), charged nowhere: 200 connections x 100 streams reached 415 MiB within the body grace. A header
/// list is now charged to the request-byte account while its call lasts, a new stream that finds no room is
/// refused at once (RESOURCE_EXHAUSTED), and a list over --max-header-list-bytes is refused outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_lists_are_charged_while_their_calls_wait_and_new_streams_past_the_account_are_refused() {
    let server = one_mib_account().await;
    const PAD: usize = 7_000;

    let (first, _first_client, _first_connection) =
        calls_on_one_connection(server.addr, 100, || padded_head(PAD), None, None).await;
    until_gauge(
        &server,
        "fmnist_request_bytes_in_flight",
        |held| held >= (100 * PAD) as f64,
        Duration::from_secs(5),
        "100 streams' header lists were never charged",
    )
    .await;

    // 100 more on a second connection: about 40 fit what is left; the rest are refused at once.
    let (second, _second_client, _second_connection) =
        calls_on_one_connection(server.addr, 100, || padded_head(PAD), None, None).await;
    let statuses = statuses_within(second, Duration::from_secs(2)).await;
    let refused = statuses.iter().filter(|s| s.as_deref() == Some("8")).count();
    let other: Vec<_> = statuses.iter().flatten().filter(|s| *s != "8").collect();
    assert!(
        (40..=80).contains(&refused),
        "{refused} of 100 streams past the account were refused"
    );
    assert!(other.is_empty(), "unexpected statuses: {other:?}");

    // A list over the limit (8 KiB) is refused without waiting for a body.
    let (over, _over_client, _over_connection) =
        calls_on_one_connection(server.addr, 1, || padded_head(9_000), None, None).await;
    let (response, _send) = over.into_iter().next().unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(2), response).await;
    assert!(
        matches!(&answered, Ok(Err(_)) | Ok(Ok(_))),
        "a 9 kB header list was still waiting for its body after 2 s"
    );
    if let Ok(Ok(response)) = answered {
        assert_ne!(
            response.headers().get("grpc-status").map(|s| s.as_bytes()),
            Some(&b"0"[..]),
            "a 9 kB header list was served"
        );
        assert_ne!(
            response.status(),
            http::StatusCode::OK,
            "a 9 kB header list was accepted"
        );
    }

    // Every charge goes when its stream does.
    drop(first);
    until_gauge(
        &server,
        "fmnist_request_bytes_in_flight",
        |held| held <= 0.0,
        Duration::from_secs(5),
        "header charges outlived their streams",
    )
    .await;
}

/// Issue #27/#35, the slow reader: a client that sets its HTTP/2 window to 0 and never reads let each of its
/// streams hold a whole answer in the server (100 streams on each of 256 connections held 1.6 GiB against a
/// 712 MiB budget). A ready answer is now charged to the same account as request bytes until its connection
/// takes it; one that finds no room is refused (RESOURCE_EXHAUSTED, a header frame that needs no window),
/// which frees it, and every charge goes with the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_does_not_read_are_charged_and_past_the_account_refused() {
    use prost::Message;
    let server = one_mib_account().await;
    // 64 blank images (refused for low contrast: no inference), each answered with the 784 pixels the model
    // would have seen: an answer of tens of kB for a request of 50 kB.
    let mut call = request(vec![raw(&[0u8; 784]); 64]);
    call.return_model_input = true;
    let framed = grpc_frame(call.encode_to_vec());

    let classify = || grpc_call("/fashion_mnist.v1.Classifier/Classify");
    let (streams, client, connection) =
        calls_on_one_connection(server.addr, 40, classify, Some((&framed, true)), Some(0)).await;
    let statuses = statuses_within(streams, Duration::from_secs(3)).await;
    let refused = statuses.iter().filter(|s| s.as_deref() == Some("8")).count();
    // On a busy machine the last answers may still be on their way to the account when the statuses are in.
    until_gauge(
        &server,
        "fmnist_answer_bytes_waiting",
        |held| held > 0.0,
        Duration::from_secs(10),
        "the unread answers were not charged",
    )
    .await;
    let waiting = metric(&server.metrics().await, "fmnist_answer_bytes_waiting");
    eprintln!("{refused} of 40 answers refused; {waiting} answer bytes waiting for the client");
    assert!(refused >= 1, "no answer was refused: every unread answer was held");
    assert!(
        waiting <= f64::from(1 << 20),
        "{waiting} answer bytes held, over the 1 MiB account"
    );

    drop(client);
    connection.abort();
    until_gauge(
        &server,
        "fmnist_answer_bytes_waiting",
        |held| held <= 0.0,
        Duration::from_secs(5),
        "answer charges outlived their connection",
    )
    .await;
}

/// Issue #35: a decoded message may take far more memory than its wire bytes (a packed varint of one byte
/// becomes a `u32` or `u64` in a `Vec` that grew by doubling), and tonic holds it until the stream ends. Only
/// the wire bytes were charged: 50 kB each for ModelInfer calls holding 800 kB decoded. What the codec's scan
/// proves a message will take is now charged before it is decoded, and a message that finds no room is
/// refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_messages_are_charged_at_their_decoded_size_before_decoding() {
    use fmnist_serve::inference_pb::{InferTensorContents, ModelInferRequest, model_infer_request::InferInputTensor};
    use prost::Message;
    let server = one_mib_account().await;
    // 64 images of UINT8 pixels as one-byte varints: 50 kB on the wire, charged at 16 bytes each once
    // decoded (the bound for any varint: a u64 in a Vec that grew by doubling).
    let call = ModelInferRequest {
        model_name: "cnn".into(),
        inputs: vec![InferInputTensor {
            name: "raw".into(),
            datatype: "UINT8".into(),
            shape: vec![64, 28, 28],
            contents: Some(InferTensorContents {
                uint_contents: vec![0; 64 * 784],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let framed = grpc_frame(call.encode_to_vec());

    // Each message whole, the end of its stream held back: tonic keeps the decoded message meanwhile.
    let infer = || grpc_call("/inference.GRPCInferenceService/ModelInfer");
    let (streams, _client, connection) =
        calls_on_one_connection(server.addr, 4, infer, Some((&framed, false)), None).await;
    until_gauge(
        &server,
        "fmnist_request_bytes_in_flight",
        |held| held >= 700e3,
        Duration::from_secs(5),
        "no stream was charged for its decoded message: 4 x 50 kB on the wire, 800 kB each decoded",
    )
    .await;
    let statuses = statuses_within(streams, Duration::from_secs(2)).await;
    let refused = statuses.iter().filter(|s| s.as_deref() == Some("8")).count();
    assert_eq!(
        refused, 3,
        "one stream's decoded message fits the 896 KiB, three do not: {statuses:?}"
    );

    connection.abort();
    until_gauge(
        &server,
        "fmnist_request_bytes_in_flight",
        |held| held <= 0.0,
        Duration::from_secs(5),
        "decoded charges outlived their streams",
    )
    .await;
}
