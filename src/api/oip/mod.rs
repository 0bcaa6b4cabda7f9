//! The Open Inference Protocol (KServe v2) for this service, whatever carries it: the tensors a `ModelInfer`
//! call may send and gets back, and how they become a [`ClassifyRequest`] and come out of [`Verdict`]s. The
//! transports (`grpc` for gRPC, `rest` for HTTP/JSON) only move these tensors to and from their
//! wire formats; classification itself is the core's.
//!
//! A call sends exactly one input, N images in one of three forms, and gets up to six outputs of N rows.

pub mod grpc;
pub mod json;
pub mod rest;

use crate::{
    core::classify::{ClassifyRequest, ClassifyResponse, ImageInput, Pipeline},
    core::control::{ControlCall, ModelControl},
    core::model::CLASSES,
    core::preprocess::{PIXELS, SIDE},
    core::registry::LoadedModel,
    core::statistics::Statistics,
    core::verdict::Verdict,
    error::{ErrorKind, ServiceError, clip},
};

/// What `ServerMetadata` reports.
pub const SERVER_NAME: &str = "fmnist-serve";
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The protocol extensions served: the HTTP binary tensor extension (tritonclient's default over HTTP), and
/// Triton's model configuration and statistics extensions.
pub const EXTENSIONS: [&str; 3] = ["binary_tensor_data", "model_configuration", "statistics"];
/// Triton's platform name for ONNX Runtime models.
pub const PLATFORM: &str = "onnxruntime_onnx";

/// A tensor's name, datatype and shape, as `ModelMetadata` describes it; -1 is the batch of N images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub datatype: &'static str,
    pub shape: &'static [i64],
}

const SIDE_DIM: i64 = SIDE as i64;

/// The three forms an input may take; a call sends one of them.
pub const INPUTS: [TensorSpec; 3] = [
    // Encoded files (PNG, JPEG, ...), preprocessed as `Classify`'s `encoded` images are.
    TensorSpec {
        name: "encoded",
        datatype: "BYTES",
        shape: &[-1],
    },
    // 28x28 8-bit grayscale, 0 = background: the dataset's own form, as `Classify`'s `raw` images.
    TensorSpec {
        name: "raw",
        datatype: "UINT8",
        shape: &[-1, SIDE_DIM, SIDE_DIM],
    },
    // The ONNX model's own input: pixel / 255 in [0, 1], run as sent (the input check sees it rounded).
    TensorSpec {
        name: "image",
        datatype: "FP32",
        shape: &[-1, 1, SIDE_DIM, SIDE_DIM],
    },
];

/// Every output, in the order a call gets them when it names none.
pub const OUTPUTS: [TensorSpec; 6] = [
    TensorSpec {
        name: "probabilities",
        datatype: "FP32",
        shape: &[-1, CLASSES as i64],
    },
    TensorSpec {
        name: "class_id",
        datatype: "INT64",
        shape: &[-1],
    },
    TensorSpec {
        name: "ood_score",
        datatype: "FP32",
        shape: &[-1],
    },
    TensorSpec {
        name: "accepted",
        datatype: "BOOL",
        shape: &[-1],
    },
    TensorSpec {
        name: "reason",
        datatype: "BYTES",
        shape: &[-1],
    },
    TensorSpec {
        name: "detail",
        datatype: "BYTES",
        shape: &[-1],
    },
];

/// What `ModelMetadata` says of a model: its name, the versions that serve, and the tensors above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDescription {
    pub name: String,
    pub versions: Vec<String>,
}

/// `ModelMetadata` for the model a call names (the version it names must be ready, as for `ModelInfer`).
pub fn describe_model(core: &Pipeline, name: &str, version: &str) -> Result<ModelDescription, ServiceError> {
    require_name(name, "to describe")?;
    let snapshot = core.models()?;
    let model = snapshot.find(name, version)?;
    let versions = snapshot.models[&model.name].ready.keys().map(u64::to_string).collect();
    Ok(ModelDescription {
        name: model.name.clone(),
        versions,
    })
}

