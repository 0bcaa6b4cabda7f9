//! The opt-in capture of what the model rejected: a sample of the images it judged out of distribution or not
//! confident enough, kept on disk as the 28x28 input it saw with its verdict, scores, model version and time,
//! so that someone can look at them, label them and train on them (training/captures.py reads them).
//!
//! Off unless `--capture-dir` is set. Nothing of it runs on the request path but a counter and a `try_send`:
//! one writer thread owns the files, fed by a bounded queue, and a record that finds the queue full is
//! dropped and counted. A slow, full or read-only disk therefore costs calls nothing; it shows in
//! `fmnist_capture_records_total{outcome}` and in a rate-limited WARN line.
//!
//! Files: `capture-<unix ms>-<n>.jsonl` segments in the directory, one JSON object per line. A segment is
//! closed at `segment_bytes`; once the segments together pass `max_bytes`, the oldest are deleted.

use std::{
    fs::{self, File},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use serde::Serialize;

use crate::{core::preprocess::PIXELS, core::reason::Reason, core::verdict::Verdict, telemetry::metric};

/// The reasons whose images are captured: the model's own rejections (the input checks' happen before it).
pub const CAPTURED_REASONS: [Reason; 2] = [Reason::OutOfDistribution, Reason::LowConfidence];

/// Built by the app from `--capture-*`.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    pub dir: PathBuf,
    /// The share of captured-reason images kept, in (0, 1]: every k-th, not at random, so a test can count.
    pub sample: f64,
    /// The most the segments may hold together on disk.
    pub max_bytes: u64,
    /// A segment is closed once it holds this much.
    pub segment_bytes: u64,
    /// Records waiting for the writer; past it they are dropped.
    pub queue: usize,
}

/// One captured image, as a line of a segment.
#[derive(Debug, Serialize)]
pub struct Record {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub model: String,
    pub version: String,
    pub reason: &'static str,
    pub class_id: u32,
    pub class: String,
    pub top_probability: f32,
    pub ood_score: f32,
    /// The 28x28 input the model saw, row by row, base64 of 784 bytes (light garment on 0).
    pub pixels: String,
    /// Empty when captured: a person labelling the set writes "garment" or "not_garment" here (or a class
    /// name); training/captures.py reads only labelled lines.
    pub label: String,
}

/// The capture's handle: cheap to clone, shared by every call.
#[derive(Debug, Clone)]
pub struct Capture {
    dir: std::sync::Arc<PathBuf>,
    sender: SyncSender<Record>,
    sample: f64,
    seen: std::sync::Arc<AtomicU64>,
    recorded: Outcomes,
}

#[derive(Debug, Clone)]
struct Outcomes {
    queued: metrics::Counter,
    dropped_queue_full: metrics::Counter,
    not_sampled: metrics::Counter,
}

impl Capture {
    /// Creates the directory (a failure is a configuration error) and starts the writer thread, which ends
    /// when the last handle is dropped.
    pub fn start(settings: CaptureSettings) -> std::io::Result<Capture> {
        fs::create_dir_all(&settings.dir)?;
        let (sender, receiver) = mpsc::sync_channel::<Record>(settings.queue.max(1));
        let mut writer = Writer::new(&settings);
        thread::Builder::new().name("capture".into()).spawn(move || {
            for record in receiver {
                writer.write(&record);
            }
            writer.close();
        })?;
        Ok(Capture {
            dir: std::sync::Arc::new(settings.dir.clone()),
            sender,
            sample: settings.sample.clamp(f64::MIN_POSITIVE, 1.0),
            seen: Default::default(),
            recorded: Outcomes {
                queued: outcome("queued"),
                dropped_queue_full: outcome("dropped_queue_full"),
                not_sampled: outcome("not_sampled"),
            },
        })
    }

