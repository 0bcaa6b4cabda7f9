//! A real server on an ephemeral port, with the repository's models and ONNX Runtime, for integration tests.

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
    // The FP32 model on every CPU: the shipped `auto` would make the expected answers depend on the machine.
    // `the_auto_default_model_follows_the_cpu_and_says_why` tests `auto` itself.
    config.default_model = "cnn".into();
    config.models_dir = repo().join("models");
    config.ort_dylib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".ort/libonnxruntime.so.1.31.1"));
    config
}

/// The model control key the tests that load and unload models give their servers.
pub const CONTROL_KEY: &str = "test-control-key-0123456789";

/// `config` with the model control calls on, gated by [`CONTROL_KEY`].
pub fn with_model_control(mut config: Config) -> Config {
    config.model_control = fmnist_serve::config::ModelControlMode::Explicit;
    config.model_control_key = Some(CONTROL_KEY.into());
    config
}

/// `request` carrying [`CONTROL_KEY`] as a bearer credential.
pub fn authorized<T>(request: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {CONTROL_KEY}").parse().expect("an ASCII header value"),
    );
    request
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub client: ClassifierClient<Channel>,
    /// The client's channel, for other services' clients on the same connection.
    pub channel: Channel,
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

    /// Starts a TLS server whose returned client trusts `ca` and presents no certificate.
    pub async fn start_tls_trusting(config: Config, ca: Certificate) -> TestServer {
        let tls = ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost");
        Self::start_with(config, Some(tls)).await
    }

    /// Starts a server without waiting for its models: it listens at once and loads them meanwhile.
    pub async fn start_loading(config: Config) -> TestServer {
        Self::spawn(config, None).await
    }

    async fn start_with(config: Config, tls: Option<ClientTlsConfig>) -> TestServer {
        let mut server = Self::spawn(config, tls).await;
        server.wait_serving().await;
        server
    }

    /// Returns once health reports SERVING.
    pub async fn wait_serving(&mut self) {
        let mut health = HealthClient::new(self.channel.clone());
        let started = std::time::Instant::now();
        loop {
            let request = HealthCheckRequest {
                service: "fashion_mnist.v1.Classifier".into(),
            };
            if let Ok(r) = health.check(request).await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
            let task = self.task.as_ref().expect("the server runs");
            assert!(
                !task.is_finished(),
                "server stopped during start-up: {:?}",
                self.task.take().unwrap().await
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "server not SERVING after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn spawn(config: Config, tls: Option<ClientTlsConfig>) -> TestServer {
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
        let client = ClassifierClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        TestServer {
            addr,
            metrics_addr,
            client,
            channel,
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
        metrics_text(self.metrics_addr).await
    }
}

/// `GET /metrics` from a server's metrics port.
pub async fn metrics_text(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics port open");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "metrics answered {body:.100}");
    body
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the real binary on ephemeral ports with `args` added; returns the child and its gRPC address (read from its log).
pub fn spawn_binary(args: &[&str]) -> Spawned {
    spawn_binary_logging(args, "info")
}

/// [`spawn_binary`] with the log filter `rust_log` (e.g. one that keeps the per-call DEBUG lines).
pub fn spawn_binary_logging(args: &[&str], rust_log: &str) -> Spawned {
    let shipped = repo().join("models");
    let models_dir: Vec<&std::ffi::OsStr> = if args.contains(&"--models-dir") {
        vec![]
    } else {
        vec!["--models-dir".as_ref(), shipped.as_os_str()]
    };
    use std::{
        io::{BufRead, BufReader},
        process::{Command, Stdio},
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_fmnist"));
    // The developer's shell must not change what is tested.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FMNIST_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(models_dir)
        .arg("--ort-dylib")
        .arg(config().ort_dylib)
        .args(args)
        .env("RUST_LOG", rust_log)
        // As config(): the FP32 default on every CPU, unless `args` set another.
        .env("FMNIST_DEFAULT_MODEL", "cnn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("server binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut addr, mut metrics_addr) = (None, None);
    let field = |line: &str, key: &str| Some(line.split(key).nth(1)?.split_whitespace().next()?.to_string());
    for line in lines.by_ref() {
        let line = line.unwrap();
        addr = addr.or_else(|| field(&line, "grpc="));
        metrics_addr = metrics_addr.or_else(|| field(&line, "metrics="));
        if line.contains(" serving") {
            break;
        }
    }
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    Spawned {
        child,
        addr: addr.expect("address in log"),
        metrics_addr: metrics_addr.expect("metrics address in log"),
        log: Some(log),
    }
}

/// The server binary started by [`spawn_binary`].
pub struct Spawned {
    pub child: std::process::Child,
    pub addr: String,
    pub metrics_addr: String,
    /// Collects the rest of its log until it exits.
    log: Option<std::thread::JoinHandle<String>>,
}

/// A test that fails must not leave a server behind (it would hold the test runner's output open).
impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Spawned {
    /// Waits for the process to exit; its exit status and the rest of its log.
    pub fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().expect("wait for the server");
        let log = self.log.take().expect("waited once").join().expect("log reader");
        (status, log)
    }

    /// The Prometheus exposition text.
    pub async fn metrics(&self) -> String {
        metrics_text(self.metrics_addr.parse().expect("a socket address")).await
    }
}

/// The peak resident memory (VmHWM) of process `pid`, in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

/// The resident memory (VmRSS) of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is alive");
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kb * 1024
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

/// The labels `model="<model>",version="<served>"` of the version `served_version` names.
pub fn served_labels(model: &str) -> String {
    format!("model=\"{model}\",version=\"{}\"", served_version(model))
}

/// The series `name{model="<model>",version="<served>"}`.
pub fn served_series(name: &str, model: &str) -> String {
    format!("{name}{{{}}}", served_labels(model))
}

/// The version of a shipped model that calls naming no version get: the newest one in models/<name>/ (the
/// shipped repository has no config.json, so the policy is the newest one).
pub fn served_version(model: &str) -> String {
    std::fs::read_dir(repo().join("models").join(model))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .expect("a numbered version")
        .to_string()
}

/// The shipped metadata of the version of a model that is served: models/<name>/<newest>/model.json.
pub fn shipped_metadata(model: &str) -> serde_json::Value {
    let version = served_version(model);
    let text = std::fs::read_to_string(repo().join(format!("models/{model}/{version}/model.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// What the service serves for a model whose graph gives `probabilities`: the same, calibrated by the
/// temperature in the model's shipped metadata, `softmax(ln(p) / T)` (= `softmax(logits / T)`), in f64.
pub fn calibrated(model: &str, probabilities: [f32; 10]) -> [f32; 10] {
    let t = shipped_metadata(model)["calibration"]["temperature"]
        .as_f64()
        .unwrap_or(1.0);
    let z = probabilities.map(|p| f64::from(p).max(f64::MIN_POSITIVE).ln() / t);
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
    z.map(|v| ((v - max).exp() / sum) as f32)
}

/// The model's measured test accuracy from its shipped metadata.
pub fn metadata_accuracy(model: &str) -> f64 {
    shipped_metadata(model)["metrics"]["test_accuracy"].as_f64().unwrap()
}

/// A gRPC call for an HTTP/2 client whose body the test sends itself (`h2`).
pub fn grpc_call(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://test{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A gRPC-framed message: `fields` (encoded protobuf) followed by an unknown field 100 of `padding` bytes,
/// which every protobuf decoder skips: a valid message of any size.
pub fn padded_grpc_message(fields: &[u8], padding: usize) -> bytes::Bytes {
    let mut message = fields.to_vec();
    message.extend([0xa2, 0x06]); // field 100, length-delimited
    let mut len = padding;
    while len >= 0x80 {
        message.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    message.push(len as u8);
    message.extend(std::iter::repeat_n(b'x', padding));
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    framed.into()
}
