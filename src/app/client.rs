//! `fmnist classify`: a command-line client of the Classify RPC, printing a table or JSON.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pb::{self, classifier_client::ClassifierClient};

#[derive(Debug, Clone, Args)]
pub struct ClassifyArgs {
    /// Image files to classify (PNG, JPEG, GIF, BMP, WebP, ...; with --raw, 784-byte raw pixel files).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Server address; several, comma-separated, or dns:///name:port (a headless Service) to spread calls over
    /// every replica.
    #[arg(long, env = "FMNIST_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Model name; default: the server's default model.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Minimum confidence override for this call.
    #[arg(long)]
    pub min_confidence: Option<f32>,
    /// Send the files as raw 28x28 pixels instead of encoded images.
    #[arg(long)]
    pub raw: bool,
    /// Print JSON (one object per file) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
    /// PEM file of the CA that signed the server's certificate: the client speaks TLS to `https://` addresses
    /// and trusts this CA only (it carries no system roots).
    #[arg(long, env = "FMNIST_CLIENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate chain this client presents to a server that asks for one (mutual TLS), with --tls-key.
    #[arg(long, env = "FMNIST_CLIENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FMNIST_CLIENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry; default: the address's host name.
    #[arg(long)]
    pub tls_domain: Option<String>,
}