    /// The newest `limit` records of `model` on disk, newest first, as written (a line still being written,
    /// or one that does not parse, is skipped). Reads the newest segments only until it has enough.
    pub fn recent(&self, model: &str, limit: usize) -> std::io::Result<Vec<serde_json::Value>> {
        let mut segments: Vec<PathBuf> = fs::read_dir(self.dir.as_path())?
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_segment(p))
            .collect();
        // `capture-<unix ms>-<n>.jsonl`, zero-padded: the names sort as the segments were opened.
        segments.sort_unstable_by(|a, b| b.cmp(a));
        let mut records = Vec::new();
        for segment in segments {
            let text = match fs::read_to_string(&segment) {
                Ok(text) => text,
                // Rotated away since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for line in text.lines().rev() {
                if records.len() >= limit {
                    return Ok(records);
                }
                match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(record) if record["model"] == model => records.push(record),
                    _ => {}
                }
            }
        }
        Ok(records)
    }

    /// Whether an image with this verdict may be captured (the caller then keeps its pixels until judged).
    pub fn wants(reason: Reason) -> bool {
        CAPTURED_REASONS.contains(&reason)
    }

    /// Offers one judged image; never blocks.
    pub fn offer(&self, model: &str, version: &str, verdict: &Verdict, pixels: &[u8; PIXELS]) {
        let Some(prediction) = verdict.prediction.as_ref().filter(|_| Self::wants(verdict.reason)) else {
            return;
        };
        // Every k-th: the n-th image is kept when floor(n * sample) steps up.
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if ((n + 1) as f64 * self.sample).floor() == (n as f64 * self.sample).floor() {
            self.recorded.not_sampled.increment(1);
            return;
        }
        let record = Record {
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            model: model.to_string(),
            version: version.to_string(),
            reason: verdict.reason.label(),
            class_id: prediction.class_id,
            class: prediction.class_name.clone(),
            top_probability: prediction.probability,
            ood_score: prediction.ood_score,
            pixels: base64::engine::general_purpose::STANDARD.encode(pixels),
            label: String::new(),
        };
        match self.sender.try_send(record) {
            Ok(()) => self.recorded.queued.increment(1),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.recorded.dropped_queue_full.increment(1),
        }
    }
}

/// The writer thread's state: the open segment and what is on disk.
struct Writer {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    open: Option<(BufWriter<File>, u64)>,
    /// Segments written by this process, oldest first, with their sizes (earlier runs' count too: they are
    /// listed when the writer starts).
    segments: std::collections::VecDeque<(PathBuf, u64)>,
    next: u64,
    written: metrics::Counter,
    failed: metrics::Counter,
    last_warning: Option<Instant>,
}

/// At most one WARN line per this long about a failing disk.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl Writer {
    fn new(settings: &CaptureSettings) -> Writer {
        let mut segments: Vec<(PathBuf, u64)> = fs::read_dir(&settings.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| is_segment(&e.path()))
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        segments.sort();
        Writer {
            dir: settings.dir.clone(),
            max_bytes: settings.max_bytes,
            segment_bytes: settings.segment_bytes.max(1),
            open: None,
            segments: segments.into(),
            next: 0,
            written: outcome("written"),
            failed: outcome("write_failed"),
            last_warning: None,
        }
    }

    fn write(&mut self, record: &Record) {
        match self.append(record) {
            Ok(()) => self.written.increment(1),
            Err(e) => {
                self.failed.increment(1);
                // The segment may be half written: start a new one with the next record.
                self.open = None;
                if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(dir = %self.dir.display(), error = %e, "capture: cannot write a record; calls are not affected, records are dropped until the disk takes them");
                }
            }
        }
    }

    fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if self.open.is_none() {
            let millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let path = self.dir.join(format!("capture-{millis:013}-{:06}.jsonl", self.next));
            self.next += 1;
            let file = File::options().create_new(true).append(true).open(&path)?;
            self.segments.push_back((path, 0));
            self.open = Some((BufWriter::new(file), 0));
        }
        let (file, size) = self.open.as_mut().expect("opened above");
        file.write_all(&line)?;
        // Flushed per record: a capture is for people to read, and a crash should lose at most the record
        // being written.
        file.flush()?;
        *size += line.len() as u64;
        let size = *size;
        if let Some(last) = self.segments.back_mut() {
            last.1 = size;
        }
        if size >= self.segment_bytes {
            self.open = None;
        }
        self.rotate();
        Ok(())
    }

    /// Deletes the oldest closed segments while the total is over the bound.
    fn rotate(&mut self) {
        let mut total: u64 = self.segments.iter().map(|(_, s)| s).sum();
        while total > self.max_bytes && self.segments.len() > 1 {
            let Some((path, size)) = self.segments.pop_front() else {
                break;
            };
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                self.segments.push_front((path, size));
                break;
            }
            total -= size;
        }
    }

    fn close(&mut self) {
        if let Some((mut file, _)) = self.open.take() {
            let _ = file.flush();
        }
    }
}

