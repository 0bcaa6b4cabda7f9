//! Who gets to use the server's bounded resources, and how much of them: the queue room, decode slots and
//! request bytes one connection may hold ([`ConnectionShare`]), the two decode lanes that keep a small image
//! from waiting behind huge ones ([`DecodeLanes`]), and the cap on request bytes in flight
//! ([`RequestBytesLayer`]).
//!
//! Every refusal here is immediate (`try_acquire`), so an overloaded server answers RESOURCE_EXHAUSTED in
//! microseconds instead of letting one greedy client queue everyone else out.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::{connections::ConnectionInfo, error::AdmissionError};

/// How much of the server one connection may hold at once; from the config, validated there.
#[derive(Debug, Clone, Copy)]
pub struct SharePolicy {
    /// Images queued or being decoded for one connection, across models.
    pub queued_images: usize,
    /// Calls of one connection decoding (or waiting for a decode slot) at once; its further calls wait.
    pub decodes: usize,
    /// Request bytes of one connection's calls in flight.
    pub request_bytes: usize,
}

/// One connection's share (see [`SharePolicy`]); dropped with the connection.
#[derive(Debug)]
pub struct ConnectionShare {
    images: Arc<Semaphore>,
    decodes: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl ConnectionShare {
    pub fn new(policy: &SharePolicy) -> Self {
        ConnectionShare {
            images: Arc::new(Semaphore::new(policy.queued_images)),
            decodes: Arc::new(Semaphore::new(policy.decodes)),
            bytes: Arc::new(Semaphore::new(policy.request_bytes)),
        }
    }

    /// Room for `n` more images of this connection, or an immediate refusal.
    pub fn reserve_images(&self, n: usize) -> Result<OwnedSemaphorePermit, AdmissionError> {
        let limit = self.images.available_permits();
        u32::try_from(n)
            .ok()
            .and_then(|n| self.images.clone().try_acquire_many_owned(n).ok())
            .ok_or(AdmissionError::ConnectionImages { requested: n, room: limit })
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

/// Caps the request bytes held by calls in flight, across the server and per connection: each body frame is
/// charged as it arrives, and the charge lasts until the call's response is ready. Past either cap the call
/// fails with RESOURCE_EXHAUSTED instead of buffering more.
#[derive(Debug, Clone)]
pub struct RequestBytesLayer {
    global: Arc<Semaphore>,
}

impl RequestBytesLayer {
    pub fn new(max_bytes: usize) -> Self {
        RequestBytesLayer {
            global: Arc::new(Semaphore::new(max_bytes)),
        }
    }
}

impl<S> tower::Layer<S> for RequestBytesLayer {
    type Service = RequestBytes<S>;

    fn layer(&self, inner: S) -> RequestBytes<S> {
        RequestBytes {
            inner,
            global: self.global.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestBytes<S> {
    inner: S,
    global: Arc<Semaphore>,
}

type Charge = Arc<Mutex<Vec<OwnedSemaphorePermit>>>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for RequestBytes<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let connection = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|c| c.share.bytes.clone());
        let charge: Charge = Arc::default();
        let request = request.map(|inner| {
            tonic::body::Body::new(ChargedBody {
                inner,
                global: self.global.clone(),
                connection,
                charge: charge.clone(),
            })
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // The handler has finished with the request's bytes (a streaming response holds none of them).
            drop(charge);
            response
        })
    }
}

struct ChargedBody {
    inner: tonic::body::Body,
    global: Arc<Semaphore>,
    connection: Option<Arc<Semaphore>>,
    charge: Charge,
}

impl ChargedBody {
    fn charge(&self, len: usize) -> Result<(), Status> {
        let Ok(n) = u32::try_from(len) else {
            return Err(AdmissionError::RequestBytes.into());
        };
        if n == 0 {
            return Ok(());
        }
        let mut held = self.charge.lock().expect("the charge lock is never poisoned");
        if let Some(connection) = &self.connection {
            held.push(
                connection
                    .clone()
                    .try_acquire_many_owned(n)
                    .map_err(|_| AdmissionError::ConnectionRequestBytes)?,
            );
        }
        held.push(
            self.global
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| AdmissionError::RequestBytes)?,
        );
        Ok(())
    }
}

impl HttpBody for ChargedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref()
            && let Err(status) = self.charge(data.len())
        {
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
