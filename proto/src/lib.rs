//! Bindings for the `gpufleet.v1` gRPC API, generated from `proto/` at build
//! time, and a client subset of etcd's v3 API (`etcd`). Nothing else lives
//! here: conversions belong to the domain crates.

#![allow(unreachable_pub, clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("gpufleet.v1");
}

/// etcd's v3 API (a client subset), for the controller's etcd store.
pub mod etcd {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
}

pub mod codec;

/// Encoded `FileDescriptorSet` of every gpufleet.v1 file (and the well-known
/// types they import), for gRPC reflection and protobuf-JSON output.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/gpufleet_descriptor.bin"));
