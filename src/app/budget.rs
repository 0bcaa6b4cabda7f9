//! The most memory the server can hold under any load, from its limits, and the check that it fits the
//! container's memory limit at start-up.

use crate::telemetry::metric;

/// The most memory the server can hold under any load, derived from its limits (docs/reliability.md, "Memory budget").
/// Every attack the limits exist for (cancelled decodes, stalled uploads, stream floods, greedy clients) is
/// bounded by one of these terms; `deploy/` gives the pod a memory limit above the total with margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The runtime and ONNX Runtime, without models.
    pub baseline: u64,
    /// Every model session: (models + 1 for a version being swapped in) x (instances + the solo session, if
    /// any) x one session with its arenas at full batches (measured 2026-12-06, lscpu "AMD EPYC", after warm-up
    /// with the three models: 95 MB resident with 1 instance, 128 MB with 2, 194 MB with 4, so ~11 MB a session
    /// and ~62 MB without).
    pub model_sessions: u64,
    /// Decode slots of the large lane x the peak of one image under the decode limits.
    pub large_decodes: u64,
    /// Decode slots of the small lane x the peak of its largest call.
    pub small_decodes: u64,
    /// Request bytes in flight, twice: the received buffer and the decoded message overlap briefly.
    pub request_bytes: u64,
    /// Connections x (buffers + streams x per-stream state).
    pub connections: u64,
    /// Records waiting for the capture's writer (`--capture-dir`), at most.
    pub capture_queue: u64,
    pub total: u64,
}

/// See [`MemoryBudget::baseline`].
const BASELINE_BYTES: u64 = 64 << 20;
/// See [`MemoryBudget::model_sessions`]: one session, with margin over the ~11 MB measured.
const SESSION_BYTES: u64 = 16 << 20;
/// HTTP/2 state of one open stream, measured: 20,000 idle health watches took 135 MB.
const STREAM_BYTES: u64 = 8 << 10;
/// hyper's read and write buffers of one connection.
const CONNECTION_BYTES: u64 = 64 << 10;
/// One captured record in the writer's queue: 784 pixels as base64 (1,048 bytes) with its strings.
const CAPTURE_RECORD_BYTES: u64 = 2 << 10;

impl MemoryBudget {
    pub fn of(config: &crate::app::config::Config) -> MemoryBudget {
        let slots = config.decode_slots() as u64;
        let large_decodes = slots * config.decode_limits().peak_bytes_per_image();
        // The small lane's images declare few pixels, but each may decode to 16-bit RGBA (8 bytes a pixel).
        let small_call = crate::core::preprocess::DecodeLimits {
            max_dimension: config.max_decode_dimension,
            max_alloc_bytes: config
                .small_decode_pixels
                .saturating_mul(8)
                .min(config.max_decode_bytes),
        };
        let small_decodes = slots * small_call.peak_bytes_per_image();
        let model_sessions = (config.models.len() as u64 + 1)
            * (config.model_instances() + usize::from(config.solo_threads().is_some())) as u64
            * SESSION_BYTES;
        let request_bytes = 2 * config.max_request_bytes_in_flight as u64;
        let connections = config.max_connections as u64
            * (CONNECTION_BYTES + u64::from(config.max_concurrent_streams) * STREAM_BYTES);
        let capture_queue = config
            .capture_settings()
            .map_or(0, |c| c.queue as u64 * CAPTURE_RECORD_BYTES);
        MemoryBudget {
            baseline: BASELINE_BYTES,
            model_sessions,
            large_decodes,
            small_decodes,
            request_bytes,
            connections,
            capture_queue,
            total: BASELINE_BYTES
                + model_sessions
                + large_decodes
                + small_decodes
                + request_bytes
                + connections
                + capture_queue,
        }
    }

    /// Each term, by name, as `/metrics` shows them (`fmnist_memory_budget_bytes{term}`).
    pub fn terms(&self) -> [(&'static str, u64); 8] {
        [
            ("baseline", self.baseline),
            ("model_sessions", self.model_sessions),
            ("large_decodes", self.large_decodes),
            ("small_decodes", self.small_decodes),
            ("request_bytes", self.request_bytes),
            ("connections", self.connections),
            ("capture_queue", self.capture_queue),
            ("total", self.total),
        ]
    }

    /// Sets `fmnist_memory_budget_bytes{term}`, and `fmnist_memory_limit_bytes` when a cgroup limit applies.
    pub fn publish(&self) {
        for (term, bytes) in self.terms() {
            metrics::gauge!(metric::MEMORY_BUDGET, "term" => term).set(bytes as f64);
        }
        if let Some(limit) = cgroup_memory_limit() {
            metrics::gauge!(metric::MEMORY_LIMIT).set(limit as f64);
        }
    }
}

impl std::fmt::Display for MemoryBudget {
    /// "712 MiB = baseline 64 + model sessions 64 + ...": the terms of [`MemoryBudget::terms`], in MiB.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} MiB =", self.total >> 20)?;
        let parts = self.terms().into_iter().filter(|(term, _)| *term != "total");
        for (i, (term, bytes)) in parts.enumerate() {
            let joint = if i == 0 { "" } else { " +" };
            write!(f, "{joint} {} {}", term.replace('_', " "), bytes >> 20)?;
        }
        Ok(())
    }
}

