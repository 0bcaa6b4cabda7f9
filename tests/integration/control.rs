//! Who may change what the server serves, and health that tells the truth about it:
//! - with the defaults, anonymous load and unload are refused over gRPC and REST (PERMISSION_DENIED / 403,
//!   naming the flag), and the default model keeps serving;
//! - with model control on, only the operator's key passes; refusals are counted and logged with the peer, and
//!   the key never shows;
//! - once an authorised, forced unload takes the default model away, health is NOT_SERVING, readiness 503 and
//!   calls that name no model UNAVAILABLE, until a version is loaded again.

use crate::{common, oip::http};

use std::{net::SocketAddr, time::Duration};

use common::{CONTROL_KEY, TestServer, authorized, config, fixture, metric, raw, request, with_model_control};
use fmnist_serve::inference_pb::{
    ModelRepositoryParameter, RepositoryModelLoadRequest, RepositoryModelUnloadRequest,
    grpc_inference_service_client::GrpcInferenceServiceClient, model_repository_parameter::ParameterChoice,
};
use serde_json::Value;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

fn unload_request(model: &str, force: bool) -> RepositoryModelUnloadRequest {
    let mut request = RepositoryModelUnloadRequest {
        model_name: model.into(),
        ..Default::default()
    };
    if force {
        request.parameters.insert(
            "force".into(),
            ModelRepositoryParameter {
                parameter_choice: Some(ParameterChoice::BoolParam(true)),
            },
        );
    }
    request
}

fn load_request(model: &str) -> RepositoryModelLoadRequest {
    RepositoryModelLoadRequest {
        model_name: model.into(),
        ..Default::default()
    }
}

/// A REST repository call: its status and JSON body.
async fn rest_control(addr: SocketAddr, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(key) = key {
        headers.push(("authorization", format!("Bearer {key}")));
    }
    let (status, _, body) = http(addr, "POST", path, &headers, body.as_bytes()).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn refusals(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!("fmnist_model_control_refusals_total{{reason=\"{reason}\"}}"),
    )
}

async fn get_status(addr: SocketAddr, path: &str) -> u16 {
    http(addr, "GET", path, &[], b"").await.0
}

