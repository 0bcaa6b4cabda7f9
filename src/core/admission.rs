//! Who gets to use the server's bounded resources, and how much of them: the queue room, decode slots and
//! request bytes one connection may hold ([`ConnectionShare`]), the two decode lanes that keep a small image
//! from waiting behind huge ones ([`DecodeLanes`]), and the memory budget all the bounds add up to
//! (`app::budget`). The layer that enforces the call and byte shares is `transport::layers::CallLimits`.
//!
//! Calls and request bytes past a share are refused at once (`try_acquire`): those bounds are checked while
//! the request is still arriving, where holding it back would stall its connection. Queue room is waited for,
//! first come first served, for at most `--max-queue-wait-ms` ([`queue_room`]): a caller beyond capacity
//! waits for its turn instead of coming back at once to be refused again. Decode turns and lanes are waited
//! for within the call's deadline and the server's request timeout.

use std::{sync::Arc, time::Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    core::batching::{Batcher, Reservation, acquire_until},
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
    /// room, in turn ([`acquire_until`](crate::core::batching::acquire_until)), counted in `waiting`.
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn share() -> ConnectionShare {
        ConnectionShare::new(&SharePolicy {
            calls: 2,
            queued_images: 64,
            decodes: 1,
            request_bytes: 1024,
        })
    }

    #[test]
    fn a_connection_holds_at_most_its_share_of_images() {
        let share = share();
        let first = share.reserve_images(60).expect("within the share");
        assert!(share.reserve_images(5).is_none(), "60 + 5 is past 64");
        let second = share.reserve_images(4).expect("60 + 4 fits exactly");
        drop(first);
        assert!(share.reserve_images(60).is_some(), "released with the call");
        drop(second);
    }

    #[tokio::test]
    async fn waiting_for_the_share_ends_at_the_deadline_and_is_counted_meanwhile() {
        let share = share();
        let held = share.reserve_images(64).unwrap();
        let gauge = metrics::Gauge::noop();
        let until = Instant::now() + Duration::from_millis(50);
        assert!(
            share.reserve_images_waiting(1, until, &gauge).await.is_none(),
            "nothing freed in time"
        );
        let until = Instant::now() + Duration::from_secs(5);
        let waiter = async { share.reserve_images_waiting(8, until, &gauge).await };
        let release = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(held);
        };
        let (got, ()) = tokio::join!(waiter, release);
        assert!(got.is_some(), "room freed by the connection's earlier call");
    }

    #[tokio::test]
    async fn small_calls_have_a_decode_lane_of_their_own() {
        let lanes = DecodeLanes::new(1, 1000);
        let _large = lanes.acquire(Some(5000)).await;
        // The large lane is full; a small call still gets a slot at once.
        let small = tokio::time::timeout(Duration::from_millis(100), lanes.acquire(Some(784))).await;
        assert!(small.is_ok(), "a small call waited behind a large one");
        // An image whose size is unknown counts as large: it waits.
        let unknown = tokio::time::timeout(Duration::from_millis(50), lanes.acquire(None)).await;
        assert!(unknown.is_err(), "an unknown size took a slot from the full large lane");
    }

    #[tokio::test]
    async fn a_connection_decodes_one_call_at_a_time_past_its_share() {
        let share = share();
        let turn = share.decode_turn().await;
        let next = tokio::time::timeout(Duration::from_millis(50), share.decode_turn()).await;
        assert!(next.is_err(), "a second decode turn with the first held");
        drop(turn);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), share.decode_turn())
                .await
                .is_ok()
        );
    }
}
