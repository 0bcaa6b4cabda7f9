//! The Open Inference Protocol (KServe v2), over gRPC and over HTTP/JSON, against a real server: the same
//! images give the same answers as `Classify`, whatever form they are sent in, and every mistake a client
//! can make is refused with a message that says what to fix. tests/oip_clients.py checks the same server
//! with clients nobody here wrote (tritonclient, the kserve SDK).

use crate::common;

use std::net::SocketAddr;

use common::{TestServer, config, encoded, fixture, png, png_declaring, raw, request};
use fmnist_serve::{
    inference_pb::{
        self as oip, InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        infer_parameter::ParameterChoice,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    },
    pb,
    preprocess::PIXELS,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, transport::Channel};

fn client(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_lazy();
    GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

/// A ModelInfer call for the cnn with one input sent as raw contents.
fn infer_raw(tensor: InferInputTensor, raw_contents: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "cnn".into(),
        inputs: vec![tensor],
        raw_input_contents: vec![raw_contents],
        ..Default::default()
    }
}

/// BYTES raw contents: each element a 4-byte little-endian length and its bytes.
fn bytes_tensor(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut raw = Vec::new();
    for e in elements {
        raw.extend_from_slice(&(e.len() as u32).to_le_bytes());
        raw.extend_from_slice(e);
    }
    raw
}

/// An output's raw contents, by name.
fn output<'a>(response: &'a ModelInferResponse, name: &str) -> &'a [u8] {
    let i = response
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("output {name} in {:?}", response.outputs));
    &response.raw_output_contents[i]
}

fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn strings(raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(String::from_utf8(rest[4..4 + len].to_vec()).unwrap());
        rest = &rest[4 + len..];
    }
    out
}

/// Every image's probabilities from `Classify`, the reference the OIP answers must match.
async fn classify_probabilities(server: &mut TestServer, images: Vec<pb::Image>) -> Vec<f32> {
    let mut req = request(images);
    req.model = "cnn".into();
    let results = server.client.classify(req).await.unwrap().into_inner().results;
    results
        .iter()
        .flat_map(|r| r.prediction.as_ref().expect("classified").probabilities.clone())
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "{what}: value {i}: {g} vs Classify's {w}");
    }
}

