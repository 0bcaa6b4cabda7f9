//! The model versions being served, and the swaps between them. A call resolves its model and version against
//! the current [`Snapshot`] and keeps that version (an `Arc`) until it is answered; a reload builds the next
//! snapshot beside the current one and publishes it in one step. So:
//! - a new version takes traffic only once it is loaded, checked (sha256, graph signature) and warmed up;
//! - a version that fails any of that never replaces a working one: it is reported as FAILED with the reason,
//!   and is not tried again until its files change;
//! - a version that leaves stops taking new calls, finishes the ones it has (a call pinned to it completes on
//!   it), then its inference thread ends, is joined, and its session's memory is returned;
//! - the last version of a model is never taken away by a reload that has nothing better: only an explicit
//!   unload does that.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, Weak},
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    core::batching::{ActiveCalls, BatchConfig, Batcher},
    core::drift::DriftSignals,
    core::model::{Model, ModelMetadata, RuntimeOptions, SessionShape},
    core::repository::{self, Fingerprint},
    core::verdict::Reason,
    error::{ModelError, RequestError, clip},
    telemetry::metric,
};

/// What returns freed memory to the operating system after a version has drained, when the binary has one
/// (`main.rs` sets glibc's `malloc_trim`: ONNX Runtime allocates with the C allocator, whose per-thread arenas
/// otherwise keep a retired session's memory, about 8 MiB a swap).
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what runs once drained versions are joined; the first call wins.
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

/// A version ready to serve: its metadata and its queue.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model's name in the repository (its directory).
    pub name: String,
    pub version: u64,
    pub meta: ModelMetadata,
    pub batcher: Batcher,
    /// `fmnist_images_total` for this version, one counter per reason, looked up once here rather than per
    /// image on the hot path.
    pub images: ImageCounters,
    /// The version's drift metrics (class mix, top probability, OOD margin, input brightness and contrast).
    pub drift: DriftSignals,
}

/// The image counters of one model version, indexed by `Reason as usize`.
#[derive(Debug)]
pub struct ImageCounters([metrics::Counter; Reason::ALL.len()]);

impl ImageCounters {
    fn new(name: &str, version: u64) -> Self {
        ImageCounters(Reason::ALL.map(|reason| {
            let outcome = if reason == Reason::Accepted { "accepted" } else { "rejected" };
            metrics::counter!(metric::IMAGES, "model" => name.to_string(), "version" => version.to_string(), "outcome" => outcome, "reason" => reason.label())
        }))
    }

    pub fn count(&self, reason: Reason) {
        self.0[reason as usize].increment(1);
    }
}

impl LoadedModel {
    pub fn version_label(&self) -> String {
        self.version.to_string()
    }
}

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Loading,
    Ready,
    /// Out of the snapshot: finishing the calls it has, then its thread is joined.
    Draining,
    /// Could not be loaded; the reason says why. The versions serving before keep serving.
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Loading => "LOADING",
            State::Ready => "READY",
            State::Draining => "DRAINING",
            State::Failed => "FAILED",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatus {
    pub state: State,
    pub reason: String,
}

/// One model: the versions that take calls, its labels, and the state of every version the server knows of.
#[derive(Debug, Clone, Default)]
pub struct ServedModel {
    pub ready: BTreeMap<u64, Arc<LoadedModel>>,
    pub labels: BTreeMap<String, u64>,
    pub states: BTreeMap<u64, VersionStatus>,
}

impl ServedModel {
    /// The version a call gets when it names none: the newest ready one.
    pub fn default_version(&self) -> Option<&Arc<LoadedModel>> {
        self.ready.values().next_back()
    }

    fn describe_versions(&self) -> String {
        let mut names: Vec<String> = self.ready.keys().map(u64::to_string).collect();
        names.extend(
            self.labels
                .iter()
                .filter(|(_, v)| self.ready.contains_key(v))
                .map(|(label, v)| format!("{label} (= {v})")),
        );
        if names.is_empty() {
            "none is ready".into()
        } else {
            names.join(", ")
        }
    }
}

/// Every model as calls see it at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub models: BTreeMap<String, ServedModel>,
    /// The model a call gets when it names none.
    pub default: String,
    /// Every model the server is configured to serve (`--models`), ready or not.
    pub configured: Vec<String>,
}

