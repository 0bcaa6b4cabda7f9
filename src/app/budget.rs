//! The most memory the server can hold under any load, from its limits, and the check that it fits the
//! container's memory limit at start-up.

/// The most memory the server can hold under any load, derived from its limits (docs/reliability.md, "Memory budget").
/// Every attack the limits exist for (cancelled decodes, stalled uploads, stream floods, greedy clients) is
/// bounded by one of these terms; `deploy/` gives the pod a memory limit above the total with margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Runtime, ONNX Runtime and every loaded model, with their arenas at full batches (measured: 95.5 MiB
    /// resident after warm-up with the three models, 2026-12-03, lscpu "AMD EPYC"; docs/reliability.md).
    pub baseline: u64,
    /// Decode slots of the large lane x the peak of one image under the decode limits.
    pub large_decodes: u64,
    /// Decode slots of the small lane x the peak of its largest call.
    pub small_decodes: u64,
    /// Request bytes in flight, twice: the received buffer and the decoded message overlap briefly.
    pub request_bytes: u64,
    /// Connections x (buffers + streams x per-stream state).
    pub connections: u64,
    pub total: u64,
}

/// See [`MemoryBudget::baseline`].
const BASELINE_BYTES: u64 = 128 << 20;
/// HTTP/2 state of one open stream, measured: 20,000 idle health watches took 135 MB.
const STREAM_BYTES: u64 = 8 << 10;
/// hyper's read and write buffers of one connection.
const CONNECTION_BYTES: u64 = 64 << 10;

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
        let request_bytes = 2 * config.max_request_bytes_in_flight as u64;
        let connections = config.max_connections as u64
            * (CONNECTION_BYTES + u64::from(config.max_concurrent_streams) * STREAM_BYTES);
        MemoryBudget {
            baseline: BASELINE_BYTES,
            large_decodes,
            small_decodes,
            request_bytes,
            connections,
            total: BASELINE_BYTES + large_decodes + small_decodes + request_bytes + connections,
        }
    }
}

impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b >> 20;
        write!(
            f,
            "{} MiB = baseline {} + large decodes {} + small decodes {} + request bytes {} + connections {}",
            mib(self.total),
            mib(self.baseline),
            mib(self.large_decodes),
            mib(self.small_decodes),
            mib(self.request_bytes),
            mib(self.connections)
        )
    }
}

/// The memory limit of the cgroup this process runs in (a container's `resources.limits.memory`), when it has
/// one: cgroup v2's `memory.max`, else v1's `memory.limit_in_bytes`.
fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    for line in own.lines() {
        // v2: "0::/path"; v1: "N:memory:/path".
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next().unwrap_or(""), fields.next().unwrap_or("/"));
        if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup{path}/memory.max"));
            candidates.push("/sys/fs/cgroup/memory.max".to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"));
            candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string());
        }
    }
    candidates
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|text| text.trim().parse::<u64>().ok())
        // v1 says "no limit" with a number near u64::MAX.
        .find(|&limit| limit < (1 << 60))
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