/// What Triton's model configuration extension (`GET /v2/models/{name}/config`, `ModelConfig`) says of a
/// model version: built from what serves, never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfiguration {
    pub name: String,
    pub max_batch_size: usize,
    pub instances: usize,
    pub max_queue_delay_us: u64,
    /// The model file the version runs.
    pub file: String,
}

/// A tensor in Triton's configuration form: its datatype as `TYPE_*`, its dims without the batch dimension
/// (Triton's rule when `max_batch_size` > 0), and for a tensor of one element per image, dims `[1]` reshaped
/// to `[]`, as Triton writes a scalar per batch entry.
pub struct ConfigTensor {
    pub name: &'static str,
    pub data_type: &'static str,
    pub dims: Vec<i64>,
    pub reshape: Option<Vec<i64>>,
}

impl ConfigTensor {
    pub fn of(spec: &TensorSpec) -> ConfigTensor {
        let data_type = match spec.datatype {
            "BYTES" => "TYPE_STRING",
            "UINT8" => "TYPE_UINT8",
            "FP32" => "TYPE_FP32",
            "INT64" => "TYPE_INT64",
            "BOOL" => "TYPE_BOOL",
            other => unreachable!("a datatype this service declares: {other}"),
        };
        let per_image = spec.shape[1..].to_vec();
        let (dims, reshape) = if per_image.is_empty() {
            (vec![1], Some(Vec::new()))
        } else {
            (per_image, None)
        };
        ConfigTensor {
            name: spec.name,
            data_type,
            dims,
            reshape,
        }
    }
}

/// `ModelConfig` for the model a call names (its version must be ready, as for `ModelInfer`).
pub fn model_configuration(core: &Pipeline, name: &str, version: &str) -> Result<ModelConfiguration, ServiceError> {
    require_name(name, "whose configuration you want")?;
    let snapshot = core.models()?;
    let model = snapshot.find(name, version)?;
    let batching = model.batcher.config();
    Ok(ModelConfiguration {
        name: model.name.clone(),
        max_batch_size: batching.max_batch_size,
        instances: model.batcher.instances(),
        max_queue_delay_us: u64::try_from(batching.max_batch_delay.as_micros()).unwrap_or(u64::MAX),
        file: model.meta.file.clone(),
    })
}

/// `ModelStatistics`: of the model and version named; an empty version is every version that serves, an
/// empty name every model (as Triton answers).
pub fn model_statistics(
    core: &Pipeline,
    name: &str,
    version: &str,
) -> Result<Vec<(String, String, Statistics)>, ServiceError> {
    let snapshot = core.models()?;
    let row = |m: &LoadedModel| (m.name.clone(), m.version.to_string(), m.batcher.statistics().snapshot());
    if name.is_empty() {
        return Ok(snapshot
            .models
            .values()
            .flat_map(|served| served.ready.values())
            .map(|m| row(m))
            .collect());
    }
    // find() gives the clear error for an unknown or unready model or version.
    let model = snapshot.find(name, version)?;
    if !version.is_empty() {
        return Ok(vec![row(model)]);
    }
    // Every version that serves.
    Ok(snapshot.models[&model.name].ready.values().map(|m| row(m)).collect())
}

/// Refuses an empty model name, saying what the name is needed for ("the model name is empty: name the model
/// `purpose`").
fn require_name(name: &str, purpose: &str) -> Result<(), ServiceError> {
    if name.is_empty() {
        return Err(ServiceError::invalid(format!(
            "the model name is empty: name the model {purpose}"
        )));
    }
    Ok(())
}

/// `ModelReady`: the server is not draining, and the model has the version named (or any, when none is named).
/// As Triton answers it, an unknown model or version is simply not ready.
pub fn model_ready(core: &Pipeline, name: &str, version: &str) -> bool {
    !core.is_draining() && !name.is_empty() && core.models().is_ok_and(|m| m.find(name, version).is_ok())
}

