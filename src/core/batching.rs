//! Dynamic batching: a bounded queue per model and one inference thread that owns the model's session.
//!
//! Policy: the thread takes the oldest waiting call and every call queued behind it, up to `max_batch_size`
//! images, and runs them as one ONNX Runtime call. It never waits for a timer unless `max_batch_delay` is set:
//! under load, calls pile up while the previous batch runs, so batches form by themselves, and a lone call
//! runs at once. Calls are never split across batches; a call larger than `max_batch_size` runs on its own.
//! A lone call (no other call on the server, none overlapping another for a while) does not cross to the
//! inference thread at all: it runs on the thread that read it ([`Batcher::infer`]).
//!
//! Backpressure counts images, not calls: a semaphore of `max_queued_images` permits, taken before decoding.
//! When the queue is full a call waits its turn for room (first come, first served) for at most
//! `max_queue_wait`, holding only its request, then gets RESOURCE_EXHAUSTED: callers beyond capacity wait
//! instead of coming back at once to be refused again, which cost nearly as much CPU as serving them. Work
//! whose caller has gone away or whose deadline has passed is dropped before inference.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, RecvTimeoutError, TryRecvError},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::{
    core::model::{BatchOutput, CLASSES, ImageOutput, Model},
    core::preprocess::{ModelInput, PIXELS},
    core::statistics::{BatchRecord, Recorder},
    error::{ModelError, QueueError},
    telemetry::metric,
    traces,
};

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    pub max_queued_images: usize,
    /// Longest wait for room in a full queue ([`Batcher::reserve_waiting`]); zero refuses at once.
    pub max_queue_wait: Duration,
    /// Queue room a caller past its own share may borrow ([`Batcher::reserve_spare`]); the rest of the
    /// queue stays free for callers within theirs.
    pub spare_images: usize,
    /// Most images of a lone call that runs on its caller's own thread instead of the inference thread's
    /// ([`Batcher::infer`]); 0: every call goes through the queue.
    pub inline_images: usize,
}

type Reply = Result<Vec<ImageOutput>, QueueError>;

/// One caller's images waiting for the inference thread.
struct Job {
    inputs: Vec<ModelInput>,
    reply: oneshot::Sender<Reply>,
    enqueued: Instant,
    deadline: Option<Instant>,
    /// Released when the job is answered or dropped: the queue bound covers work in flight too.
    reservation: Reservation,
    /// The caller's span: what the inference thread logs about this job names the caller's request id, and
    /// the batch span links to it.
    span: tracing::Span,
    /// Open while the images wait; `Span::none()` unless traces are exported.
    queue_wait: tracing::Span,
}

impl Job {
    /// Frees the job's queue room, then answers: a caller that sends its next call the moment it has this
    /// answer finds the room already free.
    fn answer(self, reply: Reply) {
        drop(self.reservation);
        // The caller may have gone away meanwhile; nothing to do then.
        let _ = self.reply.send(reply);
    }
}

/// Room in a model's queue, held from before decoding until the images are answered.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    /// Another bound the same images count against (the caller's connection share), released with this one.
    _also: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    /// Keeps `permit` for as long as this reservation: until the images are answered or dropped.
    pub fn also_hold(&mut self, permit: Option<OwnedSemaphorePermit>) {
        self._also = permit;
    }
}

/// The calls the server is handling, over every connection and protocol, from the moment a call's head is read
/// until its answer is ready (`transport::layers::CallLimits` counts them; long-lived streams are not counted),
/// and when two last overlapped. A call that finds itself [`alone`](Self::alone) runs on its own thread
/// ([`Batcher::infer`]). Cheap to clone: every clone counts into the same total.
#[derive(Debug, Clone, Default)]
pub struct ActiveCalls(Arc<CallCount>);

#[derive(Debug)]
struct CallCount {
    count: AtomicUsize,
    /// Microseconds after `epoch` when a call began while another was in progress.
    crowded_at: AtomicU64,
    epoch: Instant,
    /// [`ActiveCalls::CALM`], in microseconds.
    calm: u64,
}

impl Default for CallCount {
    fn default() -> Self {
        CallCount {
            count: AtomicUsize::new(0),
            crowded_at: AtomicU64::new(0),
            epoch: Instant::now(),
            calm: micros(ActiveCalls::CALM),
        }
    }
}