impl ClassifyArgs {
    /// The TLS settings for `https://` addresses; `None` when no TLS file was given.
    fn tls(&self) -> Result<Option<ClientTlsConfig>, String> {
        let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
        if self.tls_ca.is_none() && self.tls_cert.is_none() {
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        // A dns:/// target resolves to addresses: the certificate is checked against the name that was resolved.
        let resolved_name = self
            .addr
            .strip_prefix("dns:///")
            .and_then(|name| name.rsplit_once(':').map(|(host, _)| host.to_string()));
        if let Some(domain) = self.tls_domain.clone().or(resolved_name) {
            tls = tls.domain_name(domain);
        }
        Ok(Some(tls))
    }
}

/// Runs the client; the error is the one line to print before exiting non-zero.
pub async fn classify(args: ClassifyArgs) -> Result<(), String> {
    let mut images = Vec::with_capacity(args.files.len());
    for file in &args.files {
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let data = if args.raw {
            pb::image::Data::Raw(bytes)
        } else {
            pb::image::Data::Encoded(bytes)
        };
        images.push(pb::Image { data: Some(data) });
    }
    let timeout = Duration::from_secs(args.timeout_s);
    let channel = channel(&args.addr, timeout, args.tls()?).await?;
    let mut client = ClassifierClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    // The server says how many images one call may carry (`--max-images-per-request`): more files than that
    // go in several calls, one after the other.
    let per_call = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .map_err(|s| format!("model info failed: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .limits
        .map_or(0, |l| l.max_images_per_request as usize)
        .max(1);
    let mut response = pb::ClassifyResponse::default();
    let mut images = images.into_iter().peekable();
    while images.peek().is_some() {
        let request = pb::ClassifyRequest {
            images: images.by_ref().take(per_call).collect(),
            model: args.model.clone(),
            min_confidence: args.min_confidence,
            ..Default::default()
        };
        let answer = client
            .classify(request)
            .await
            .map_err(|s| format!("classify failed: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        response.results.extend(answer.results);
        response.model = answer.model;
        response.model_version = answer.model_version;
    }

    if args.json {
        for (file, r) in args.files.iter().zip(&response.results) {
            let p = r.prediction.as_ref();
            let line = serde_json::json!({
                "file": file.display().to_string(),
                "class_id": p.map(|p| p.class_id),
                "class": p.map(|p| p.class_name.clone()),
                "probability": p.map(|p| p.probability),
                "accepted": r.accepted,
                "reason": reason_name(r.reason),
                "detail": r.detail,
                "model": response.model,
                "model_version": response.model_version,
            });
            println!("{line}");
        }
    } else {
        let width = args
            .files
            .iter()
            .map(|f| f.display().to_string().len())
            .max()
            .unwrap_or(4)
            .max(4);
        // The reason column as wide as its longest name, then the server's sentence, as classify.py prints them.
        println!(
            "{:<width$}  {:<12}  {:>11}  {:<8}  {:<26}  DETAIL",
            "FILE", "CLASS", "PROBABILITY", "ACCEPTED", "REASON"
        );
        for (file, r) in args.files.iter().zip(&response.results) {
            let (class, prob) = r.prediction.as_ref().map_or(("-".to_string(), "-".to_string()), |p| {
                (p.class_name.clone(), format!("{:.4}", p.probability))
            });
            println!(
                "{:<width$}  {:<12}  {:>11}  {:<8}  {:<26}  {}",
                file.display(),
                class,
                prob,
                if r.accepted { "yes" } else { "no" },
                reason_name(r.reason),
                r.detail
            );
        }
    }
    Ok(())
}

/// A channel to the server(s) `addr` names: one URL, several (comma-separated), or `dns:///name:port`, whose
/// every address is used. With more than one reachable address, each call goes to the less loaded of two
/// replicas picked at random (tower's power of two choices), so calls spread per call, not per connection.
/// `https://` addresses speak TLS with `tls`, which must then be given: the client trusts no CA by default.
pub async fn channel(addr: &str, timeout: Duration, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let urls = resolve(addr, if tls.is_some() { "https" } else { "http" }).await?;
    let endpoints = urls
        .iter()
        .map(|url| {
            let endpoint = Endpoint::from_shared(url.clone())
                .map(|e| e.connect_timeout(timeout).timeout(timeout))
                .map_err(|e| format!("invalid address {url:?}: {e}"))?;
            match (url.starts_with("https://"), &tls) {
                (true, Some(tls)) => endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| format!("TLS for {url}: {}", error_chain(&e))),
                (true, None) => Err(format!(
                    "{url} is a TLS address: give the CA that signed the server's certificate with --tls-ca"
                )),
                (false, Some(_)) => Err(format!(
                    "--tls-ca/--tls-cert are given but {url} is plaintext: write the address as https://"
                )),
                (false, None) => Ok(endpoint),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Connect to every replica first: the balancer would otherwise also pick one that is down and fail the
    // call. Those that cannot be reached are left out, with a warning, as long as one can.
    let mut reachable = Vec::new();
    let mut last_error = String::new();
    for (endpoint, url) in endpoints.iter().zip(&urls) {
        match endpoint.connect().await {
            Ok(channel) => reachable.push((endpoint.clone(), channel)),
            Err(e) => {
                last_error = error_chain(&e);
                if urls.len() > 1 {
                    eprintln!("warning: skipping {url}: {last_error}");
                }
            }
        }
    }
    match reachable.len() {
        0 => Err(format!("cannot reach the server at {addr}: {last_error}")),
        1 => Ok(reachable.pop().expect("one").1),
        _ => Ok(Channel::balance_list(reachable.into_iter().map(|(e, _)| e))),
    }
}

/// The URLs behind `addr`: a `dns:///name:port` target becomes one URL per address the name has now.
async fn resolve(addr: &str, dns_scheme: &str) -> Result<Vec<String>, String> {
    let with_scheme = |a: &str| {
        if a.contains("://") {
            a.to_string()
        } else {
            format!("http://{a}")
        }
    };
    if let Some(name) = addr.strip_prefix("dns:///") {
        let addrs = tokio::net::lookup_host(name)
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?;
        let mut urls: Vec<String> = addrs.map(|a| format!("{dns_scheme}://{a}")).collect();
        urls.dedup();
        if urls.is_empty() {
            return Err(format!("{name} has no address"));
        }
        return Ok(urls);
    }
    let urls: Vec<String> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(with_scheme)
        .collect();
    if urls.is_empty() {
        return Err("no server address given".into());
    }
    Ok(urls)
}

/// "transport error: connection refused": the top error alone rarely says what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn reason_name(reason: i32) -> String {
    pb::Reason::try_from(reason).map_or_else(|_| format!("UNKNOWN({reason})"), |r| r.as_str_name().to_string())
}