async fn health(channel: &Channel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

/// Health follows the registry on its own task: waits (up to 5 s) for `service` to report `status`.
async fn wait_health(channel: &Channel, service: &str, status: ServingStatus) {
    for _ in 0..100 {
        if health(channel, service).await == status as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("health of {service:?} never became {status:?}");
}

/// One call naming no model: its gRPC code.
async fn unnamed_call(server: &mut TestServer) -> Code {
    let (pixels, _) = fixture()[0];
    match server.client.classify(request(vec![raw(&pixels)])).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn by_default_anonymous_load_and_unload_are_refused_and_the_default_model_keeps_serving() {
    let mut server = TestServer::start(config()).await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel.clone());
    // The recorder is the test process's: count from here.
    let before = refusals(&server.metrics().await, "disabled");

    for model in ["cnn", "dense"] {
        let refused = oip
            .repository_model_unload(unload_request(model, true))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("--model-control explicit"),
            "{}",
            refused.message()
        );
        let refused = oip.repository_model_load(load_request(model)).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        // A credential changes nothing while model control is off.
        let refused = oip
            .repository_model_unload(authorized(unload_request(model, true)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

        for action in ["unload", "load"] {
            let path = format!("/v2/repository/models/{model}/{action}");
            let (status, body) = rest_control(server.addr, &path, None, r#"{"parameters":{"force":true}}"#).await;
            assert_eq!(status, 403, "{path}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains("--model-control explicit"),
                "{body}"
            );
            let (status, _) = rest_control(server.addr, &path, Some(CONTROL_KEY), "").await;
            assert_eq!(status, 403, "{path} with a key");
        }
    }

    assert_eq!(
        unnamed_call(&mut server).await,
        Code::Ok,
        "the default model still serves"
    );
    assert_eq!(health(&server.channel, "").await, ServingStatus::Serving as i32);
    assert_eq!(get_status(server.addr, "/v2/health/ready").await, 200);
    // The read-only index stays open.
    assert_eq!(rest_control(server.addr, "/v2/repository/index", None, "").await.0, 200);
    assert_eq!(
        refusals(&server.metrics().await, "disabled") - before,
        14.0,
        "every refusal counted"
    );
}

#[tokio::test]
async fn with_model_control_on_only_the_operators_key_passes() {
    let mut server = TestServer::start(with_model_control(config())).await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel.clone());
    let before = server.metrics().await;

    let missing = oip
        .repository_model_unload(unload_request("dense", false))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    let mut wrong = tonic::Request::new(unload_request("dense", false));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer test-control-key-0123456788".parse().unwrap());
    let wrong = oip.repository_model_unload(wrong).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let path = "/v2/repository/models/dense/unload";
    assert_eq!(rest_control(server.addr, path, None, "").await.0, 401);
    assert_eq!(
        rest_control(server.addr, path, Some("not-the-key-0123456789"), "")
            .await
            .0,
        401
    );
    let dense_ready = "/v2/models/dense/ready";
    assert_eq!(
        get_status(server.addr, dense_ready).await,
        200,
        "refused calls changed nothing"
    );

    // The right key, over gRPC then REST.
    oip.repository_model_unload(authorized(unload_request("dense", false)))
        .await
        .expect("the key unloads a model that is not the default");
    assert_eq!(get_status(server.addr, dense_ready).await, 503);
    let (status, body) = rest_control(server.addr, "/v2/repository/models/dense/load", Some(CONTROL_KEY), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_status(server.addr, dense_ready).await, 200);

    let after = server.metrics().await;
    for (reason, count) in [("missing_key", 2.0), ("wrong_key", 2.0), ("disabled", 0.0)] {
        assert_eq!(refusals(&after, reason) - refusals(&before, reason), count, "{reason}");
    }
    assert_eq!(unnamed_call(&mut server).await, Code::Ok);
}

#[tokio::test]
async fn a_refusal_is_logged_with_the_peer_and_the_key_never_is() {
    let dir = std::env::temp_dir().join(format!("fmnist-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, format!("{CONTROL_KEY}\n")).unwrap();
    let mut server = common::spawn_binary(&[
        "--model-control",
        "explicit",
        "--model-control-key-file",
        key_file.to_str().unwrap(),
    ]);
    let addr: SocketAddr = server.addr.parse().unwrap();
    let wrong_key = "a-wrong-key-that-must-not-be-logged";
    let path = "/v2/repository/models/dense/unload";
    assert_eq!(rest_control(addr, path, Some(wrong_key), "").await.0, 401);
    assert_eq!(rest_control(addr, path, Some(CONTROL_KEY), "").await.0, 200);
    assert_eq!(refusals(&server.metrics().await, "wrong_key"), 1.0, "its own process");
    let _ = server.child.kill();
    let (_, log) = server.wait();
    let refusal = log
        .lines()
        .find(|l| l.contains("model control call refused"))
        .unwrap_or_else(|| panic!("a refusal in the log:\n{log}"));
    assert!(refusal.contains("peer=127.0.0.1:"), "{refusal}");
    assert!(
        refusal.contains("reason=\"wrong_key\"") || refusal.contains("reason=wrong_key"),
        "{refusal}"
    );
    assert!(log.contains("model control call authorized"), "{log}");
    assert!(!log.contains(CONTROL_KEY), "the key is in the log");
    assert!(!log.contains(wrong_key), "a presented key is in the log");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn without_its_default_model_the_server_says_not_serving_until_it_is_loaded_again() {
    let mut server = TestServer::start(with_model_control(config())).await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel.clone());
    let channel = server.channel.clone();
    wait_health(&channel, "cnn", ServingStatus::Serving).await;

    // The default model's last version goes only when the operator insists.
    let refused = oip
        .repository_model_unload(authorized(unload_request("cnn", false)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("force=true"), "{}", refused.message());
    let (status, _) = rest_control(server.addr, "/v2/repository/models/cnn/unload", Some(CONTROL_KEY), "{}").await;
    assert_eq!(status, 409);
    assert_eq!(
        unnamed_call(&mut server).await,
        Code::Ok,
        "refused unloads changed nothing"
    );

    oip.repository_model_unload(authorized(unload_request("cnn", true)))
        .await
        .expect("a forced unload of the default model");
    for service in [
        "",
        "fashion_mnist.v1.Classifier",
        "inference.GRPCInferenceService",
        "cnn",
    ] {
        wait_health(&channel, service, ServingStatus::NotServing).await;
    }
    assert_eq!(health(&channel, "dense").await, ServingStatus::Serving as i32);
    assert_eq!(get_status(server.addr, "/v2/health/ready").await, 503);
    assert_eq!(get_status(server.addr, "/v2/models/cnn/ready").await, 503);
    assert_eq!(get_status(server.addr, "/v2/models/dense/ready").await, 200);
    assert_eq!(
        get_status(server.addr, "/v2/health/live").await,
        200,
        "alive: only not ready"
    );
    let unnamed = server
        .client
        .classify(request(vec![raw(&fixture()[0].0)]))
        .await
        .unwrap_err();
    assert_eq!(unnamed.code(), Code::Unavailable, "{unnamed:?}");
    assert!(
        unnamed.message().contains("default model cnn has no ready version"),
        "{}",
        unnamed.message()
    );
    let mut named = request(vec![raw(&fixture()[0].0)]);
    named.model = "dense".into();
    server.client.classify(named).await.expect("other models keep serving");

    oip.repository_model_load(authorized(load_request("cnn")))
        .await
        .expect("the operator loads it again");
    for service in [
        "",
        "fashion_mnist.v1.Classifier",
        "inference.GRPCInferenceService",
        "cnn",
    ] {
        wait_health(&channel, service, ServingStatus::Serving).await;
    }
    assert_eq!(get_status(server.addr, "/v2/health/ready").await, 200);
    assert_eq!(get_status(server.addr, "/v2/models/cnn/ready").await, 200);
    assert_eq!(unnamed_call(&mut server).await, Code::Ok);
}

/// GET a captures route, with the control key or without: status and JSON body.
async fn captures(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, Value) {
    let headers: Vec<(&str, String)> = key
        .map(|key| vec![("authorization", format!("Bearer {key}"))])
        .unwrap_or_default();
    let (status, _, body) = http(addr, "GET", path, &headers, b"").await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Issue #38: captured images are users' inputs. The operator holding the control key sees the newest ones
/// (the 28x28 input, verdict, scores and version, as the capture wrote them); nobody else does, and a server
/// without the capture says how to turn it on.
#[tokio::test]
async fn captured_images_are_shown_to_the_control_key_only() {
    use base64::Engine;
    let dir = std::env::temp_dir().join(format!("fmnist-captures-view-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = with_model_control(config());
    config.capture_dir = Some(dir.clone());
    config.capture_sample = 1.0;
    let mut server = TestServer::start(config).await;
    // Two animal photos the model rejects as out of distribution: both are captured.
    let photos = ["horse-crop1.png", "cat-crop7.png"]
        .map(|name| common::encoded(std::fs::read(common::repo().join("tests/fixtures/ood").join(name)).unwrap()));
    let served = server
        .client
        .classify(request(photos.to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert!(served.results.iter().all(|r| !r.accepted));

    let path = "/v2/models/cnn/captures?limit=10";
    let (status, body) = captures(server.addr, path, None).await;
    assert_eq!(status, 401, "without the key: {body}");
    let (status, _) = captures(server.addr, path, Some("not-the-key")).await;
    assert_eq!(status, 401, "with a wrong key");
    let mut shown = Vec::new();
    for _ in 0..50 {
        let (status, body) = captures(server.addr, path, Some(CONTROL_KEY)).await;
        assert_eq!(status, 200, "{body}");
        shown = body["captures"].as_array().cloned().unwrap_or_default();
        if shown.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(shown.len(), 2, "the two rejected photos: {shown:?}");
    for record in &shown {
        assert_eq!(record["model"], "cnn");
        assert_eq!(record["reason"], "out_of_distribution");
        let pixels = base64::engine::general_purpose::STANDARD
            .decode(record["pixels"].as_str().unwrap())
            .unwrap();
        assert_eq!(pixels.len(), 784, "the 28x28 input the model saw");
    }
    assert!(
        shown[0]["time_ms"].as_u64() >= shown[1]["time_ms"].as_u64(),
        "newest first"
    );
    let (status, body) = captures(server.addr, "/v2/models/cnn/captures?limit=0", Some(CONTROL_KEY)).await;
    assert_eq!(status, 400, "{body}");
    // An unknown model is the caller's mistake, as for every model route (400, naming the loaded models).
    let (status, body) = captures(server.addr, "/v2/models/no-such-model/captures", Some(CONTROL_KEY)).await;
    assert_eq!(status, 400, "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without `--capture-dir` there is nothing to show, and the answer says how to turn the capture on.
#[tokio::test]
async fn the_captures_route_says_when_the_capture_is_off() {
    let server = TestServer::start(with_model_control(config())).await;
    let (status, body) = captures(server.addr, "/v2/models/cnn/captures", Some(CONTROL_KEY)).await;
    assert_eq!(status, 409, "the server's state refuses it: {body}");
    assert!(body["error"].as_str().unwrap().contains("--capture-dir"), "{body}");
}