/// The memory limit that applies to this process (a container's `resources.limits.memory`, a pod-level limit,
/// a systemd slice's `MemoryMax`), when there is one.
fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    effective_memory_limit(std::path::Path::new("/sys/fs/cgroup"), &own)
}

/// The lowest memory limit on the way from the process's own cgroup up to the root: a limit set on a parent
/// (a pod, a slice) binds its children as much as their own. cgroup v2's `memory.max` and v1's
/// `memory.limit_in_bytes`; `own` is /proc/self/cgroup, `root` where the hierarchy is mounted.
fn effective_memory_limit(root: &std::path::Path, own: &str) -> Option<u64> {
    let mut files = Vec::new();
    for line in own.lines() {
        // v2: "0::/path"; v1: "N:memory:/path".
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next().unwrap_or(""), fields.next().unwrap_or("/"));
        let (dir, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut at = Some(std::path::Path::new(path.trim()));
        while let Some(cgroup) = at {
            files.push(dir.join(cgroup.strip_prefix("/").unwrap_or(cgroup)).join(file));
            at = cgroup.parent();
        }
    }
    files
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|text| text.trim().parse::<u64>().ok())
        // v2 says "no limit" with "max" (not a number), v1 with a number near u64::MAX.
        .filter(|&limit| limit < (1 << 60))
        .min()
}

/// The budget must fit in the container's memory limit: a pod whose limit is below it is OOM-killed by the
/// first burst the budget allows, so the server refuses to start unless told to (`--ignore-memory-limit`).
pub fn check_memory_limit(budget: &MemoryBudget, ignore_memory_limit: bool) -> Result<(), String> {
    let Some(limit) = cgroup_memory_limit() else {
        return Ok(());
    };
    if budget.total <= limit {
        tracing::info!(memory_budget = %budget, memory_limit_mib = limit >> 20, "the memory budget fits the cgroup limit");
        return Ok(());
    }
    let message = format!(
        "the memory budget ({budget}) exceeds this container's memory limit ({} MiB): lower \
         --max-connections, --max-request-bytes-in-flight or the decode limits, or raise the limit",
        limit >> 20
    );
    if ignore_memory_limit {
        tracing::warn!("{message}; starting anyway (--ignore-memory-limit)");
        return Ok(());
    }
    Err(format!("{message} (or start anyway with --ignore-memory-limit)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_reads_as_its_terms_in_mib() {
        let mib = |n: u64| n << 20;
        let budget = MemoryBudget {
            baseline: mib(64),
            model_sessions: mib(64),
            large_decodes: mib(200),
            small_decodes: mib(40),
            request_bytes: mib(128),
            connections: mib(216),
            capture_queue: mib(0),
            total: mib(712),
        };
        assert_eq!(
            budget.to_string(),
            "712 MiB = baseline 64 + model sessions 64 + large decodes 200 + small decodes 40 + request bytes 128 \
             + connections 216 + capture queue 0"
        );
    }

    fn hierarchy(limits: &[(&str, &str)]) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("fmnist-cgroup-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (dir, limit) in limits {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("memory.max"), format!("{limit}\n")).unwrap();
        }
        root
    }

    /// Issue #35: a pod-level limit (or a systemd slice's) sits on a parent of the container's own cgroup,
    /// whose `memory.max` says "max"; only the process's own cgroup and the root were read.
    #[test]
    fn a_limit_on_a_parent_cgroup_applies() {
        let root = hierarchy(&[
            ("", "max"),
            ("kubepods", "max"),
            ("kubepods/pod1", "536870912"),
            ("kubepods/pod1/container", "max"),
        ]);
        let limit = effective_memory_limit(&root, "0::/kubepods/pod1/container\n");
        assert_eq!(limit, Some(512 << 20));
    }

    #[test]
    fn the_lowest_limit_on_the_way_up_applies_and_none_means_none() {
        let root = hierarchy(&[
            ("", "max"),
            ("a", "1073741824"),
            ("a/b", "2147483648"),
            ("a/b/c", "max"),
        ]);
        assert_eq!(effective_memory_limit(&root, "0::/a/b/c\n"), Some(1 << 30));
        let root = hierarchy(&[("", "max"), ("x", "max")]);
        assert_eq!(effective_memory_limit(&root, "0::/x\n"), None);
    }
}
