//! Compiles the gpufleet.v1 protos with protox (pure Rust), so building needs
//! no system `protoc`.

use std::path::PathBuf;

use prost::Message;

/// etcd's v3 API, the subset the controller's etcd store calls (client
/// only; see proto/etcd/rpc.proto for where it comes from).
const ETCD_PROTOS: &[&str] = &["proto/etcd/kv.proto", "proto/etcd/rpc.proto"];

const PROTOS: &[&str] = &[
    "proto/gpufleet/v1/types.proto",
    "proto/gpufleet/v1/auth.proto",
    "proto/gpufleet/v1/agent_control.proto",
    "proto/gpufleet/v1/agent.proto",
    "proto/gpufleet/v1/jobs.proto",
    "proto/gpufleet/v1/fleet.proto",
    "proto/gpufleet/v1/usage.proto",
    "proto/gpufleet/v1/telemetry.proto",
    "proto/gpufleet/v1/secrets.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS.iter().chain(ETCD_PROTOS) {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // Served by gRPC reflection and used by the CLI's JSON output.
    std::fs::write(
        out_dir.join("gpufleet_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    // A `GpuSample` is ~600 bytes of mostly empty optional fields; inline, it
    // would sit in every `GpuStatus` the controller keeps per GPU, sample
    // or not.
    config.boxed(".gpufleet.v1.GpuStatus.latest");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `AgentControl.Connect` would clash with the generated `connect`
        // constructor; clients build a `Channel` and call `new` instead.
        .build_transport(false)
        // Smaller per-RPC buffers than tonic's 8 KiB (src/codec.rs).
        .codec_path("crate::codec::GpufleetCodec")
        .compile_fds_with_config(descriptors, config)?;

    let etcd = protox::compile(ETCD_PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds_with_config(etcd, prost_build::Config::new())?;
    Ok(())
}