impl ActiveCalls {
    /// How long the server must have served one call at a time before a call counts as alone. Clients that
    /// take turns leave moments with a single call in progress; at 4 clients those moments held 6% of the
    /// calls, and running them inline cost 12% of the throughput (bench/README.md "A lone call on its own
    /// thread"), while one client's calls never overlap at all.
    pub const CALM: Duration = Duration::from_millis(10);

    /// Counts one more call until the returned guard is dropped.
    pub fn begin(&self) -> ActiveCall {
        let c = &self.0;
        if c.count.fetch_add(1, Ordering::Relaxed) > 0 {
            c.crowded_at.store(micros(c.epoch.elapsed()), Ordering::Relaxed);
        }
        ActiveCall(self.0.clone())
    }

    /// Whether at most one call is in progress (the one asking), and no two have overlapped for [`Self::CALM`].
    pub fn alone(&self) -> bool {
        let c = &self.0;
        c.count.load(Ordering::Relaxed) <= 1
            && micros(c.epoch.elapsed()).saturating_sub(c.crowded_at.load(Ordering::Relaxed)) >= c.calm
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One call counted in [`ActiveCalls`] for as long as it lives.
#[derive(Debug)]
pub struct ActiveCall(Arc<CallCount>);

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handle to a model's queue; cheap to clone, shared by every request task.
#[derive(Clone)]
pub struct Batcher {
    model: Arc<str>,
    /// The sessions and queue the inference threads share, for a lone call to run on its own thread. Declared
    /// before `sender`, so dropped before it: the last handle lets go of the sessions while the inference
    /// thread still holds them, and that thread, woken by the closed queue, frees them before it ends (the
    /// registry joins it to know a version's memory is back).
    shared: Arc<Shared>,
    sender: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    spare: Arc<Semaphore>,
    limit: usize,
    max_wait: Duration,
    /// Looked up once: a per-call `gauge!` with a label would allocate and hash on every request.
    queue_depth: metrics::Gauge,
    waiting: metrics::Gauge,
    /// How its batches form, and how many instances run them (for the model's configuration).
    config: BatchConfig,
    instances: usize,
    statistics: Arc<Recorder>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("model", &self.model)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Batcher {
    /// Starts one inference thread per model instance in `instances` (each its own session of the same
    /// version), all taking batches from this one queue: while one instance runs a batch, the next forms and
    /// runs on another, as Triton's instance groups do, so a preempted intra-op thread delays one batch, not
    /// all of them. The returned thread joins them; they end once every `Batcher` clone is dropped and the
    /// queue is empty, so dropping the server drains the queue instead of losing it.
    ///
    /// `solo`, a session of the same version with more intra-op threads (and perhaps its own spinning), runs a
    /// batch instead of the instance that formed it when no other instance is busy and no other call holds
    /// queue room (waiting behind it, or still being decoded): a lone caller gets every
    /// core, and under load the instances run side by side (bench/README.md "The adaptive layout").
    /// A call of at most `config.inline_images` images that finds itself the only one of `calls` runs on its
    /// caller's thread ([`Shared::run_inline`]). Metrics are labelled with the model's `name` and `version`.
    pub fn spawn(
        instances: Vec<Model>,
        solo: Option<Model>,
        config: BatchConfig,
        calls: ActiveCalls,
        name: &str,
        version: u64,
    ) -> Result<(Batcher, thread::JoinHandle<()>), ModelError> {
        assert!(!instances.is_empty(), "a model version has at least one instance");
        let instance_count = instances.len();
        let statistics = Arc::new(Recorder::default());
        let name: Arc<str> = name.into();
        let version: Arc<str> = version.to_string().into();
        let (sender, receiver) = mpsc::channel();
        let permits = Arc::new(Semaphore::new(config.max_queued_images));
        let inline = (config.inline_images > 0).then(|| {
            Mutex::new(BatchWork::new(
                config,
                name.clone(),
                version.clone(),
                statistics.clone(),
            ))
        });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { receiver, carry: None }),
            busy: AtomicUsize::new(0),
            sessions: instances.into_iter().map(Mutex::new).collect(),
            solo: solo.map(Mutex::new),
            room: (permits.clone(), config.max_queued_images),
            inline,
            inline_images: config.inline_images,
            calls,
        });
        let thread = thread::Builder::new()
            .name(format!("infer-{name}-{version}"))
            .spawn({
                let (name, version) = (name.clone(), version.clone());
                let statistics = statistics.clone();
                let shared = shared.clone();
                move || {
                    let count = shared.sessions.len();
                    thread::scope(|scope| {
                        let mut loops = (0..count).map(|session| InferenceLoop {
                            session,
                            work: BatchWork::new(config, name.clone(), version.clone(), statistics.clone()),
                        });
                        let first = loops.next().expect("at least one instance");
                        for (i, other) in loops.enumerate() {
                            let shared = &shared;
                            let spawned = thread::Builder::new()
                                .name(format!("infer-{name}-{version}-{}", i + 1))
                                .spawn_scoped(scope, move || other.run(shared));
                            if let Err(e) = spawned {
                                tracing::warn!(model = %name, instances = count, error = %e, "cannot start a model instance's thread; the others serve");
                            }
                        }
                        first.run(&shared);
                    });
                }
            })
            .map_err(|e| ModelError::Environment(format!("cannot start inference thread: {e}")))?;
        let batcher = Batcher {
            queue_depth: metrics::gauge!(metric::QUEUE_DEPTH, "model" => name.to_string(), "version" => version.to_string()),
            waiting: metrics::gauge!(metric::WAITING_IMAGES, "model" => name.to_string(), "version" => version.to_string()),
            max_wait: config.max_queue_wait,
            model: name,
            sender,
            permits,
            spare: Arc::new(Semaphore::new(config.spare_images)),
            limit: config.max_queued_images,
            config,
            instances: instance_count,
            statistics,
            shared,
        };
        Ok((batcher, thread))
    }

