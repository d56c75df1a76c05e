//! The client half of the `gpufleet` command that other crates share: a
//! connection to the controller with its bearer token and CA. The
//! commands themselves live in the binary.

pub mod client;
