//! MIG discovery and GPM profiling metrics through the agent's real `nvml`
//! backend against the fake NVML library: instances with their MIG UUIDs,
//! profiles, memory and SM shares; GPM metrics per GPU and per GPU
//! instance as dcgm-exporter's ratios and bytes per second; a GPU without
//! GPM leaves every profiling field absent, never zero.

use gpufleet_agent::GpuBackend;
use gpufleet_agent::backend::nvml::NvmlBackend;
use gpufleet_tests::{fake_nvml_in, write_fake_nvml_config};
use serde_json::{Value, json};

const MIG_GPU: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
const H100: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000000";
const A100: &str = "GPU-cccccccc-0000-0000-0000-000000000000";
const MIG_1G: &str = "MIG-11111111-0000-0000-0000-000000000000";
const MIG_3G: &str = "MIG-33333333-0000-0000-0000-000000000000";
const GIB: u64 = 1 << 30;

fn values(mig_mode: u32) -> Value {
    json!({
        "gpu_util": 50, "mem_util": 20,
        "memory_total": 80 * GIB, "memory_used": 12 * GIB,
        "mig_mode": mig_mode, "sm_count": 132, "cc_major": 9, "cc_minor": 0
    })
}

/// GPU 0: an H100 in MIG mode with a 1g.10gb and a 3g.40gb instance;
/// GPU 1: an H100 with whole-GPU GPM at `tensor` percent; GPU 2: an A100
/// (no GPM).
fn machine(tensor: f64) -> String {
    json!({
        "driver_version": "550.54.15",
        "gpus": [
            { "uuid": MIG_GPU, "name": "NVIDIA H100 80GB HBM3", "values": values(1),
              "gpm": {},
              "mig_instances": [
                { "uuid": MIG_1G, "profile": "1g.10gb", "gpu_instance_id": 9,
                  "memory_total": 10 * GIB, "memory_used": 3 * GIB, "sm_count": 16,
                  "gpm": { "sm_util": 40.0, "any_tensor_util": 25.0, "graphics_util": 45.0 } },
                { "uuid": MIG_3G, "profile": "3g.40gb", "gpu_instance_id": 2,
                  "memory_total": 40 * GIB, "memory_used": 0, "sm_count": 60,
                  "gpm": { "sm_util": 0.0 } }
              ],
              "processes": [ { "pid": 77, "used_memory": 3 * GIB, "gpu_instance_id": 9 } ] },
            { "uuid": H100, "name": "NVIDIA H100 80GB HBM3", "values": values(0),
              "gpm": {
                "graphics_util": 90.0, "sm_util": 80.0, "sm_occupancy": 35.5,
                "any_tensor_util": tensor, "dram_bw_util": 61.0,
                "fp16_util": 50.0, "fp32_util": 10.0, "fp64_util": 0.0,
                "pcie_tx_mib_per_sec": 100.0, "pcie_rx_mib_per_sec": 200.0,
                "nvlink_total_tx_mib_per_sec": 1000.0, "nvlink_total_rx_mib_per_sec": 2000.0
              } },
            { "uuid": A100, "name": "NVIDIA A100-SXM4-80GB", "values": values(0) }
        ]
    })
    .to_string()
}

#[test]
fn mig_instances_are_discovered_with_profiles_memory_and_sm_shares() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml_in(dir.path()).unwrap();
    write_fake_nvml_config(dir.path(), &machine(70.0)).unwrap();
    let backend = NvmlBackend::new(Some(lib.as_os_str())).unwrap();

    let gpus = backend.gpus();
    assert!(gpus[0].mig_enabled);
    let instances = &gpus[0].mig_instances;
    assert_eq!(instances.len(), 2, "{instances:?}");
    let one = &instances[0];
    assert_eq!(one.uuid, MIG_1G);
    assert_eq!(one.profile, "1g.10gb");
    assert_eq!(one.memory_bytes, 10 * GIB);
    assert_eq!(one.sm_share_milli, 16 * 1000 / 132);
    assert_eq!((one.gpu_instance_id, one.compute_instance_id), (9, 0));
    assert_eq!(instances[1].profile, "3g.40gb");
    assert_eq!(instances[1].sm_share_milli, 60 * 1000 / 132);
    assert!(!gpus[1].mig_enabled);
    assert!(gpus[1].mig_instances.is_empty());

    let samples = backend.sample();
    let mig = &samples[0].mig_samples;
    assert_eq!(mig.len(), 2);
    assert_eq!(mig[0].uuid, MIG_1G);
    assert_eq!(mig[0].profile, "1g.10gb");
    assert_eq!(mig[0].memory_used_bytes, Some(3 * GIB));
    assert_eq!(mig[0].memory_total_bytes, Some(10 * GIB));
    assert_eq!(samples[0].mig_enabled, Some(true));
    assert!(samples[1].mig_samples.is_empty());
}

