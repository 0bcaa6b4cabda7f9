//! The Open Inference Protocol over HTTP/JSON (KServe v2 REST), on the gRPC port beside the page, so `curl`
//! works with no tools. Tensors travel as JSON arrays (flat or nested), or, with the binary tensor extension
//! that tritonclient uses by default, as raw bytes after the JSON header. `oip` and the core do the rest.
//!
//! Routes: `GET /v2`, `GET /v2/health/live`, `GET /v2/health/ready`, per model (optionally
//! `/versions/{version}` after the name) `GET /v2/models/{name}`, `GET .../ready`, `POST .../infer`, and
//! Triton's repository extension: `POST /v2/repository/index`, `POST /v2/repository/models/{name}/load` and
//! `.../unload`.

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use std::time::Instant;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    api::oip::json::{self, Scalar},
    api::oip::{self, InferRequest, InputTensor, OutputData, OutputTensor, Param, TensorData, TensorSpec},
    core::classify::Pipeline,
    core::control::{ControlCall, ModelControl},
    core::preprocess::PIXELS,
    core::statistics::Tally,
    error::{ErrorKind, QueueError, ServiceError, clip, json_error},
    transport::connections::ConnectionInfo,
    transport::status,
};

/// The largest body a repository call may carry: a few parameters.
const MAX_CONTROL_BODY_BYTES: usize = 4096;

/// The header that says how long the JSON part of a binary-extension body is.
const HEADER_LENGTH: &str = "inference-header-content-length";

struct Failed(ServiceError);

impl From<ServiceError> for Failed {
    fn from(e: ServiceError) -> Self {
        Failed(e)
    }
}

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        status::http_response(self.0)
    }
}

/// What the REST routes need besides the core; built from the config.
#[derive(Debug, Clone, Copy)]
pub struct RestSettings {
    /// A request body's bound, as the gRPC message limit bounds a call.
    pub max_body_bytes: usize,
    /// The server's `--request-timeout-s`. An inference call ends a little before it ([`TIMEOUT_MARGIN`]) with
    /// its own 504 and JSON error: the server-wide timeout would answer a REST client in gRPC's terms
    /// (HTTP 200, `grpc-status`).
    pub request_timeout: std::time::Duration,
}

/// How much earlier than the server-wide timeout a REST inference call gives up.
const TIMEOUT_MARGIN: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Clone)]
struct Rest {
    core: Pipeline,
    control: ModelControl,
    settings: RestSettings,
}

/// The routes; `control` gates the repository's load and unload.
pub fn router(core: Pipeline, control: ModelControl, settings: RestSettings) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{name}/config", get(model_config))
        .route("/v2/models/{name}/versions/{version}/config", get(model_config))
        .route("/v2/models/{name}/stats", get(model_statistics))
        .route("/v2/models/{name}/versions/{version}/stats", get(model_statistics))
        .route("/v2/models/{name}/drift", get(model_drift))
        .route("/v2/models/{name}/versions/{version}/drift", get(model_drift))
        .route("/v2/models/{name}/captures", get(model_captures))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(load))
        .route("/v2/repository/models/{name}/unload", post(unload))
        // Any other path under /v2 (Triton's trace and log settings, for example) is a 404 that says so, not
        // the gRPC fallback's empty 400.
        .route("/v2/{*rest}", any(unknown_route))
        .with_state(Rest {
            core,
            control,
            settings,
        })
}

async fn unknown_route(request: Request) -> Response {
    status::http_response(ServiceError::new(
        ErrorKind::NotFound,
        format!(
            "no route {} {}: this server answers the Open Inference Protocol's health, metadata, ready, infer and \
             repository routes, Triton's model config and stats routes, and the drift and captures routes (docs/api.md)",
            request.method(),
            clip(request.uri().path())
        ),
    ))
}

