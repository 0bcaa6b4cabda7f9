//! The gRPC codec of this crate's own protos: prost's, with the element counts of a request bounded before
//! prost builds it. A protobuf message can make its decoder allocate far more than its own bytes: an empty
//! `Image` is 2 bytes on the wire and 32 in memory, an empty `bytes` element 2 and 24, a packed `int64` 1 and
//! 8. So a 16 MiB `Classify` with 8 million empty images cost 300 MiB once decoded, before any check ran.
//! Here a scan of the wire bytes (no allocation) counts the repeated fields that could do that, and a message
//! over its bounds is refused with INVALID_ARGUMENT before prost sees it.
//!
//! `build.rs` makes every generated client and server of `fashion_mnist.v1` and `inference` use
//! [`BoundedCodec`]; responses and messages with nothing to bound have no limits ([`Bounded::LIMITS`] empty).

use std::{
    marker::PhantomData,
    sync::atomic::{AtomicUsize, Ordering},
};

use bytes::Buf;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The most images a call may carry (`--max-images-per-request`), for the bounds below. Servers in one process
/// (tests) share it: it holds the largest any of them set, so it never refuses what a server would serve; the
/// exact check stays the core's.
static MAX_IMAGES: AtomicUsize = AtomicUsize::new(64);

/// Sets the image bound; see [`MAX_IMAGES`].
pub fn allow_images_per_call(max_images: usize) {
    MAX_IMAGES.fetch_max(max_images, Ordering::Relaxed);
}

/// How many elements a field may hold.
#[derive(Debug, Clone, Copy)]
pub enum Max {
    Fixed(usize),
    /// The images a call may carry.
    Images,
    /// The pixels of the images a call may carry (784 per image).
    Pixels,
}

impl Max {
    fn resolve(self) -> usize {
        let images = MAX_IMAGES.load(Ordering::Relaxed);
        match self {
            Max::Fixed(n) => n,
            Max::Images => images,
            Max::Pixels => images.saturating_mul(crate::core::preprocess::PIXELS),
        }
    }
}

/// How a packed repeated field's elements are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// Messages, strings, bytes: one length-delimited record per element.
    Records,
    Varint,
    Fixed32,
    Fixed64,
}

impl Packing {
    /// What one element takes in memory once decoded, beyond bytes the wire also carries: its slot in a
    /// `Vec` that grew by doubling (so twice its size): 8 bytes at most for a number (so a one-byte varint
    /// can become 16), 64 for a record (a `Vec`/`String` header, or a small message such as an `Image`; its
    /// contents are on the wire too, and a nested message's own repeated fields are counted by their limits).
    /// The few larger structs (a tensor's, at most 8 a call) are left to the baseline.
    const fn decoded_bytes(self) -> usize {
        match self {
            Packing::Records => 2 * 64,
            Packing::Varint | Packing::Fixed64 => 2 * 8,
            Packing::Fixed32 => 2 * 4,
        }
    }
}

/// A repeated (or map) field's bound, and the bounds inside each of its elements (for messages).
#[derive(Debug)]
pub struct FieldLimit {
    pub number: u32,
    pub name: &'static str,
    pub max: Max,
    pub packing: Packing,
    pub inside: &'static [FieldLimit],
    /// Whether the field's elements are tensor values, which also count against the whole message's bound
    /// ([`Max::Pixels`] values in all): the cost is per message, not per field, so eight inputs of two
    /// fields each, every field within its own bound, still cannot decode to 16 times a call's worth.
    pub values: bool,
}

/// A message type's bounds; empty for most.
pub trait Bounded {
    const LIMITS: &'static [FieldLimit] = &[];
}

/// prost's codec, with [`Bounded::LIMITS`] checked before each message is decoded.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        BoundedCodec(PhantomData)
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Bounded + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(ProstDecoder::default())
    }
}

