//! Every setting of the service, in one clap struct: `fmnist serve --help` is its documentation, and each flag
//! has an environment variable for containers.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use crate::{
    api::oip::rest::RestSettings,
    core::admission::SharePolicy,
    core::capture::CaptureSettings,
    core::control::{ControlKey, ControlSettings},
    core::model::{RuntimeOptions, SessionShape, Spinning},
    core::preprocess::{DecodeLimits, InputCheck, PreprocessSettings, UploadConversion},
    core::{
        batching::{ActiveCalls, BatchConfig},
        classify::Policy,
        registry::{DefaultModel, RegistrySettings},
    },
    telemetry::LogFormat,
    transport::connections::ConnectionLimits,
    transport::layers::MinBodyRate,
};

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the gRPC (and gRPC-Web + browser page) server listens on.
    #[arg(long, env = "FMNIST_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, env = "FMNIST_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// The model repository: <dir>/<model>/<version>/{model.onnx, model.json}, with an optional
    /// <dir>/<model>/config.json (version policy, labels). docs/operations.md "Updating a model".
    #[arg(long, env = "FMNIST_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,

    /// How often (seconds) the server looks in --models-dir for new, changed or removed versions and swaps
    /// them in without a failed call; 0 = never (then SIGHUP or the RepositoryModelLoad call reloads).
    #[arg(long, env = "FMNIST_MODEL_POLL_S", default_value_t = 10)]
    pub model_poll_s: u64,

    /// Models to load, by name (comma-separated). cnn-int8 is the CNN statically quantized to INT8 (within 0.3
    /// accuracy points of cnn, 1.3-1.4x the throughput of cnn end to end on CPUs with VNNI; see bench/README.md).
    #[arg(
        long,
        env = "FMNIST_MODELS",
        value_delimiter = ',',
        default_value = "cnn,cnn-int8,dense"
    )]
    pub models: Vec<String>,

    /// Model used when a request names none. `auto`: cnn-int8 where the CPU has 8-bit dot-product instructions
    /// (AVX512-VNNI or AVX-VNNI; every CPU with AMX has them), where it serves 1.3-1.4x the images per second at the same accuracy and OOD
    /// rejection, and cnn elsewhere (docs/models.md "One INT8 file, the same answers on every CPU"). The
    /// choice is logged and in GetModelInfo.
    #[arg(long, env = "FMNIST_DEFAULT_MODEL", default_value = "auto")]
    pub default_model: String,

    /// Path of the ONNX Runtime shared library (`make ort` puts it in .ort/).
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = ".ort/libonnxruntime.so.1.31.1")]
    pub ort_dylib: PathBuf,

    /// ONNX Runtime intra-op threads per model instance; 0 = the available cores shared out among the
    /// --instances (at least one each).
    #[arg(long, env = "FMNIST_ORT_THREADS", default_value_t = 0)]
    pub ort_threads: usize,

    /// Instances of each model version: each its own ONNX Runtime session and inference thread, taking
    /// batches from the version's one queue side by side (Triton's instance_group count). More instances
    /// with fewer threads each let a batch run while another forms; each costs one more session's memory.
    /// 0 = one per core, at most 4. One is the default because no other layout measured better everywhere
    /// (bench/README.md "The adaptive layout": on 2 cores, `--instances 2 --ort-threads 1 --solo-threads 2`
    /// served 11-27% more images at 16 per call under load, and 4-12% fewer single images to a lone caller).
    #[arg(long, env = "FMNIST_INSTANCES", default_value_t = 1)]
    pub instances: usize,

    /// Intra-op threads of one more session per model version, which runs a batch instead of the instance that
    /// formed it when no other instance is busy and no call waits behind it: a lone caller gets these threads,
    /// while under load the --instances run side by side. Costs one more session's memory. 0 = none.
    #[arg(long, env = "FMNIST_SOLO_THREADS", default_value_t = 0)]
    pub solo_threads: usize,

    /// When the solo session's idle intra-op threads spin (the values of --ort-spinning). `true` gives a lone
    /// caller the lowest latency (bench/README.md "Spinning", round 9) and costs throughput under load.
    #[arg(long, env = "FMNIST_SOLO_SPINNING", value_enum, default_value_t = OrtSpinning::Never)]
    pub solo_spinning: OrtSpinning,

    /// Threads that serve the network (tokio workers: HTTP/2, protobuf, JSON, raw images); 0 = one per core.
    /// Model inference runs on its own threads; on 2 cores, 1 and 2 measured the same (bench/README.md).
    #[arg(long, env = "FMNIST_IO_THREADS", default_value_t = 0)]
    pub io_threads: usize,

    /// When idle ONNX Runtime intra-op threads spin-wait for work instead of sleeping: `false`, never; `run`,
    /// between the operators of one run only; `true`, also between runs (ONNX Runtime's default); `auto`, `run`
    /// for a model whose runs are long (an FP32 graph of at least 10 M multiply-adds per image, as cnn) and
    /// `false` for the others. Spinning serves a lone caller 11-22% more images, but where runs are short it
    /// takes CPU the network needs under load (bench/README.md "Spinning", rounds 9 and 11).
    #[arg(long, env = "FMNIST_ORT_SPINNING", value_enum, default_value_t = OrtSpinning::Auto)]
    pub ort_spinning: OrtSpinning,

    /// ONNX Runtime graph optimization level.
    #[arg(long, env = "FMNIST_ORT_OPTIMIZATION", value_enum, default_value_t = OrtOptimization::All)]
    pub ort_optimization: OrtOptimization,

    /// Minimum calibrated top-class probability for an image to be accepted, for every model (requests may
    /// override). Default: each model's own accept rule from its metadata (the threshold at which accepted
    /// validation answers are 99% correct), else 0.60.
    #[arg(long, env = "FMNIST_MIN_CONFIDENCE")]
    pub min_confidence: Option<f32>,

    /// Maximum out-of-distribution score for an image to be accepted; default: the threshold calibrated in the
    /// model's metadata (requests may override).
    #[arg(long, env = "FMNIST_MAX_OOD_SCORE")]
    pub max_ood_score: Option<f32>,

    /// Pixels at or below this level (0-255) count as near black.
    #[arg(long, env = "FMNIST_DARK_LEVEL", default_value_t = 10)]
    pub dark_level: u8,

    /// Pixels at or above this level (0-255) count as near white.
    #[arg(long, env = "FMNIST_BRIGHT_LEVEL", default_value_t = 245)]
    pub bright_level: u8,

    /// Reject images with more than this fraction of near-black pixels (test set max: 0.903).
    #[arg(long, env = "FMNIST_MAX_DARK_FRACTION", default_value_t = 0.95)]
    pub max_dark_fraction: f32,

    /// Reject images with more than this fraction of near-white pixels (test set max: 0.386).
    #[arg(long, env = "FMNIST_MAX_BRIGHT_FRACTION", default_value_t = 0.80)]
    pub max_bright_fraction: f32,

    /// An uploaded photo's pixels within this many levels of its background count as background: trimmed from
    /// the edges, then set to 0 (0-254; on the scale where the background is 0 and black on white is 255).
    #[arg(long, env = "FMNIST_BACKGROUND_TOLERANCE", default_value_t = 16, value_parser = clap::value_parser!(u8).range(0..=254))]
    pub background_tolerance: u8,

    /// Sigma of the sharpening applied to an uploaded photo once it is 28 pixels long, as Fashion-MNIST's
    /// conversion did (0: none).
    #[arg(long, env = "FMNIST_SHARPEN_SIGMA", default_value_t = 0.75)]
    pub sharpen_sigma: f32,

    /// Reject images whose pixel standard deviation is below this (test set min: 18.1).
    #[arg(long, env = "FMNIST_MIN_CONTRAST", default_value_t = 10.0)]
    pub min_contrast: f32,

    /// Most images one Classify call may carry.
    #[arg(long, env = "FMNIST_MAX_IMAGES_PER_REQUEST", default_value_t = 64)]
    pub max_images_per_request: usize,

    /// Most images in one ONNX Runtime run.
    #[arg(long, env = "FMNIST_MAX_BATCH_SIZE", default_value_t = 64)]
    pub max_batch_size: usize,

    /// Longest time (microseconds) a batch that is not full waits for more images. 0: a batch runs as soon as
    /// the model is free, taking whatever has queued meanwhile (see docs/reliability.md "Batching and backpressure").
    #[arg(long, env = "FMNIST_MAX_BATCH_DELAY_US", default_value_t = 0)]
    pub max_batch_delay_us: u64,

    /// Most images of a lone call (no other call in progress, none overlapping another for the last 10 ms)
    /// that runs on the thread that read it rather than on the model's inference thread, saving two hand-offs
    /// between threads: on 2 cores a lone caller gets 5-20% more images, and nothing else changes. At most
    /// --max-batch-size; 0: every call goes through the queue (bench/README.md "A lone call on its own thread").
    #[arg(long, env = "FMNIST_INLINE_MAX_IMAGES", default_value_t = 16)]
    pub inline_max_images: usize,

    /// Most images waiting per model; beyond it calls wait their turn for room (--max-queue-wait-ms), then get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "FMNIST_MAX_QUEUED_IMAGES", default_value_t = 1024)]
    pub max_queued_images: usize,

    /// Longest time (milliseconds) a call waits, first come first served, for room in a full queue (or for its
    /// connection's earlier calls, past the connection's share) before it gets RESOURCE_EXHAUSTED; never past
    /// its deadline. 0: refuse at once (docs/reliability.md "Batching and backpressure").
    #[arg(long, env = "FMNIST_MAX_QUEUE_WAIT_MS", default_value_t = 2000)]
    pub max_queue_wait_ms: u64,

    /// Most images one connection may have queued or decoding, across models; past it that connection's calls
    /// get RESOURCE_EXHAUSTED while other connections are still served.
    #[arg(long, env = "FMNIST_MAX_QUEUED_IMAGES_PER_CONNECTION", default_value_t = 256)]
    pub max_queued_images_per_connection: usize,

    /// Largest gRPC message accepted, in bytes: 64 images of 256 KiB each, far above any garment photo
    /// scaled for a 28x28 model.
    #[arg(long, env = "FMNIST_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Request bytes all calls in flight may hold together; past it calls get RESOURCE_EXHAUSTED.
    #[arg(long, env = "FMNIST_MAX_REQUEST_BYTES_IN_FLIGHT", default_value_t = 64 * 1024 * 1024)]
    pub max_request_bytes_in_flight: usize,

    /// Request bytes one connection's calls in flight may hold together (at least --max-message-bytes, with
    /// room for gRPC-Web's base64).
    #[arg(long, env = "FMNIST_MAX_REQUEST_BYTES_PER_CONNECTION", default_value_t = 32 * 1024 * 1024)]
    pub max_request_bytes_per_connection: usize,

    /// Largest width or height of an encoded image, in pixels (a 12-megapixel phone photo is 4032 wide).
    #[arg(long, env = "FMNIST_MAX_DECODE_DIMENSION", default_value_t = 4096)]
    pub max_decode_dimension: u32,

    /// Largest allocation the image decoder may make for one image, in bytes: a 12-megapixel photo, even as
    /// 8-bit RGBA, or 4096 x 4096 RGB.
    #[arg(long, env = "FMNIST_MAX_DECODE_BYTES", default_value_t = 48 * 1024 * 1024)]
    pub max_decode_bytes: u64,

    /// Calls with encoded images decoded at the same time, per lane (small and large); 0 = one per available
    /// core. Peak decoding memory is about this times 2 x --max-decode-bytes (docs/reliability.md "Memory budget").
    #[arg(long, env = "FMNIST_MAX_CONCURRENT_DECODES", default_value_t = 0)]
    pub max_concurrent_decodes: usize,

    /// Calls of one connection decoding at once; its further encoded-image calls wait for their turn. 0 = one
    /// less than --max-concurrent-decodes (at least 1), so one connection never holds every slot.
    #[arg(long, env = "FMNIST_MAX_DECODES_PER_CONNECTION", default_value_t = 0)]
    pub max_decodes_per_connection: usize,

    /// A call whose encoded images declare at most this many pixels in all decodes in the small lane, so it
    /// never waits behind calls of huge photos.
    #[arg(long, env = "FMNIST_SMALL_DECODE_PIXELS", default_value_t = 1024 * 1024)]
    pub small_decode_pixels: u64,

    /// Connections open at once on the gRPC port; past it the server stops accepting until one closes.
    #[arg(long, env = "FMNIST_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,

    /// Concurrent HTTP/2 streams per connection (calls and health watches).
    #[arg(long, env = "FMNIST_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub max_concurrent_streams: u32,

    /// Bytes of one request's header list, as HTTP/2 counts them (name + value + 32 per field); a larger one
    /// is refused. HPACK lets a few wire bytes name a whole list, and each open stream holds its own; the
    /// default is gRPC's own limit on metadata (8 KiB).
    #[arg(long, env = "FMNIST_MAX_HEADER_LIST_BYTES", default_value_t = 8 * 1024)]
    pub max_header_list_bytes: u32,

    /// Calls of one connection in progress at once; further calls get RESOURCE_EXHAUSTED at once (never
    /// queued: docs/reliability.md "Limits, and why each exists"). At its default, equal to
    /// --max-concurrent-streams, clients meet the stream limit first; lower it to refuse sooner than HTTP/2
    /// makes callers wait.
    #[arg(long, env = "FMNIST_MAX_CALLS_PER_CONNECTION", default_value_t = 100)]
    pub max_calls_per_connection: usize,

    /// A connection on which nothing was read or written for this long (seconds) is closed. HTTP/2 clients
    /// stay alive by answering the keepalive pings; silent sockets and stalled uploads do not.
    #[arg(long, env = "FMNIST_IDLE_TIMEOUT_S", default_value_t = 30)]
    pub idle_timeout_s: u64,

    /// A connection with no call in flight for this long (seconds) is closed, whatever it sends: answering
    /// pings or dribbling bytes does not keep it (gRPC's MAX_CONNECTION_IDLE). A call is in flight from its
    /// request head until its response is ready; a streamed response (a health Watch) does not count. At
    /// --max-connections, a new connection instead evicts the connection idle the longest, counted as
    /// fmnist_connections_closed_total{cause="evicted"}: never one with a call in flight, one whose last call
    /// ended under a second ago (a caller between calls), or one opened under 250 ms ago that has not called.
    #[arg(long, env = "FMNIST_MAX_CONNECTION_IDLE_S", default_value_t = 120)]
    pub max_connection_idle_s: u64,

    /// An HTTP/1.1 request head must arrive in full within this many seconds of its first byte (of the
    /// connection's opening, for the first request), or the connection is closed (slowloris).
    #[arg(long, env = "FMNIST_REQUEST_HEAD_TIMEOUT_S", default_value_t = 10)]
    pub request_head_timeout_s: u64,

    /// Slowest request body accepted (bytes/s): after --request-body-grace-s, a body must have averaged at
    /// least this since its call began, or the call fails: its HTTP/2 stream alone is reset, while an HTTP/1.1
    /// connection, which the unread body blocks, is closed.
    #[arg(long, env = "FMNIST_MIN_REQUEST_BODY_RATE", default_value_t = 1024)]
    pub min_request_body_rate: u64,

    /// Seconds a request body may take before --min-request-body-rate applies (slow starts, small bodies).
    /// Short, because a call in flight is never evicted: with 5 s, 300 uploads of a byte every 2 s kept the 256
    /// slots full and a polite caller got 61 of 94 calls through (scripts/attacks/round2.py slow-chunks); with
    /// 2 s, 94 of 94. A body may still pause 2 s before its first kilobyte; at 1 KiB/s a 50 KB photo has 50 s.
    #[arg(long, env = "FMNIST_REQUEST_BODY_GRACE_S", default_value_t = 2)]
    pub request_body_grace_s: u64,

    /// A connection whose writes have been blocked for this long (seconds), because the client does not read
    /// what it is sent, is closed.
    #[arg(long, env = "FMNIST_WRITE_STALL_TIMEOUT_S", default_value_t = 30)]
    pub write_stall_timeout_s: u64,

    /// Interval (seconds) of HTTP/2 keepalive pings; a ping unanswered for as long closes the connection.
    #[arg(long, env = "FMNIST_HTTP2_KEEPALIVE_S", default_value_t = 10)]
    pub http2_keepalive_s: u64,

    /// A connection older than this (seconds) is sent an HTTP/2 GOAWAY: calls in flight finish (each within
    /// --request-timeout-s) and the client opens a new connection, which a Kubernetes Service may place on
    /// another replica, so load spreads to replicas added since (gRFC A9). Each process draws its own age within
    /// +-10% of this, so replicas started together do not send their clients away at the same moment. 0 = never.
    #[arg(long, env = "FMNIST_MAX_CONNECTION_AGE_S", default_value_t = 300)]
    pub max_connection_age_s: u64,

    /// Export a span per call (RPC, preprocessing, queue wait, batch inference) over OTLP/gRPC to this
    /// collector, e.g. http://otel-collector:4317. A W3C `traceparent` in the request makes the call a child of
    /// the caller's span. Off when unset, and then tracing costs nothing extra.
    #[arg(long, env = "FMNIST_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The service.name resource attribute of exported spans.
    #[arg(long, env = "FMNIST_OTLP_SERVICE_NAME", default_value = "fmnist-serve")]
    pub otlp_service_name: String,

    /// A TLS handshake not finished within this many seconds is abandoned.
    #[arg(long, env = "FMNIST_TLS_HANDSHAKE_TIMEOUT_S", default_value_t = 10)]
    pub tls_handshake_timeout_s: u64,

    /// Streams a client may open and reset before the server reads them, per connection (the HTTP/2 "rapid
    /// reset" bound).
    #[arg(long, env = "FMNIST_HTTP2_MAX_PENDING_RESETS", default_value_t = 20)]
    pub http2_max_pending_resets: usize,

    /// Longest a call may take on the server (seconds), whatever deadline the client set or omitted.
    #[arg(long, env = "FMNIST_REQUEST_TIMEOUT_S", default_value_t = 30)]
    pub request_timeout_s: u64,

    /// On SIGTERM/SIGINT, how long (seconds) queued and in-flight calls get to finish before exit.
    #[arg(long, env = "FMNIST_DRAIN_TIMEOUT_S", default_value_t = 20)]
    pub drain_timeout_s: u64,

    /// PEM certificate chain of the server. With --tls-key the gRPC port speaks TLS only.
    #[arg(long, env = "FMNIST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the server certificate.
    #[arg(long, env = "FMNIST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: when set, clients must present a certificate signed by one of them (mutual TLS).
    #[arg(long, env = "FMNIST_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Model control: `none` refuses every load and unload call (gRPC RepositoryModelLoad/Unload, REST
    /// /v2/repository/models/*/load|unload) with PERMISSION_DENIED / 403; `explicit` serves them to callers that
    /// send `authorization: Bearer <key>` (the key from --model-control-key-file or FMNIST_MODEL_CONTROL_KEY).
    /// The repository poll and SIGHUP work either way (docs/security.md).
    #[arg(long, env = "FMNIST_MODEL_CONTROL", value_enum, default_value_t = ModelControlMode::None)]
    pub model_control: ModelControlMode,

    /// File holding the model control key (at least 16 bytes; surrounding whitespace ignored), e.g. a
    /// mounted Kubernetes Secret.
    #[arg(long, env = "FMNIST_MODEL_CONTROL_KEY_FILE")]
    pub model_control_key_file: Option<PathBuf>,

    /// The model control key itself; prefer the environment or the file (a value on the command line shows
    /// in `ps`).
    #[arg(long, env = "FMNIST_MODEL_CONTROL_KEY", hide_env_values = true)]
    pub model_control_key: Option<String>,

    /// Keep a sample of the images the model rejects (out of distribution, low confidence) in this directory:
    /// the 28x28 input with its verdict, scores, model version and time, as JSON lines that
    /// training/captures.py reads once labelled. Off unless set (docs/security.md "The capture").
    #[arg(long, env = "FMNIST_CAPTURE_DIR")]
    pub capture_dir: Option<PathBuf>,

    /// The share of those images the capture keeps (every k-th), in (0, 1].
    #[arg(long, env = "FMNIST_CAPTURE_SAMPLE", default_value_t = 0.1)]
    pub capture_sample: f64,

    /// The most the capture holds on disk, in MiB: its oldest segments (4 MiB each at most) are deleted past it.
    #[arg(long, env = "FMNIST_CAPTURE_MAX_MB", default_value_t = 64)]
    pub capture_max_mb: u64,

    /// Start even when the memory budget (logged at start-up) exceeds the container's memory limit (cgroup
    /// `memory.max`); by default the server refuses, as the first burst the budget allows would be OOM-killed.
    #[arg(long, env = "FMNIST_IGNORE_MEMORY_LIMIT", default_value_t = false, action = clap::ArgAction::Set)]
    pub ignore_memory_limit: bool,

    /// Log format: human-readable text or JSON lines. Level from RUST_LOG (default info).
    #[arg(long, env = "FMNIST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// ONNX Runtime graph optimization levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrtOptimization {
    /// No graph rewrites.
    Disable,
    /// Constant folding, redundant node removal, simple fusions.
    Basic,
    /// Basic plus complex fusions.
    Extended,
    /// Everything, including the CPU layout (NCHWc) transformations.
    All,
}