    /// Reserves queue room for `n` images, or fails at once when the queue is full. Callers reserve before
    /// decoding, so an overloaded server refuses in microseconds and images being decoded count towards the
    /// bound too.
    pub fn reserve(&self, n: usize) -> Result<Reservation, QueueError> {
        let permits = u32::try_from(n).map_err(|_| self.full(Duration::ZERO))?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(permits)
            .map_err(|_| self.full(Duration::ZERO))?;
        Ok(Reservation {
            _permit: permit,
            _also: None,
        })
    }

    /// The refusal of a call that found no room, after waiting `waited` for it.
    fn full(&self, waited: Duration) -> QueueError {
        QueueError::Full {
            model: self.model.to_string(),
            queued: self.limit - self.permits.available_permits(),
            limit: self.limit,
            waited_ms: 0,
        }
        .after_waiting(waited)
    }

    /// How this version's batches form.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// How many instances run its batches.
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// What this version has done so far (Triton's statistics).
    pub fn statistics(&self) -> &Recorder {
        &self.statistics
    }

    /// The `fmnist_queue_waiting_images` gauge of this model version: images of calls waiting for room.
    pub fn waiting_gauge(&self) -> &metrics::Gauge {
        &self.waiting
    }

    /// The latest a call arriving now may wait for room: `max_queue_wait` from now.
    pub fn wait_until(&self) -> Instant {
        Instant::now() + self.max_wait
    }

    /// Like [`Self::reserve`], but when the queue is full waits for room until `until`, in turn
    /// ([`acquire_until`]). Fails with `Full` when `until` passes.
    pub async fn reserve_waiting(&self, n: usize, until: Instant) -> Result<Reservation, QueueError> {
        let started = Instant::now();
        match acquire_until(&self.permits, n, until, &self.waiting).await {
            Some(permit) => Ok(Reservation {
                _permit: permit,
                _also: None,
            }),
            None => Err(self.full(started.elapsed())),
        }
    }

    /// Like [`Self::reserve`], for a caller past its own share: it may use only the spare room, so a greedy
    /// caller cannot take the queue from the others, while a lone one still gets most of it.
    pub fn reserve_spare(&self, n: usize) -> Result<Reservation, QueueError> {
        let spare = u32::try_from(n)
            .ok()
            .and_then(|k| self.spare.clone().try_acquire_many_owned(k).ok())
            .ok_or_else(|| QueueError::NoSpareRoom {
                model: self.model.to_string(),
                waited_ms: 0,
            })?;
        let mut reservation = self.reserve(n)?;
        reservation.also_hold(Some(spare));
        Ok(reservation)
    }