#[tokio::test]
async fn every_input_form_gives_the_probabilities_classify_gives() {
    let mut server = TestServer::start(config()).await;
    let mut oip = client(&server);
    let images: Vec<[u8; PIXELS]> = fixture().iter().take(48).map(|(p, _)| *p).collect();
    let n = images.len() as i64;
    let pixels: Vec<u8> = images.concat();
    let want = classify_probabilities(&mut server, images.iter().map(|p| raw(p)).collect()).await;

    let probabilities = |r: ModelInferResponse| f32s(output(&r, "probabilities"));
    let by_raw = oip
        .model_infer(infer_raw(input("raw", "UINT8", &[n, 28, 28]), pixels.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_raw.model_name, "cnn");
    assert_close(&probabilities(by_raw), &want, "UINT8 raw_input_contents");

    let mut typed = input("raw", "UINT8", &[n, 28, 28]);
    typed.contents = Some(InferTensorContents {
        uint_contents: pixels.iter().map(|&p| u32::from(p)).collect(),
        ..Default::default()
    });
    let by_typed = oip
        .model_infer(ModelInferRequest {
            model_name: "cnn".into(),
            inputs: vec![typed],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_close(&probabilities(by_typed), &want, "UINT8 uint_contents");

    // pixel / 255 is what the server computes from raw pixels, so the FP32 path must land on the same values.
    let scaled: Vec<u8> = pixels
        .iter()
        .flat_map(|&p| (f32::from(p) / 255.0).to_le_bytes())
        .collect();
    let by_fp32 = oip
        .model_infer(infer_raw(input("image", "FP32", &[n, 1, 28, 28]), scaled))
        .await
        .unwrap()
        .into_inner();
    assert_close(&probabilities(by_fp32), &want, "FP32 [N,1,28,28]");

    let files: Vec<Vec<u8>> = images.iter().map(|p| png(p, 28, 28)).collect();
    let want_png = classify_probabilities(&mut server, files.iter().cloned().map(encoded).collect()).await;
    let by_png = oip
        .model_infer(infer_raw(input("encoded", "BYTES", &[n]), bytes_tensor(&files)))
        .await
        .unwrap()
        .into_inner();
    assert_close(&probabilities(by_png), &want_png, "BYTES PNG files");
}

#[tokio::test]
async fn fp32_values_run_as_sent_not_rounded_to_pixels() {
    let server = TestServer::start(config()).await;
    let mut oip = client(&server);
    let (pixels, _) = fixture()[3];
    let run = |shift: f32| {
        let values: Vec<u8> = pixels
            .iter()
            .flat_map(|&p| ((f32::from(p) / 255.0 + shift).clamp(0.0, 1.0)).to_le_bytes())
            .collect();
        infer_raw(input("image", "FP32", &[1, 1, 28, 28]), values)
    };
    let exact = oip.model_infer(run(0.0)).await.unwrap().into_inner();
    // A shift smaller than half a grey level rounds to the same pixels; the model must still see it.
    let shifted = oip.model_infer(run(0.0015)).await.unwrap().into_inner();
    assert_ne!(
        f32s(output(&exact, "probabilities")),
        f32s(output(&shifted, "probabilities"))
    );
}

#[tokio::test]
async fn every_reject_reason_comes_back_by_name_with_a_detail() {
    let server = TestServer::start(config()).await;
    let mut oip = client(&server);
    let (good, label) = fixture()[0];
    let mut almost_black = [0u8; PIXELS];
    almost_black[..20].fill(255);
    let mut almost_white = [255u8; PIXELS];
    almost_white[..20].fill(0);
    let files = vec![
        png(&good, 28, 28),
        png(&[0u8; PIXELS], 28, 28),
        b"definitely not an image".to_vec(),
        png_declaring(50_000, 50_000),
    ];
    let want = ["ACCEPTED", "LOW_CONTRAST", "UNDECODABLE", "TOO_LARGE"];
    let r = oip
        .model_infer(infer_raw(
            input("encoded", "BYTES", &[files.len() as i64]),
            bytes_tensor(&files),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strings(output(&r, "reason")), want);
    let details = strings(output(&r, "detail"));
    assert!(details.iter().all(|d| !d.is_empty()), "{details:?}");
    assert_eq!(output(&r, "accepted"), [1, 0, 0, 0]);
    let class_ids: Vec<i64> = output(&r, "class_id")
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        class_ids,
        [i64::from(label), -1, -1, -1],
        "never-run images have class -1"
    );
    let ood = f32s(output(&r, "ood_score"));
    assert!(ood[0].is_finite() && ood[1..].iter().all(|s| s.is_nan()), "{ood:?}");

    // Raw pixels are taken as sent (no polarity step): a dark and a bright image; then FP32 values outside [0, 1].
    let r = oip
        .model_infer(infer_raw(
            input("raw", "UINT8", &[2, 28, 28]),
            [almost_black, almost_white].concat(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strings(output(&r, "reason")), ["MOSTLY_DARK", "MOSTLY_BRIGHT"]);
    let mut values = vec![0.5f32; PIXELS];
    values[7] = 1.5;
    let r = oip
        .model_infer(infer_raw(
            input("image", "FP32", &[1, 1, 28, 28]),
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(strings(output(&r, "reason")), ["UNDECODABLE"]);
    assert!(strings(output(&r, "detail"))[0].contains("index 7 is outside [0, 1]"));

    // The thresholds as request parameters: every image is then too unsure, or too unusual.
    for (key, value, reason) in [
        ("min_confidence", ParameterChoice::DoubleParam(1.0), "LOW_CONFIDENCE"),
        (
            "max_ood_score",
            ParameterChoice::StringParam("-1000".into()),
            "OUT_OF_DISTRIBUTION",
        ),
    ] {
        let mut req = infer_raw(input("raw", "UINT8", &[1, 28, 28]), good.to_vec());
        req.parameters.insert(
            key.into(),
            InferParameter {
                parameter_choice: Some(value),
            },
        );
        let r = oip.model_infer(req).await.unwrap().into_inner();
        assert_eq!(strings(output(&r, "reason")), [reason], "{key}");
        assert_eq!(output(&r, "accepted"), [0], "{key}: still classified, not accepted");
    }
}

#[tokio::test]
async fn outputs_can_be_chosen_and_the_id_comes_back() {
    let server = TestServer::start(config()).await;
    let mut oip = client(&server);
    let (good, _) = fixture()[1];
    let mut req = infer_raw(input("raw", "UINT8", &[1, 28, 28]), good.to_vec());
    req.id = "call-42".into();
    req.outputs = ["class_id", "accepted"]
        .iter()
        .map(|name| InferRequestedOutputTensor {
            name: (*name).into(),
            ..Default::default()
        })
        .collect();
    let r = oip.model_infer(req).await.unwrap().into_inner();
    assert_eq!(r.id, "call-42");
    let names: Vec<(&str, &str, &[i64])> = r
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype.as_str(), o.shape.as_slice()))
        .collect();
    assert_eq!(names, [("class_id", "INT64", &[1][..]), ("accepted", "BOOL", &[1][..])]);
    assert_eq!(r.raw_output_contents.len(), 2);
    assert!(
        r.outputs.iter().all(|o| o.contents.is_none()),
        "raw_output_contents only, as tritonclient reads"
    );
}

#[tokio::test]
async fn mistakes_are_invalid_argument_with_what_to_fix() {
    let server = TestServer::start(config()).await;
    let mut oip = client(&server);
    let (good, _) = fixture()[0];
    let cases: Vec<(ModelInferRequest, &str)> = vec![
        (
            infer_raw(input("raw", "UINT8", &[1, 784]), good.to_vec()),
            "raw UINT8 [N,28,28], got shape [1, 784]",
        ),
        (
            infer_raw(input("raw", "UINT8", &[2, 28, 28]), good.to_vec()),
            "784 elements; expected 1568",
        ),
        (
            infer_raw(input("raw", "INT32", &[1, 28, 28]), good.to_vec()),
            "datatype INT32; send exactly one input",
        ),
        (
            infer_raw(input("pixels", "UINT8", &[1, 28, 28]), good.to_vec()),
            "unknown input pixels",
        ),
        (
            ModelInferRequest {
                model_name: "shoes".into(),
                ..infer_raw(input("raw", "UINT8", &[1, 28, 28]), good.to_vec())
            },
            "unknown model \"shoes\": loaded models are cnn, cnn-int8, dense",
        ),
        (
            ModelInferRequest {
                model_version: "7".into(),
                ..infer_raw(input("raw", "UINT8", &[1, 28, 28]), good.to_vec())
            },
            "model cnn has no version \"7\"",
        ),
        (
            ModelInferRequest {
                raw_input_contents: vec![],
                ..infer_raw(
                    InferInputTensor {
                        contents: Some(InferTensorContents {
                            uint_contents: vec![300; PIXELS],
                            ..Default::default()
                        }),
                        ..input("raw", "UINT8", &[1, 28, 28])
                    },
                    vec![],
                )
            },
            "every value must be 0..=255",
        ),
        (
            ModelInferRequest {
                raw_input_contents: vec![good.to_vec(), good.to_vec()],
                ..infer_raw(input("raw", "UINT8", &[1, 28, 28]), vec![])
            },
            "raw_input_contents has 2 entries for 1 inputs",
        ),
        (
            infer_raw(input("raw", "UINT8", &[65, 28, 28]), [good; 65].concat()),
            "65 images; at most 64 per request",
        ),
        (
            ModelInferRequest {
                outputs: vec![InferRequestedOutputTensor {
                    name: "logits".into(),
                    ..Default::default()
                }],
                ..infer_raw(input("raw", "UINT8", &[1, 28, 28]), good.to_vec())
            },
            "unknown output logits: outputs are probabilities, class_id",
        ),
        (
            ModelInferRequest {
                model_name: "cnn".into(),
                ..Default::default()
            },
            "send exactly one input: encoded BYTES [N], or raw UINT8 [N,28,28], or image FP32 [N,1,28,28]",
        ),
    ];
    for (req, want) in cases {
        let status = oip.model_infer(req).await.expect_err(want);
        assert_eq!(status.code(), Code::InvalidArgument, "{want}: {status:?}");
        assert!(
            status.message().contains(want),
            "want {want:?} in {:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn with_no_queue_wait_a_full_queue_is_resource_exhausted_over_oip_too() {
    let mut config = config();
    config.max_queued_images = 64;
    config.max_queue_wait_ms = 0; // refused at once; waiting has its own tests (reliability.rs)
    config.max_batch_size = 8;
    let server = TestServer::start(config).await;
    let (good, _) = fixture()[0];
    let calls: Vec<_> = (0..24)
        .map(|_| {
            let mut oip = client(&server);
            let req = infer_raw(input("raw", "UINT8", &[64, 28, 28]), [good; 64].concat());
            tokio::spawn(async move { oip.model_infer(req).await })
        })
        .collect();
    let (mut ok, mut exhausted) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().outputs[0].shape, [64, 10]);
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                exhausted += 1;
            }
        }
    }
    assert!(ok >= 1 && exhausted >= 1, "{ok} succeeded, {exhausted} refused");
}

#[tokio::test]
async fn health_readiness_and_metadata_describe_the_real_model() {
    let server = TestServer::start(config()).await;
    let mut oip = client(&server);
    assert!(
        oip.server_live(oip::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        oip.server_ready(oip::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str, version: &str| oip::ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(oip.model_ready(ready("cnn", "")).await.unwrap().into_inner().ready);
    assert!(!oip.model_ready(ready("shoes", "")).await.unwrap().into_inner().ready);
    assert!(!oip.model_ready(ready("cnn", "7")).await.unwrap().into_inner().ready);

    let meta = oip
        .model_metadata(oip::ModelMetadataRequest {
            name: "cnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let version = common::served_version("cnn"); // the newest: the shipped repository has no version policy
    assert_eq!(meta.versions, std::slice::from_ref(&version));
    assert_eq!(meta.platform, "onnxruntime_onnx");
    let inputs: Vec<(&str, &str, &[i64])> = meta
        .inputs
        .iter()
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(
        inputs,
        [
            ("encoded", "BYTES", &[-1][..]),
            ("raw", "UINT8", &[-1, 28, 28][..]),
            ("image", "FP32", &[-1, 1, 28, 28][..])
        ]
    );
    let outputs: Vec<&str> = meta.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        outputs,
        ["probabilities", "class_id", "ood_score", "accepted", "reason", "detail"]
    );
    let unknown = oip
        .model_metadata(oip::ModelMetadataRequest {
            name: "shoes".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);

    // The same model at its version, by number: pinned requests name it.
    let r = oip
        .model_infer(ModelInferRequest {
            model_version: version.clone(),
            ..infer_raw(input("raw", "UINT8", &[1, 28, 28]), fixture()[0].0.to_vec())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_version, version);
}

/// One HTTP/1.1 request to the server's port; the status, headers (lower-cased) and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a full response");
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let mut body = response[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[line + 2..line + 2 + size]);
        body = &body[line + 2 + size + 2..];
    }
}

async fn post_json(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let (status, _, body) = http(
        addr,
        "POST",
        path,
        &[("content-type", "application/json".into())],
        body.to_string().as_bytes(),
    )
    .await;
    (
        status,
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body))),
    )
}

#[tokio::test]
async fn rest_json_gives_the_answers_grpc_gives() {
    let mut server = TestServer::start(config()).await;
    let addr = server.addr;
    let images: Vec<[u8; PIXELS]> = fixture().iter().take(5).map(|(p, _)| *p).collect();
    let want = classify_probabilities(&mut server, images.iter().map(|p| raw(p)).collect()).await;

    // Nested rows, as a numpy array's tolist() gives them.
    let rows: Vec<Vec<Vec<u8>>> = images
        .iter()
        .map(|p| p.chunks(28).map(<[u8]>::to_vec).collect())
        .collect();
    let (status, body) = post_json(
        addr,
        "/v2/models/cnn/infer",
        json!({"id": "r1", "inputs": [{"name": "raw", "datatype": "UINT8", "shape": [5, 28, 28], "data": rows}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "r1");
    assert_eq!(body["model_name"], "cnn");
    let probabilities: Vec<f32> = body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(body["outputs"][0]["name"], "probabilities");
    assert_close(&probabilities, &want, "REST UINT8");

    // An encoded file as base64, and an image that never reaches the model: its probabilities are null.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let files = [b64.encode(png(&images[0], 28, 28)), b64.encode(b"not an image")];
    let (status, body) = post_json(
        addr,
        "/v2/models/cnn/infer",
        json!({"inputs": [{"name": "encoded", "datatype": "BYTES", "shape": [2],
                           "parameters": {"content_type": "base64"}, "data": files}],
               "outputs": [{"name": "reason"}, {"name": "probabilities"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!(["ACCEPTED", "UNDECODABLE"]));
    assert_eq!(body["outputs"][1]["data"][10], Value::Null);
}

#[tokio::test]
async fn rest_errors_are_json_with_the_status_of_their_kind() {
    let server = TestServer::start(config()).await;
    let addr = server.addr;
    // The metrics recorder is the test process's: other tests' calls are in it too.
    let before = server.metrics().await;
    let count = |metrics: &str, key: &str| common::metric(metrics, key);
    let good: Vec<u8> = fixture()[0].0.to_vec();
    let (status, body) = post_json(
        addr,
        "/v2/models/shoes/infer",
        json!({"inputs": [{"name": "raw", "datatype": "UINT8", "shape": [1, 28, 28], "data": good}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("unknown model \"shoes\""),
        "{body}"
    );
    let (status, body) = post_json(
        addr,
        "/v2/models/cnn/infer",
        json!({"inputs": [{"name": "raw", "datatype": "UINT8", "shape": [1, 28, 28], "data": [300]}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("an integer 0..=255"), "{body}");
    // A base64 image sent without content_type: the message says what to set (issue #40: it was answered 200,
    // UNDECODABLE, with no hint).
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD.encode(common::png(&good, 28, 28));
    let (status, body) = post_json(
        addr,
        "/v2/models/cnn/infer",
        json!({"inputs": [{"name": "encoded", "datatype": "BYTES", "shape": [1], "data": [png]}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("base64-encoded PNG") && message.contains(r#""content_type": "base64""#),
        "{message}"
    );
    let (status, _, body) = http(addr, "POST", "/v2/models/cnn/infer", &[], b"{not json").await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not an inference request"));

    let (status, _, _) = http(addr, "GET", "/v2/health/live", &[], b"").await;
    assert_eq!(status, 200);
    let (status, _, _) = http(addr, "GET", "/v2/health/ready", &[], b"").await;
    assert_eq!(status, 200);
    let (status, _, _) = http(addr, "GET", "/v2/models/cnn/ready", &[], b"").await;
    assert_eq!(status, 200);
    let (status, _, _) = http(addr, "GET", "/v2/models/shoes/ready", &[], b"").await;
    assert_eq!(status, 400);
    // A route this server does not have is a 404 that says so, counted with its real code (issue #40).
    for path in ["/v2/trace/setting", "/v2/models/cnn/trace/setting", "/v2/nothing/here"] {
        let (status, _, body) = http(addr, "GET", path, &[], b"").await;
        assert_eq!(status, 404, "{path}");
        let body: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains(&format!("no route GET {path}")),
            "{body}"
        );
    }
    let (status, _, body) = http(addr, "GET", "/v2/models/cnn", &[], b"").await;
    assert_eq!(status, 200);
    let meta: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        meta["inputs"][1],
        json!({"name": "raw", "datatype": "UINT8", "shape": [-1, 28, 28]})
    );

    // The calls are counted under closed route labels, whatever the model name in the path.
    let metrics = server.metrics().await;
    for (key, calls) in [
        ("fmnist_requests_total{rpc=\"v2/infer\",code=\"InvalidArgument\"}", 4.0),
        (
            "fmnist_requests_total{rpc=\"v2/model_ready\",code=\"InvalidArgument\"}",
            1.0,
        ),
        ("fmnist_requests_total{rpc=\"v2/unknown\",code=\"NotFound\"}", 3.0),
    ] {
        assert_eq!(count(&metrics, key) - count(&before, key), calls, "{key}");
    }
}

#[tokio::test]
async fn a_rest_error_names_what_is_wrong_and_where_without_echoing_the_clients_value() {
    // issue #35: a `shape` sent as a long string came back whole, escaped, in the 400's message (a 16 MiB
    // string gave a 58.7 MB answer).
    let server = TestServer::start(config()).await;
    let long = "\u{1}".repeat(200_000);
    let (status, body) = post_json(
        server.addr,
        "/v2/models/cnn/infer",
        json!({"inputs": [{"name": "raw", "datatype": "UINT8", "shape": long, "data": [0]}]}),
    )
    .await;
    assert_eq!(status, 400);
    let message = body["error"].as_str().unwrap();
    assert!(
        message.len() < 400,
        "{} bytes: {}…",
        message.len(),
        &message[..400.min(message.len())]
    );
    assert!(message.contains("invalid type: string"), "{message}");
    assert!(message.contains("at line 1 column"), "{message}");
}

#[tokio::test]
async fn rest_binary_tensors_follow_the_json_header() {
    let mut server = TestServer::start(config()).await;
    let addr = server.addr;
    let images: Vec<[u8; PIXELS]> = fixture().iter().take(3).map(|(p, _)| *p).collect();
    let want = classify_probabilities(&mut server, images.iter().map(|p| raw(p)).collect()).await;
    let values: Vec<u8> = images
        .concat()
        .iter()
        .flat_map(|&p| (f32::from(p) / 255.0).to_le_bytes())
        .collect();
    let header = json!({
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [3, 1, 28, 28],
                    "parameters": {"binary_data_size": values.len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}, {"name": "reason"}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&values);
    let (status, head, response) = http(
        addr,
        "POST",
        "/v2/models/cnn/infer",
        &[("inference-header-content-length", header.len().to_string())],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&response));
    let json_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("inference-header-content-length: "))
        .expect("the response says where its JSON ends")
        .trim()
        .parse()
        .unwrap();
    let meta: Value = serde_json::from_slice(&response[..json_len]).unwrap();
    assert_eq!(meta["outputs"][0]["parameters"]["binary_data_size"], 3 * 10 * 4);
    assert_eq!(meta["outputs"][1]["data"], json!(["ACCEPTED", "ACCEPTED", "ACCEPTED"]));
    assert_close(&f32s(&response[json_len..]), &want, "REST binary FP32");
}

/// Issue #40: Triton's model configuration and statistics extensions, which tritonclient's `get_model_config`
/// and `get_inference_statistics` call (they answered UNIMPLEMENTED and an empty HTTP 400). The configuration
/// describes what serves; the statistics count exactly the calls made, over gRPC and REST alike.
#[tokio::test]
async fn the_model_config_and_statistics_describe_what_serves_and_count_the_calls_made() {
    let mut server = TestServer::start(config()).await;
    let mut oip = client(&server);
    let version = common::served_version("cnn");

    let config = oip
        .model_config(oip::ModelConfigRequest {
            name: "cnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(
        (config.name.as_str(), config.platform.as_str()),
        ("cnn", "onnxruntime_onnx")
    );
    assert_eq!(config.max_batch_size, 64, "--max-batch-size");
    assert_eq!(config.instance_group[0].count, 1, "--instances");
    let raw_input = config.input.iter().find(|i| i.name == "raw").unwrap();
    assert_eq!(
        (raw_input.data_type, raw_input.dims.as_slice()),
        (oip::DataType::TypeUint8 as i32, &[28, 28][..])
    );
    let (status, _, body) = http(server.addr, "GET", "/v2/models/cnn/config", &[], b"").await;
    let rest: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(rest["max_batch_size"], 64);
    assert_eq!(rest["input"][1]["data_type"], "TYPE_UINT8");
    assert_eq!(rest["output"][0]["dims"], json!([10]));

    // Three calls of 4, 2 and 1 real images: 7 images run, 3 calls answered.
    let images: Vec<(_, _)> = fixture().into_iter().take(7).collect();
    for group in [&images[..4], &images[4..6], &images[6..]] {
        let pixels: Vec<u8> = group.iter().flat_map(|(p, _)| p.to_vec()).collect();
        let shape = [group.len() as i64, 28, 28];
        oip.model_infer(infer_raw(input("raw", "UINT8", &shape), pixels))
            .await
            .unwrap();
    }
    // Refused before it reaches a version (65 images): not the version's to count, as in Triton.
    let too_many = server.client.classify(request(vec![raw(&images[0].0); 65])).await;
    assert!(too_many.is_err());

    let stats = oip
        .model_statistics(oip::ModelStatisticsRequest {
            name: "cnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .model_stats;
    assert_eq!(stats.len(), 1, "{stats:?}");
    let s = &stats[0];
    assert_eq!(s.version, version);
    assert_eq!(s.inference_count, 7, "images run");
    assert!((1..=3).contains(&s.execution_count), "{} batches", s.execution_count);
    let inference = s.inference_stats.as_ref().unwrap();
    let success = inference.success.unwrap();
    assert_eq!(success.count, 3, "calls answered");
    assert!(success.ns > 0);
    assert_eq!(inference.fail.unwrap_or_default().count, 0);
    assert_eq!(inference.queue.unwrap().count, 3, "calls queued");
    assert_eq!(inference.compute_infer.unwrap().count, 3);
    let per_size: u64 = s
        .batch_stats
        .iter()
        .map(|b| b.batch_size * b.compute_infer.unwrap().count)
        .sum();
    assert_eq!(per_size, 7, "the batches hold the 7 images: {:?}", s.batch_stats);
    assert!(s.last_inference > 1_700_000_000_000, "milliseconds since the epoch");

    let (status, _, body) = http(server.addr, "GET", "/v2/models/cnn/stats", &[], b"").await;
    let rest: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(rest["model_stats"][0]["inference_count"], 7);
    assert_eq!(rest["model_stats"][0]["inference_stats"]["success"]["count"], 3);
    let (status, _, body) = http(server.addr, "GET", "/v2/models/stats", &[], b"").await;
    let all: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    let models: Vec<&str> = all["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(models.contains(&"cnn") && models.contains(&"dense"), "{models:?}");
    let (status, _, body) = http(server.addr, "GET", "/v2/models/shoes/stats", &[], b"").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
}

/// Issue #40: a REST body over the message limit is a 413 with a JSON error that says which limit and what to
/// send instead (it was a 400 telling a caller of one 17 MiB image to "send fewer images per call").
#[tokio::test]
async fn a_rest_body_over_the_limit_is_a_413_naming_the_limit() {
    let server = TestServer::start(config()).await;
    let big = vec![b' '; (16 << 20) + 1];
    let (status, _, body) = http(
        server.addr,
        "POST",
        "/v2/models/cnn/infer",
        &[("content-type", "application/json".into())],
        &big,
    )
    .await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let body: Value = serde_json::from_slice(&body).unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("--max-message-bytes") && error.contains("smaller images"),
        "{error}"
    );
}
