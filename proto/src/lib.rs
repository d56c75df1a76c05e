//! Bindings for the `gpufleet.v1` gRPC API, generated from `proto/` at build
//! time. Nothing else lives here: conversions belong to the domain crates.

#![allow(unreachable_pub, clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("gpufleet.v1");
}

pub mod codec;

/// Encoded `FileDescriptorSet` of every gpufleet.v1 file (and the well-known
/// types they import), for gRPC reflection and protobuf-JSON output.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gpufleet_descriptor.bin"));