#[derive(Debug, Deserialize)]
struct ModelPath {
    name: String,
    #[serde(default)]
    version: String,
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": oip::SERVER_NAME,
        "version": oip::SERVER_VERSION,
        "extensions": oip::EXTENSIONS,
    }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(rest): State<Rest>) -> StatusCode {
    if rest.core.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_metadata(State(rest): State<Rest>, Path(path): Path<ModelPath>) -> Result<Json<Value>, Failed> {
    let model = oip::describe_model(&rest.core, &path.name, &path.version)?;
    let tensors = |specs: &[TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "datatype": s.datatype, "shape": s.shape }))
            .collect()
    };
    Ok(Json(json!({
        "name": model.name,
        "versions": model.versions,
        "platform": oip::PLATFORM,
        "inputs": tensors(&oip::INPUTS),
        "outputs": tensors(&oip::OUTPUTS),
    })))
}

/// Triton's model configuration extension: the configuration Triton would show for this model, in its JSON form.
async fn model_config(State(rest): State<Rest>, Path(path): Path<ModelPath>) -> Result<Json<Value>, Failed> {
    let config = oip::model_configuration(&rest.core, &path.name, &path.version)?;
    let tensors = |specs: &[TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|spec| {
                let t = oip::ConfigTensor::of(spec);
                let mut v = json!({ "name": t.name, "data_type": t.data_type, "dims": t.dims });
                if let Some(shape) = t.reshape {
                    v["reshape"] = json!({ "shape": shape });
                }
                v
            })
            .collect()
    };
    let mut inputs = tensors(&oip::INPUTS);
    // A call sends one of the three forms.
    for input in &mut inputs {
        input["optional"] = json!(true);
    }
    Ok(Json(json!({
        "name": config.name,
        "platform": oip::PLATFORM,
        "backend": "onnxruntime",
        "version_policy": { "latest": { "num_versions": 1 } },
        "max_batch_size": config.max_batch_size,
        "input": inputs,
        "output": tensors(&oip::OUTPUTS),
        "instance_group": [{ "name": config.name, "kind": "KIND_CPU", "count": config.instances }],
        "dynamic_batching": { "max_queue_delay_microseconds": config.max_queue_delay_us },
        "default_model_filename": config.file,
    })))
}

/// Triton's statistics extension, for one model (and version) or, at `/v2/models/stats`, every model.
async fn model_statistics(State(rest): State<Rest>, Path(path): Path<ModelPath>) -> Result<Json<Value>, Failed> {
    if path.name.is_empty() {
        return Err(ServiceError::invalid("the model name is empty: ask /v2/models/stats for every model").into());
    }
    statistics_json(&rest, &path.name, &path.version)
}

/// This server's extension: the predicted class mix of a version since it was loaded, beside its validation
/// reference (docs/drift.md), for the browser page.
async fn model_drift(State(rest): State<Rest>, Path(path): Path<ModelPath>) -> Result<Json<Value>, Failed> {
    let snapshot = rest.core.models()?;
    let model = snapshot.find(&path.name, &path.version).map_err(ServiceError::from)?;
    let counts = model.drift.class_counts();
    let seen: u64 = counts.iter().sum();
    let reference = model.meta.drift_reference.as_ref();
    let classes = model
        .meta
        .classes
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(i, (class, count))| {
            json!({
                "name": class.name,
                "live_count": count,
                "live_share": if seen > 0 { count as f64 / seen as f64 } else { 0.0 },
                "reference_share": reference.and_then(|r| r.classes.get(i)),
            })
        })
        .collect::<Vec<_>>();
    Ok(Json(json!({
        "name": model.name,
        "version": model.version.to_string(),
        "live_images": seen,
        "reference_images": reference.map(|r| r.images),
        "reference_measured_on": reference.map(|r| r.measured_on.as_str()),
        "classes": classes,
    })))
}

async fn all_statistics(State(rest): State<Rest>) -> Result<Json<Value>, Failed> {
    statistics_json(&rest, "", "")
}

