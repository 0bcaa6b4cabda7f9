//! The out-of-distribution score of one image, computed as training/ood_protocol.py fitted it: from the
//! model's `logits` and, for the feature-space scores, its penultimate `features`. Higher means less like the
//! training data. The detector's parameters come from the model's `ood.json`, checked once when the model
//! loads; what the score is compared against, and what follows, is `verdict`'s job.

use serde::Deserialize;

use crate::model::CLASSES;

/// `ood.json` as training/ood_protocol.py writes it (fields the server uses).
#[derive(Debug, Deserialize)]
struct OodFile {
    method: String,
    /// Absent in files older than the round-2 protocol: the method's own name is then its one component.
    #[serde(default)]
    components: Option<Vec<String>>,
    #[serde(default)]
    fusion: Option<FusionFile>,
    #[serde(default)]
    mahalanobis: Option<MahalanobisFile>,
    #[serde(default)]
    knn: Option<KnnFile>,
}

#[derive(Debug, Deserialize)]
struct FusionFile {
    mean: Vec<f32>,
    std: Vec<f32>,
    weights: Vec<f32>,
}

#[derive(Debug, Deserialize)]
struct MahalanobisFile {
    whiten: Vec<Vec<f32>>,
    whitened_means: Vec<Vec<f32>>,
}

#[derive(Debug, Deserialize)]
struct KnnFile {
    k: usize,
    bank: Vec<Vec<f32>>,
}

/// One single score.
#[derive(Debug, Clone)]
enum Component {
    /// −max softmax probability (the raw softmax, not the calibrated one: it was fitted that way).
    Msp,
    /// −logsumexp(logits).
    Energy,
    /// Distance of the whitened features to the nearest whitened class mean (tied covariance).
    Mahalanobis { whiten: Vec<f32>, means: Vec<f32> },
    /// 1 − cosine similarity of the L2-normalised features to their k-th nearest row of a bank of normalised
    /// training features.
    Knn { k: usize, bank: Vec<f32> },
}

/// A fitted detector: one component, or a fusion of several (a weighted sum of their standardised scores).
#[derive(Debug, Clone)]
pub struct Detector {
    method: String,
    components: Vec<Component>,
    /// Per component: (mean, std, weight); empty for a single component.
    fusion: Vec<(f32, f32, f32)>,
    /// Length of the `features` output the detector reads; 0 when it reads only the logits.
    features: usize,
}

impl Default for Detector {
    /// Energy: what a model without a fitted detector is scored by.
    fn default() -> Self {
        Detector {
            method: "energy".into(),
            components: vec![Component::Energy],
            fusion: Vec::new(),
            features: 0,
        }
    }
}

impl Detector {
    /// Parses and checks an `ood.json`: every component known, every matrix of one consistent feature width.
    pub fn from_json(text: &str) -> Result<Detector, String> {
        let file: OodFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let names = file.components.clone().unwrap_or_else(|| vec![file.method.clone()]);
        if names.is_empty() {
            return Err("no OOD score components".into());
        }
        let mut features = 0;
        let mut width = |w: usize, what: &str| -> Result<(), String> {
            if w == 0 || (features != 0 && w != features) {
                return Err(format!("{what} is {w} features wide, other parameters {features}"));
            }
            features = w;
            Ok(())
        };
        let mut components = Vec::with_capacity(names.len());
        for name in &names {
            components.push(match name.as_str() {
                "msp" => Component::Msp,
                "energy" => Component::Energy,
                "mahalanobis" => {
                    let m = file.mahalanobis.as_ref().ok_or("mahalanobis parameters missing")?;
                    let f = m.whiten.len();
                    width(f, "mahalanobis.whiten")?;
                    if m.whiten.iter().any(|r| r.len() != f) || m.whitened_means.len() != CLASSES {
                        return Err(format!("mahalanobis parameters are not {f}x{f} and {CLASSES}x{f}"));
                    }
                    if m.whitened_means.iter().any(|r| r.len() != f) {
                        return Err(format!("mahalanobis.whitened_means rows are not {f} wide"));
                    }
                    Component::Mahalanobis {
                        whiten: m.whiten.concat(),
                        means: m.whitened_means.concat(),
                    }
                }
                "knn" => {
                    let knn = file.knn.as_ref().ok_or("knn parameters missing")?;
                    let f = knn.bank.first().map_or(0, Vec::len);
                    width(f, "knn.bank")?;
                    if knn.bank.iter().any(|r| r.len() != f) || knn.k == 0 || knn.k > knn.bank.len() {
                        return Err(format!(
                            "knn bank of {} rows with k = {} is not usable",
                            knn.bank.len(),
                            knn.k
                        ));
                    }
                    Component::Knn {
                        k: knn.k,
                        bank: knn.bank.concat(),
                    }
                }
                other => return Err(format!("OOD score component {other:?} is not one this server computes")),
            });
        }
        let fusion = match (&file.fusion, components.len()) {
            (None, 1) => Vec::new(),
            (Some(f), n) if f.mean.len() == n && f.std.len() == n && f.weights.len() == n => {
                if f.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err("fusion.std must be positive".into());
                }
                (0..n).map(|i| (f.mean[i], f.std[i], f.weights[i])).collect()
            }
            (_, n) => return Err(format!("{n} components need fusion parameters for {n}")),
        };
        if fusion.iter().any(|&(m, _, w)| !(m.is_finite() && w.is_finite())) {
            return Err("fusion parameters must be finite".into());
        }
        Ok(Detector {
            method: file.method,
            components,
            fusion,
            features,
        })
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    /// Length of the `features` output per image this detector reads; 0 when it needs only the logits.
    pub fn features(&self) -> usize {
        self.features
    }

