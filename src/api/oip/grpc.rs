//! The `inference.GRPCInferenceService` adapter: the Open Inference Protocol over gRPC. It reads tensors out
//! of the proto (typed `contents` or `raw_input_contents`) and writes them back (always as
//! `raw_output_contents`, the form tritonclient's `as_numpy` reads); `oip` and the core do the rest.

use tonic::{Request, Response, Status};

use crate::{
    api::oip::{self, InferRequest, InputTensor, Param, TensorData},
    core::classify::Pipeline,
    core::control::{ControlCall, ModelControl},
    core::statistics::Tally,
    error::{ServiceError, clip},
    inference_pb as pb,
    transport::connections::ConnectionInfo,
    transport::layers::Deadline,
};

#[derive(Debug, Clone)]
pub struct InferenceService {
    core: Pipeline,
    control: ModelControl,
}

impl InferenceService {
    pub fn new(core: Pipeline, control: ModelControl) -> Self {
        InferenceService { core, control }
    }
}

/// A control call as the gate needs it: the caller's address and its `authorization` metadata.
fn control_call<'a, T>(action: &'static str, model: &'a str, request: &'a Request<T>) -> ControlCall<'a> {
    ControlCall {
        action,
        model,
        peer: request.extensions().get::<ConnectionInfo>().and_then(|c| c.remote),
        authorization: request.metadata().get("authorization").map(|v| v.as_bytes()),
    }
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.core.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = oip::model_ready(&self.core, &r.name, &r.version);
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: oip::SERVER_NAME.into(),
            version: oip::SERVER_VERSION.into(),
            extensions: oip::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let model = oip::describe_model(&self.core, &r.name, &r.version)?;
        let tensors = |specs: &[oip::TensorSpec]| {
            specs
                .iter()
                .map(|s| pb::model_metadata_response::TensorMetadata {
                    name: s.name.into(),
                    datatype: s.datatype.into(),
                    shape: s.shape.to_vec(),
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: model.name,
            versions: model.versions,
            platform: oip::PLATFORM.into(),
            inputs: tensors(&oip::INPUTS),
            outputs: tensors(&oip::OUTPUTS),
        }))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.into_inner();
        let config = oip::model_configuration(&self.core, &r.name, &r.version)?;
        let data_type = |name: &str| pb::DataType::from_str_name(name).unwrap_or(pb::DataType::TypeInvalid) as i32;
        let reshape = |shape: Option<Vec<i64>>| shape.map(|shape| pb::ModelTensorReshape { shape });
        let input = oip::INPUTS
            .iter()
            .map(|spec| {
                let t = oip::ConfigTensor::of(spec);
                pb::ModelInput {
                    name: t.name.into(),
                    data_type: data_type(t.data_type),
                    dims: t.dims,
                    reshape: reshape(t.reshape),
                    // A call sends one of the three forms.
                    optional: true,
                }
            })
            .collect();
        let output = oip::OUTPUTS
            .iter()
            .map(|spec| {
                let t = oip::ConfigTensor::of(spec);
                pb::ModelOutput {
                    name: t.name.into(),
                    data_type: data_type(t.data_type),
                    dims: t.dims,
                    reshape: reshape(t.reshape),
                }
            })
            .collect();
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(pb::ModelConfig {
                name: config.name.clone(),
                platform: oip::PLATFORM.into(),
                backend: "onnxruntime".into(),
                version_policy: Some(pb::ModelVersionPolicy {
                    policy_choice: Some(pb::model_version_policy::PolicyChoice::Latest(
                        pb::model_version_policy::Latest { num_versions: 1 },
                    )),
                }),
                max_batch_size: i32::try_from(config.max_batch_size).unwrap_or(i32::MAX),
                input,
                output,
                instance_group: vec![pb::ModelInstanceGroup {
                    name: config.name,
                    count: i32::try_from(config.instances).unwrap_or(i32::MAX),
                    kind: pb::model_instance_group::Kind::Cpu as i32,
                }],
                default_model_filename: config.file,
                dynamic_batching: Some(pb::ModelDynamicBatching {
                    max_queue_delay_microseconds: config.max_queue_delay_us,
                }),
            }),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = request.into_inner();
        let tally = |t: Tally| {
            Some(pb::StatisticDuration {
                count: t.count,
                ns: t.ns,
            })
        };
        let model_stats = oip::model_statistics(&self.core, &r.name, &r.version)?
            .into_iter()
            .map(|(name, version, s)| pb::ModelStatistics {
                name,
                version,
                last_inference: s.last_inference_ms,
                inference_count: s.inference_count,
                execution_count: s.execution_count,
                inference_stats: Some(pb::InferStatistics {
                    success: tally(s.success),
                    fail: tally(s.fail),
                    queue: tally(s.queue),
                    compute_input: tally(s.calls.input),
                    compute_infer: tally(s.calls.infer),
                    compute_output: tally(s.calls.output),
                    cache_hit: tally(Tally::default()),
                    cache_miss: tally(Tally::default()),
                }),
                batch_stats: s
                    .batches
                    .iter()
                    .map(|(&batch_size, p)| pb::InferBatchStatistics {
                        batch_size,
                        compute_input: tally(p.input),
                        compute_infer: tally(p.infer),
                        compute_output: tally(p.output),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let index = self.core.registry().index(request.into_inner().ready);
        Ok(Response::new(pb::RepositoryIndexResponse {
            models: index
                .into_iter()
                .map(|e| pb::repository_index_response::ModelIndex {
                    name: e.name,
                    version: e.version,
                    state: e.state.into(),
                    reason: e.reason,
                })
                .collect(),
        }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let call = control_call("load", &request.get_ref().model_name, &request);
        oip::load_model(&self.core, &self.control, call).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let force = request.get_ref().parameters.get(oip::FORCE_PARAMETER).is_some_and(|p| {
            matches!(
                p.parameter_choice,
                Some(pb::model_repository_parameter::ParameterChoice::BoolParam(true))
            )
        });
        let call = control_call("unload", &request.get_ref().model_name, &request);
        oip::unload_model(&self.core, &self.control, call, force)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = request.extensions().get::<Deadline>().map(|d| d.0);
        let share = request.extensions().get::<ConnectionInfo>().map(|c| c.share.clone());
        let request = request.into_inner();
        let id = request.id.clone();
        let call = oip::read_call(from_proto(request, self.core.policy().max_images_per_request)?)?;
        let response = self.core.classify(call.request, share, deadline).await?;
        let outputs = oip::outputs(&response, &call.outputs);
        Ok(Response::new(pb::ModelInferResponse {
            model_name: response.model,
            model_version: response.model_version,
            id,
            parameters: Default::default(),
            raw_output_contents: outputs.iter().map(|o| o.data.to_raw()).collect(),
            outputs: outputs
                .into_iter()
                .map(|o| pb::model_infer_response::InferOutputTensor {
                    name: o.spec.name.into(),
                    datatype: o.spec.datatype.into(),
                    shape: o.shape,
                    parameters: Default::default(),
                    contents: None,
                })
                .collect(),
        }))
    }
}

/// `max_images`: the most BYTES elements a raw input may hold.
fn from_proto(request: pb::ModelInferRequest, max_images: usize) -> Result<InferRequest, ServiceError> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(ServiceError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs: send one per input, in order",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let inputs = request
        .inputs
        .into_iter()
        .map(|input| {
            let data = match (raw.next(), input.contents) {
                (Some(_), Some(_)) => {
                    return Err(ServiceError::invalid(format!(
                        "input {} has both contents and raw_input_contents: send one of them",
                        clip(&input.name)
                    )));
                }
                (Some(bytes), None) => TensorData::from_raw(&input.name, &input.datatype, &bytes, max_images)?,
                (None, contents) => typed(&input.name, &input.datatype, contents.unwrap_or_default())?,
            };
            Ok(InputTensor {
                name: input.name,
                datatype: input.datatype,
                shape: input.shape,
                data,
            })
        })
        .collect::<Result<_, ServiceError>>()?;
    Ok(InferRequest {
        model_name: request.model_name,
        model_version: request.model_version,
        inputs,
        outputs: request.outputs.into_iter().map(|o| o.name).collect(),
        parameters: request
            .parameters
            .into_iter()
            .filter_map(|(key, value)| Some((key, param(value.parameter_choice?))))
            .collect(),
    })
}

/// A tensor's typed `contents`, read from the field its datatype uses.
fn typed(name: &str, datatype: &str, contents: pb::InferTensorContents) -> Result<TensorData, ServiceError> {
    match datatype {
        "UINT8" => contents
            .uint_contents
            .iter()
            .map(|&v| u8::try_from(v))
            .collect::<Result<Vec<u8>, _>>()
            .map(TensorData::Uint8)
            .map_err(|_| ServiceError::invalid(format!("input {} is UINT8: every value must be 0..=255", clip(name)))),
        "FP32" => Ok(TensorData::Fp32(contents.fp32_contents)),
        "BYTES" => Ok(TensorData::Bytes(contents.bytes_contents)),
        other => Err(oip::unsupported_datatype(name, other)),
    }
}

fn param(choice: pb::infer_parameter::ParameterChoice) -> Param {
    use pb::infer_parameter::ParameterChoice as P;
    match choice {
        P::BoolParam(b) => Param::Bool(b),
        P::Int64Param(i) => Param::Int(i),
        P::StringParam(s) => Param::Str(s),
        P::DoubleParam(d) => Param::Double(d),
        P::Uint64Param(u) => Param::Int(i64::try_from(u).unwrap_or(i64::MAX)),
    }
}
