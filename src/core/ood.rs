//! The out-of-distribution score of one image, computed as training/ood_protocol.py fitted it: from the
//! model's `logits` and, for the feature-space scores (Mahalanobis, kNN on the penultimate features), from the
//! graph's `ood_components` output, which the protocol appends to the ONNX graph so that ONNX Runtime computes
//! them for a whole batch in one matrix product. Higher means less like the training data. The detector's
//! parameters come from the model's `ood.json`, checked once when the model loads; what the score is compared
//! against, and what follows, is `verdict`'s job.

use serde::Deserialize;

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
    graph_output: Option<GraphOutputFile>,
    /// What the method is, in a sentence, and the protocol that fixed it (training/ood_head.py writes both).
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FusionFile {
    mean: Vec<f32>,
    std: Vec<f32>,
    weights: Vec<f32>,
}

/// The graph output that carries the feature-space components, `[batch, components.len()]`, in this order.
#[derive(Debug, Deserialize)]
struct GraphOutputFile {
    name: String,
    components: Vec<String>,
}

/// One single score.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Component {
    /// −max softmax probability (the raw softmax, not the calibrated one: it was fitted that way).
    Msp,
    /// −logsumexp(logits).
    Energy,
    /// Column `i` of the graph's components output (Mahalanobis distance to the nearest class mean with a tied
    /// covariance, or 1 − the k-th nearest cosine similarity to a bank of training features).
    Graph(usize),
}

/// A fitted detector: one component, or a fusion of several (a weighted sum of their standardised scores).
#[derive(Debug, Clone)]
pub struct Detector {
    method: String,
    components: Vec<Component>,
    /// Per component: (mean, std, weight); empty for a single component.
    fusion: Vec<(f32, f32, f32)>,
    /// The graph output the detector reads, and its width; `None` when it reads only the logits.
    graph_output: Option<(String, usize)>,
    /// What `ood.json` says the method is, and the protocol that fixed its threshold.
    description: Option<String>,
    protocol: Option<String>,
}

impl Default for Detector {
    /// Energy: what a model without a fitted detector is scored by.
    fn default() -> Self {
        Detector {
            method: "energy".into(),
            components: vec![Component::Energy],
            fusion: Vec::new(),
            graph_output: None,
            description: None,
            protocol: None,
        }
    }
}