fn statistics_json(rest: &Rest, name: &str, version: &str) -> Result<Json<Value>, Failed> {
    let tally = |t: Tally| json!({ "count": t.count, "ns": t.ns });
    let stats = oip::model_statistics(&rest.core, name, version)?
        .into_iter()
        .map(|(name, version, s)| {
            json!({
                "name": name,
                "version": version,
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": tally(s.success),
                    "fail": tally(s.fail),
                    "queue": tally(s.queue),
                    "compute_input": tally(s.calls.input),
                    "compute_infer": tally(s.calls.infer),
                    "compute_output": tally(s.calls.output),
                    "cache_hit": tally(Tally::default()),
                    "cache_miss": tally(Tally::default()),
                },
                "batch_stats": s.batches.iter().map(|(size, p)| json!({
                    "batch_size": size,
                    "compute_input": tally(p.input),
                    "compute_infer": tally(p.infer),
                    "compute_output": tally(p.output),
                })).collect::<Vec<_>>(),
                "memory_usage": [],
            })
        })
        .collect::<Vec<_>>();
    Ok(Json(json!({ "model_stats": stats })))
}

async fn model_ready(State(rest): State<Rest>, Path(path): Path<ModelPath>) -> Result<StatusCode, Failed> {
    // An unknown model or version is a client error with a message; a known one not ready (loading,
    // draining) is 503.
    rest.core
        .models()?
        .find(&path.name, &path.version)
        .map_err(ServiceError::from)?;
    Ok(if oip::model_ready(&rest.core, &path.name, &path.version) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

#[derive(Debug, Default, Deserialize)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(State(rest): State<Rest>, body: axum::body::Bytes) -> Result<Json<Value>, Failed> {
    // The body is optional: `{}`, `{"ready": true}`, or nothing.
    let request: IndexRequest = optional_json(&body, "index request")?;
    let entries: Vec<Value> = rest
        .core
        .registry()
        .index(request.ready)
        .into_iter()
        .map(|e| json!({ "name": e.name, "version": e.version, "state": e.state, "reason": e.reason }))
        .collect();
    Ok(Json(Value::Array(entries)))
}

/// Captured records a call returns when it asks for no `limit`, and the most it may ask for.
const CAPTURES_SHOWN: usize = 50;
const MAX_CAPTURES_SHOWN: usize = 500;

/// This server's extension: the newest images the capture kept for a model (`--capture-dir`, docs/drift.md),
/// newest first, as written: the 28x28 input (base64), verdict, scores, version and time. They are users'
/// inputs, so only a caller holding the control key sees them (the same gate as load and unload).
/// `?limit=N` (default 50, at most 500).
async fn model_captures(
    State(rest): State<Rest>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Json<Value>, Failed> {
    let (parts, _) = request.into_parts();
    rest.control.authorize(control_call("captures", &name, &parts))?;
    rest.core.models()?.find(&name, "").map_err(ServiceError::from)?;
    let capture = rest.core.capture().cloned().ok_or_else(|| {
        ServiceError::new(
            ErrorKind::FailedPrecondition,
            "the capture is off on this server: start it with --capture-dir (docs/drift.md)",
        )
    })?;
    let limit = match parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit=")))
    {
        None => CAPTURES_SHOWN,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_CAPTURES_SHOWN).contains(n))
            .ok_or_else(|| {
                ServiceError::invalid(format!(
                    "limit {:?}: a number of records from 1 to {MAX_CAPTURES_SHOWN}",
                    clip(n)
                ))
            })?,
    };
    let model = name.clone();
    let records = tokio::task::spawn_blocking(move || capture.recent(&model, limit))
        .await
        .map_err(std::io::Error::other)
        .and_then(|read| read)
        .map_err(|e| ServiceError::new(ErrorKind::Internal, format!("reading the capture: {e}")))?;
    Ok(Json(json!({ "name": name, "captures": records })))
}

/// A repository call's body, which may be empty (all defaults) or JSON; `what` names it in the error.
fn optional_json<T: Default + serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ServiceError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ServiceError::invalid(format!("{what}: {}", json_error(&e))))
}

/// A control call as the gate needs it: the caller's address and its `authorization` header.
fn control_call<'a>(action: &'static str, model: &'a str, parts: &'a axum::http::request::Parts) -> ControlCall<'a> {
    ControlCall {
        action,
        model,
        peer: parts.extensions.get::<ConnectionInfo>().and_then(|c| c.remote),
        authorization: parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
    }
}

