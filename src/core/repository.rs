//! The model repository on disk, as Triton lays one out: `<dir>/<model>/<version>/model.onnx` with its
//! `model.json` beside it, versions being positive integers, and an optional `<dir>/<model>/config.json` that
//! sets the version policy and labels. This module only reads the layout and says which versions should
//! serve; loading them is the registry's job (`registry`).
//!
//! ```json
//! {"version_policy": {"latest": {"num_versions": 2}}, "labels": {"stable": 3, "canary": 4}}
//! ```
//! `version_policy` is `{"latest": {"num_versions": N}}` (default N = 1), `{"all": {}}` or
//! `{"specific": {"versions": [1, 3]}}`, as in Triton's model configuration.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::Deserialize;

/// The metadata file of a version, written by the export step.
pub const METADATA_FILE: &str = "model.json";
/// A model's own settings, beside its versions.
pub const CONFIG_FILE: &str = "config.json";

/// Which versions of a model serve.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPolicy {
    Latest { num_versions: usize },
    All {},
    Specific { versions: Vec<u64> },
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest { num_versions: 1 }
    }
}

impl VersionPolicy {
    /// The versions to serve, of those on disk.
    pub fn select(&self, available: &BTreeSet<u64>) -> BTreeSet<u64> {
        match self {
            VersionPolicy::Latest { num_versions } => available.iter().rev().take(*num_versions).copied().collect(),
            VersionPolicy::All {} => available.clone(),
            VersionPolicy::Specific { versions } => {
                versions.iter().filter(|v| available.contains(v)).copied().collect()
            }
        }
    }
}

/// `<dir>/<model>/config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Names a request may use instead of a version number, e.g. `stable` → 3.
    #[serde(default)]
    pub labels: BTreeMap<String, u64>,
}

/// One version directory on disk, with what identifies its contents: a version whose files change is loaded
/// again; one that failed is not retried until they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionDir {
    pub path: PathBuf,
    pub fingerprint: Fingerprint,
}

/// Sizes and modification times of a version's files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(String, u64, Option<SystemTime>)>);

/// One model as found on disk.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub config: ModelConfig,
    /// A config.json that cannot be read: the model keeps its current versions and says why.
    pub config_error: Option<String>,
    pub versions: BTreeMap<u64, VersionDir>,
}

impl ModelDir {
    /// The versions the policy selects from those on disk.
    pub fn wanted(&self) -> BTreeSet<u64> {
        let available = self.versions.keys().copied().collect();
        self.config.version_policy.select(&available)
    }
}

/// Reads `<dir>/<name>/`: its config and its version directories. Entries that are not positive integers
/// are not versions and are skipped; a model directory that does not exist has no versions.
pub fn scan(dir: &Path, name: &str) -> ModelDir {
    let root = dir.join(name);
    let (config, config_error) = match std::fs::read_to_string(root.join(CONFIG_FILE)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ModelConfig::default(), None),
        Err(e) => (
            ModelConfig::default(),
            Some(format!("{}: {e}", root.join(CONFIG_FILE).display())),
        ),
        Ok(text) => match serde_json::from_str(&text) {
            Ok(config) => (config, None),
            Err(e) => (
                ModelConfig::default(),
                Some(format!("{}: {e}", root.join(CONFIG_FILE).display())),
            ),
        },
    };
    let mut versions = BTreeMap::new();
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let Some(version) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&v| v > 0)
        else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() {
            let fingerprint = fingerprint(&path);
            versions.insert(version, VersionDir { path, fingerprint });
        }
    }
    ModelDir {
        config,
        config_error,
        versions,
    }
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut files: Vec<(String, u64, Option<SystemTime>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            // Follow links: a version may be a folder of links into a shared store.
            let meta = std::fs::metadata(e.path()).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    files.sort();
    Fingerprint(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn policies_select_versions_like_tritons() {
        let on_disk = set(&[1, 2, 5, 9]);
        assert_eq!(VersionPolicy::default().select(&on_disk), set(&[9]));
        assert_eq!(VersionPolicy::Latest { num_versions: 2 }.select(&on_disk), set(&[5, 9]));
        assert_eq!(VersionPolicy::All {}.select(&on_disk), on_disk);
        let specific = VersionPolicy::Specific { versions: vec![2, 3] };
        assert_eq!(specific.select(&on_disk), set(&[2]), "only versions on disk");
    }

    #[test]
    fn configs_read_as_triton_writes_them_and_typos_fail() {
        let config: ModelConfig = serde_json::from_str(
            r#"{"version_policy": {"latest": {"num_versions": 2}}, "labels": {"stable": 3, "canary": 4}}"#,
        )
        .unwrap();
        assert_eq!(config.version_policy, VersionPolicy::Latest { num_versions: 2 });
        assert_eq!(config.labels["canary"], 4);
        let specific: ModelConfig =
            serde_json::from_str(r#"{"version_policy": {"specific": {"versions": [1, 3]}}}"#).unwrap();
        assert_eq!(
            specific.version_policy,
            VersionPolicy::Specific { versions: vec![1, 3] }
        );
        assert!(serde_json::from_str::<ModelConfig>(r#"{"version_polcy": {"all": {}}}"#).is_err());
    }

    #[test]
    fn only_positive_integer_directories_are_versions() {
        let dir = std::env::temp_dir().join(format!("fmnist-repo-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["cnn/1", "cnn/12", "cnn/0", "cnn/draft", "cnn/-3"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("cnn/7"), b"a file, not a version").unwrap();
        std::fs::write(dir.join("cnn/config.json"), br#"{"labels": {"stable": 1}}"#).unwrap();
        let model = scan(&dir, "cnn");
        assert_eq!(model.versions.keys().copied().collect::<Vec<_>>(), [1, 12]);
        assert_eq!(model.wanted(), set(&[12]));
        assert_eq!(model.config.labels["stable"], 1);
        assert!(scan(&dir, "absent").versions.is_empty());
        std::fs::write(dir.join("cnn/config.json"), b"{not json").unwrap();
        assert!(scan(&dir, "cnn").config_error.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
