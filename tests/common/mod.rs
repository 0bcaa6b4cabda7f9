//! A real server on an ephemeral port, with the repository's models and ONNX Runtime, for integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use fmnist_serve::{
    config::Config,
    pb::{self, classifier_client::ClassifierClient},
    preprocess::PIXELS,
    server::{self, ServeError},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The server's defaults, pointed at the repository's models and ONNX Runtime (`make ort`).
pub fn config() -> Config {
    let mut config = Config::defaults();
    config.models_dir = repo().join("models");
    config.ort_dylib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ort/libonnxruntime.so.1.31.1"));
    config
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub client: ClassifierClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    /// Starts a server and returns once health reports SERVING.
    pub async fn start(config: Config) -> TestServer {
        Self::start_with(config, None).await
    }

    /// Starts a TLS server; the returned client trusts `ca` and presents `identity` (for mutual TLS).
    pub async fn start_tls(config: Config, ca: Certificate, identity: Identity) -> TestServer {
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca)
            .identity(identity)
            .domain_name("localhost");
        Self::start_with(config, Some(tls)).await
    }

    async fn start_with(config: Config, tls: Option<ClientTlsConfig>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
        let metrics = TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port");
        let (addr, metrics_addr) = (listener.local_addr().unwrap(), metrics.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(config, listener, metrics, async move {
            let _ = rx.await;
        }));
        let channel = match tls {
            None => Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
            Some(tls) => Channel::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect_lazy(),
        };
        let mut health = HealthClient::new(channel.clone());
        let started = std::time::Instant::now();
        loop {
            let request = HealthCheckRequest {
                service: "fashion_mnist.v1.Classifier".into(),
            };
            if let Ok(r) = health.check(request).await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                break;
            }
            assert!(!task.is_finished(), "server stopped during start-up: {:?}", task.await);
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "server not SERVING after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = ClassifierClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        TestServer {
            addr,
            metrics_addr,
            client,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Asks the server to drain and waits for it to stop.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap().await.expect("server task does not panic")
    }

    /// `GetModelInfo`'s entry for the model called `name`.
    pub async fn model_info(&mut self, name: &str) -> pb::ModelInfo {
        let info = self
            .client
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .expect("GetModelInfo answers")
            .into_inner();
        info.models
            .into_iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("model {name} is loaded"))
    }

    /// The Prometheus exposition text.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .expect("metrics port open");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "metrics answered {body:.100}");
        body
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The value of the first sample in Prometheus exposition `text` whose line starts with `line_prefix`
/// (metric name and labels), or 0 when the series does not exist yet (counters appear on first use).
pub fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The committed fixture: 1,000 Fashion-MNIST test images (100 per class, seeded random draw) with labels.
pub fn fixture() -> Vec<([u8; PIXELS], u32)> {
    let images = std::fs::read(repo().join("tests/fixtures/test-images.u8")).expect("fixture images");
    let labels = std::fs::read(repo().join("tests/fixtures/test-labels.u8")).expect("fixture labels");
    assert_eq!(images.len(), labels.len() * PIXELS);
    images
        .chunks_exact(PIXELS)
        .zip(labels)
        .map(|(c, l)| (c.try_into().unwrap(), u32::from(l)))
        .collect()
}

/// The full test set when the Debian package `dataset-fashion-mnist` is installed.
pub fn full_test_set() -> Option<Vec<([u8; PIXELS], u32)>> {
    use std::io::Read;
    let dir = PathBuf::from("/usr/share/datasets/fashion-mnist");
    let read = |name: &str| -> Option<Vec<u8>> {
        let file = std::fs::File::open(dir.join(name)).ok()?;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(file).read_to_end(&mut out).ok()?;
        Some(out)
    };
    let images = read("t10k-images-idx3-ubyte.gz")?;
    let labels = read("t10k-labels-idx1-ubyte.gz")?;
    Some(
        images[16..]
            .chunks_exact(PIXELS)
            .zip(&labels[8..])
            .map(|(c, &l)| (c.try_into().unwrap(), u32::from(l)))
            .collect(),
    )
}

pub fn raw(pixels: &[u8]) -> pb::Image {
    pb::Image {
        data: Some(pb::image::Data::Raw(pixels.to_vec())),
    }
}

pub fn encoded(bytes: Vec<u8>) -> pb::Image {
    pb::Image {
        data: Some(pb::image::Data::Encoded(bytes)),
    }
}

/// PNG-encodes a grayscale image.
pub fn png(pixels: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::GrayImage::from_raw(width, height, pixels.to_vec())
        .expect("pixel count matches")
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encodes");
    out
}

/// A valid 4x4 PNG whose header declares `width` x `height` (a decompression bomb's calling card).
pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut png = png(&[0u8; 16], 4, 4);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]); // IHDR type + data
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    png
}

pub fn request(images: Vec<pb::Image>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        images,
        ..Default::default()
    }
}

/// Classifies every image in calls of up to 64, returning the results in order.
pub async fn classify_all(
    client: &mut ClassifierClient<Channel>,
    images: &[([u8; PIXELS], u32)],
    model: &str,
) -> Vec<pb::Classification> {
    let mut results = Vec::with_capacity(images.len());
    for chunk in images.chunks(64) {
        let mut req = request(chunk.iter().map(|(p, _)| raw(p)).collect());
        req.model = model.to_string();
        results.extend(
            client
                .classify(req)
                .await
                .expect("classify succeeds")
                .into_inner()
                .results,
        );
    }
    results
}

/// The model's measured test accuracy from models/<name>.json.
pub fn metadata_accuracy(model: &str) -> f64 {
    let text = std::fs::read_to_string(repo().join(format!("models/{model}.json"))).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["metrics"]["test_accuracy"].as_f64().unwrap()
}
