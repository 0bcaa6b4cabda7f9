//! Reliability: start-up faults, run-time inference faults, deadlines, overload, message limits and TLS.

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, config, encoded, fixture, metric, png, raw, repo, request};
use fmnist_serve::{pb, server};
use tonic::Code;

fn fault_config(models: &[&str]) -> fmnist_serve::config::Config {
    let mut config = config();
    config.models_dir = repo().join("tests/fixtures/models");
    config.models = models.iter().map(|m| m.to_string()).collect();
    config.default_model = models[0].to_string();
    config
}

fn startup_error(config: &fmnist_serve::config::Config) -> String {
    server::load_models(config).expect_err("start-up fails").to_string()
}

#[test]
fn a_missing_model_fails_start_up_naming_the_file() {
    let message = startup_error(&fault_config(&["absent"]));
    assert!(
        message.contains("absent/<version>/model.json") && message.contains("no version of model absent"),
        "{message}"
    );
}

#[test]
fn a_corrupt_model_file_fails_start_up_naming_the_file_and_why() {
    let dir = tempdir();
    let version = dir.join("faulty/1");
    std::fs::create_dir_all(&version).unwrap();
    for file in ["model.onnx", "model.json"] {
        std::fs::copy(
            repo().join("tests/fixtures/models/faulty/1").join(file),
            version.join(file),
        )
        .unwrap();
    }
    let mut config = fault_config(&["faulty"]);
    config.models_dir = dir.clone();
    let onnx = version.join("model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&onnx, &bytes).unwrap();
    let message = startup_error(&config);
    assert!(
        message.contains("faulty/1/model.onnx") && message.contains("sha256"),
        "{message}"
    );

    // Same corruption with a metadata checksum that matches: ONNX Runtime itself refuses the file.
    let meta_path = version.join("model.json");
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    use sha2::Digest;
    meta["sha256"] = format!("{:x}", sha2::Sha256::digest(&bytes)).into();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let message = startup_error(&config);
    assert!(
        message.contains("faulty/1/model.onnx") && message.contains("not a loadable ONNX model"),
        "{message}"
    );
}

#[test]
fn a_model_with_the_wrong_input_shape_fails_start_up() {
    let message = startup_error(&fault_config(&["wrong-shape"]));
    assert!(
        message.contains("wrong-shape/1/model.onnx") && message.contains("expected float32 [batch, 1, 28, 28]"),
        "{message}"
    );
}

#[test]
fn a_missing_onnx_runtime_library_says_what_to_run() {
    let mut config = config();
    config.ort_dylib = "/nonexistent/libonnxruntime.so".into();
    let message = startup_error(&config);
    assert!(
        message.contains("/nonexistent/libonnxruntime.so") && message.contains("make ort"),
        "{message}"
    );
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fmnist-test-{}-{:?}", std::process::id(), Instant::now()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_inference_failure_is_internal_for_that_call_and_the_server_keeps_serving() {
    let mut server = TestServer::start(fault_config(&["faulty"])).await;
    let (good, _) = fixture()[0];
    let mut poison = good;
    poison[0] = 255; // makes the faulty model's Gather index go out of bounds inside ONNX Runtime

    assert!(server.client.classify(request(vec![raw(&good)])).await.is_ok());
    let status = server
        .client
        .classify(request(vec![raw(&poison)]))
        .await
        .expect_err("inference fails");
    assert_eq!(status.code(), Code::Internal);
    assert!(status.message().contains("inference failed"), "{}", status.message());
    let after = server.client.classify(request(vec![raw(&good)])).await;
    assert!(after.is_ok(), "the next call is served: {after:?}");
}

/// Callers beyond the queue's bound wait their turn: with four times the queue's worth of images wanted at
/// once, every call is served and none refused (they used to be refused at once, and came straight back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_beyond_the_queue_bound_wait_their_turn_and_are_all_served() {
    let mut config = config();
    config.max_queued_images = 64;
    config.max_queued_images_per_connection = 64;
    assert_eq!(config.max_queue_wait_ms, 2000, "the shipped wait");
    let server = TestServer::start(config).await;
    let images: Vec<pb::Image> = fixture().iter().take(16).map(|(p, _)| raw(p)).collect();
    // 16 callers of 16 images on one connection: 256 images wanted, 4 calls' worth of room.
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (mut client, images) = (server.client.clone(), images.clone());
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..10 {
                    let answer = client.classify(request(images.clone())).await;
                    codes.push(answer.map(|r| r.into_inner().results.len()).map_err(|s| s.code()));
                }
                codes
            })
        })
        .collect();
    let mut waited = 0.0f64;
    let waiting = common::served_series("fmnist_queue_waiting_images", "cnn");
    while !callers.iter().all(|c| c.is_finished()) {
        let gauge = metric(&server.metrics().await, &waiting);
        waited = waited.max(gauge);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut codes = Vec::new();
    for c in callers {
        codes.extend(c.await.unwrap());
    }
    assert!(codes.iter().all(|c| *c == Ok(16)), "{codes:?}");
    assert!(
        waited >= 16.0,
        "no call was seen waiting for room ({waited} images at most)"
    );
    let after = metric(&server.metrics().await, &waiting);
    assert_eq!(after, 0.0, "the waiting gauge returns to 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_no_room_within_the_queue_wait_is_refused_saying_how_long_it_waited() {
    let mut config = config();
    config.max_queued_images = 64; // one 64-image call fills the queue, and runs for several milliseconds
    config.max_queue_wait_ms = 1;
    let server = TestServer::start(config).await;
    let (pixels, _) = fixture()[0];
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let mut client = server.client.clone();
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..5 {
                    codes.push(client.classify(request(vec![raw(&pixels); 64])).await.map(|_| ()));
                }
                codes
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, Vec::new());
    for c in callers {
        for code in c.await.unwrap() {
            match code {
                Ok(()) => ok += 1,
                Err(s) => refused.push(s),
            }
        }
    }
    assert!(ok >= 1 && !refused.is_empty(), "{ok} served, {} refused", refused.len());
    for s in &refused {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("no room within"), "{}", s.message());
    }
}