async fn load(State(rest): State<Rest>, Path(name): Path<String>, request: Request) -> Result<Json<Value>, Failed> {
    let (parts, _) = request.into_parts();
    oip::load_model(&rest.core, &rest.control, control_call("load", &name, &parts)).await?;
    Ok(Json(json!({})))
}

/// The body Triton's unload takes, `{"parameters": {...}}`; only `force` means anything here.
#[derive(Debug, Default, Deserialize)]
struct UnloadRequest {
    #[serde(default)]
    parameters: UnloadParameters,
}

#[derive(Debug, Default, Deserialize)]
struct UnloadParameters {
    #[serde(default)]
    force: bool,
}

async fn unload(State(rest): State<Rest>, Path(name): Path<String>, request: Request) -> Result<Json<Value>, Failed> {
    let (parts, body) = request.into_parts();
    let call = control_call("unload", &name, &parts);
    let body = read_body(body, MAX_CONTROL_BODY_BYTES).await?;
    let request: UnloadRequest = optional_json(&body, "unload request")?;
    oip::unload_model(&rest.core, &rest.control, call, request.parameters.force)?;
    Ok(Json(json!({})))
}

async fn infer(State(rest): State<Rest>, Path(path): Path<ModelPath>, request: Request) -> Result<Response, Failed> {
    let deadline = Instant::now() + rest.settings.request_timeout.saturating_sub(TIMEOUT_MARGIN);
    tokio::time::timeout_at(deadline.into(), infer_until(rest, path, request, deadline))
        .await
        .unwrap_or_else(|_| Err(ServiceError::from(QueueError::DeadlineExceeded).into()))
}

async fn infer_until(rest: Rest, path: ModelPath, request: Request, deadline: Instant) -> Result<Response, Failed> {
    let (parts, body) = request.into_parts();
    let share = parts.extensions.get::<ConnectionInfo>().map(|c| c.share.clone());
    let body = read_body(body, rest.settings.max_body_bytes).await?;
    let (json_part, binary) = split_binary(&parts.headers, &body)?;
    let max_images = rest.core.policy().max_images_per_request;
    let request = json::parse(json_part, max_images.saturating_mul(PIXELS))
        .map_err(|e| ServiceError::invalid(format!("request body is not an inference request: {}", json_error(&e))))?;
    let binary_by_default = request
        .parameters
        .get("binary_data_output")
        .and_then(Scalar::as_bool)
        .unwrap_or(false);
    let binary_outputs: Vec<(String, bool)> = request
        .outputs
        .0
        .iter()
        .map(|o| {
            let binary = o.parameters.get("binary_data").and_then(Scalar::as_bool);
            (o.name.clone(), binary.unwrap_or(binary_by_default))
        })
        .collect();
    let id = request.id.clone();
    let call = oip::read_call(from_json(request, path, binary, max_images)?)?;
    let response = rest.core.classify(call.request, share, Some(deadline)).await?;
    let outputs = oip::outputs(&response, &call.outputs);
    let wants_binary = |name: &str| {
        binary_outputs
            .iter()
            .find(|(n, _)| n == name)
            .map_or(binary_by_default, |(_, b)| *b)
    };
    let mut tail = Vec::new();
    let outputs: Vec<Value> = outputs
        .iter()
        .map(|o| {
            if wants_binary(o.spec.name) {
                let raw = o.data.to_raw();
                let size = raw.len();
                tail.extend_from_slice(&raw);
                json!({ "name": o.spec.name, "datatype": o.spec.datatype, "shape": o.shape,
                        "parameters": { "binary_data_size": size } })
            } else {
                json!({ "name": o.spec.name, "datatype": o.spec.datatype, "shape": o.shape, "data": data(o) })
            }
        })
        .collect();
    let mut head = Map::new();
    head.insert("model_name".into(), response.model.into());
    head.insert("model_version".into(), response.model_version.into());
    if let Some(id) = id {
        head.insert("id".into(), id.into());
    }
    head.insert("outputs".into(), outputs.into());
    let mut body = serde_json::to_vec(&head).map_err(|e| ServiceError::internal(e.to_string()))?;
    if tail.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    let json_length = HeaderValue::from(body.len());
    body.extend_from_slice(&tail);
    let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    response.headers_mut().insert(HEADER_LENGTH, json_length);
    Ok(response)
}