/// `RepositoryModelLoad`, once `control` lets the call through: reads the model's folder now and swaps in
/// what is new or changed. It answers once that is done; a version that failed to load is an error naming it
/// and why (the versions serving before keep serving).
pub async fn load_model(core: &Pipeline, control: &ModelControl, call: ControlCall<'_>) -> Result<(), ServiceError> {
    control.authorize(call)?;
    let name = call.model;
    let registry = core.registry();
    if !registry.is_configured(name) {
        return Err(ServiceError::invalid(format!(
            "model {} is not served here: the server serves {} (--models)",
            clip(name),
            registry.configured().join(", ")
        )));
    }
    let report = registry.reload(Some(name.to_string())).await;
    match report.failed.into_iter().next() {
        None => Ok(()),
        Some((_, version, e)) => Err(ServiceError::invalid(format!(
            "model {} version {version} failed to load, and the versions serving before keep serving: {e}",
            clip(name)
        ))),
    }
}

/// The parameter an unload of the default model needs: without it, calls that name no model would fail.
pub const FORCE_PARAMETER: &str = "force";

/// `RepositoryModelUnload`, once `control` lets the call through: stops serving every version of the model;
/// calls in flight finish. The default model goes only with `force`: without it, every call that names no
/// model would fail, and the server would report itself not ready.
pub fn unload_model(
    core: &Pipeline,
    control: &ModelControl,
    call: ControlCall<'_>,
    force: bool,
) -> Result<(), ServiceError> {
    control.authorize(call)?;
    let registry = core.registry();
    if call.model == registry.default_model().name && !force {
        return Err(ServiceError::new(
            ErrorKind::FailedPrecondition,
            format!(
                "model {} is the default model: unloading it fails every call that names no model and turns \
                 health NOT_SERVING; send the parameter {FORCE_PARAMETER}=true to unload it anyway",
                call.model
            ),
        ));
    }
    registry.unload(call.model)?;
    Ok(())
}

/// An input tensor's elements, as its transport read them.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Uint8(Vec<u8>),
    Fp32(Vec<f32>),
    Bytes(Vec<Vec<u8>>),
}