/// `--ort-spinning`: when idle intra-op threads spin ([`Spinning`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrtSpinning {
    /// Never.
    #[value(name = "false", alias = "off")]
    Never,
    /// Within a run, not after it.
    Run,
    /// Also between runs.
    #[value(name = "true", alias = "on")]
    Always,
    /// Each model's own: [`Spinning::auto`].
    Auto,
}

impl OrtSpinning {
    /// The spinning every session gets, or `None` where each model's graph decides ([`Spinning::auto`]).
    fn fixed(self) -> Option<Spinning> {
        match self {
            OrtSpinning::Never => Some(Spinning::Never),
            OrtSpinning::Run => Some(Spinning::WithinRun),
            OrtSpinning::Always => Some(Spinning::Always),
            OrtSpinning::Auto => None,
        }
    }
}

/// Who may load and unload models through the API (Triton's `--model-control-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelControlMode {
    /// Load and unload calls are refused.
    None,
    /// Load and unload calls are served to callers that present the key.
    Explicit,
}

impl Config {
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_dimension: self.max_decode_dimension,
            max_alloc_bytes: self.max_decode_bytes,
        }
    }

    pub fn input_check(&self) -> InputCheck {
        InputCheck {
            dark_level: self.dark_level,
            bright_level: self.bright_level,
            max_dark_fraction: self.max_dark_fraction,
            max_bright_fraction: self.max_bright_fraction,
            min_contrast: self.min_contrast,
        }
    }

    pub fn upload_conversion(&self) -> UploadConversion {
        UploadConversion {
            background_tolerance: self.background_tolerance,
            sharpen_sigma: self.sharpen_sigma,
        }
    }

    pub fn preprocess_settings(&self) -> PreprocessSettings {
        PreprocessSettings {
            limits: self.decode_limits(),
            conversion: self.upload_conversion(),
            check: self.input_check(),
        }
    }

    /// The ONNX Runtime settings every model session is built with (the server and the bench ceiling alike).
    pub fn runtime_options(&self) -> RuntimeOptions {
        use ort::session::builder::GraphOptimizationLevel as Level;
        RuntimeOptions {
            dylib: self.ort_dylib.clone(),
            intra_threads: match self.ort_threads {
                0 => (available_cores() / self.model_instances()).max(1),
                n => n,
            },
            intra_spinning: self.ort_spinning.fixed(),
            optimization: match self.ort_optimization {
                OrtOptimization::Disable => Level::Disable,
                OrtOptimization::Basic => Level::Level1,
                OrtOptimization::Extended => Level::Level2,
                OrtOptimization::All => Level::All,
            },
        }
    }

    /// Checks the settings together, once, at start-up: a bad combination fails with a message naming the
    /// flags instead of being clamped somewhere deep inside.
    pub fn validate(&self) -> Result<(), String> {
        let positive: [(&str, u64); 17] = [
            ("--max-batch-size", self.max_batch_size as u64),
            ("--max-images-per-request", self.max_images_per_request as u64),
            ("--max-queued-images", self.max_queued_images as u64),
            (
                "--max-queued-images-per-connection",
                self.max_queued_images_per_connection as u64,
            ),
            ("--max-connections", self.max_connections as u64),
            ("--max-concurrent-streams", u64::from(self.max_concurrent_streams)),
            ("--max-header-list-bytes", u64::from(self.max_header_list_bytes)),
            ("--max-calls-per-connection", self.max_calls_per_connection as u64),
            ("--idle-timeout-s", self.idle_timeout_s),
            ("--max-connection-idle-s", self.max_connection_idle_s),
            ("--request-head-timeout-s", self.request_head_timeout_s),
            ("--min-request-body-rate", self.min_request_body_rate),
            ("--write-stall-timeout-s", self.write_stall_timeout_s),
            ("--http2-keepalive-s", self.http2_keepalive_s),
            ("--tls-handshake-timeout-s", self.tls_handshake_timeout_s),
            ("--request-timeout-s", self.request_timeout_s),
            ("--max-decode-bytes", self.max_decode_bytes),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        if !(self.capture_sample > 0.0 && self.capture_sample <= 1.0) {
            return Err(format!(
                "--capture-sample ({}) must be above 0 and at most 1",
                self.capture_sample
            ));
        }
        if self.capture_dir.is_some() && self.capture_max_mb == 0 {
            return Err("--capture-max-mb must be at least 1".into());
        }
        // A blur wider than the 28-pixel garment is no sharpening; NaN would turn every upload into NaN pixels.
        if !(0.0..=8.0).contains(&self.sharpen_sigma) {
            return Err(format!(
                "--sharpen-sigma ({}) must be between 0 and 8",
                self.sharpen_sigma
            ));
        }
        let at_least = |flag: &str, value: usize, other: &str, min: usize| {
            if value < min {
                Err(format!("{flag} ({value}) must be at least {other} ({min})"))
            } else {
                Ok(())
            }
        };
        at_least(
            "--max-queued-images",
            self.max_queued_images,
            "--max-images-per-request",
            self.max_images_per_request,
        )?;
        at_least(
            "--max-queued-images-per-connection",
            self.max_queued_images_per_connection,
            "--max-images-per-request",
            self.max_images_per_request,
        )?;
        at_least(
            "--max-request-bytes-per-connection",
            self.max_request_bytes_per_connection,
            "--max-message-bytes",
            self.max_message_bytes,
        )?;
        at_least(
            "--max-request-bytes-in-flight",
            self.max_request_bytes_in_flight,
            "--max-request-bytes-per-connection",
            self.max_request_bytes_per_connection,
        )?;
        if let Some(c) = self.min_confidence
            && !(0.0..=1.0).contains(&c)
        {
            return Err(format!("--min-confidence must be between 0 and 1, got {c}"));
        }
        if self.max_ood_score.is_some_and(|s| !s.is_finite()) {
            return Err("--max-ood-score must be a finite number".into());
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!(
                "--otlp-endpoint must be an http:// or https:// URL of an OTLP/gRPC collector, got {endpoint:?}"
            ));
        }
        if self.http2_keepalive_s >= self.idle_timeout_s {
            return Err(format!(
                "--http2-keepalive-s ({}) must be below --idle-timeout-s ({}): the pings are what keeps an idle \
                 HTTP/2 client's connection open",
                self.http2_keepalive_s, self.idle_timeout_s
            ));
        }
        Ok(())
    }

    /// How each model's queue and batches are formed.
    pub fn batch_config(&self) -> BatchConfig {
        BatchConfig {
            max_batch_size: self.max_batch_size,
            max_batch_delay: self.max_batch_delay(),
            max_queued_images: self.max_queued_images,
            max_queue_wait: self.max_queue_wait(),
            // A connection past its share borrows from what is left once its own share and one more (for
            // whoever comes next) are set aside: a lone client still gets queue - share.
            spare_images: self
                .max_queued_images
                .saturating_sub(2 * self.max_queued_images_per_connection),
            // Never more than a batch: inline, a bigger call would hold a network thread longer than any batch.
            inline_images: self.inline_max_images.min(self.max_batch_size),
        }
    }

    /// The per-call settings of the classification pipeline.
    pub fn policy(&self) -> Policy {
        Policy {
            preprocess: self.preprocess_settings(),
            min_confidence: self.min_confidence,
            max_ood_score: self.max_ood_score,
            max_images_per_request: self.max_images_per_request,
            batch: self.batch_config(),
            max_concurrent_decodes: self.decode_slots(),
            small_decode_pixels: self.small_decode_pixels,
        }
    }

    pub fn rest_settings(&self) -> RestSettings {
        RestSettings {
            max_body_bytes: self.max_message_bytes,
            request_timeout: Duration::from_secs(self.request_timeout_s),
        }
    }

    /// The model control gate: off, or the key read from its file or variable.
    pub fn control_settings(&self) -> Result<ControlSettings, String> {
        let key_text = match (&self.model_control_key_file, &self.model_control_key) {
            (Some(_), Some(_)) => {
                return Err("set one of --model-control-key-file and FMNIST_MODEL_CONTROL_KEY, not both".into());
            }
            (Some(path), None) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--model-control-key-file {}: {e}", path.display()))?,
            ),
            (None, key) => key.clone(),
        };
        match (self.model_control, key_text) {
            (ModelControlMode::None, None) => Ok(ControlSettings::default()),
            (ModelControlMode::None, Some(_)) => Err(
                "a model control key is set but --model-control is none: set --model-control explicit to serve \
                 load and unload calls, or remove the key"
                    .into(),
            ),
            (ModelControlMode::Explicit, None) => {
                Err("--model-control explicit needs a key: --model-control-key-file or FMNIST_MODEL_CONTROL_KEY".into())
            }
            (ModelControlMode::Explicit, Some(text)) => Ok(ControlSettings {
                key: Some(ControlKey::new(&text)?),
            }),
        }
    }

    /// Decode slots per lane: the flag, or one per available core (which follows a container's CPU limit).
    pub fn decode_slots(&self) -> usize {
        match self.max_concurrent_decodes {
            0 => available_cores(),
            n => n,
        }
    }

    /// How much of the server one connection may hold.
    pub fn share_policy(&self) -> SharePolicy {
        SharePolicy {
            calls: self.max_calls_per_connection,
            queued_images: self.max_queued_images_per_connection,
            decodes: match self.max_decodes_per_connection {
                0 => self.decode_slots().saturating_sub(1).max(1),
                n => n,
            },
            request_bytes: self.max_request_bytes_per_connection,
        }
    }

    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            max_idle: Duration::from_secs(self.max_connection_idle_s),
            head_timeout: Duration::from_secs(self.request_head_timeout_s),
            write_stall_timeout: Duration::from_secs(self.write_stall_timeout_s),
            tls_handshake_timeout: Duration::from_secs(self.tls_handshake_timeout_s),
        }
    }

    /// The slowest a request body may arrive.
    pub fn min_body_rate(&self) -> MinBodyRate {
        MinBodyRate {
            grace: Duration::from_secs(self.request_body_grace_s),
            bytes_per_s: self.min_request_body_rate,
        }
    }

    pub fn max_queue_wait(&self) -> Duration {
        Duration::from_millis(self.max_queue_wait_ms)
    }

    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_micros(self.max_batch_delay_us)
    }

    /// How the registry finds, loads and batches model versions; `calls` counts the server's calls in progress
    /// (the same count its call layer keeps).
    pub fn registry_settings(&self, calls: ActiveCalls) -> RegistrySettings {
        RegistrySettings {
            dir: self.models_dir.clone(),
            models: self.models.clone(),
            default: self.default_model_choice(),
            runtime: self.runtime_options(),
            batch: self.batch_config(),
            warmup_batch: self.max_batch_size,
            instances: self.model_instances(),
            solo: self.solo_threads().map(|threads| SessionShape {
                threads,
                spinning: self.solo_spinning.fixed(),
            }),
            calls,
        }
    }

    /// The capture's settings, when `--capture-dir` is set.
    pub fn capture_settings(&self) -> Option<CaptureSettings> {
        let dir = self.capture_dir.clone()?;
        let max_bytes = self.capture_max_mb << 20;
        Some(CaptureSettings {
            dir,
            sample: self.capture_sample,
            max_bytes,
            segment_bytes: (4 << 20).min(max_bytes / 4).max(1),
            queue: CAPTURE_QUEUE,
        })
    }

    /// `--solo-threads`: `None` when 0.
    pub fn solo_threads(&self) -> Option<usize> {
        (self.solo_threads > 0).then_some(self.solo_threads)
    }

    /// `--instances`, with 0 resolved: one per core, at most [`AUTO_INSTANCES_MAX`].
    pub fn model_instances(&self) -> usize {
        match self.instances {
            0 => available_cores().clamp(1, AUTO_INSTANCES_MAX),
            n => n,
        }
    }

    /// `--io-threads`, with 0 resolved: one per core.
    pub fn io_threads(&self) -> usize {
        match self.io_threads {
            0 => available_cores(),
            n => n,
        }
    }

    /// The model that answers requests naming none, and why: `--default-model` resolved against this CPU and
    /// the loaded models.
    pub fn default_model_choice(&self) -> DefaultModel {
        DefaultModel::choose(&self.default_model, &self.models, int8_dot_product())
    }

    pub fn model_poll(&self) -> Option<Duration> {
        (self.model_poll_s > 0).then(|| Duration::from_secs(self.model_poll_s))
    }

    /// This process's connection age: --max-connection-age-s scaled by `jitter` in [-1, 1] to within +-10%.
    /// `None` when ages are off.
    pub fn max_connection_age(&self, jitter: f64) -> Option<Duration> {
        (self.max_connection_age_s > 0)
            .then(|| Duration::from_secs_f64(self.max_connection_age_s as f64 * (1.0 + 0.1 * jitter.clamp(-1.0, 1.0))))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_s)
    }

    /// The configuration `fmnist serve` has with no flags and no `FMNIST_*` environment. Tests and benches
    /// start from it and change what they need, so a developer's shell cannot change what they test.
    pub fn defaults() -> Config {
        Self::parse_no_args(false)
    }

    /// The configuration `fmnist` has with no flags: the defaults with the `FMNIST_*` environment applied.
    pub fn from_env() -> Config {
        Self::parse_no_args(true)
    }

    fn parse_no_args(with_env: bool) -> Config {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        let mut command = Only::command().no_binary_name(true);
        if !with_env {
            command = command.mut_args(|arg| arg.env(None));
        }
        let matches = command.get_matches_from(Vec::<String>::new());
        Only::from_arg_matches(&matches)
            .expect("defaults parse: every field has a default")
            .config
    }
}