/// The whole body, at most `limit` bytes. A body the call limits refused mid-way (the connection's or the
/// server's request bytes are taken) is `Overloaded`, as the same refusal is over gRPC.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ServiceError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let refused = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<tonic::Status>())
            .filter(|s| s.code() == tonic::Code::ResourceExhausted);
        match refused {
            Some(status) => ServiceError::new(ErrorKind::Overloaded, status.message()),
            None if e.to_string().contains("length limit") => ServiceError::new(
                ErrorKind::TooLarge,
                format!(
                    "request body is over {limit} bytes (--max-message-bytes): send fewer or smaller images per call"
                ),
            ),
            None => ServiceError::invalid(format!("cannot read the request body: {e}")),
        }
    })
}

/// The JSON part of the body and the binary tensors after it (the binary tensor extension).
fn split_binary<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), ServiceError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let length = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n <= body.len())
        .ok_or_else(|| {
            ServiceError::invalid(format!(
                "{HEADER_LENGTH} must be the byte length of the JSON part, at most the body's {} bytes",
                body.len()
            ))
        })?;
    Ok(body.split_at(length))
}

/// `max_images`: the most BYTES elements a binary input may hold.
fn from_json(
    request: json::InferRequest,
    path: ModelPath,
    binary: &[u8],
    max_images: usize,
) -> Result<InferRequest, ServiceError> {
    let mut binary = binary;
    let mut inputs = Vec::with_capacity(request.inputs.0.len());
    for input in request.inputs.0 {
        let name = clip(&input.name);
        let data = match input.parameters.get("binary_data_size") {
            Some(size) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|&s| s <= binary.len())
                    .ok_or_else(|| {
                        ServiceError::invalid(format!(
                            "input {name}: binary_data_size must be a byte count within the {} binary bytes left",
                            binary.len()
                        ))
                    })?;
                let (raw, rest) = binary.split_at(size);
                binary = rest;
                TensorData::from_raw(&input.name, &input.datatype, raw, max_images)?
            }
            None => {
                let base64 = input.parameters.get("content_type").and_then(Scalar::as_str) == Some("base64");
                let elements = input.data.unwrap_or_default().0;
                json_elements(&input.name, &input.datatype, elements, base64)?
            }
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape.0,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(ServiceError::invalid(format!(
            "{} binary bytes follow the JSON that no input's binary_data_size claims",
            binary.len()
        )));
    }
    Ok(InferRequest {
        model_name: path.name,
        model_version: path.version,
        inputs,
        outputs: request.outputs.0.into_iter().map(|o| o.name).collect(),
        parameters: request
            .parameters
            .0
            .into_iter()
            .map(|(key, value)| {
                let param = match value {
                    Scalar::Bool(b) => Param::Bool(b),
                    Scalar::Int(n) => Param::Int(n),
                    Scalar::Uint(n) => i64::try_from(n).map_or(Param::Double(n as f64), Param::Int),
                    Scalar::Float(x) => Param::Double(x),
                    Scalar::Str(s) => Param::Str(s),
                };
                (key, param)
            })
            .collect(),
    })
}

