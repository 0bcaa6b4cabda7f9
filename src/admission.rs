//! Who gets to use the server's bounded resources, and how much of them: the queue room, decode slots and
//! request bytes one connection may hold ([`ConnectionShare`]), the two decode lanes that keep a small image
//! from waiting behind huge ones ([`DecodeLanes`]), and the memory budget all the bounds add up to
//! ([`MemoryBudget`]). The gRPC layer that enforces the call and byte shares is `grpc::layers::CallLimits`.
//!
//! Calls and request bytes past a share are refused at once (`try_acquire`): those bounds are checked while
//! the request is still arriving, where holding it back would stall its connection. Queue room is waited for,
//! first come first served, for at most `--max-queue-wait-ms` ([`queue_room`]): a caller beyond capacity
//! waits for its turn instead of coming back at once to be refused again. Decode turns and lanes are waited
//! for within the call's deadline and the server's request timeout.

use std::{sync::Arc, time::Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    batching::{Batcher, Reservation},
    error::QueueError,
};

/// How much of the server one connection may hold at once; from the config, validated there.
#[derive(Debug, Clone, Copy)]
pub struct SharePolicy {
    /// Calls of one connection in progress at once; further calls are refused at once.
    pub calls: usize,
    /// Images queued or being decoded for one connection, across models, that are admitted while the queue
    /// has room; past it a connection only borrows the spare room (the queue minus twice this share).
    pub queued_images: usize,
    /// Calls of one connection decoding (or waiting for a decode slot) at once; its further calls wait.
    pub decodes: usize,
    /// Request bytes of one connection's calls in flight.
    pub request_bytes: usize,
}

/// One connection's share (see [`SharePolicy`]); dropped with the connection.
#[derive(Debug)]
pub struct ConnectionShare {
    pub(crate) calls: Arc<Semaphore>,
    images: Arc<Semaphore>,
    decodes: Arc<Semaphore>,
    pub(crate) bytes: Arc<Semaphore>,
}

impl ConnectionShare {
    pub fn new(policy: &SharePolicy) -> Self {
        ConnectionShare {
            calls: Arc::new(Semaphore::new(policy.calls)),
            images: Arc::new(Semaphore::new(policy.queued_images)),
            decodes: Arc::new(Semaphore::new(policy.decodes)),
            bytes: Arc::new(Semaphore::new(policy.request_bytes)),
        }
    }

    /// Room for `n` more images within this connection's share; `None` when it is used up (the call may then
    /// only borrow the queue's spare room: `Batcher::reserve_spare`).
    pub fn reserve_images(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).ok()?;
        self.images.clone().try_acquire_many_owned(n).ok()
    }

    /// Like [`Self::reserve_images`], but waits until `until` for this connection's earlier calls to free
    /// room, in turn ([`acquire_until`]), counted in `waiting`.
    pub async fn reserve_images_waiting(
        &self,
        n: usize,
        until: Instant,
        waiting: &metrics::Gauge,
    ) -> Option<OwnedSemaphorePermit> {
        acquire_until(&self.images, n, until, waiting).await
    }

    /// A decode turn for this connection: its calls past its share wait for each other here, outside the
    /// decode lanes, so they cannot take every slot from other connections. (They already hold their queue
    /// room, which [`Self::reserve_images`] bounds.)
    pub async fn decode_turn(&self) -> OwnedSemaphorePermit {
        self.decodes
            .clone()
            .acquire_owned()
            .await
            .expect("connection semaphores are never closed")
    }
}

/// Room in `batcher`'s queue for a call of `n` images on a connection with `share` (`None`: a caller with no
/// connection, such as the core called in-process), held until the images are answered.
///
/// Within its connection's share a call takes any free room, or waits its turn for it. Past its share it may
/// borrow the queue's spare room if some is free at once; if not, it waits for its own connection's earlier
/// calls to leave room in its share, and then for the queue, so a greedy connection waits behind itself and
/// each connection has at most a share's worth of images waiting for the queue. All waiting ends at
/// `--max-queue-wait-ms` after the call arrived, with RESOURCE_EXHAUSTED (and at the call's deadline).
pub async fn queue_room(
    batcher: &Batcher,
    share: Option<&ConnectionShare>,
    n: usize,
) -> Result<Reservation, QueueError> {
    let (arrived, until) = (Instant::now(), batcher.wait_until());
    let Some(share) = share else {
        return batcher.reserve_waiting(n, until).await;
    };
    let own = match share.reserve_images(n) {
        Some(own) => own,
        None => {
            let spare = batcher.reserve_spare(n);
            if spare.is_ok() {
                return spare;
            }
            match share.reserve_images_waiting(n, until, batcher.waiting_gauge()).await {
                Some(own) => own,
                None => return spare.map_err(|e| e.after_waiting(arrived.elapsed())),
            }
        }
    };
    let mut reservation = batcher.reserve_waiting(n, until).await?;
    reservation.also_hold(Some(own));
    Ok(reservation)
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

/// The decode slots, in two lanes: calls whose images declare few pixels in all (a page upload, a dataset
/// image as PNG) have slots of their own, so calls of huge photos can fill theirs without making a small one
/// wait seconds. The small lane's memory is bounded by its pixel limit; the large lane's by the decode limits.
#[derive(Debug, Clone)]
pub struct DecodeLanes {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
    small_pixels: u64,
}

impl DecodeLanes {
    /// `slots` per lane; a call is small when its images declare at most `small_pixels` in all.
    pub fn new(slots: usize, small_pixels: u64) -> Self {
        DecodeLanes {
            small: Arc::new(Semaphore::new(slots)),
            large: Arc::new(Semaphore::new(slots)),
            small_pixels,
        }
    }

    /// Waits for a slot in the lane for a call whose images declare `pixels` (`None`: unknown, so large).
    pub async fn acquire(&self, pixels: Option<u64>) -> OwnedSemaphorePermit {
        let lane = match pixels {
            Some(p) if p <= self.small_pixels => &self.small,
            _ => &self.large,
        };
        lane.clone()
            .acquire_owned()
            .await
            .expect("decode semaphores are never closed")
    }
}

/// The most memory the server can hold under any load, derived from its limits (README "Memory budget").
/// Every attack the limits exist for (cancelled decodes, stalled uploads, stream floods, greedy clients) is
/// bounded by one of these terms; `deploy/` gives the pod a memory limit above the total with margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Runtime, ONNX Runtime and every loaded model, with their arenas at full batches (measured below
    /// 80 MB with three models; see the README).
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
    pub fn of(config: &crate::config::Config) -> MemoryBudget {
        let slots = config.decode_slots() as u64;
        let large_decodes = slots * config.decode_limits().peak_bytes_per_image();
        // The small lane's images declare few pixels, but each may decode to 16-bit RGBA (8 bytes a pixel).
        let small_call = crate::preprocess::DecodeLimits {
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
