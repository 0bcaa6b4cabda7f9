//! What each model version has done, in the terms of Triton's statistics extension: how many calls
//! succeeded and failed and how long they took, how long they queued, and how long each batch spent preparing
//! its input, running and splitting its output, per batch size. The protocol adapters only render it.
//!
//! Recorded before a call's answer leaves the inference thread and before the call returns, so a client that
//! asks for statistics after its own calls have returned finds them counted.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, SystemTime},
};

/// A count and the total time of what it counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub ns: u64,
}

impl Tally {
    fn add(&mut self, count: u64, took: Duration) {
        self.count += count;
        self.ns = self
            .ns
            .saturating_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).saturating_mul(count));
    }
}

/// The three phases of running a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Phases {
    /// Scaling the images into the model's input tensor.
    pub input: Tally,
    /// ONNX Runtime's run.
    pub infer: Tally,
    /// Splitting the outputs among the calls.
    pub output: Tally,
}

/// A model version's statistics so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Statistics {
    /// When it last ran a batch, in milliseconds since the Unix epoch (0: never).
    pub last_inference_ms: u64,
    /// Images run (Triton counts each inference of a batch).
    pub inference_count: u64,
    /// Batches run.
    pub execution_count: u64,
    /// Calls answered, and their time from admission to answer.
    pub success: Tally,
    /// Calls that failed once they had reached this version.
    pub fail: Tally,
    /// Calls queued for a batch, and their wait.
    pub queue: Tally,
    /// Per call: the phases of the batch it ran in.
    pub calls: Phases,
    /// Per batch size: how many batches of that size ran, and their phases.
    pub batches: BTreeMap<u64, Phases>,
}

/// Collects one version's [`Statistics`]; shared by its calls and its inference threads.
#[derive(Debug, Default)]
pub struct Recorder(Mutex<Statistics>);

/// One batch as the inference thread saw it.
pub struct BatchRecord<'a> {
    pub images: usize,
    /// Each call's wait in the queue.
    pub waits: &'a [Duration],
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Statistics> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A batch that ran.
    pub fn batch(&self, batch: BatchRecord<'_>) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let calls = batch.waits.len() as u64;
        let mut s = self.lock();
        s.last_inference_ms = now;
        s.inference_count += batch.images as u64;
        s.execution_count += 1;
        for wait in batch.waits {
            s.queue.add(1, *wait);
        }
        s.calls.input.add(calls, batch.input);
        s.calls.infer.add(calls, batch.infer);
        s.calls.output.add(calls, batch.output);
        let size = s.batches.entry(batch.images as u64).or_default();
        size.input.add(1, batch.input);
        size.infer.add(1, batch.infer);
        size.output.add(1, batch.output);
    }

    /// A call that reached this version, answered (`ok`) or failed, after `took`.
    pub fn call(&self, ok: bool, took: Duration) {
        let mut s = self.lock();
        if ok { &mut s.success } else { &mut s.fail }.add(1, took);
    }

    pub fn snapshot(&self) -> Statistics {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_counts_its_images_once_and_its_phases_per_call_and_per_size() {
        let recorder = Recorder::default();
        let ms = Duration::from_millis;
        recorder.batch(BatchRecord {
            images: 5,
            waits: &[ms(1), ms(3)],
            input: ms(2),
            infer: ms(10),
            output: ms(1),
        });
        recorder.call(true, ms(20));
        recorder.call(false, ms(4));
        let s = recorder.snapshot();
        assert_eq!((s.inference_count, s.execution_count), (5, 1));
        assert_eq!(
            s.queue,
            Tally {
                count: 2,
                ns: 4_000_000
            }
        );
        assert_eq!(
            s.calls.infer,
            Tally {
                count: 2,
                ns: 20_000_000
            }
        );
        assert_eq!(
            s.batches[&5].infer,
            Tally {
                count: 1,
                ns: 10_000_000
            }
        );
        assert_eq!(
            s.success,
            Tally {
                count: 1,
                ns: 20_000_000
            }
        );
        assert_eq!(
            s.fail,
            Tally {
                count: 1,
                ns: 4_000_000
            }
        );
        assert!(s.last_inference_ms > 0);
    }
}