    /// Queues `inputs` (at most as many as reserved) and waits for their outputs, in order.
    pub async fn infer(
        &self,
        reservation: Reservation,
        inputs: Vec<ModelInput>,
        deadline: Option<Instant>,
    ) -> Result<Vec<ImageOutput>, QueueError> {
        let n = inputs.len();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            reply,
            enqueued: Instant::now(),
            deadline,
            reservation,
            span: tracing::Span::current(),
            queue_wait: if traces::enabled() {
                tracing::info_span!("queue_wait", images = n as i64)
            } else {
                tracing::Span::none()
            },
        };
        self.queue_depth.increment(n as f64);
        // A lone call would cross two threads for nothing (to the inference thread and back, each a wake-up
        // that costs more than this call's serving work on a small VM): it runs here instead.
        if let Some(job) = self.shared.run_inline(job)
            && self.sender.send(job).is_err()
        {
            self.queue_depth.decrement(n as f64);
            return Err(QueueError::ShuttingDown);
        }
        answer.await.unwrap_or_else(|_| {
            Err(ModelError::Inference("the inference thread stopped before answering".into()).into())
        })
    }
}

/// A model version's queue, shared by its instances: whichever holds it forms the next batch.
struct Queue {
    receiver: mpsc::Receiver<Job>,
    /// A job received while filling a batch that did not fit; it opens the next batch, on whichever instance
    /// comes next (kept by the instance that carried it, it would wait for that instance's next turn while
    /// another blocks on an empty queue).
    carry: Option<Job>,
}

/// A batch that has run, waiting to be answered.
struct RanBatch {
    batch: Vec<Job>,
    n: usize,
    result: Result<(), ModelError>,
    /// Filling the input, and the ONNX Runtime run.
    input: Duration,
    infer: Duration,
    ran: Instant,
}

/// What a version's instances share.
struct Shared {
    queue: Mutex<Queue>,
    /// Batches running (counted from the moment one is formed, under the queue's lock, or taken to run inline).
    busy: AtomicUsize,
    /// Each instance's session, locked while a batch runs on it: by its own inference thread, or by a lone
    /// caller's ([`Shared::run_inline`]).
    sessions: Vec<Mutex<Model>>,
    solo: Option<Mutex<Model>>,
    /// The queue's room and its size: images reserved beyond a batch's own are other calls on their way (being
    /// decoded or queued), so the batch is not the only work.
    room: (Arc<Semaphore>, usize),
    /// What a batch run on a caller's thread uses; `None` when no call runs inline.
    inline: Option<Mutex<BatchWork>>,
    inline_images: usize,
    /// The server's calls, this one's included: a call runs inline only when it is the only one.
    calls: ActiveCalls,
}

impl Shared {
    /// Whether no images are reserved but the `batched` of the batch just formed.
    fn no_other_calls(&self, batched: usize) -> bool {
        let (permits, limit) = &self.room;
        limit.saturating_sub(permits.available_permits()) <= batched
    }

    /// Runs `job` as a batch of its own on the calling thread, and answers it, when it is the only work: the
    /// server has no other call (none being read, decoded, queued or run, on any model) and has had none beside
    /// another for [`ActiveCalls::CALM`], no other call holds this queue's room, it has at most
    /// `inline_images` images, and the session it would run on is free (the solo session when there is one,
    /// else the first instance's). Gives the job back otherwise, to be queued.
    ///
    /// It blocks the caller's network thread for one run of a small batch. With other clients about, that
    /// thread is theirs too: inlined whenever no other call held queue room, cnn-int8 served 17-22% fewer
    /// images at C=4 (bench/README.md "A lone call on its own thread"). A call arriving meanwhile is queued,
    /// and its batch runs as soon as the session is free, as it would behind a batch on the inference thread.
    fn run_inline(&self, job: Job) -> Option<Job> {
        let n = job.inputs.len();
        let Some(work) = &self.inline else { return Some(job) };
        if n > self.inline_images || !self.calls.alone() || !self.no_other_calls(n) {
            return Some(job);
        }
        // `try_lock` only: a session held is running a batch (an inference thread's, or a lone call's that
        // began at the same moment), which this call queues behind.
        let Ok(mut work) = work.try_lock() else {
            return Some(job);
        };
        let session = self.solo.as_ref().unwrap_or(&self.sessions[0]);
        let Ok(mut model) = session.try_lock() else {
            return Some(job);
        };
        // A job past its deadline is answered by `admit`: nothing is left to queue.
        let job = work.admit(job)?;
        self.busy.fetch_add(1, Ordering::AcqRel);
        work.metrics.inline_batches.increment(1);
        if self.solo.is_some() {
            work.metrics.solo_batches.increment(1);
        }
        let ran = work.infer(&mut model, vec![job]);
        drop(model);
        self.busy.fetch_sub(1, Ordering::AcqRel);
        work.answer(ran);
        None
    }
}