    /// The score of one image. `features` is that image's `features` output (empty when [`Detector::features`]
    /// is 0); `scratch` is reused between calls so scoring allocates nothing once warm.
    pub fn score(&self, logits: &[f32], features: &[f32], scratch: &mut Vec<f32>) -> f32 {
        let single = |c: &Component, scratch: &mut Vec<f32>| match c {
            Component::Msp => msp(logits),
            Component::Energy => energy(logits),
            Component::Mahalanobis { whiten, means } => mahalanobis(whiten, means, features, scratch),
            Component::Knn { k, bank } => knn(bank, *k, features, scratch),
        };
        if self.fusion.is_empty() {
            return single(&self.components[0], scratch);
        }
        self.components
            .iter()
            .zip(&self.fusion)
            .map(|(c, &(mean, std, weight))| (single(c, scratch) - mean) / std * weight)
            .sum()
    }
}

/// Energy: −logsumexp(logits). In-distribution images have large logits, so a higher score means less like the
/// training data.
pub fn energy(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    -(max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln())
}

fn msp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    -1.0 / logits.iter().map(|l| (l - max).exp()).sum::<f32>()
}

fn mahalanobis(whiten: &[f32], means: &[f32], features: &[f32], z: &mut Vec<f32>) -> f32 {
    let f = features.len();
    z.clear();
    z.extend(whiten.chunks_exact(f).map(|row| dot(row, features)));
    means
        .chunks_exact(f)
        .map(|m| m.iter().zip(z.iter()).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
        .fold(f32::INFINITY, f32::min)
        .sqrt()
}

fn knn(bank: &[f32], k: usize, features: &[f32], sims: &mut Vec<f32>) -> f32 {
    let norm = dot(features, features).sqrt().max(1e-12);
    sims.clear();
    sims.extend(bank.chunks_exact(features.len()).map(|row| dot(row, features) / norm));
    // The k-th largest similarity: select_nth on the descending order, O(bank).
    let (_, kth, _) = sims.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    1.0 - *kth
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators over fixed-size chunks: the compiler vectorises the loop without having to
    // reassociate the sum itself (it may not for floats), and the adds do not wait on one another.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        let (x, y): (&[f32; 8], &[f32; 8]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGITS: [f32; CLASSES] = [2.0, 1.0, 0.0, -1.0, 9.0, 0.5, -2.0, 0.0, 1.5, -0.5];

    #[test]
    fn energy_is_minus_logsumexp() {
        let want = -LOGITS.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((f64::from(energy(&LOGITS)) - want).abs() < 1e-5);
        assert!(energy(&[1e4; CLASSES]).is_finite(), "no overflow on extreme logits");
    }

    #[test]
    fn an_old_energy_file_scores_by_energy_alone() {
        let d = Detector::from_json(r#"{"method": "energy", "threshold": -4.5}"#).unwrap();
        assert_eq!((d.method(), d.features()), ("energy", 0));
        assert_eq!(d.score(&LOGITS, &[], &mut Vec::new()), energy(&LOGITS));
    }

    fn fusion_file() -> String {
        // 2 features: whitening doubles them; class means at (2k, 0); bank of 3 unit vectors.
        let means: Vec<[f32; 2]> = (0..CLASSES).map(|k| [2.0 * k as f32, 0.0]).collect();
        serde_json::json!({
            "method": "energy+mahalanobis+knn", "threshold": 1.0,
            "components": ["energy", "mahalanobis", "knn"],
            "fusion": {"mean": [1.0, 2.0, 0.5], "std": [2.0, 4.0, 0.25], "weights": [1.0, 0.5, 2.0]},
            "mahalanobis": {"whiten": [[2.0, 0.0], [0.0, 2.0]], "whitened_means": means},
            "knn": {"k": 2, "bank": [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]},
        })
        .to_string()
    }

    #[test]
    fn a_fusion_is_the_weighted_sum_of_standardised_component_scores() {
        let d = Detector::from_json(&fusion_file()).unwrap();
        assert_eq!(d.features(), 2);
        let features = [3.0, 4.0]; // whitened (6, 8): nearest mean (6, 0) at distance 8; unit (0.6, 0.8)
        let maha = 8.0;
        let knn = 1.0 - 0.8; // similarities 0.6, 0.8, 1.0: the 2nd largest is 0.8
        let want = (energy(&LOGITS) - 1.0) / 2.0 * 1.0 + (maha - 2.0) / 4.0 * 0.5 + (knn - 0.5) / 0.25 * 2.0;
        let got = d.score(&LOGITS, &features, &mut Vec::new());
        assert!((got - want).abs() < 1e-5, "{got} != {want}");
    }

    #[test]
    fn parameters_the_server_cannot_use_are_refused() {
        let mut v: serde_json::Value = serde_json::from_str(&fusion_file()).unwrap();
        v["knn"]["bank"] = serde_json::json!([[1.0, 0.0, 0.0]]);
        assert!(
            Detector::from_json(&v.to_string())
                .unwrap_err()
                .contains("features wide")
        );
        let mut v: serde_json::Value = serde_json::from_str(&fusion_file()).unwrap();
        v["fusion"]["weights"] = serde_json::json!([1.0]);
        assert!(
            Detector::from_json(&v.to_string())
                .unwrap_err()
                .contains("fusion parameters")
        );
        let mut v: serde_json::Value = serde_json::from_str(&fusion_file()).unwrap();
        v["components"] = serde_json::json!(["energy", "vim"]);
        assert!(Detector::from_json(&v.to_string()).unwrap_err().contains("\"vim\""));
        let mut v: serde_json::Value = serde_json::from_str(&fusion_file()).unwrap();
        v["knn"]["k"] = serde_json::json!(4);
        assert!(Detector::from_json(&v.to_string()).unwrap_err().contains("k = 4"));
    }
}
