//! The protobuf codec every gpufleet service and client uses: prost's, with
//! smaller per-RPC buffers.
//!
//! Why: tonic allocates an encode and a decode buffer of `buffer_size`
//! (8 KiB by default) for every RPC, and a long-lived stream keeps both for
//! its life. A controller holds one `AgentControl.Connect` stream per agent,
//! down which it sends an acknowledgement of about 12 bytes a second. Each
//! message is encoded after the previous one, so the encode buffer's pages
//! were touched one by one: 8 KiB took about eleven minutes to become
//! resident, and with 1,000 agents the controller's RSS climbed by about
//! 8 MiB over its first eleven minutes while its live heap stayed level
//! (BENCHMARKS.md, `load`). With 1 KiB buffers a stream holds 14 KiB less
//! and its buffers are resident within its first minutes. A larger message
//! grows its buffer in `BUFFER_SIZE` steps, as tonic documents.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes of each RPC's encode and decode buffer.
pub const BUFFER_SIZE: usize = 1024;
/// Encoded bytes after which a streaming response yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers (named in `build.rs` as the
/// generated code's codec).
#[derive(Debug, Clone)]
pub struct GpufleetCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for GpufleetCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for GpufleetCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