/// One instance's inference thread: it forms batches from the shared queue and runs them.
struct InferenceLoop {
    /// Its own session, in [`Shared::sessions`].
    session: usize,
    work: BatchWork,
}

/// The state a batch runs with apart from its session, so a batch can run on either an instance's own session
/// or the solo one, and on an inference thread or a lone caller's.
struct BatchWork {
    config: BatchConfig,
    name: Arc<str>,
    version: Arc<str>,
    /// Reused input and output buffers: no allocation per batch on the hot path.
    input: Vec<f32>,
    output: BatchOutput,
    metrics: LoopMetrics,
    statistics: Arc<Recorder>,
    /// Reused per batch: each call's wait in the queue.
    waits: Vec<Duration>,
}

/// A batch's metric handles, labelled with the model once.
struct LoopMetrics {
    queue_depth: metrics::Gauge,
    batch_size: metrics::Histogram,
    queue_wait: metrics::Histogram,
    inference_time: metrics::Histogram,
    carried: metrics::Counter,
    solo_batches: metrics::Counter,
    inline_batches: metrics::Counter,
    dropped_cancelled: metrics::Counter,
    dropped_deadline: metrics::Counter,
}

impl InferenceLoop {
    /// Forms a batch holding the queue (the other instances wait for it meanwhile), then runs it without: on
    /// the solo session when there is one, no other batch is running and no other call holds queue room (a
    /// spinning solo session would take the CPU that call's decoding or network work needs); otherwise on this
    /// instance's own session (waiting for it while a lone caller's batch runs on it).
    fn run(mut self, shared: &Shared) {
        loop {
            let (batch, alone) = {
                let mut queue = shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let batch = self.work.next_batch(&mut queue);
                let others_busy = shared.busy.fetch_add(1, Ordering::AcqRel);
                let nothing_waits = shared.solo.is_some()
                    && queue.nothing_waits()
                    && batch
                        .as_ref()
                        .is_some_and(|b| shared.no_other_calls(b.iter().map(|job| job.inputs.len()).sum()));
                (batch, others_busy == 0 && nothing_waits)
            };
            let Some(batch) = batch else {
                shared.busy.fetch_sub(1, Ordering::AcqRel);
                break;
            };
            // `try_lock`: the instance that ran the last solo batch may not have let go of it yet.
            let mut solo = if alone {
                shared.solo.as_ref().and_then(|s| s.try_lock().ok())
            } else {
                None
            };
            let ran = match solo.as_deref_mut() {
                Some(model) => {
                    self.work.metrics.solo_batches.increment(1);
                    self.work.infer(model, batch)
                }
                None => {
                    let mut model = shared.sessions[self.session]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    self.work.infer(&mut model, batch)
                }
            };
            // Free before anyone is answered: a lone caller's next call, formed by whichever instance takes
            // it, must find the solo session free and no instance busy.
            drop(solo);
            shared.busy.fetch_sub(1, Ordering::AcqRel);
            self.work.answer(ran);
        }
        tracing::debug!(model = %self.work.name, "inference thread stopped: queue closed and empty");
    }
}

impl Queue {
    /// Whether no call waits to be batched. A call found waiting is kept as the next batch's first.
    fn nothing_waits(&mut self) -> bool {
        if self.carry.is_some() {
            return false;
        }
        match self.receiver.try_recv() {
            Ok(job) => {
                self.carry = Some(job);
                false
            }
            Err(_) => true,
        }
    }
}