/// Captured records waiting for the writer thread, at most (~1.3 KB each): past it they are dropped, so a
/// slow disk costs memory only up to this.
pub const CAPTURE_QUEUE: usize = 256;

/// The most instances `--instances 0` starts: each costs a session's memory, and past a few nothing was
/// measured.
const AUTO_INSTANCES_MAX: usize = 4;

/// The cores this process may use (which follows a container's CPU limit).
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU's 8-bit dot-product instruction set that ONNX Runtime's INT8 kernels use, if it has one.
pub fn int8_dot_product() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        // AMX-INT8 detection is unstable in std; every CPU with AMX (Sapphire Rapids on) has AVX512-VNNI too.
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            return Some("AVX512-VNNI");
        }
        if std::arch::is_x86_feature_detected!("avxvnni") {
            return Some("AVX-VNNI");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn auto_picks_int8_only_where_the_cpu_has_int8_dot_products_and_it_is_loaded() {
        let all = models(&["cnn", "cnn-int8", "dense"]);
        assert_eq!(DefaultModel::choose("auto", &all, Some("AVX512-VNNI")).name, "cnn-int8");
        assert_eq!(DefaultModel::choose("auto", &all, None).name, "cnn");
        let fp32_only = models(&["cnn", "dense"]);
        assert_eq!(DefaultModel::choose("auto", &fp32_only, Some("AVX-VNNI")).name, "cnn");
        assert_eq!(DefaultModel::choose("auto", &models(&["dense"]), None).name, "dense");
        let set = DefaultModel::choose("dense", &all, Some("AVX512-VNNI"));
        assert_eq!(
            (set.name.as_str(), set.why.as_str()),
            ("dense", "set by --default-model")
        );
        assert!(
            DefaultModel::choose("auto", &all, Some("AVX512-VNNI"))
                .why
                .contains("AVX512-VNNI")
        );
    }

    #[test]
    fn the_defaults_are_valid() {
        let config = Config::defaults();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.models, ["cnn", "cnn-int8", "dense"]);
        assert_eq!(config.min_confidence, None, "each model's own accept rule");
        assert!(
            config.capture_settings().is_none(),
            "nothing is captured unless --capture-dir is set"
        );
        assert!(config.solo_threads().is_none(), "no solo session by default");
    }

    #[test]
    fn ort_spinning_is_each_models_own_by_default_and_keeps_its_boolean_spellings() {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        let spinning = |value: &str| {
            let matches = Only::command()
                .no_binary_name(true)
                .mut_args(|arg| arg.env(None))
                .try_get_matches_from(["--ort-spinning", value])
                .map_err(|e| e.to_string())?;
            let config = Only::from_arg_matches(&matches).map_err(|e| e.to_string())?.config;
            Ok::<_, String>(config.runtime_options().intra_spinning)
        };
        assert_eq!(
            Config::defaults().runtime_options().intra_spinning,
            None,
            "each model's graph decides"
        );
        assert_eq!(spinning("auto"), Ok(None));
        assert_eq!(spinning("run"), Ok(Some(Spinning::WithinRun)));
        // Scripts written when the flag was a boolean keep their meaning.
        assert_eq!(spinning("false"), Ok(Some(Spinning::Never)));
        assert_eq!(spinning("true"), Ok(Some(Spinning::Always)));
        assert_eq!(spinning("off"), Ok(Some(Spinning::Never)));
        assert!(
            spinning("sometimes").is_err_and(|e| e.contains("run")),
            "the error lists the values"
        );
    }

    #[test]
    fn the_capture_takes_a_share_in_0_to_1_and_rotates_within_its_bound() {
        let mut config = Config::defaults();
        config.capture_dir = Some("/tmp/capture".into());
        config.capture_max_mb = 8;
        let settings = config.capture_settings().expect("set");
        assert_eq!((settings.max_bytes, settings.segment_bytes), (8 << 20, 2 << 20));
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            config.capture_sample = bad;
            assert!(config.validate().unwrap_err().contains("--capture-sample"), "{bad}");
        }
    }

    #[test]
    fn bad_combinations_fail_naming_the_flags() {
        let mut config = Config::defaults();
        config.max_queued_images_per_connection = 10;
        let message = config.validate().unwrap_err();
        assert!(message.contains("--max-queued-images-per-connection") && message.contains("--max-images-per-request"));
        let mut config = Config::defaults();
        config.http2_keepalive_s = config.idle_timeout_s;
        assert!(config.validate().unwrap_err().contains("--http2-keepalive-s"));
        let mut config = Config::defaults();
        config.max_connections = 0;
        assert_eq!(config.validate().unwrap_err(), "--max-connections must be at least 1");
    }
}