/// With `--max-queue-wait-ms 0` a full queue refuses at once, as TF Serving does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_queue_wait_overload_is_refused_fast_memory_stays_bounded_and_service_recovers() {
    let mut config = config();
    config.max_queued_images = 256;
    config.max_queue_wait_ms = 0;
    let mut server = TestServer::start(config).await;
    let images: Vec<pb::Image> = fixture()
        .iter()
        .take(64)
        .map(|(p, _)| encoded(png(p, 28, 28)))
        .collect();
    let rss_before = common::rss_bytes(std::process::id());
    // 128 callers sending 64-image PNG calls back to back for 3 s: many times what two cores can serve.
    let until = Instant::now() + Duration::from_secs(3);
    let callers: Vec<_> = (0..128)
        .map(|_| {
            let (mut client, images) = (server.client.clone(), images.clone());
            tokio::spawn(async move {
                let (mut ok, mut refused, mut refusal_latency) = (0u32, 0u32, Vec::new());
                while Instant::now() < until {
                    let started = Instant::now();
                    match client.classify(request(images.clone())).await {
                        Ok(r) => {
                            assert_eq!(r.into_inner().results.len(), 64);
                            ok += 1;
                        }
                        Err(s) => {
                            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                            refused += 1;
                            refusal_latency.push(started.elapsed());
                        }
                    }
                }
                (ok, refused, refusal_latency)
            })
        })
        .collect();
    let (mut ok, mut refused, mut latencies) = (0, 0, Vec::new());
    for c in callers {
        let (o, r, l) = c.await.unwrap();
        ok += o;
        refused += r;
        latencies.extend(l);
    }
    latencies.sort();
    let client_p50 = latencies.get(latencies.len() / 2).copied().unwrap_or_default();
    let grown = common::rss_bytes(std::process::id()).saturating_sub(rss_before);
    // How long the server took to refuse, from its own histogram (the client-side figure also counts the wait
    // for a CPU shared by 128 callers, the server and the decoding).
    let metrics = server.metrics().await;
    let bucket = |le: &str| {
        metric(
            &metrics,
            &format!(
                "fmnist_request_duration_seconds_bucket{{rpc=\"Classify\",code=\"ResourceExhausted\",le=\"{le}\"}}"
            ),
        )
    };
    let (fast, all) = (bucket("0.001"), bucket("+Inf"));
    eprintln!(
        "overload: {ok} calls served, {refused} refused ({:.1}% of refusals answered within 1 ms by the server, client-side p50 {client_p50:?}), RSS grew {} MiB",
        100.0 * fast / all,
        grown >> 20
    );
    assert!(ok > 0 && refused > 0, "{ok} served, {refused} refused");
    // Room is reserved before decoding, so a refusal costs no decoding and no queueing.
    assert!(fast >= 0.9 * all, "{fast} of {all} refusals took under 1 ms");
    assert!(grown < 300 << 20, "RSS grew by {} MiB", grown >> 20);
    let (good, label) = fixture()[0];
    let after = server
        .client
        .classify(request(vec![raw(&good)]))
        .await
        .expect("serves normally after the load");
    assert_eq!(
        after.into_inner().results[0].prediction.as_ref().unwrap().class_id,
        label
    );
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_with_a_clear_status() {
    let mut config = config();
    config.max_message_bytes = 64 * 1024;
    let mut server = TestServer::start(config).await;
    let status = server
        .client
        .classify(request(vec![encoded(vec![0u8; 100 * 1024])]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{}", status.message());
}

#[tokio::test]
async fn tls_and_mutual_tls_refuse_clients_without_a_valid_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let issue = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue("localhost");
    let (client_cert, client_key) = issue("client");
    let dir = tempdir();
    for (name, pem) in [
        ("server.pem", &server_cert),
        ("server.key", &server_key),
        ("ca.pem", &ca.pem()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    let mut config = config();
    config.tls_cert = Some(dir.join("server.pem"));
    config.tls_key = Some(dir.join("server.key"));
    config.tls_client_ca = Some(dir.join("ca.pem"));
    config.tls_handshake_timeout_s = 1;
    let server = TestServer::start_tls(
        config,
        Certificate::from_pem(ca.pem()),
        Identity::from_pem(&client_cert, &client_key),
    )
    .await;

    let (good, label) = fixture()[0];
    let mut client = server.client.clone();
    let ok = client
        .classify(request(vec![raw(&good)]))
        .await
        .expect("a client with a certificate is served");
    assert_eq!(ok.into_inner().results[0].prediction.as_ref().unwrap().class_id, label);

    let endpoint = format!("https://{}", server.addr);
    let no_cert = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let anonymous = Channel::from_shared(endpoint.clone())
        .unwrap()
        .tls_config(no_cert)
        .unwrap()
        .connect()
        .await;
    let refused = match anonymous {
        Err(_) => true,
        Ok(channel) => pb::classifier_client::ClassifierClient::new(channel)
            .classify(request(vec![raw(&good)]))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate is refused");

    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => pb::classifier_client::ClassifierClient::new(channel)
            .classify(request(vec![raw(&good)]))
            .await
            .is_err(),
    };
    assert!(refused, "plaintext is refused on a TLS port");

    // ALPN offers http/1.1 beside h2: the page (and gRPC-Web) work under TLS too.
    {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::{TlsConnector, rustls};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(client_cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(client_key.as_bytes()).unwrap(),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut stream = TlsConnector::from(std::sync::Arc::new(tls))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS with ALPN http/1.1");
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut page = Vec::new();
        let _ = stream.read_to_end(&mut page).await;
        let page = String::from_utf8_lossy(&page);
        assert!(
            page.starts_with("HTTP/1.1 200") && page.contains("<html"),
            "{page:.200}"
        );

        // A client that connects and never starts its handshake is dropped after --tls-handshake-timeout-s.
        let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "closed, not answered: {closed:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(800),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn calls_before_the_models_are_loaded_are_unavailable() {
    use fmnist_serve::classify::{ClassifyRequest, ImageInput, Pipeline};
    // The server listens (and answers health NOT_SERVING) while its models load; the core says why.
    let core = Pipeline::new(
        fmnist_serve::registry::Registry::new(config().registry_settings(Default::default())),
        config().policy(),
        None,
    );
    let (pixels, _) = fixture()[0];
    let call = ClassifyRequest {
        images: vec![ImageInput::Raw(pixels.to_vec())],
        ..Default::default()
    };
    let status = tonic::Status::from(core.classify(call, None, None).await.unwrap_err());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("loading"), "{}", status.message());
}

#[test]
fn a_failed_start_does_not_claim_that_other_versions_keep_serving() {
    // issue #40: with a wrong --ort-dylib, each model logged "the versions serving keep serving" while nothing
    // was serving.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fmnist"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--ort-dylib", "/nonexistent/libonnxruntime.so", "--models-dir"])
        .arg(common::repo().join("models"))
        .output()
        .expect("the binary runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("no version of this model is serving"), "{log}");
    assert!(!log.contains("keep serving"), "{log}");
}

/// Issue #35: 200 connections x 100 bad calls wrote 20,000 WARN lines. A peer's failures are logged at a
/// bounded rate, the line that gets through says how many were left out, and the metrics count every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failing_calls_from_one_peer_cannot_flood_the_log() {
    let mut server = common::spawn_binary(&[]);
    let mut client = pb::classifier_client::ClassifierClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    const CALLS: usize = 400;
    let started = Instant::now();
    for _ in 0..CALLS {
        // No images: INVALID_ARGUMENT, cheap for both sides.
        let refused = client.classify(request(vec![])).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
    }
    let seconds = started.elapsed().as_secs_f64().ceil();
    // One call after a window has passed carries the count of those left out before it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.classify(request(vec![])).await.unwrap_err();
    let counted = metric(
        &server.metrics().await,
        "fmnist_requests_total{rpc=\"Classify\",code=\"InvalidArgument\"}",
    );
    assert_eq!(counted, (CALLS + 1) as f64, "the metrics count every failure");
    let _ = server.child.kill();
    let (_, log) = server.wait();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("call failed")).collect();
    let allowed = 5 * (seconds as usize + 2);
    assert!(
        lines.len() <= allowed,
        "{} WARN lines for {} failures in {seconds} s (at most {allowed})",
        lines.len(),
        CALLS + 1
    );
    let summary = lines.last().expect("failures are logged");
    assert!(summary.contains("failures_not_logged_before="), "{summary}");
}