impl BatchWork {
    fn new(config: BatchConfig, name: Arc<str>, version: Arc<str>, statistics: Arc<Recorder>) -> Self {
        let (m, v) = (|| name.to_string(), || version.to_string());
        let metrics = LoopMetrics {
            queue_depth: metrics::gauge!(metric::QUEUE_DEPTH, "model" => m(), "version" => v()),
            batch_size: metrics::histogram!(metric::BATCH_SIZE, "model" => m(), "version" => v()),
            queue_wait: metrics::histogram!(metric::QUEUE_WAIT, "model" => m(), "version" => v()),
            inference_time: metrics::histogram!(metric::INFERENCE_TIME, "model" => m(), "version" => v()),
            carried: metrics::counter!(metric::CARRIED_JOBS, "model" => m(), "version" => v()),
            solo_batches: metrics::counter!(metric::SOLO_BATCHES, "model" => m(), "version" => v()),
            inline_batches: metrics::counter!(metric::INLINE_BATCHES, "model" => m(), "version" => v()),
            dropped_cancelled: metrics::counter!(metric::DROPPED_IMAGES, "model" => m(), "version" => v(), "cause" => "cancelled"),
            dropped_deadline: metrics::counter!(metric::DROPPED_IMAGES, "model" => m(), "version" => v(), "cause" => "deadline"),
        };
        BatchWork {
            input: Vec::with_capacity(config.max_batch_size * PIXELS),
            waits: Vec::with_capacity(config.max_batch_size),
            config,
            name,
            version,
            output: BatchOutput::default(),
            metrics,
            statistics,
        }
    }

    /// Blocks for the first live job, then takes what else is queued, up to the batch size (and, when a batch
    /// delay is set, waits up to that long after the oldest job was queued). `None` once the queue is closed.
    fn next_batch(&mut self, queue: &mut Queue) -> Option<Vec<Job>> {
        let receiver = &queue.receiver;
        let first = loop {
            let job = match queue.carry.take() {
                Some(job) => job,
                None => receiver.recv().ok()?,
            };
            if let Some(job) = self.admit(job) {
                break job;
            }
        };
        let close_at = first.enqueued + self.config.max_batch_delay;
        let mut size = first.inputs.len();
        let mut batch = vec![first];
        while size < self.config.max_batch_size {
            let job = match receiver.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= close_at {
                        break;
                    }
                    match receiver.recv_timeout(close_at - now) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let Some(job) = self.admit(job) else { continue };
            if size + job.inputs.len() > self.config.max_batch_size {
                self.metrics.carried.increment(1);
                queue.carry = Some(job);
                break;
            }
            size += job.inputs.len();
            batch.push(job);
        }
        Some(batch)
    }

    /// Drops a job whose caller went away or whose deadline passed; those images are never run.
    fn admit(&self, job: Job) -> Option<Job> {
        let cause = if job.reply.is_closed() {
            "cancelled"
        } else if job.deadline.is_some_and(|d| Instant::now() >= d) {
            "deadline"
        } else {
            return Some(job);
        };
        let n = job.inputs.len() as f64;
        self.metrics.queue_depth.decrement(n);
        let dropped = if cause == "deadline" {
            &self.metrics.dropped_deadline
        } else {
            &self.metrics.dropped_cancelled
        };
        dropped.increment(n as u64);
        if cause == "deadline" {
            job.answer(Err(QueueError::DeadlineExceeded));
        }
        None
    }

    /// When traces are exported: ends the calls' queue waits, and opens the batch's `inference_batch` span
    /// (linked to every call it serves) and each call's `inference` span (linked to the batch), which end when
    /// the returned spans are dropped.
    fn trace(&self, batch: &mut [Job], n: usize) -> (tracing::Span, Vec<tracing::Span>) {
        if !traces::enabled() {
            return (tracing::Span::none(), Vec::new());
        }
        let batch_span = tracing::info_span!(parent: None, "inference_batch", model = %self.name, version = %self.version, images = n as i64);
        for job in batch.iter_mut() {
            job.queue_wait = tracing::Span::none();
            traces::link(&batch_span, traces::span_context(&job.span));
        }
        let batch_context = traces::span_context(&batch_span);
        let calls = batch
            .iter()
            .map(|job| {
                let span = tracing::info_span!(parent: &job.span, "inference", images = job.inputs.len() as i64, batch_images = n as i64);
                traces::link(&span, batch_context.clone());
                span
            })
            .collect();
        (batch_span, calls)
    }