fn json_elements(name: &str, datatype: &str, elements: Vec<Scalar>, base64: bool) -> Result<TensorData, ServiceError> {
    let bad = |what: &str, v: &Scalar| {
        ServiceError::invalid(format!(
            "input {}: every element must be {what}, got {}",
            clip(name),
            clip(&v.to_string())
        ))
    };
    match datatype {
        "UINT8" => elements
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(|| bad("an integer 0..=255", v))
            })
            .collect::<Result<_, _>>()
            .map(TensorData::Uint8),
        "FP32" => elements
            .iter()
            .map(|v| match v {
                Scalar::Int(n) => Ok(*n as f32),
                Scalar::Uint(n) => Ok(*n as f32),
                Scalar::Float(x) => Ok(*x as f32),
                other => Err(bad("a number", other)),
            })
            .collect::<Result<_, _>>()
            .map(TensorData::Fp32),
        "BYTES" => elements
            .into_iter()
            .map(|v| {
                let Scalar::Str(s) = v else {
                    return Err(bad("a string", &v));
                };
                if base64 {
                    base64::engine::general_purpose::STANDARD
                        .decode(s)
                        .map_err(|e| ServiceError::invalid(format!("input {}: not base64: {e}", clip(name))))
                } else if let Some(format) = base64_image_format(&s) {
                    // Taken as bytes, the text can never decode: say what would have worked.
                    Err(ServiceError::invalid(format!(
                        "input {}: the string looks like a base64-encoded {format} file; set \
                         \"parameters\": {{\"content_type\": \"base64\"}} on the input (or on the request), or send \
                         the file's bytes in the binary extension",
                        clip(name)
                    )))
                } else {
                    Ok(s.into_bytes())
                }
            })
            .collect::<Result<_, _>>()
            .map(TensorData::Bytes),
        other => Err(oip::unsupported_datatype(name, other)),
    }
}

/// The image format whose file a string is the base64 text of, judged by how the text of each accepted
/// format's signature begins; `None` for anything else.
fn base64_image_format(s: &str) -> Option<&'static str> {
    const SIGNATURES: [(&str, &str); 7] = [
        ("iVBORw0KGgo", "PNG"),
        ("/9j/", "JPEG"),
        ("R0lGOD", "GIF"),
        ("Qk", "BMP"),
        ("UklGR", "WebP"),
        ("SUkqA", "TIFF"),
        ("TU0AK", "TIFF"),
    ];
    // Bitmaps' "Qk" is two letters: also ask for a length that base64 can have.
    let plausible = s.len() >= 16 && s.len().is_multiple_of(4);
    SIGNATURES
        .iter()
        .find(|(prefix, _)| plausible && s.starts_with(prefix))
        .map(|&(_, format)| format)
}

/// An output's rows as a flat JSON array; NaN (an image the model never saw) is `null`.
fn data(output: &OutputTensor) -> Value {
    match &output.data {
        OutputData::Fp32(v) => json!(v),
        OutputData::Int64(v) => json!(v),
        OutputData::Bool(v) => json!(v),
        OutputData::Bytes(v) => json!(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_elements_are_checked_against_the_datatype() {
        let uint = |n| Scalar::Uint(n);
        assert_eq!(
            json_elements("raw", "UINT8", vec![uint(1), uint(2)], false).unwrap(),
            TensorData::Uint8(vec![1, 2])
        );
        assert!(json_elements("raw", "UINT8", vec![uint(256)], false).is_err());
        assert!(json_elements("raw", "UINT8", vec![Scalar::Int(-1)], false).is_err());
        assert!(json_elements("image", "FP32", vec![Scalar::Str("x".into())], false).is_err());
        assert_eq!(
            json_elements("image", "FP32", vec![uint(1), Scalar::Float(0.5)], false).unwrap(),
            TensorData::Fp32(vec![1.0, 0.5])
        );
        assert_eq!(
            json_elements("encoded", "BYTES", vec![Scalar::Str("aGk=".into())], true).unwrap(),
            TensorData::Bytes(vec![b"hi".to_vec()])
        );
        assert_eq!(
            json_elements("encoded", "BYTES", vec![Scalar::Str("hi".into())], false).unwrap(),
            TensorData::Bytes(vec![b"hi".to_vec()])
        );
    }

    #[test]
    fn the_binary_extension_splits_the_body_at_the_header_length() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("2"));
        assert_eq!(split_binary(&headers, b"{}abc").unwrap(), (&b"{}"[..], &b"abc"[..]));
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("9"));
        assert!(split_binary(&headers, b"{}abc").is_err());
        assert_eq!(split_binary(&HeaderMap::new(), b"{}").unwrap(), (&b"{}"[..], &b""[..]));
    }

    #[test]
    fn nan_is_written_as_null() {
        let spec = &oip::OUTPUTS[2];
        let output = OutputTensor {
            spec,
            shape: vec![2],
            data: OutputData::Fp32(vec![f32::NAN, 1.5]),
        };
        assert_eq!(data(&output), json!([null, 1.5]));
    }
}