impl TensorData {
    /// Reads a tensor's raw bytes (gRPC `raw_input_contents`, an HTTP binary part): elements row-major and
    /// little-endian, a BYTES element as a 4-byte little-endian length and its bytes.
    /// At most `max_elements` BYTES elements are read: each costs an allocation, so they are counted before
    /// any is made.
    pub fn from_raw(name: &str, datatype: &str, raw: &[u8], max_elements: usize) -> Result<TensorData, ServiceError> {
        match datatype {
            "UINT8" => Ok(TensorData::Uint8(raw.to_vec())),
            "FP32" => {
                if !raw.len().is_multiple_of(4) {
                    return Err(ServiceError::invalid(format!(
                        "input {} is FP32 but its raw contents are {} bytes, not a multiple of 4",
                        clip(name),
                        raw.len()
                    )));
                }
                Ok(TensorData::Fp32(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
            "BYTES" => {
                let mut elements = Vec::new();
                let mut rest = raw;
                while !rest.is_empty() {
                    if elements.len() == max_elements {
                        return Err(ServiceError::invalid(format!(
                            "input {}: more than {max_elements} BYTES elements; at most {max_elements} images per call",
                            clip(name)
                        )));
                    }
                    let malformed = || {
                        ServiceError::invalid(format!(
                            "input {}: raw BYTES contents must be elements of a 4-byte little-endian length \
                             followed by that many bytes",
                            clip(name)
                        ))
                    };
                    let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
                    let len = u32::from_le_bytes(*len) as usize;
                    if tail.len() < len {
                        return Err(malformed());
                    }
                    let (element, tail) = tail.split_at(len);
                    elements.push(element.to_vec());
                    rest = tail;
                }
                Ok(TensorData::Bytes(elements))
            }
            other => Err(unsupported_datatype(name, other)),
        }
    }

    fn len(&self) -> usize {
        match self {
            TensorData::Uint8(v) => v.len(),
            TensorData::Fp32(v) => v.len(),
            TensorData::Bytes(v) => v.len(),
        }
    }
}

/// An input tensor as a transport read it.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// A request parameter's value (`InferParameter`, a JSON value).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(String),
}

/// A `ModelInfer` call as its transport read it.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model_name: String,
    pub model_version: String,
    pub inputs: Vec<InputTensor>,
    /// The outputs the call names; empty: every output.
    pub outputs: Vec<String>,
    pub parameters: Vec<(String, Param)>,
}

/// What a `ModelInfer` call asks of the core, and which outputs it wants back.
#[derive(Debug)]
pub struct Call {
    pub request: ClassifyRequest,
    pub outputs: Vec<&'static TensorSpec>,
}

/// The message for a datatype this service does not take as an input.
pub fn unsupported_datatype(name: &str, datatype: &str) -> ServiceError {
    ServiceError::invalid(format!(
        "input {} has datatype {}; {}",
        clip(name),
        clip(datatype),
        inputs_hint()
    ))
}

fn inputs_hint() -> String {
    let forms: Vec<String> = INPUTS.iter().map(describe).collect();
    format!("send exactly one input: {}", forms.join(", or "))
}

/// "raw UINT8 [N,28,28]".
fn describe(spec: &TensorSpec) -> String {
    let dims: Vec<String> = spec
        .shape
        .iter()
        .map(|&d| if d < 0 { "N".to_string() } else { d.to_string() })
        .collect();
    format!("{} {} [{}]", spec.name, spec.datatype, dims.join(","))
}

/// Checks a `ModelInfer` call against the tensors above and turns it into the core's request. Any mismatch
/// is `Invalid`, with a message that says what to send instead; a problem with one image is left to that
/// image's verdict.
pub fn read_call(req: InferRequest) -> Result<Call, ServiceError> {
    if req.model_name.is_empty() {
        return Err(ServiceError::invalid("model_name is empty: name the model to run"));
    }
    let outputs = requested_outputs(&req.outputs)?;
    let mut inputs = req.inputs.into_iter();
    let (Some(input), None) = (inputs.next(), inputs.next()) else {
        return Err(ServiceError::invalid(inputs_hint()));
    };
    let images = images(input)?;
    let mut request = ClassifyRequest {
        images,
        model: req.model_name,
        version: req.model_version,
        ..ClassifyRequest::default()
    };
    for (key, value) in &req.parameters {
        match key.as_str() {
            "min_confidence" => request.min_confidence = Some(threshold(key, value)?),
            "max_ood_score" => request.max_ood_score = Some(threshold(key, value)?),
            // Other parameters belong to clients and transports (tritonclient sends its own): not ours to refuse.
            _ => {}
        }
    }
    Ok(Call { request, outputs })
}

fn requested_outputs(names: &[String]) -> Result<Vec<&'static TensorSpec>, ServiceError> {
    if names.is_empty() {
        return Ok(OUTPUTS.iter().collect());
    }
    let mut wanted = Vec::with_capacity(names.len());
    for name in names {
        let spec = OUTPUTS.iter().find(|o| o.name == name).ok_or_else(|| {
            let known: Vec<&str> = OUTPUTS.iter().map(|o| o.name).collect();
            ServiceError::invalid(format!(
                "unknown output {}: outputs are {}",
                clip(name),
                known.join(", ")
            ))
        })?;
        if wanted.contains(&spec) {
            return Err(ServiceError::invalid(format!(
                "output {} is requested twice",
                clip(name)
            )));
        }
        wanted.push(spec);
    }
    Ok(wanted)
}

