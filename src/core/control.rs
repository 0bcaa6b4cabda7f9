//! Who may change what the server serves: the model repository's load and unload calls (the Open Inference
//! Protocol's `RepositoryModelLoad`/`RepositoryModelUnload` over gRPC, `POST /v2/repository/models/{name}/load`
//! and `.../unload` over REST). As Triton's `--model-control-mode none`, they are refused unless the operator
//! turns them on; once on, a caller must present the operator's key as `authorization: Bearer <key>`.
//!
//! What stays open, and why: the repository index is read-only; the file-system poll and SIGHUP are driven by
//! whoever can write the model directory or signal the process, who is already trusted.
//!
//! The key is kept only as its SHA-256 digest and compared in constant time (the digests, so the key's length
//! does not leak either); it never reaches a log line, a metric or an error message.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    error::{ErrorKind, ServiceError},
    telemetry::metric,
};

/// The shortest key accepted: a guessable key would turn the gate into a formality.
pub const MIN_KEY_BYTES: usize = 16;

/// The flag that turns the control calls on, named in every refusal.
pub const ENABLE_FLAG: &str = "--model-control explicit";

/// The operator's key, as its digest.
#[derive(Clone)]
pub struct ControlKey([u8; 32]);

impl ControlKey {
    /// The key from its text (a file's content or an environment variable): surrounding whitespace, such as
    /// a file's final newline, is not part of it.
    pub fn new(text: &str) -> Result<Self, String> {
        let key = text.trim();
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the model control key is {} bytes; it must be at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
                key.len()
            ));
        }
        Ok(ControlKey(Sha256::digest(key.as_bytes()).into()))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.0.ct_eq(&digest).into()
    }
}

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlKey(<redacted>)")
    }
}

/// Whether the control calls are served, and the key that gates them.
#[derive(Debug, Clone, Default)]
pub struct ControlSettings {
    /// `None`: every control call is refused.
    pub key: Option<ControlKey>,
}

/// Why a control call was refused, as the metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Disabled,
    MissingKey,
    WrongKey,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Disabled => "disabled",
            Refusal::MissingKey => "missing_key",
            Refusal::WrongKey => "wrong_key",
        }
    }
}

/// One control call as the gate sees it: what the caller asks, who it is, and what it presented.
#[derive(Debug, Clone, Copy)]
pub struct ControlCall<'a> {
    /// `load`, `unload`, or `captures` (reading the captured images).
    pub action: &'static str,
    pub model: &'a str,
    pub peer: Option<SocketAddr>,
    /// The `authorization` header's value, as sent.
    pub authorization: Option<&'a [u8]>,
}

/// The gate in front of the control calls; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ModelControl {
    settings: std::sync::Arc<ControlSettings>,
}

impl ModelControl {
    pub fn new(settings: ControlSettings) -> Self {
        ModelControl {
            settings: std::sync::Arc::new(settings),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.key.is_some()
    }

    /// Lets the call through, or refuses it: `PermissionDenied` while the control calls are off,
    /// `Unauthenticated` without the right key. Refusals are counted and logged with the peer's address.
    pub fn authorize(&self, call: ControlCall<'_>) -> Result<(), ServiceError> {
        let refusal = match &self.settings.key {
            None => Some(Refusal::Disabled),
            Some(key) => match call.authorization.and_then(bearer) {
                None => Some(Refusal::MissingKey),
                Some(presented) if !key.matches(presented) => Some(Refusal::WrongKey),
                Some(_) => None,
            },
        };
        let model = crate::error::clip(call.model);
        let peer = call.peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        let Some(refusal) = refusal else {
            tracing::info!(action = call.action, model = %model, peer = %peer, "model control call authorized");
            return Ok(());
        };
        metrics::counter!(metric::CONTROL_REFUSALS, "reason" => refusal.label()).increment(1);
        tracing::warn!(action = call.action, model = %model, peer = %peer, reason = refusal.label(), "model control call refused");
        Err(match refusal {
            Refusal::Disabled => ServiceError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "model control is disabled on this server: start it with {ENABLE_FLAG} and a key \
                     (--model-control-key-file or FMNIST_MODEL_CONTROL_KEY) to allow load and unload calls"
                ),
            ),
            Refusal::MissingKey => ServiceError::new(
                ErrorKind::Unauthenticated,
                "model control calls need the operator's key: send `authorization: Bearer <key>`",
            ),
            Refusal::WrongKey => ServiceError::new(ErrorKind::Unauthenticated, "the model control key is not valid"),
        })
    }
}

/// The token of an `authorization: Bearer <token>` value (the scheme is case-insensitive, RFC 6750).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123";

    fn call(authorization: Option<&str>) -> ControlCall<'_> {
        ControlCall {
            action: "unload",
            model: "cnn",
            peer: None,
            authorization: authorization.map(str::as_bytes),
        }
    }

    fn kind(control: &ModelControl, authorization: Option<&str>) -> Option<ErrorKind> {
        control.authorize(call(authorization)).err().map(|e| e.kind)
    }

    #[test]
    fn control_calls_are_refused_by_default_naming_the_flag() {
        let control = ModelControl::default();
        let refusal = control.authorize(call(Some(&format!("Bearer {KEY}")))).unwrap_err();
        assert_eq!(refusal.kind, ErrorKind::PermissionDenied);
        assert!(refusal.message.contains(ENABLE_FLAG), "{}", refusal.message);
    }

    #[test]
    fn only_the_right_bearer_key_passes() {
        let control = ModelControl::new(ControlSettings {
            key: Some(ControlKey::new(&format!("{KEY}\n")).unwrap()),
        });
        assert_eq!(kind(&control, None), Some(ErrorKind::Unauthenticated));
        assert_eq!(kind(&control, Some(KEY)), Some(ErrorKind::Unauthenticated), "no scheme");
        assert_eq!(kind(&control, Some("Bearer ")), Some(ErrorKind::Unauthenticated));
        assert_eq!(
            kind(&control, Some("Bearer 0123456789abcdef012")),
            Some(ErrorKind::Unauthenticated),
            "a prefix of the key"
        );
        assert_eq!(
            kind(&control, Some(&format!("Bearer {KEY}x"))),
            Some(ErrorKind::Unauthenticated)
        );
        assert_eq!(kind(&control, Some(&format!("Bearer {KEY}"))), None);
        assert_eq!(kind(&control, Some(&format!("bearer {KEY}"))), None);
    }

    #[test]
    fn short_keys_are_refused_and_the_key_never_prints() {
        assert!(ControlKey::new("short\n").unwrap_err().contains("at least 16"));
        let key = ControlKey::new(KEY).unwrap();
        let shown = format!("{:?}", ControlSettings { key: Some(key) });
        assert!(!shown.contains(KEY), "{shown}");
    }
}