#[test]
fn gpm_metrics_arrive_per_gpu_and_per_mig_instance_and_stay_absent_without_gpm() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml_in(dir.path()).unwrap();
    write_fake_nvml_config(dir.path(), &machine(70.0)).unwrap();
    let backend = NvmlBackend::new(Some(lib.as_os_str())).unwrap();

    // GPM needs two samples: the first has nothing to compare with.
    let first = backend.sample();
    assert_eq!(first[1].gpm, None);
    assert!(first[0].mig_samples.iter().all(|m| m.gpm.is_none()));

    let second = backend.sample();
    let gpm = second[1].gpm.expect("whole-GPU GPM on the H100");
    assert_eq!(gpm.gr_engine_active, Some(0.9));
    assert_eq!(gpm.sm_active, Some(0.8));
    assert_eq!(gpm.sm_occupancy, Some(0.355));
    assert_eq!(gpm.tensor_active, Some(0.7));
    assert_eq!(gpm.dram_active, Some(0.61));
    assert_eq!(
        (gpm.fp16_active, gpm.fp32_active, gpm.fp64_active),
        (Some(0.5), Some(0.1), Some(0.0))
    );
    assert_eq!(gpm.pcie_tx_bytes_per_second, Some(100 << 20));
    assert_eq!(gpm.pcie_rx_bytes_per_second, Some(200 << 20));
    assert_eq!(gpm.nvlink_tx_bytes_per_second, Some(1000 << 20));
    assert_eq!(gpm.nvlink_rx_bytes_per_second, Some(2000 << 20));

    // Per MIG GPU instance; a metric the instance lacks is absent.
    let mig = &second[0].mig_samples;
    let one = mig[0].gpm.expect("GPM of the 1g.10gb instance");
    assert_eq!(one.sm_active, Some(0.4));
    assert_eq!(one.tensor_active, Some(0.25));
    assert_eq!(one.fp64_active, None);
    let three = mig[1].gpm.expect("GPM of the 3g.40gb instance");
    assert_eq!(three.sm_active, Some(0.0), "a measured zero is zero");
    assert_eq!(three.tensor_active, None);
    assert_eq!(second[0].gpm, None, "a MIG GPU reports per instance");

    // The A100 has no GPM: absent, never zero.
    assert_eq!(second[2].gpm, None);
    assert!(second[2].mig_samples.is_empty());

    // New values are those of the next interval.
    write_fake_nvml_config(dir.path(), &machine(5.0)).unwrap();
    let third = backend.sample();
    assert_eq!(
        third[1].gpm.as_ref().and_then(|g| g.tensor_active),
        Some(0.05)
    );
}

#[test]
fn a_mig_layout_is_applied_through_nvml_on_the_gpu_in_mig_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml_in(dir.path()).unwrap();
    write_fake_nvml_config(dir.path(), &machine(70.0)).unwrap();
    let backend = NvmlBackend::new(Some(lib.as_os_str())).unwrap();
    let layout: Vec<String> = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
        .map(String::from)
        .to_vec();

    backend.apply_mig_layout(MIG_GPU, &layout).unwrap();
    let gpu = backend.gpus().remove(0);
    let mut got: Vec<&str> = gpu
        .mig_instances
        .iter()
        .map(|m| m.profile.as_str())
        .collect();
    got.sort_unstable();
    assert_eq!(got, ["1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"]);
    // The old instances are gone; the new ones have new UUIDs.
    assert!(
        gpu.mig_instances
            .iter()
            .all(|m| m.uuid != MIG_1G && m.uuid != MIG_3G)
    );
    let memory: Vec<u64> = gpu
        .mig_instances
        .iter()
        .map(|m| m.memory_bytes >> 30)
        .collect();
    assert_eq!(memory.iter().sum::<u64>(), 40 + 20 + 10 + 10, "{memory:?}");
    // Samples show the new layout too.
    assert_eq!(backend.sample()[0].mig_samples.len(), 4);

    // Applying it again makes the same layout afresh.
    backend.apply_mig_layout(MIG_GPU, &layout).unwrap();
    assert_eq!(backend.gpus()[0].mig_instances.len(), 4);

    // What does not fit, and a GPU not in MIG mode, are refused with why.
    let err = backend
        .apply_mig_layout(MIG_GPU, &["4g.40gb".into(), "4g.40gb".into()])
        .unwrap_err();
    assert!(err.contains("compute slices"), "{err}");
    assert_eq!(backend.gpus()[0].mig_instances.len(), 4, "left as it was");
    let err = backend.apply_mig_layout(H100, &layout).unwrap_err();
    assert!(err.contains("MIG mode is off"), "{err}");
}