/// The input tensor's N images, once its name, datatype, shape and element count agree.
fn images(input: InputTensor) -> Result<Vec<ImageInput>, ServiceError> {
    let name = clip(&input.name);
    let spec = INPUTS
        .iter()
        .find(|s| s.name == input.name)
        .ok_or_else(|| ServiceError::invalid(format!("unknown input {name}; {}", inputs_hint())))?;
    if input.datatype != spec.datatype {
        return Err(ServiceError::invalid(format!(
            "input {name} is {}, got datatype {}",
            describe(spec),
            clip(&input.datatype)
        )));
    }
    let shape_fits =
        input.shape.len() == spec.shape.len() && input.shape[0] >= 0 && input.shape[1..] == spec.shape[1..];
    if !shape_fits {
        return Err(ServiceError::invalid(format!(
            "input {name} is {}, got shape {}",
            describe(spec),
            show_shape(&input.shape)
        )));
    }
    let n = usize::try_from(input.shape[0]).unwrap_or(usize::MAX);
    let per_image = spec.shape[1..].iter().product::<i64>() as usize;
    let expected = n.checked_mul(per_image);
    if expected != Some(input.data.len()) {
        return Err(ServiceError::invalid(format!(
            "input {name} has shape {} but {} elements; expected {} ({per_image} per image)",
            show_shape(&input.shape),
            input.data.len(),
            expected.map_or_else(|| "more than can be sent".to_string(), |e| e.to_string()),
        )));
    }
    Ok(match input.data {
        TensorData::Bytes(files) => files.into_iter().map(ImageInput::Encoded).collect(),
        TensorData::Uint8(pixels) => pixels
            .chunks_exact(PIXELS)
            .map(|c| ImageInput::Raw(c.to_vec()))
            .collect(),
        TensorData::Fp32(values) => values
            .chunks_exact(PIXELS)
            .map(|c| ImageInput::Scaled(c.to_vec()))
            .collect(),
    })
}

fn threshold(key: &str, value: &Param) -> Result<f32, ServiceError> {
    let number = match value {
        Param::Double(v) => Some(*v),
        Param::Int(v) => Some(*v as f64),
        Param::Str(s) => s.trim().parse::<f64>().ok(),
        Param::Bool(_) => None,
    };
    // The range itself is the core's to check, as for `Classify`.
    number.map(|v| v as f32).ok_or_else(|| {
        let got = match value {
            Param::Str(s) => format!("the string {:?}", clip(s)),
            other => format!("{other:?}"),
        };
        ServiceError::invalid(format!(
            "parameter {key} must be a number (a double, an int64 or a string such as \"0.9\"), got {got}"
        ))
    })
}

/// A client's shape as it may be echoed: its first dimensions, never the whole of a long one.
fn show_shape(shape: &[i64]) -> String {
    const SHOWN: usize = 6;
    let dims: Vec<String> = shape.iter().take(SHOWN).map(i64::to_string).collect();
    if shape.len() > SHOWN {
        format!("[{}, …] ({} dimensions)", dims.join(", "), shape.len())
    } else {
        format!("[{}]", dims.join(", "))
    }
}

/// An output tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputData {
    Fp32(Vec<f32>),
    Int64(Vec<i64>),
    Bool(Vec<bool>),
    Bytes(Vec<String>),
}

impl OutputData {
    /// The tensor's raw bytes, encoded as [`TensorData::from_raw`] reads them.
    pub fn to_raw(&self) -> Vec<u8> {
        match self {
            OutputData::Fp32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Int64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            OutputData::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
            OutputData::Bytes(v) => {
                let mut raw = Vec::with_capacity(v.iter().map(|s| 4 + s.len()).sum());
                for s in v {
                    raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    raw.extend_from_slice(s.as_bytes());
                }
                raw
            }
        }
    }
}

/// An output tensor of N rows.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub spec: &'static TensorSpec,
    pub shape: Vec<i64>,
    pub data: OutputData,
}