    /// Runs a batch on `model`; [`BatchWork::answer`] then answers its callers, once the session is free for
    /// the next batch.
    fn infer(&mut self, model: &mut Model, mut batch: Vec<Job>) -> RanBatch {
        let started = Instant::now();
        let n: usize = batch.iter().map(|j| j.inputs.len()).sum();
        let (batch_span, call_spans) = self.trace(&mut batch, n);
        self.metrics.queue_depth.decrement(n as f64);
        self.metrics.batch_size.record(n as f64);
        self.waits.clear();
        for job in &batch {
            let wait = started.duration_since(job.enqueued);
            self.metrics.queue_wait.record(wait.as_secs_f64());
            self.waits.push(wait);
        }

        self.input.clear();
        self.input.resize(n * PIXELS, 0.0);
        for (input, chunk) in batch
            .iter()
            .flat_map(|j| &j.inputs)
            .zip(self.input.chunks_exact_mut(PIXELS))
        {
            input.write_scaled(chunk);
        }
        let scaled = Instant::now();
        let result = batch_span.in_scope(|| model.run_into(&self.input, n, &mut self.output));
        drop(call_spans);
        let ran = Instant::now();
        self.metrics
            .inference_time
            .record(ran.duration_since(started).as_secs_f64());
        RanBatch {
            batch,
            n,
            result,
            input: scaled.duration_since(started),
            infer: ran.duration_since(scaled),
            ran,
        }
    }

    fn answer(&mut self, ran: RanBatch) {
        let RanBatch {
            batch,
            n,
            result,
            input,
            infer,
            ran,
        } = ran;
        match result {
            Ok(()) => {
                let out = &self.output;
                let mut offset = 0;
                let answers: Vec<(Job, Vec<ImageOutput>)> = batch
                    .into_iter()
                    .map(|job| {
                        let k = job.inputs.len();
                        let outputs = (offset..offset + k)
                            .map(|i| ImageOutput {
                                probabilities: out.probabilities[i * CLASSES..(i + 1) * CLASSES]
                                    .try_into()
                                    .expect("CLASSES values per image"),
                                logits: out.logits[i * CLASSES..(i + 1) * CLASSES]
                                    .try_into()
                                    .expect("CLASSES values per image"),
                                ood_score: out.ood_scores[i],
                            })
                            .collect();
                        offset += k;
                        (job, outputs)
                    })
                    .collect();
                // Counted before anyone is answered: a caller that asks for statistics after its answer finds
                // its batch in them.
                self.statistics.batch(BatchRecord {
                    images: n,
                    waits: &self.waits,
                    input,
                    infer,
                    output: ran.elapsed(),
                });
                for (job, outputs) in answers {
                    job.answer(Ok(outputs));
                }
            }
            Err(e) => {
                for job in batch {
                    // Once per caller, inside its span: the log names every request id the failure hit.
                    job.span.in_scope(|| {
                        tracing::error!(model = %self.name, batch_images = n, error = %e, "inference failed");
                    });
                    job.answer(Err(QueueError::Model(ModelError::Inference(e.to_string()))));
                }
            }
        }
    }
}

/// `n` permits of `semaphore`: at once when they are free, or else waited for until `until`, behind the calls
/// that were waiting first (tokio's semaphore hands released permits to its waiters in order, so a newcomer
/// cannot take them first), while `waiting` counts the `n` images. `None` once `until` has passed; when it
/// already has, no timer is armed (tokio's would first wait for its next 1 ms tick).
pub(crate) async fn acquire_until(
    semaphore: &Arc<Semaphore>,
    n: usize,
    until: Instant,
    waiting: &metrics::Gauge,
) -> Option<OwnedSemaphorePermit> {
    let permits = u32::try_from(n).ok()?;
    if let Ok(permit) = semaphore.clone().try_acquire_many_owned(permits) {
        return Some(permit);
    }
    if Instant::now() >= until {
        return None;
    }
    let _counted = Waiting::count(waiting, n);
    let acquire = semaphore.clone().acquire_many_owned(permits);
    tokio::time::timeout_at(until.into(), acquire).await.ok()?.ok()
}