impl Detector {
    /// Parses and checks an `ood.json`: every component known and, for the graph's, found in its output.
    pub fn from_json(text: &str) -> Result<Detector, String> {
        let file: OodFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let names = file.components.clone().unwrap_or_else(|| vec![file.method.clone()]);
        if names.is_empty() {
            return Err("no OOD score components".into());
        }
        let in_graph = file.graph_output.as_ref().map_or(&[][..], |g| &g.components[..]);
        let components = names
            .iter()
            .map(|name| match name.as_str() {
                "msp" => Ok(Component::Msp),
                "energy" => Ok(Component::Energy),
                other => in_graph.iter().position(|c| c == other).map(Component::Graph).ok_or_else(|| {
                    format!("OOD score component {other:?} is neither computed here (msp, energy) nor in the graph's output")
                }),
            })
            .collect::<Result<Vec<_>, String>>()?;
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
            graph_output: file
                .graph_output
                .filter(|g| !g.components.is_empty())
                .map(|g| (g.name, g.components.len())),
            description: file.description,
            protocol: file.protocol,
        })
    }

    /// What the model's `ood.json` says the method is, when it says.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The protocol that fixed the method and its threshold, when `ood.json` names it.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    /// The graph output this detector reads besides the logits, and its width per image.
    pub fn graph_output(&self) -> Option<(&str, usize)> {
        self.graph_output.as_ref().map(|(name, n)| (name.as_str(), *n))
    }

    /// The score of one image from its logits and its row of the graph output (empty when
    /// [`Detector::graph_output`] is `None`).
    pub fn score(&self, logits: &[f32], graph: &[f32]) -> f32 {
        let single = |c: Component| match c {
            Component::Msp => msp(logits),
            Component::Energy => energy(logits),
            Component::Graph(i) => graph[i],
        };
        if self.fusion.is_empty() {
            return single(self.components[0]);
        }
        self.components
            .iter()
            .zip(&self.fusion)
            .map(|(&c, &(mean, std, weight))| (single(c) - mean) / std * weight)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::CLASSES;

    const LOGITS: [f32; CLASSES] = [2.0, 1.0, 0.0, -1.0, 9.0, 0.5, -2.0, 0.0, 1.5, -0.5];

    #[test]
    fn a_detector_says_what_its_ood_json_says_it_is() {
        let head = Detector::from_json(
            r#"{"method": "garment_head", "components": ["garment_head"],
                "graph_output": {"name": "ood_components", "components": ["garment_head"]},
                "description": "garment head: a small network", "protocol": "training/ood_head_protocol.md"}"#,
        )
        .unwrap();
        assert_eq!(head.description(), Some("garment head: a small network"));
        assert_eq!(head.protocol(), Some("training/ood_head_protocol.md"));
        assert_eq!(head.graph_output(), Some(("ood_components", 1)));
        let energy = Detector::from_json(r#"{"method": "energy"}"#).unwrap();
        assert_eq!((energy.description(), energy.protocol()), (None, None));
    }

    #[test]
    fn energy_is_minus_logsumexp() {
        let want = -LOGITS.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((f64::from(energy(&LOGITS)) - want).abs() < 1e-5);
        assert!(energy(&[1e4; CLASSES]).is_finite(), "no overflow on extreme logits");
    }

    #[test]
    fn an_old_energy_file_scores_by_energy_alone() {
        let d = Detector::from_json(r#"{"method": "energy", "threshold": -4.5}"#).unwrap();
        assert_eq!((d.method(), d.graph_output()), ("energy", None));
        assert_eq!(d.score(&LOGITS, &[]), energy(&LOGITS));
    }

    fn fusion_file() -> serde_json::Value {
        serde_json::json!({
            "method": "energy+mahalanobis+knn", "threshold": 1.0,
            "components": ["energy", "mahalanobis", "knn"],
            "fusion": {"mean": [1.0, 2.0, 0.5], "std": [2.0, 4.0, 0.25], "weights": [1.0, 0.5, 2.0]},
            "graph_output": {"name": "ood_components", "components": ["knn", "mahalanobis"]},
        })
    }

    #[test]
    fn a_fusion_is_the_weighted_sum_of_standardised_component_scores() {
        let d = Detector::from_json(&fusion_file().to_string()).unwrap();
        assert_eq!(d.graph_output(), Some(("ood_components", 2)));
        let (knn, maha) = (0.2, 8.0); // the graph output's order, not the fusion's
        let want = (energy(&LOGITS) - 1.0) / 2.0 * 1.0 + (maha - 2.0) / 4.0 * 0.5 + (knn - 0.5) / 0.25 * 2.0;
        let got = d.score(&LOGITS, &[knn, maha]);
        assert!((got - want).abs() < 1e-5, "{got} != {want}");
    }

    #[test]
    fn parameters_the_server_cannot_use_are_refused() {
        let mut v = fusion_file();
        v["graph_output"]["components"] = serde_json::json!(["knn"]);
        assert!(
            Detector::from_json(&v.to_string())
                .unwrap_err()
                .contains("\"mahalanobis\"")
        );
        let mut v = fusion_file();
        v["fusion"]["weights"] = serde_json::json!([1.0]);
        assert!(
            Detector::from_json(&v.to_string())
                .unwrap_err()
                .contains("fusion parameters")
        );
        let mut v = fusion_file();
        v["fusion"]["std"] = serde_json::json!([1.0, 0.0, 1.0]);
        assert!(Detector::from_json(&v.to_string()).unwrap_err().contains("positive"));
        let mut v = fusion_file();
        v["components"] = serde_json::json!(["energy", "vim"]);
        assert!(Detector::from_json(&v.to_string()).unwrap_err().contains("\"vim\""));
    }
}