/// The outputs a call asked for, one row per image in the order sent. An image that never reached the model
/// (undecodable, or rejected by the input check) has NaN probabilities and OOD score and class -1; its
/// `reason` and `detail` say why.
pub fn outputs(response: &ClassifyResponse, wanted: &[&'static TensorSpec]) -> Vec<OutputTensor> {
    let verdicts = &response.verdicts;
    let n = verdicts.len() as i64;
    wanted
        .iter()
        .map(|&spec| {
            let data = match spec.name {
                "probabilities" => OutputData::Fp32(
                    verdicts
                        .iter()
                        .flat_map(|v| v.prediction.as_ref().map_or([f32::NAN; CLASSES], |p| p.probabilities))
                        .collect(),
                ),
                "class_id" => OutputData::Int64(
                    verdicts
                        .iter()
                        .map(|v| v.prediction.as_ref().map_or(-1, |p| i64::from(p.class_id)))
                        .collect(),
                ),
                "ood_score" => OutputData::Fp32(
                    verdicts
                        .iter()
                        .map(|v| v.prediction.as_ref().map_or(f32::NAN, |p| p.ood_score))
                        .collect(),
                ),
                "accepted" => OutputData::Bool(verdicts.iter().map(Verdict::accepted).collect()),
                "reason" => OutputData::Bytes(verdicts.iter().map(|v| v.reason.name().to_string()).collect()),
                "detail" => OutputData::Bytes(verdicts.iter().map(|v| v.detail.clone()).collect()),
                other => unreachable!("output {other} is in OUTPUTS but has no rows"),
            };
            let shape = spec.shape.iter().map(|&d| if d < 0 { n } else { d }).collect();
            OutputTensor { spec, shape, data }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn call(input: InputTensor) -> Result<Call, ServiceError> {
        read_call(InferRequest {
            model_name: "cnn".into(),
            inputs: vec![input],
            ..InferRequest::default()
        })
    }

    fn tensor(name: &str, datatype: &str, shape: &[i64], data: TensorData) -> InputTensor {
        InputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    fn invalid_message(result: Result<Call, ServiceError>) -> String {
        let e = result.expect_err("the call is invalid");
        assert_eq!(e.kind, ErrorKind::Invalid, "{}", e.message);
        e.message
    }

    #[test]
    fn each_input_form_becomes_its_images() {
        let raw = call(tensor(
            "raw",
            "UINT8",
            &[2, 28, 28],
            TensorData::Uint8(vec![7; 2 * PIXELS]),
        ))
        .unwrap();
        assert_eq!(raw.request.images, vec![ImageInput::Raw(vec![7; PIXELS]); 2]);
        let scaled = call(tensor(
            "image",
            "FP32",
            &[1, 1, 28, 28],
            TensorData::Fp32(vec![0.5; PIXELS]),
        ))
        .unwrap();
        assert_eq!(scaled.request.images, vec![ImageInput::Scaled(vec![0.5; PIXELS])]);
        let files = vec![b"png".to_vec(), b"jpeg".to_vec()];
        let encoded = call(tensor("encoded", "BYTES", &[2], TensorData::Bytes(files.clone()))).unwrap();
        assert_eq!(
            encoded.request.images,
            files.into_iter().map(ImageInput::Encoded).collect::<Vec<_>>()
        );
        assert_eq!(encoded.outputs.len(), OUTPUTS.len(), "no outputs named: all of them");
    }

    #[test]
    fn mismatched_tensors_say_what_to_send() {
        let wrong_shape = call(tensor("raw", "UINT8", &[1, 784], TensorData::Uint8(vec![0; PIXELS])));
        assert!(invalid_message(wrong_shape).contains("raw UINT8 [N,28,28]"));
        let wrong_type = call(tensor("raw", "FP32", &[1, 28, 28], TensorData::Fp32(vec![0.0; PIXELS])));
        assert!(invalid_message(wrong_type).contains("got datatype FP32"));
        let short = call(tensor("raw", "UINT8", &[2, 28, 28], TensorData::Uint8(vec![0; PIXELS])));
        assert!(invalid_message(short).contains("784 elements; expected 1568"));
        let unknown = call(tensor(
            "pixels",
            "UINT8",
            &[1, 28, 28],
            TensorData::Uint8(vec![0; PIXELS]),
        ));
        assert!(invalid_message(unknown).contains("encoded BYTES [N], or raw UINT8 [N,28,28], or image FP32"));
        let negative = call(tensor("encoded", "BYTES", &[-1], TensorData::Bytes(vec![])));
        assert!(invalid_message(negative).contains("got shape [-1]"));
        let huge = call(tensor("raw", "UINT8", &[i64::MAX, 28, 28], TensorData::Uint8(vec![])));
        assert!(invalid_message(huge).contains("more than can be sent"));
        let two = read_call(InferRequest {
            model_name: "cnn".into(),
            inputs: vec![
                tensor("raw", "UINT8", &[1, 28, 28], TensorData::Uint8(vec![0; PIXELS])),
                tensor("raw", "UINT8", &[1, 28, 28], TensorData::Uint8(vec![0; PIXELS])),
            ],
            ..InferRequest::default()
        });
        assert!(invalid_message(two).contains("exactly one input"));
        let nameless = read_call(InferRequest::default());
        assert!(invalid_message(nameless).contains("model_name"));
    }

    #[test]
    fn outputs_are_chosen_by_name_and_unknown_ones_refused() {
        let mut request = InferRequest {
            model_name: "cnn".into(),
            inputs: vec![tensor("raw", "UINT8", &[1, 28, 28], TensorData::Uint8(vec![0; PIXELS]))],
            outputs: vec!["reason".into(), "class_id".into()],
            ..InferRequest::default()
        };
        let names: Vec<&str> = read_call(request.clone())
            .unwrap()
            .outputs
            .iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(names, ["reason", "class_id"]);
        request.outputs = vec!["logits".into()];
        assert!(invalid_message(read_call(request.clone())).contains("unknown output logits"));
        request.outputs = vec!["reason".into(), "reason".into()];
        assert!(invalid_message(read_call(request)).contains("twice"));
    }

    #[test]
    fn thresholds_come_from_numeric_parameters() {
        let mut request = InferRequest {
            model_name: "cnn".into(),
            inputs: vec![tensor("raw", "UINT8", &[1, 28, 28], TensorData::Uint8(vec![0; PIXELS]))],
            parameters: vec![
                ("min_confidence".into(), Param::Double(0.9)),
                ("max_ood_score".into(), Param::Str("-3.5".into())),
                ("binary_data_output".into(), Param::Bool(true)),
            ],
            ..InferRequest::default()
        };
        let call = read_call(request.clone()).unwrap();
        assert_eq!(call.request.min_confidence, Some(0.9));
        assert_eq!(call.request.max_ood_score, Some(-3.5));
        request.parameters = vec![("min_confidence".into(), Param::Bool(true))];
        assert!(invalid_message(read_call(request)).contains("min_confidence must be a number"));
    }

    #[test]
    fn raw_contents_decode_each_datatype() {
        let fp32 = TensorData::from_raw("image", "FP32", &[0, 0, 0x80, 0x3f, 0, 0, 0, 0], 64).unwrap();
        assert_eq!(fp32, TensorData::Fp32(vec![1.0, 0.0]));
        assert_eq!(
            TensorData::from_raw("image", "FP32", &[0; 5], 64).unwrap_err().kind,
            ErrorKind::Invalid
        );
        let bytes = TensorData::from_raw("encoded", "BYTES", &[2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0], 64).unwrap();
        assert_eq!(bytes, TensorData::Bytes(vec![b"hi".to_vec(), vec![]]));
        for malformed in [&[2, 0, 0][..], &[5, 0, 0, 0, b'h']] {
            assert!(TensorData::from_raw("encoded", "BYTES", malformed, 64).is_err());
        }
        let over = TensorData::from_raw("encoded", "BYTES", &[0; 12], 2).unwrap_err();
        assert!(over.message.contains("more than 2 BYTES elements"), "{}", over.message);
        let e = TensorData::from_raw("raw", "INT32", &[], 64).unwrap_err();
        assert!(e.message.contains("datatype INT32"), "{}", e.message);
    }

    #[test]
    fn bytes_outputs_encode_as_bytes_inputs_decode() {
        let out = OutputData::Bytes(vec!["ACCEPTED".into(), String::new()]);
        assert_eq!(
            TensorData::from_raw("x", "BYTES", &out.to_raw(), 64).unwrap(),
            TensorData::Bytes(vec![b"ACCEPTED".to_vec(), vec![]])
        );
        assert_eq!(OutputData::Int64(vec![-1]).to_raw(), vec![0xff; 8]);
        assert_eq!(OutputData::Bool(vec![true, false]).to_raw(), vec![1, 0]);
    }
}