/// Images counted on a waiting gauge for as long as it lives: taken off however the wait ends, the caller
/// going away (its future dropped) included.
struct Waiting<'a>(&'a metrics::Gauge, f64);

impl<'a> Waiting<'a> {
    fn count(gauge: &'a metrics::Gauge, n: usize) -> Self {
        gauge.increment(n as f64);
        Waiting(gauge, n as f64)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.decrement(self.1);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A count whose calm lasts `calm` instead of [`ActiveCalls::CALM`], counting from now.
    fn calls_with_calm(calm: Duration) -> ActiveCalls {
        ActiveCalls(Arc::new(CallCount {
            calm: micros(calm),
            ..CallCount::default()
        }))
    }

    #[test]
    fn a_call_is_alone_only_while_no_other_is_in_progress_and_none_overlapped_for_the_calm() {
        let calls = calls_with_calm(Duration::ZERO);
        let first = calls.begin();
        assert!(calls.alone(), "one call, nothing before it");
        let second = calls.begin();
        assert!(!calls.alone(), "two calls in progress");
        drop(first);
        assert!(calls.alone(), "with no calm to wait for, the one left is alone at once");
        drop(second);
        assert_eq!(
            calls.0.count.load(Ordering::Relaxed),
            0,
            "every guard took its call off"
        );

        // An hour's calm: a call that follows an overlap is not alone, however long that takes here.
        let calls = calls_with_calm(Duration::from_secs(3600));
        let (a, b) = (calls.begin(), calls.begin());
        drop((a, b));
        let _next = calls.begin();
        assert!(!calls.alone(), "two calls overlapped within the calm");
    }

    #[test]
    fn the_calm_is_counted_from_the_last_overlap() {
        let calm = Duration::from_millis(20);
        let calls = calls_with_calm(calm);
        // A clone counts into the same total, as the call layer's and the batchers' do.
        let counted_elsewhere = calls.clone();
        drop((counted_elsewhere.begin(), calls.begin()));
        std::thread::sleep(calm + Duration::from_millis(5));
        let _lone = calls.begin();
        assert!(calls.alone(), "no overlap for longer than the calm");
    }

    #[tokio::test]
    async fn permits_are_taken_at_once_when_free_and_never_after_the_deadline() {
        let semaphore = Arc::new(Semaphore::new(4));
        let gauge = metrics::Gauge::noop();
        let past = Instant::now() - Duration::from_millis(1);
        let held = acquire_until(&semaphore, 4, past, &gauge).await;
        assert!(held.is_some(), "free permits are taken even with no time left");
        assert!(
            acquire_until(&semaphore, 1, past, &gauge).await.is_none(),
            "no time, no room: at once"
        );
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(
            acquire_until(&semaphore, 1, soon, &gauge).await.is_none(),
            "nothing freed before the deadline"
        );
        assert!(
            acquire_until(&semaphore, 5, soon, &gauge).await.is_none(),
            "more than exist"
        );
    }

    #[tokio::test]
    async fn waiters_are_served_first_come_first_served() {
        let semaphore = Arc::new(Semaphore::new(2));
        let gauge = metrics::Gauge::noop();
        let held = acquire_until(&semaphore, 2, Instant::now(), &gauge).await.unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let first = {
            let (semaphore, order_tx, gauge) = (semaphore.clone(), order_tx.clone(), gauge.clone());
            tokio::spawn(async move {
                let permit = acquire_until(&semaphore, 2, until, &gauge).await;
                order_tx.send("first (2 images)").unwrap();
                permit
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = {
            let (semaphore, gauge) = (semaphore.clone(), gauge.clone());
            tokio::spawn(async move {
                let permit = acquire_until(&semaphore, 1, until, &gauge).await;
                order_tx.send("second (1 image)").unwrap();
                permit
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert_eq!(
            order.recv().await,
            Some("first (2 images)"),
            "a newcomer for fewer images went first"
        );
        let first = first.await.unwrap();
        assert!(first.is_some());
        drop(first);
        assert_eq!(order.recv().await, Some("second (1 image)"));
        assert!(second.await.unwrap().is_some());
    }
}