/// `fmnist_capture_records_total{outcome}`.
fn outcome(outcome: &'static str) -> metrics::Counter {
    metrics::counter!(metric::CAPTURE_RECORDS, "outcome" => outcome)
}

fn is_segment(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("capture-") && n.ends_with(".jsonl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Record {
        Record {
            // Four digits for every n the tests use: every line has the same length.
            time_ms: 1000 + n as u64,
            model: "cnn".into(),
            version: "2".into(),
            reason: "out_of_distribution",
            class_id: 3,
            class: "Dress".into(),
            top_probability: 0.5,
            ood_score: 1.0,
            pixels: base64::engine::general_purpose::STANDARD.encode([7u8; PIXELS]),
            label: String::new(),
        }
    }

    fn settings(dir: &Path, max_bytes: u64, segment_bytes: u64) -> CaptureSettings {
        CaptureSettings {
            dir: dir.to_path_buf(),
            sample: 1.0,
            max_bytes,
            segment_bytes,
            queue: 8,
        }
    }

    fn on_disk(dir: &Path) -> (usize, u64) {
        let sizes: Vec<u64> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| is_segment(&e.path()))
            .map(|e| e.metadata().unwrap().len())
            .collect();
        (sizes.len(), sizes.iter().sum())
    }

    #[test]
    fn segments_rotate_and_the_directory_stays_within_its_bound() {
        let dir = std::env::temp_dir().join(format!("fmnist-capture-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let line = serde_json::to_vec(&record(0)).unwrap().len() as u64 + 1;
        // Segments of 4 records, at most 3 segments' worth on disk.
        let mut writer = Writer::new(&settings(&dir, 12 * line, 4 * line));
        for n in 0..100 {
            writer.write(&record(n));
        }
        writer.close();
        let (segments, bytes) = on_disk(&dir);
        assert!(bytes <= 12 * line, "{bytes} bytes on disk, bound {}", 12 * line);
        assert_eq!(segments, 3, "the newest three segments are kept");
        // The newest record is on disk; the oldest is gone.
        let text: String = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| fs::read_to_string(e.path()).unwrap())
            .collect();
        assert!(text.contains("\"time_ms\":1099,"));
        assert!(!text.contains("\"time_ms\":1000,"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_written_counts_failures_and_the_writer_goes_on() {
        let dir = std::env::temp_dir().join(format!("fmnist-capture-gone-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut writer = Writer::new(&settings(&dir, 1 << 20, 1 << 20));
        fs::remove_dir_all(&dir).unwrap();
        writer.write(&record(1));
        writer.write(&record(2));
        assert!(writer.open.is_none(), "no segment is open after a failure");
        // The disk comes back: the next record opens a new segment and lands.
        fs::create_dir_all(&dir).unwrap();
        writer.write(&record(3));
        writer.close();
        assert_eq!(on_disk(&dir).0, 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