#[derive(Debug)]
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default + Bounded> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if !U::LIMITS.is_empty() {
            // A gRPC message arrives whole in one buffer, so the scan sees all of it.
            let wire = buf.chunk();
            let decoded = check(wire, U::LIMITS).map_err(Status::invalid_argument)?;
            // The wire bytes are charged as they arrive; what decoding adds to them is charged here, before
            // prost allocates it, to the same call.
            crate::transport::layers::charge_decoded(decoded.saturating_sub(wire.len()))?;
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Counts the bounded fields of one message (and of the bounded fields' messages) on the wire, and returns a
/// bound on what their elements take in memory once decoded ([`Packing::decoded_bytes`]). An error names the
/// field by its path (`inputs.contents.bytes_contents`), built only on the way out.
fn check(buf: &[u8], limits: &[FieldLimit]) -> Result<usize, String> {
    let mut values = 0usize;
    let mut decoded = 0usize;
    check_counting(buf, limits, &mut values, &mut decoded)?;
    let max = Max::Pixels.resolve();
    if values > max {
        return Err(format!(
            "the request's tensors hold {values} values in all: at most {max} (the images a call may carry x 784)"
        ));
    }
    Ok(decoded)
}

/// [`check`] of one (possibly nested) message, adding the tensor values it holds to `values` and its bounded
/// elements' decoded size to `decoded`.
fn check_counting(
    mut buf: &[u8],
    limits: &[FieldLimit],
    values: &mut usize,
    decoded: &mut usize,
) -> Result<(), String> {
    let mut counts = vec![0usize; limits.len()];
    while !buf.is_empty() {
        let key = varint(&mut buf).ok_or("malformed message")?;
        let (number, wire_type) = ((key >> 3) as u32, key & 7);
        let limit = limits.iter().position(|l| l.number == number);
        let elements = match wire_type {
            0 => {
                varint(&mut buf).ok_or("malformed varint")?;
                1
            }
            1 => {
                skip(&mut buf, 8)?;
                1
            }
            5 => {
                skip(&mut buf, 4)?;
                1
            }
            2 => {
                let len = usize::try_from(varint(&mut buf).ok_or("malformed length")?).map_err(|_| "length")?;
                let record = buf.get(..len).ok_or("truncated record")?;
                buf = &buf[len..];
                match limit.map(|i| &limits[i]) {
                    Some(l) if l.packing == Packing::Varint => record.iter().filter(|b| **b < 0x80).count(),
                    Some(l) if l.packing == Packing::Fixed32 => record.len() / 4,
                    Some(l) if l.packing == Packing::Fixed64 => record.len() / 8,
                    Some(l) => {
                        if !l.inside.is_empty() {
                            check_counting(record, l.inside, values, decoded).map_err(|e| format!("{}.{e}", l.name))?;
                        }
                        1
                    }
                    None => 0,
                }
            }
            _ => return Err(format!("unsupported wire type {wire_type}")),
        };
        if let Some(i) = limit {
            counts[i] += elements;
            *decoded = decoded.saturating_add(elements.saturating_mul(limits[i].packing.decoded_bytes()));
            if limits[i].values {
                *values = values.saturating_add(elements);
            }
            let max = limits[i].max.resolve();
            if counts[i] > max {
                return Err(format!(
                    "{} has more than {max} elements: at most {max} per call",
                    limits[i].name
                ));
            }
        }
    }
    Ok(())
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

fn skip(buf: &mut &[u8], n: usize) -> Result<(), String> {
    *buf = buf.get(n..).ok_or("truncated field")?;
    Ok(())
}

const fn field(number: u32, name: &'static str, max: Max, packing: Packing) -> FieldLimit {
    FieldLimit {
        number,
        name,
        max,
        packing,
        inside: &[],
        values: false,
    }
}

/// A tensor-contents field: bounded itself, and counted against the message's values ([`FieldLimit::values`]).
const fn values(number: u32, name: &'static str, packing: Packing) -> FieldLimit {
    FieldLimit {
        values: true,
        ..field(number, name, Max::Pixels, packing)
    }
}

/// Parameters a call may set (maps are repeated entries on the wire).
const PARAMETERS: Max = Max::Fixed(64);

const CONTENTS: &[FieldLimit] = &[
    values(1, "bool_contents", Packing::Varint),
    values(2, "int_contents", Packing::Varint),
    values(3, "int64_contents", Packing::Varint),
    values(4, "uint_contents", Packing::Varint),
    values(5, "uint64_contents", Packing::Varint),
    values(6, "fp32_contents", Packing::Fixed32),
    values(7, "fp64_contents", Packing::Fixed64),
    field(8, "bytes_contents", Max::Images, Packing::Records),
];

const INPUT_TENSOR: &[FieldLimit] = &[
    field(3, "shape", Max::Fixed(8), Packing::Varint),
    field(4, "parameters", PARAMETERS, Packing::Records),
    FieldLimit {
        number: 5,
        name: "contents",
        max: Max::Fixed(1),
        packing: Packing::Records,
        inside: CONTENTS,
        values: false,
    },
];

const OUTPUT_TENSOR: &[FieldLimit] = &[field(2, "parameters", PARAMETERS, Packing::Records)];

impl Bounded for crate::pb::ClassifyRequest {
    const LIMITS: &'static [FieldLimit] = &[field(1, "images", Max::Images, Packing::Records)];
}

impl Bounded for crate::inference_pb::ModelInferRequest {
    const LIMITS: &'static [FieldLimit] = &[
        field(4, "parameters", PARAMETERS, Packing::Records),
        FieldLimit {
            number: 5,
            name: "inputs",
            max: Max::Fixed(8),
            packing: Packing::Records,
            inside: INPUT_TENSOR,
            values: false,
        },
        FieldLimit {
            number: 6,
            name: "outputs",
            max: Max::Fixed(16),
            packing: Packing::Records,
            inside: OUTPUT_TENSOR,
            values: false,
        },
        field(7, "raw_input_contents", Max::Fixed(8), Packing::Records),
    ];
}

impl Bounded for crate::inference_pb::RepositoryModelLoadRequest {
    const LIMITS: &'static [FieldLimit] = &[field(3, "parameters", PARAMETERS, Packing::Records)];
}

impl Bounded for crate::inference_pb::RepositoryModelUnloadRequest {
    const LIMITS: &'static [FieldLimit] = &[field(3, "parameters", PARAMETERS, Packing::Records)];
}

/// Messages with nothing a client could inflate: no bounds.
macro_rules! unbounded {
    ($($t:path),* $(,)?) => { $(impl Bounded for $t {})* };
}

unbounded!(
    crate::pb::ClassifyResponse,
    crate::pb::GetModelInfoRequest,
    crate::pb::GetModelInfoResponse,
    crate::inference_pb::ServerLiveRequest,
    crate::inference_pb::ServerLiveResponse,
    crate::inference_pb::ServerReadyRequest,
    crate::inference_pb::ServerReadyResponse,
    crate::inference_pb::ModelReadyRequest,
    crate::inference_pb::ModelReadyResponse,
    crate::inference_pb::ServerMetadataRequest,
    crate::inference_pb::ServerMetadataResponse,
    crate::inference_pb::ModelMetadataRequest,
    crate::inference_pb::ModelMetadataResponse,
    crate::inference_pb::ModelInferResponse,
    crate::inference_pb::RepositoryIndexRequest,
    crate::inference_pb::RepositoryIndexResponse,
    crate::inference_pb::RepositoryModelLoadResponse,
    crate::inference_pb::RepositoryModelUnloadResponse,
    crate::inference_pb::ModelConfigRequest,
    crate::inference_pb::ModelConfigResponse,
    crate::inference_pb::ModelStatisticsRequest,
    crate::inference_pb::ModelStatisticsResponse,
);

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{inference_pb as oip, pb};

    fn scan<M: Message + Bounded>(message: &M) -> Result<(), String> {
        check(&message.encode_to_vec(), M::LIMITS).map(|_| ())
    }

    #[test]
    fn a_classify_call_over_the_image_bound_is_refused_before_decoding() {
        let image = pb::Image { data: None };
        let within = pb::ClassifyRequest {
            images: vec![image.clone(); 64],
            ..Default::default()
        };
        assert_eq!(scan(&within), Ok(()));
        let over = pb::ClassifyRequest {
            images: vec![image; 65],
            ..Default::default()
        };
        assert_eq!(
            scan(&over).unwrap_err(),
            "images has more than 64 elements: at most 64 per call"
        );
    }

    #[test]
    fn nested_tensor_fields_are_bounded_packed_or_not() {
        let tensor = |contents: oip::InferTensorContents, shape: Vec<i64>| oip::ModelInferRequest {
            inputs: vec![oip::model_infer_request::InferInputTensor {
                shape,
                contents: Some(contents),
                ..Default::default()
            }],
            ..Default::default()
        };
        let bytes = |n| oip::InferTensorContents {
            bytes_contents: vec![Vec::new(); n],
            ..Default::default()
        };
        assert_eq!(scan(&tensor(bytes(64), vec![64])), Ok(()));
        assert!(
            scan(&tensor(bytes(65), vec![65]))
                .unwrap_err()
                .starts_with("inputs.contents.bytes_contents")
        );
        let shape = scan(&tensor(bytes(1), vec![0; 9])).unwrap_err();
        assert!(shape.starts_with("inputs.shape has more than 8"), "{shape}");
        let fp32 = |n| oip::InferTensorContents {
            fp32_contents: vec![0.0; n],
            ..Default::default()
        };
        assert_eq!(scan(&tensor(fp32(64 * 784), vec![64, 1, 28, 28])), Ok(()));
        assert!(scan(&tensor(fp32(64 * 784 + 1), vec![1])).is_err());
        let uint = oip::InferTensorContents {
            uint_contents: vec![0; 64 * 784 + 1],
            ..Default::default()
        };
        assert!(scan(&tensor(uint, vec![1])).unwrap_err().contains("uint_contents"));
    }

    /// Issue #35: 8 inputs, each with 50,176 packed zeros in two 64-bit fields, are 803 kB on the wire and
    /// 6.4 MB decoded; every field was within its own bound, so 80 such streams took the server to 761 MiB.
    /// The values are bounded per message: a call's worth in all.
    #[test]
    fn the_tensor_values_of_a_whole_message_are_bounded_not_just_each_field() {
        let pixels = 64 * 784;
        let input = |int64: usize, uint64: usize| oip::model_infer_request::InferInputTensor {
            shape: vec![1],
            contents: Some(oip::InferTensorContents {
                int64_contents: vec![0; int64],
                uint64_contents: vec![0; uint64],
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = |inputs| oip::ModelInferRequest {
            inputs,
            ..Default::default()
        };
        let attack = request((0..8).map(|_| input(pixels, pixels)).collect());
        assert!(attack.encoded_len() < 1 << 20, "the attack is small on the wire");
        let refused = scan(&attack).unwrap_err();
        assert!(refused.contains("values in all"), "{refused}");
        // A call's worth spread over inputs and fields is still served.
        let spread = request(vec![input(pixels / 4, pixels / 4), input(pixels / 4, pixels / 4)]);
        assert_eq!(scan(&spread), Ok(()));
        assert!(scan(&request(vec![input(pixels / 2, pixels / 2), input(1, 0)])).is_err());
    }

    #[test]
    fn truncated_messages_are_refused_not_read_past_their_end() {
        let bytes = pb::ClassifyRequest {
            images: vec![pb::Image { data: None }; 3],
            ..Default::default()
        }
        .encode_to_vec();
        assert!(check(&bytes[..bytes.len() - 1], pb::ClassifyRequest::LIMITS).is_err());
    }
}
