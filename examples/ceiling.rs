//! The ceiling for the service: ONNX Runtime alone, in process, through the crate's own `model::Model` (the
//! session the server's inference thread owns, built with the server's options), on real test images. Prints
//! one JSON object per batch size: images/s and the latency of one `Model::run` call.
//!
//!     cargo run --release --example ceiling -- --model cnn --batches 1,8,32,64,128 --seconds 3
//!
//! `bench/run.py` (make bench) runs it and puts the numbers beside the end-to-end ones.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use fmnist_serve::{
    config::{Config, OrtOptimization, OrtSpinning},
    model::{Model, Spinning},
    preprocess::{ModelInput, PIXELS},
};

#[derive(Parser)]
struct Args {
    /// Model to load from --models-dir.
    #[arg(long, default_value = "cnn")]
    model: String,
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128")]
    batches: Vec<usize>,
    /// ONNX Runtime intra-op threads (the server's --ort-threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Sessions run side by side, each on its own thread with --threads intra-op threads (the server's
    /// --instances): images/s is their sum, latencies are pooled. `--sessions 2 --threads 1` is the other
    /// layout a 2-core machine can run.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// When idle intra-op threads spin (the server's --ort-spinning: false, run, true, auto), by default as the
    /// server's.
    #[arg(long, value_enum, default_value_t = OrtSpinning::Auto)]
    spinning: OrtSpinning,
    /// Graph optimization level (the server's --ort-optimization).
    #[arg(long, value_enum, default_value_t = OrtOptimization::All)]
    optimization: OrtOptimization,
    /// Measuring time per batch size, after a warm-up of a fifth of it.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// 784-byte images to feed, cycled through (the committed test-set fixture).
    #[arg(long, default_value = "tests/fixtures/test-images.u8")]
    images: PathBuf,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut config = Config::defaults();
    config.ort_threads = args.threads;
    config.ort_spinning = args.spinning;
    config.ort_optimization = args.optimization;
    let options = config.runtime_options();
    let largest = args.batches.iter().copied().max().unwrap_or(1);
    // The newest version of the model in the repository, as the server would serve it by default.
    let versions = fmnist_serve::repository::scan(&args.models_dir, &args.model);
    let (_, newest) = versions
        .versions
        .last_key_value()
        .ok_or_else(|| format!("no version of {} in {}", args.model, args.models_dir.display()))?;
    let mut models = Model::load_sessions(
        &newest.path,
        &options,
        largest,
        &vec![options.session_shape(); args.sessions.max(1)],
    )?;

    let spinning = options
        .intra_spinning
        .unwrap_or_else(|| Spinning::auto(&models[0].meta));

    let raw = std::fs::read(&args.images)?;
    if raw.len() < PIXELS || raw.len() % PIXELS != 0 {
        return Err(format!("{} is not a whole number of 784-byte images", args.images.display()).into());
    }
    let images: Vec<ModelInput> = raw
        .chunks_exact(PIXELS)
        .map(|c| ModelInput::from_pixels(Box::new(c.try_into().expect("chunks_exact gives PIXELS bytes"))))
        .collect();

    for &n in &args.batches {
        // Every run gets a different slice of real images, scaled by the server's own function.
        let batches: Vec<Vec<f32>> = (0..16)
            .map(|b| {
                let mut input = vec![0.0; n * PIXELS];
                for (i, chunk) in input.chunks_exact_mut(PIXELS).enumerate() {
                    images[(b * n + i) % images.len()].write_scaled(chunk);
                }
                input
            })
            .collect();
        let measure = |model: &mut Model, budget: Duration| -> Result<Vec<f64>, fmnist_serve::error::ModelError> {
            let mut latencies = Vec::new();
            let started = Instant::now();
            while started.elapsed() < budget || latencies.len() < 5 {
                let t = Instant::now();
                std::hint::black_box(model.run(&batches[latencies.len() % batches.len()], n)?);
                latencies.push(t.elapsed().as_secs_f64());
            }
            Ok(latencies)
        };
        // Every session runs the same measurement at once; each returns its run latencies.
        let side_by_side = |models: &mut [Model], budget: Duration| -> Result<Vec<Vec<f64>>, String> {
            std::thread::scope(|scope| {
                let runs: Vec<_> = models
                    .iter_mut()
                    .map(|model| scope.spawn(|| measure(model, budget).map_err(|e| e.to_string())))
                    .collect();
                runs.into_iter()
                    .map(|r| r.join().expect("a measuring thread does not panic"))
                    .collect()
            })
        };
        side_by_side(&mut models, Duration::from_secs_f64(args.seconds / 5.0))?;
        let (started, cpu_before) = (Instant::now(), process_cpu_seconds());
        let per_session = side_by_side(&mut models, Duration::from_secs_f64(args.seconds))?;
        let (wall, cpu) = (started.elapsed().as_secs_f64(), process_cpu_seconds() - cpu_before);
        let runs: usize = per_session.iter().map(Vec::len).sum();
        let mut latencies: Vec<f64> = per_session.into_iter().flatten().collect();
        let total: f64 = latencies.iter().sum();
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] * 1e3;
        let record = serde_json::json!({
            "model": args.model,
            "threads": args.threads,
            "sessions": args.sessions,
            "layout": format!("{}x{}", args.sessions, args.threads),
            "spinning": format!("{spinning:?}").to_lowercase(),
            "optimization": format!("{:?}", args.optimization).to_lowercase(),
            "batch": n,
            "runs": latencies.len(),
            // Sessions overlap in time: the rate is the images of all of them over the wall time.
            "images_per_s": (n * runs) as f64 / wall,
            // The whole process's CPU (ONNX Runtime's pool threads included) per image: what serving an image
            // costs at least, to compare with the server's CPU per image.
            "cpu_us_per_image": cpu / (n * runs) as f64 * 1e6,
            "latency_mean_ms": total / latencies.len() as f64 * 1e3,
            "latency_p50_ms": pct(0.50),
            "latency_p90_ms": pct(0.90),
            "latency_p99_ms": pct(0.99),
        });
        println!("{record}");
    }
    Ok(())
}

/// User + system CPU time of this process so far (/proc/self/stat, clock ticks of 1/100 s).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