impl Snapshot {
    /// The model a call names (empty: the default) at the version it names: empty for the newest ready one,
    /// a number, or a label.
    /// A configured model with no version ready is `NotReady` (the server's state), not unknown.
    pub fn find(&self, name: &str, version: &str) -> Result<&Arc<LoadedModel>, RequestError> {
        let default = name.is_empty();
        let name = if default { self.default.as_str() } else { name };
        let not_ready = || RequestError::NotReady {
            model: name.to_string(),
            default,
        };
        let served = match self.models.get(name) {
            Some(served) => served,
            None if self.configured.iter().any(|m| m == name) => return Err(not_ready()),
            None => {
                return Err(RequestError::UnknownModel {
                    name: clip(name),
                    loaded: self.models.keys().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        };
        if served.ready.is_empty() {
            return Err(not_ready());
        }
        let found = if version.is_empty() {
            served.default_version()
        } else {
            // "3" names version 3; "03" or "+3" name nothing (a label could be spelt so).
            let number = version
                .parse::<u64>()
                .ok()
                .filter(|v| v.to_string() == version)
                .or_else(|| served.labels.get(version).copied());
            number.and_then(|v| served.ready.get(&v))
        };
        found.ok_or_else(|| RequestError::UnknownVersion {
            model: name.to_string(),
            version: clip(version),
            served: served.describe_versions(),
        })
    }
}

impl Snapshot {
    /// Whether the default model has a version ready: what the server's health and readiness report.
    pub fn default_ready(&self) -> bool {
        self.model_ready(&self.default)
    }

    /// Whether `name` has a version ready.
    pub fn model_ready(&self, name: &str) -> bool {
        self.models.get(name).is_some_and(|m| !m.ready.is_empty())
    }
}

/// What the registry needs to load a version.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub dir: PathBuf,
    /// The models to serve, by name: `<dir>/<name>/`.
    pub models: Vec<String>,
    pub default: DefaultModel,
    pub runtime: RuntimeOptions,
    pub batch: BatchConfig,
    pub warmup_batch: usize,
    /// Sessions per version, each on its own inference thread, sharing the version's queue.
    pub instances: usize,
    /// The version's solo session, which runs a batch when it is the only work (see [`Batcher::spawn`]);
    /// `None`: no solo session.
    pub solo: Option<SessionShape>,
    /// The server's calls in progress, which a lone call checks before it runs on its own thread.
    pub calls: ActiveCalls,
}

/// The live set of models; see the module documentation.
#[derive(Debug)]
pub struct Registry {
    settings: RegistrySettings,
    current: RwLock<Option<Arc<Snapshot>>>,
    /// One reload at a time, with what it must remember between reloads.
    reload: Mutex<Book>,
    /// Every load runs on this one thread. ONNX Runtime keeps per-thread state and the C allocator a
    /// per-thread arena: loading on whichever pool thread is free grew the server by ~2 MiB a swap (to
    /// 240 MiB after 80 swaps); on one thread it stays flat.
    loader: Mutex<Option<std::sync::mpsc::Sender<LoadJob>>>,
    /// Bumped at every publish, for what follows the served models (health).
    published: tokio::sync::watch::Sender<u64>,
}

type LoadJob = (Option<String>, std::sync::mpsc::Sender<ReloadReport>);

/// What reloads remember.
#[derive(Debug, Default)]
struct Book {
    /// The files each ready version was loaded from: a change loads it again.
    loaded: BTreeMap<(String, u64), Fingerprint>,
    /// Versions that failed, with the files they failed with and why: not retried until those change.
    failed: BTreeMap<(String, u64), (Fingerprint, String)>,
    /// Models unloaded on request: reloads leave them alone until they are loaded on request.
    unloaded: BTreeSet<String>,
    threads: BTreeMap<(String, u64), JoinHandle<()>>,
    draining: Vec<Draining>,
}

#[derive(Debug)]
struct Draining {
    name: String,
    version: u64,
    model: Weak<LoadedModel>,
    thread: Option<JoinHandle<()>>,
}

/// One line of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

/// What one reload did, for logs, metrics and the caller that asked for it.
#[derive(Debug, Default)]
pub struct ReloadReport {
    pub loaded: Vec<(String, u64)>,
    pub unloaded: Vec<(String, u64)>,
    pub failed: Vec<(String, u64, ModelError)>,
}

impl Registry {
    /// The default model and why it is the default.
    pub fn default_model(&self) -> &DefaultModel {
        &self.settings.default
    }

    pub fn new(settings: RegistrySettings) -> Arc<Registry> {
        Arc::new(Registry {
            settings,
            current: RwLock::new(None),
            reload: Mutex::new(Book::default()),
            loader: Mutex::new(None),
            published: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Runs a reload on the loader thread and waits for it (blocking).
    fn reload_on_loader(self: &Arc<Self>, only: Option<String>) -> ReloadReport {
        let (reply, report) = std::sync::mpsc::channel();
        let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        let sender = loader.get_or_insert_with(|| {
            let (sender, jobs) = std::sync::mpsc::channel::<LoadJob>();
            let registry = Arc::downgrade(self);
            std::thread::Builder::new()
                .name("model-loader".into())
                .spawn(move || {
                    for (only, reply) in jobs {
                        let Some(registry) = registry.upgrade() else { return };
                        let _ = reply.send(registry.reload_now(only.as_deref()));
                    }
                })
                .expect("the model loader thread starts");
            sender
        });
        sender
            .send((only, reply))
            .expect("the model loader runs while the registry lives");
        drop(loader);
        report.recv().expect("the model loader answers every job")
    }

    /// The models as calls see them now; `None` until the first load has finished.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, next: Snapshot) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(next));
        self.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes whenever the served models do (a load, a swap, an unload, a drain ending).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// The first load, at start-up: every configured model must have a version that serves, or the server
    /// does not start (the error names the file and why).
    pub fn load_at_start(self: &Arc<Self>) -> Result<ReloadReport, ModelError> {
        let mut report = self.reload_on_loader(None);
        for name in &self.settings.models {
            let snapshot = self.snapshot().unwrap_or_default();
            if snapshot.models.get(name).is_some_and(|m| !m.ready.is_empty()) {
                continue;
            }
            if let Some(i) = report.failed.iter().position(|(n, _, _)| n == name) {
                return Err(report.failed.swap_remove(i).2);
            }
            let dir = self.settings.dir.join(name);
            return Err(ModelError::Metadata {
                path: dir.join("<version>").join(repository::METADATA_FILE),
                reason: format!(
                    "no version of model {name} found: a model is {}/<version>/{{model.onnx, {}}} with a \
                     positive integer version (`make train` writes them)",
                    dir.display(),
                    repository::METADATA_FILE
                ),
            });
        }
        Ok(report)
    }

    /// Reads the repository and brings the served versions in line with it (on the calling thread; the server
    /// goes through [`Self::reload`], which runs it on the loader thread): loads what is new or changed,
    /// retires what the policy no longer selects. `only`: one model (an explicit load of it, which also
    /// undoes an explicit unload).
    pub fn reload_now(self: &Arc<Self>, only: Option<&str>) -> ReloadReport {
        let mut book = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = ReloadReport::default();
        let mut next = self.snapshot().map(|s| (*s).clone()).unwrap_or_default();
        next.default = self.settings.default.name.clone();
        next.configured = self.settings.models.clone();
        for name in &self.settings.models {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            if only.is_some() {
                book.unloaded.remove(name);
            } else if book.unloaded.contains(name) {
                continue;
            }
            self.reload_model(name, &mut next, &mut book, &mut report, only.is_some());
        }
        self.publish(next);
        if !book.draining.is_empty() {
            drop(book);
            self.spawn_reaper();
        }
        report
    }

    /// `explicit`: a caller asked for this model; a version that failed before with the same files is then
    /// reported again (not retried, not counted again).
    fn reload_model(
        self: &Arc<Self>,
        name: &str,
        next: &mut Snapshot,
        book: &mut Book,
        report: &mut ReloadReport,
        explicit: bool,
    ) {
        let dir = repository::scan(&self.settings.dir, name);
        if let Some(error) = &dir.config_error {
            // A broken config must not unload anything: keep serving, and say why nothing changed.
            tracing::warn!(model = %name, error = %error, "model config unreadable; its versions stay as they are");
            return;
        }
        let wanted = dir.wanted();
        next.models.entry(name.to_string()).or_default().labels = dir.config.labels.clone();
        for &version in &wanted {
            let files = &dir.versions[&version];
            let key = (name.to_string(), version);
            if next.models[name].ready.contains_key(&version) && book.loaded.get(&key) == Some(&files.fingerprint) {
                continue;
            }
            if let Some((fingerprint, reason)) = book.failed.get(&key)
                && *fingerprint == files.fingerprint
            {
                if explicit {
                    report
                        .failed
                        .push((name.to_string(), version, ModelError::Remembered(reason.clone())));
                }
                continue;
            }
            let loading = VersionStatus {
                state: State::Loading,
                reason: String::new(),
            };
            next.models
                .get_mut(name)
                .expect("inserted above")
                .states
                .insert(version, loading);
            // While serving, LOADING shows in model info as it happens; the first load shows nothing until every
            // model is in (calls are UNAVAILABLE until then).
            if self.snapshot().is_some() {
                self.publish(next.clone());
            }
            let served = next.models.get_mut(name).expect("inserted above");
            match self.load_version(name, version, &files.path) {
                Ok((model, thread)) => {
                    tracing::info!(model = %name, version, build = %model.meta.version, "version loaded, checked and warmed up; taking calls");
                    metrics::counter!(metric::MODEL_RELOADS, "model" => name.to_string(), "outcome" => "loaded")
                        .increment(1);
                    metrics::gauge!(metric::MODEL_INFO, "model" => name.to_string(), "version" => version.to_string())
                        .set(1.0);
                    if let Some(replaced) = served.ready.insert(version, Arc::new(model)) {
                        // The same version number with new files: the old build drains like any other.
                        self.retire(book, name, version, replaced);
                    }
                    book.threads.insert(key.clone(), thread);
                    book.loaded.insert(key.clone(), files.fingerprint.clone());
                    book.failed.remove(&key);
                    served.states.insert(
                        version,
                        VersionStatus {
                            state: State::Ready,
                            reason: String::new(),
                        },
                    );
                    report.loaded.push(key);
                }
                Err(e) => {
                    // Say what is left: at start-up (or after an unload) nothing of this model serves.
                    if served.ready.is_empty() {
                        tracing::warn!(model = %name, version, error = %e, "version failed to load; no version of this model is serving");
                    } else {
                        tracing::warn!(model = %name, version, error = %e, "version failed to load; the versions serving keep serving");
                    }
                    metrics::counter!(metric::MODEL_RELOADS, "model" => name.to_string(), "outcome" => "failed")
                        .increment(1);
                    book.failed
                        .insert(key.clone(), (files.fingerprint.clone(), e.to_string()));
                    let status = if served.ready.contains_key(&version) {
                        VersionStatus {
                            state: State::Ready,
                            reason: format!("changed files failed to load, serving the previous ones: {e}"),
                        }
                    } else {
                        VersionStatus {
                            state: State::Failed,
                            reason: e.to_string(),
                        }
                    };
                    served.states.insert(version, status);
                    report.failed.push((name.to_string(), version, e));
                }
            }
        }
        // Retire what the policy no longer selects, but never the last ready version for nothing.
        let served = next.models.get_mut(name).expect("inserted above");
        let wanted_ready = served.ready.keys().any(|v| wanted.contains(v));
        if wanted_ready {
            let leaving: Vec<u64> = served.ready.keys().filter(|v| !wanted.contains(v)).copied().collect();
            for version in leaving {
                let model = served.ready.remove(&version).expect("listed above");
                self.retire(book, name, version, model);
                served.states.insert(
                    version,
                    VersionStatus {
                        state: State::Draining,
                        reason: String::new(),
                    },
                );
                report.unloaded.push((name.to_string(), version));
            }
        } else if !served.ready.is_empty() {
            tracing::warn!(model = %name, serving = ?served.ready.keys().collect::<Vec<_>>(), "no version the policy selects could be loaded; the ones serving keep serving");
        }
        // Failed versions that left the disk are forgotten.
        served
            .states
            .retain(|v, s| s.state != State::Failed || dir.versions.contains_key(v));
        book.failed
            .retain(|(n, v), _| n != name || dir.versions.contains_key(v));
    }

    /// [`Self::reload_now`] on the loader thread, awaited off the async runtime; logs what changed.
    pub async fn reload(self: &Arc<Self>, only: Option<String>) -> ReloadReport {
        let registry = self.clone();
        let report = tokio::task::spawn_blocking(move || registry.reload_on_loader(only))
            .await
            .expect("reloading does not panic");
        if !report.loaded.is_empty() || !report.unloaded.is_empty() || !report.failed.is_empty() {
            tracing::info!(loaded = ?report.loaded, unloaded = ?report.unloaded, failed = report.failed.len(), "model repository reloaded");
        }
        report
    }

    /// Whether `name` is one of the models this server serves (`--models`).
    pub fn is_configured(&self, name: &str) -> bool {
        self.settings.models.iter().any(|m| m == name)
    }

    pub fn configured(&self) -> &[String] {
        &self.settings.models
    }

    /// Every version of every configured model and its state; a model unloaded on request is listed once,
    /// with no version, as UNLOADED.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let snapshot = self.snapshot().unwrap_or_default();
        let mut entries = Vec::new();
        for name in &self.settings.models {
            let Some(served) = snapshot.models.get(name) else {
                if !ready_only {
                    entries.push(IndexEntry {
                        name: name.clone(),
                        version: String::new(),
                        state: "UNLOADED",
                        reason: "unloaded on request: load it to serve it again".into(),
                    });
                }
                continue;
            };
            for (version, status) in &served.states {
                if ready_only && status.state != State::Ready {
                    continue;
                }
                entries.push(IndexEntry {
                    name: name.clone(),
                    version: version.to_string(),
                    state: status.state.name(),
                    reason: status.reason.clone(),
                });
            }
        }
        entries
    }

    /// Stops serving every version of `name` until it is loaded again on request.
    pub fn unload(self: &Arc<Self>, name: &str) -> Result<ReloadReport, RequestError> {
        let mut book = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.snapshot().map(|s| (*s).clone()).unwrap_or_default();
        let Some(mut served) = next.models.remove(name) else {
            if self.is_configured(name) {
                // Already unloaded: nothing more to do.
                return Ok(ReloadReport::default());
            }
            return Err(RequestError::UnknownModel {
                name: clip(name),
                loaded: next.models.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        let mut report = ReloadReport::default();
        for (version, model) in std::mem::take(&mut served.ready) {
            self.retire(&mut book, name, version, model);
            report.unloaded.push((name.to_string(), version));
        }
        book.unloaded.insert(name.to_string());
        self.publish(next);
        drop(book);
        self.spawn_reaper();
        Ok(report)
    }

    fn load_version(
        &self,
        name: &str,
        version: u64,
        dir: &std::path::Path,
    ) -> Result<(LoadedModel, JoinHandle<()>), ModelError> {
        let s = &self.settings;
        let mut shapes = vec![s.runtime.session_shape(); s.instances.max(1)];
        shapes.extend(s.solo);
        let mut instances = Model::load_sessions(dir, &s.runtime, s.warmup_batch, &shapes)?;
        let solo = s.solo.and_then(|_| instances.pop());
        let meta = instances[0].meta.clone();
        let (batcher, thread) = Batcher::spawn(instances, solo, s.batch, s.calls.clone(), name, version)?;
        Ok((
            LoadedModel {
                name: name.to_string(),
                version,
                drift: DriftSignals::new(name, version, &meta),
                meta,
                batcher,
                images: ImageCounters::new(name, version),
            },
            thread,
        ))
    }

    /// Takes a version out of service: new calls no longer find it; it drains in the background.
    fn retire(&self, book: &mut Book, name: &str, version: u64, model: Arc<LoadedModel>) {
        metrics::counter!(metric::MODEL_RELOADS, "model" => name.to_string(), "outcome" => "unloaded").increment(1);
        metrics::gauge!(metric::MODEL_INFO, "model" => name.to_string(), "version" => version.to_string()).set(0.0);
        tracing::info!(model = %name, version, "version leaves service: finishing its calls");
        book.loaded.remove(&(name.to_string(), version));
        book.draining.push(Draining {
            name: name.to_string(),
            version,
            model: Arc::downgrade(&model),
            thread: book.threads.remove(&(name.to_string(), version)),
        });
    }

    /// Joins the threads of drained versions (no call holds them and their queue is empty); returns how many
    /// are still draining.
    pub fn reap(&self) -> usize {
        let mut book = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let (done, still): (Vec<Draining>, Vec<Draining>) = std::mem::take(&mut book.draining)
            .into_iter()
            .partition(|d| d.model.strong_count() == 0 && d.thread.as_ref().is_none_or(JoinHandle::is_finished));
        book.draining = still;
        if done.is_empty() {
            return book.draining.len();
        }
        let mut next = self.snapshot().map(|s| (*s).clone()).unwrap_or_default();
        let mut released = false;
        for d in done {
            if let Some(thread) = d.thread {
                let _ = thread.join();
            }
            tracing::info!(model = %d.name, version = d.version, "version drained: thread joined, memory returned");
            released = true;
            let draining_elsewhere = book.draining.iter().any(|o| o.name == d.name && o.version == d.version);
            if let Some(served) = next.models.get_mut(&d.name)
                && !draining_elsewhere
                && served
                    .states
                    .get(&d.version)
                    .is_some_and(|s| s.state == State::Draining)
            {
                served.states.remove(&d.version);
            }
        }
        self.publish(next);
        if released && let Some(release) = RELEASE_MEMORY.get() {
            release();
        }
        book.draining.len()
    }

    /// Joins drained versions in the background, as soon as their last call is answered.
    fn spawn_reaper(self: &Arc<Self>) {
        let registry = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("reap-models".into()).spawn(move || {
            // A drain lasts as long as the longest call it holds (bounded by the request timeout).
            for _ in 0..1200 {
                std::thread::sleep(Duration::from_millis(50));
                let Some(registry) = registry.upgrade() else { return };
                if registry.reap() == 0 {
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that joins drained versions; the next reload will");
        }
    }
}

/// The server's default model and the reason it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultModel {
    pub name: String,
    pub why: String,
}

impl DefaultModel {
    /// `requested` is `--default-model`; `int8` names the CPU's 8-bit dot-product instruction set, if any.
    pub fn choose(requested: &str, models: &[String], int8: Option<&str>) -> DefaultModel {
        let loaded = |name: &str| models.iter().any(|m| m == name);
        let (name, why) = if requested != "auto" {
            (requested.to_string(), "set by --default-model".to_string())
        } else {
            match int8 {
                Some(isa) if loaded("cnn-int8") => (
                    "cnn-int8".into(),
                    format!(
                        "auto: this CPU has {isa}, where cnn-int8 serves 1.3-1.4x the images per second of cnn \
                         (bench/README.md) within 0.1 point of its accuracy and 1 point of its OOD rejection"
                    ),
                ),
                Some(_) if loaded("cnn") => ("cnn".into(), "auto: cnn-int8 is not among --models".into()),
                None if loaded("cnn") => (
                    "cnn".into(),
                    "auto: this CPU has no 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI), so INT8 would not pay"
                        .into(),
                ),
                _ => (
                    models.first().cloned().unwrap_or_default(),
                    "auto: the first of --models (neither cnn nor cnn-int8 is loaded)".into(),
                ),
            }
        };
        DefaultModel { name, why }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot serving nothing: `cnn` unloaded, `dense` known with no ready version, as the registry leaves
    /// them after an unload or before a first load.
    fn nothing_ready() -> Snapshot {
        let mut snapshot = Snapshot {
            default: "cnn".into(),
            configured: vec!["cnn".into(), "dense".into()],
            ..Snapshot::default()
        };
        snapshot.models.insert("dense".into(), ServedModel::default());
        snapshot
    }

    #[test]
    fn a_configured_model_without_a_ready_version_is_not_ready_not_unknown() {
        let snapshot = nothing_ready();
        let kind = |name: &str| snapshot.find(name, "").map(|_| ()).unwrap_err();
        assert!(matches!(kind(""), RequestError::NotReady { ref model, default: true } if model == "cnn"));
        assert!(matches!(kind("cnn"), RequestError::NotReady { default: false, .. }));
        assert!(matches!(kind("dense"), RequestError::NotReady { default: false, .. }));
        assert!(matches!(kind("resnet"), RequestError::UnknownModel { .. }));
        assert_eq!(kind("").kind(), crate::error::ErrorKind::Unavailable);
        assert_eq!(kind("resnet").kind(), crate::error::ErrorKind::Invalid);
        assert!(!snapshot.default_ready());
        assert!(!snapshot.model_ready("dense"));
    }

    #[test]
    fn auto_picks_int8_only_where_the_cpu_has_8_bit_dot_products() {
        let all: Vec<String> = ["cnn", "cnn-int8", "dense"].map(String::from).to_vec();
        assert_eq!(DefaultModel::choose("auto", &all, Some("AVX512-VNNI")).name, "cnn-int8");
        assert_eq!(DefaultModel::choose("auto", &all, None).name, "cnn");
        let why = DefaultModel::choose("auto", &all, Some("AVX-VNNI")).why;
        assert!(!why.contains("  "), "no run of spaces in {why:?}");
        assert_eq!(DefaultModel::choose("dense", &all, None).why, "set by --default-model");
    }
}
