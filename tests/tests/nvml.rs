//! The agent's real `nvml` backend against the fake NVML library
//! (tests/fake-nvml): enumeration and values, absent fields, XID events,
//! and health reaching the controller's scheduler.

use std::path::Path;
use std::time::Duration;

use gpufleet_agent::GpuBackend;
use gpufleet_agent::backend::nvml::NvmlBackend;
use gpufleet_proto::v1::{GetNodeRequest, GpuHealth, JobState, NodeIdentity};
use gpufleet_tests::{Cluster, eventually, fake_nvml_in, write_fake_nvml_config};
use serde_json::{Value, json};

const UUID0: &str = "GPU-11111111-2222-3333-4444-555555555555";
const UUID1: &str = "GPU-66666666-7777-8888-9999-000000000000";

fn full_values() -> Value {
    json!({
        "gpu_util": 87, "mem_util": 41, "enc_util": 3, "dec_util": 5,
        "memory_total": 85_899_345_920u64, "memory_used": 21_474_836_480u64,
        "temperature": 61, "memory_temp": 70,
        "power_usage_mw": 512_345, "power_limit_mw": 700_000, "energy_mj": 123_456_789,
        "sm_clock": 1980, "mem_clock": 2619, "throttle_reasons": 0x44,
        "pcie_tx": 1234, "pcie_rx": 5678, "pcie_replay": 2,
        "ecc_sbe_volatile": 7, "ecc_dbe_volatile": 0, "ecc_sbe_aggregate": 70, "ecc_dbe_aggregate": 1,
        "retired_sbe": 1, "retired_dbe": 0, "retired_pending": 0,
        "remapped_correctable": 3, "remapped_uncorrectable": 0, "remap_pending": 0, "remap_failure": 0,
        "nvlink_crc_flit_errors": 0, "nvlink_replay_errors": 0, "nvlink_recovery_errors": 0,
        "mig_mode": 0, "persistence_mode": 1, "numa_node": 1, "cc_major": 9, "cc_minor": 0
    })
}

/// Two H100s; GPU 1 lacks temperature, encoder and ECC readings.
fn machine(xids0: &[u64]) -> String {
    let mut sparse = full_values();
    for key in [
        "temperature",
        "enc_util",
        "ecc_sbe_volatile",
        "ecc_dbe_volatile",
    ] {
        sparse.as_object_mut().map(|o| o.remove(key));
    }
    json!({
        "driver_version": "550.54.15",
        "cuda_driver_version": 12040,
        "gpus": [
            { "uuid": UUID0, "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": "00000000:18:00.0",
              "serial": "1650923000001", "values": full_values(),
              "processes": [ { "pid": 4242, "used_memory": 1_073_741_824u64 } ], "xids": xids0 },
            { "uuid": UUID1, "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": "00000000:2A:00.0",
              "values": sparse }
        ]
    })
    .to_string()
}

fn library(dir: &Path, xids0: &[u64]) -> std::path::PathBuf {
    let lib = fake_nvml_in(dir).expect("fake NVML library");
    write_fake_nvml_config(dir, &machine(xids0)).expect("fake NVML config");
    lib
}

#[test]
fn nvml_backend_reads_what_the_fake_library_serves() {
    let dir = tempfile::tempdir().unwrap();
    let lib = library(dir.path(), &[]);
    let backend = NvmlBackend::new(Some(lib.as_os_str())).unwrap();

    let gpus = backend.gpus();
    assert_eq!(gpus.len(), 2);
    let g = &gpus[0];
    assert_eq!(g.uuid, UUID0);
    assert_eq!(g.model, "H100-SXM-80GB");
    assert_eq!(g.memory_bytes, 85_899_345_920);
    assert_eq!(
        (g.compute_capability_major, g.compute_capability_minor),
        (9, 0)
    );
    assert_eq!(g.pci_bus_id, "00000000:18:00.0");
    assert_eq!(g.serial, "1650923000001");
    assert_eq!(g.driver_version, "550.54.15");
    assert_eq!(g.cuda_driver_version, "12.4");
    assert_eq!(g.persistence_mode, Some(true));
    assert_eq!(g.numa_node, Some(1));
    assert_eq!(gpus[1].serial, "", "serial unsupported on GPU 1");
    assert_eq!(backend.driver_version(), "550.54.15");

    let samples = backend.sample();
    let s = &samples[0];
    assert_eq!(s.gpu_utilization_percent, Some(87));
    assert_eq!(s.memory_utilization_percent, Some(41));
    assert_eq!(s.encoder_utilization_percent, Some(3));
    assert_eq!(s.decoder_utilization_percent, Some(5));
    assert_eq!(s.memory_used_bytes, Some(21_474_836_480));
    assert_eq!(s.memory_free_bytes, Some(85_899_345_920 - 21_474_836_480));
    assert_eq!(s.temperature_celsius, Some(61));
    assert_eq!(s.memory_temperature_celsius, Some(70));
    assert_eq!(s.power_usage_milliwatts, Some(512_345));
    assert_eq!(s.power_limit_milliwatts, Some(700_000));
    assert_eq!(s.total_energy_millijoules, Some(123_456_789));
    assert_eq!(
        (s.sm_clock_mhz, s.memory_clock_mhz),
        (Some(1980), Some(2619))
    );
    assert_eq!(s.throttle_reasons_mask, Some(0x44));
    assert_eq!(s.throttle_reasons, ["sw_power_cap", "hw_thermal_slowdown"]);
    assert_eq!(
        (s.pcie_tx_kib_per_second, s.pcie_rx_kib_per_second),
        (Some(1234), Some(5678))
    );
    assert_eq!(s.pcie_replay_count, Some(2));
    assert_eq!((s.ecc_sbe_volatile, s.ecc_dbe_volatile), (Some(7), Some(0)));
    assert_eq!(
        (s.ecc_sbe_aggregate, s.ecc_dbe_aggregate),
        (Some(70), Some(1))
    );
    assert_eq!(
        (s.retired_pages_sbe, s.retired_pages_pending),
        (Some(1), Some(false))
    );
    assert_eq!(s.remapped_rows_correctable, Some(3));
    assert_eq!(
        (s.row_remap_pending, s.row_remap_failure),
        (Some(false), Some(false))
    );
    assert_eq!(s.nvlink_crc_errors, Some(0));
    assert_eq!(s.mig_enabled, Some(false));
    assert_eq!(s.processes.len(), 1);
    assert_eq!(s.processes[0].pid, 4242);
    assert_eq!(s.processes[0].used_memory_bytes, Some(1_073_741_824));
    assert!(s.sample_error.is_empty());

    // Unsupported on GPU 1: absent, not zero; the rest is still there.
    let s = &samples[1];
    assert_eq!(s.temperature_celsius, None);
    assert_eq!(s.encoder_utilization_percent, None);
    assert_eq!(s.ecc_sbe_volatile, None);
    assert_eq!(s.ecc_dbe_volatile, None);
    assert_eq!(s.gpu_utilization_percent, Some(87));
    assert_eq!(s.memory_temperature_celsius, Some(70));

    // An XID appended to the file arrives through the event thread.
    write_fake_nvml_config(dir.path(), &machine(&[79])).unwrap();
    let deadline = std::time::Instant::now() + gpufleet_tests::DEADLINE;
    let mut got = Vec::new();
    while got.is_empty() && std::time::Instant::now() < deadline {
        got = backend.drain_xids();
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(got.len(), 1, "no XID event within the deadline");
    assert_eq!(
        (got[0].gpu_uuid.as_str(), got[0].xid, got[0].source),
        (UUID0, 79, "nvml")
    );
}

/// NVLink data counters: read per GPU with the scope id NVML needs, summed
/// over links, absent on a GPU without NVLink, and exported on /metrics.
#[test]
fn nvlink_data_counters_arrive_per_gpu_summed_over_links() {
    const UUID2: &str = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml_in(dir.path()).unwrap();
    let links = |base: u64| {
        (0..4u64)
            .map(|l| json!({ "tx_kib": base + l, "rx_kib": 10 * (base + l) }))
            .collect::<Vec<_>>()
    };
    let config = json!({
        "driver_version": "550.54.15",
        "gpus": [
            // Four links; the driver sums them for the all-links scope.
            { "uuid": UUID0, "name": "NVIDIA H100 80GB HBM3", "values": full_values(),
              "nvlink": links(1000) },
            // An older driver: per-link scopes only, so the agent adds them.
            { "uuid": UUID1, "name": "NVIDIA H100 80GB HBM3", "values": full_values(),
              "nvlink": links(5000), "nvlink_scope_all_unsupported": true },
            // A PCIe card without NVLink.
            { "uuid": UUID2, "name": "NVIDIA L4", "values": full_values() }
        ]
    });
    write_fake_nvml_config(dir.path(), &config.to_string()).unwrap();
    let backend = NvmlBackend::new(Some(lib.as_os_str())).unwrap();
    let samples = backend.sample();
    let got: Vec<(&str, Option<u64>, Option<u64>)> = samples
        .iter()
        .map(|s| (s.uuid.as_str(), s.nvlink_tx_kib, s.nvlink_rx_kib))
        .collect();
    // 1000 + 1001 + 1002 + 1003 = 4006; rx is ten times tx per link.
    assert_eq!(
        got,
        [
            (UUID0, Some(4006), Some(40_060)),
            (UUID1, Some(20_006), Some(200_060)),
            (UUID2, None, None),
        ]
    );
    // The error counters read in the same sample are untouched.
    assert_eq!(samples[0].nvlink_crc_errors, Some(0));

    let metrics = gpufleet_agent::metrics::render(
        &NodeIdentity::default(),
        &backend.gpus(),
        &samples,
        &Default::default(),
    );
    let bandwidth: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL{"))
        .collect();
    assert_eq!(bandwidth.len(), 2, "{bandwidth:?}");
    assert!(
        bandwidth[0].contains(UUID0) && bandwidth[0].ends_with(" 44066"),
        "{bandwidth:?}"
    );
    assert!(
        bandwidth[1].contains(UUID1) && bandwidth[1].ends_with(" 220066"),
        "{bandwidth:?}"
    );

    // The counters move with the driver's: a rewrite is read next sample.
    let mut moved = config.clone();
    moved["gpus"][0]["nvlink"][3]["tx_kib"] = json!(2003);
    write_fake_nvml_config(dir.path(), &moved.to_string()).unwrap();
    assert_eq!(backend.sample()[0].nvlink_tx_kib, Some(5006));

    // A GPU without the counters is not asked every sample (two calls, one
    // for every link), but it is asked again: one that gains them (a driver
    // reload, a misreported card) shows them within a minute of samples.
    moved["gpus"][2]["nvlink"] = json!(links(7000));
    write_fake_nvml_config(dir.path(), &moved.to_string()).unwrap();
    let mut seen_after = None;
    for n in 1..=61 {
        if backend.sample()[2].nvlink_tx_kib.is_some() {
            seen_after = Some(n);
            break;
        }
    }
    let seen_after = seen_after.expect("NVLink counters picked up again within 61 samples");
    assert!(seen_after > 1, "skipped right after it reported none");
}

#[tokio::test]
async fn xid_79_keeps_work_off_the_gpu_until_a_clean_period_passes() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let nvml_dir = cluster.dir.path().join("nvml");
    let lib = library(&nvml_dir, &[]);
    let node = gpufleet_tests::NodeSpec::new("nvml-node", "aws", "us-east-1", "", 3.93);
    let mut config = cluster.agent_config(&node);
    config.gpu_backend = gpufleet_agent::GpuBackendKind::Nvml;
    config.simulated_gpus.clear();
    config.monitoring.nvml_library_path = Some(lib);
    config.monitoring.health.clean_period = Duration::from_secs(3);
    cluster.add_agent_with(config).await?;
    cluster.wait_ready(1).await?;

    let health_of = |node: gpufleet_proto::v1::Node| -> Vec<GpuHealth> {
        node.gpus.iter().map(|g| g.health()).collect()
    };
    let fleet = cluster.fleet().await?;
    let get = GetNodeRequest {
        node_id: "nvml-node".into(),
    };
    eventually("healthy GPUs reported", || {
        let (fleet, get) = (fleet.clone(), get.clone());
        async move {
            let node = fleet.clone().get_node(get).await?.into_inner();
            let ok = node.gpus.iter().all(|g| g.latest.is_some());
            Ok((ok && node.gpus.len() == 2).then_some(()))
        }
    })
    .await?;

    write_fake_nvml_config(&nvml_dir, &machine(&[79]))?;
    eventually("GPU 0 unhealthy at the controller", || {
        let (fleet, get) = (fleet.clone(), get.clone());
        async move {
            let node = fleet.clone().get_node(get).await?.into_inner();
            Ok((health_of(node) == [GpuHealth::Unhealthy, GpuHealth::Healthy]).then_some(()))
        }
    })
    .await?;
    let node = fleet.clone().get_node(get.clone()).await?.into_inner();
    let latest = node.gpus[0].latest.clone().unwrap_or_default();
    assert_eq!(latest.health_reasons[0].code, "xid_critical");
    assert_eq!(latest.health_reasons[0].xid, Some(79));

    // A 2-GPU job cannot go on a node with one healthy GPU...
    let job = cluster.submit(2, &["sleep", "60"]).await?;
    let pending = cluster
        .wait_job(&job.id, "a verdict naming the unhealthy GPU", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.exclusions.iter().any(|e| e.constraint == "unhealthy"))
        })
        .await?;
    assert_eq!(pending.state(), JobState::Pending);
    // ...and is placed once the clean period has passed without new XIDs.
    let placed = cluster
        .wait_job(&job.id, "placement after the clean period", |j| {
            j.state() != JobState::Pending
        })
        .await?;
    assert!(
        matches!(placed.state(), JobState::Running | JobState::Scheduled),
        "{placed:?}"
    );
    let node = fleet.clone().get_node(get).await?.into_inner();
    assert_eq!(health_of(node)[0], GpuHealth::Healthy);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_returns_a_gpu_to_service_until_the_fault_comes_back() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let nvml_dir = cluster.dir.path().join("nvml");
    let lib = library(&nvml_dir, &[]);
    let node = gpufleet_tests::NodeSpec::new("nvml-node", "aws", "us-east-1", "", 3.93);
    let mut config = cluster.agent_config(&node);
    config.gpu_backend = gpufleet_agent::GpuBackendKind::Nvml;
    config.simulated_gpus.clear();
    config.monitoring.nvml_library_path = Some(lib);
    // Longer than the test's deadline: only the operator can bring it back.
    config.monitoring.health.clean_period = Duration::from_secs(600);
    cluster.add_agent_with(config).await?;
    cluster.wait_ready(1).await?;
    let fleet = cluster.fleet().await?;
    let get = GetNodeRequest {
        node_id: "nvml-node".into(),
    };
    let gpu0_health =
        |fleet: gpufleet_proto::v1::fleet_client::FleetClient<gpufleet_tests::Authed>,
         get: GetNodeRequest| async move {
            let node = fleet.clone().get_node(get).await?.into_inner();
            anyhow::Ok(node.gpus.first().map(|g| g.health()).unwrap_or_default())
        };

    write_fake_nvml_config(&nvml_dir, &machine(&[79]))?;
    eventually("GPU 0 unhealthy", || {
        let (fleet, get) = (fleet.clone(), get.clone());
        async move { Ok((gpu0_health(fleet, get).await? == GpuHealth::Unhealthy).then_some(())) }
    })
    .await?;
    let job = cluster.submit(2, &["sleep", "60"]).await?;
    cluster
        .wait_job(&job.id, "pending on the unhealthy GPU", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.exclusions.iter().any(|e| e.constraint == "unhealthy"))
        })
        .await?;

    let uuid = fleet.clone().get_node(get.clone()).await?.into_inner().gpus[0]
        .info
        .clone()
        .unwrap_or_default()
        .uuid;
    fleet
        .clone()
        .uncordon_gpu(gpufleet_proto::v1::UncordonGpuRequest {
            node_id: "nvml-node".into(),
            gpu_uuid: uuid.clone(),
        })
        .await?;
    let placed = cluster
        .wait_job(&job.id, "placed after the uncordon", |j| {
            j.state() != JobState::Pending
        })
        .await?;
    assert!(placed.tasks[0].gpu_uuids.contains(&uuid), "{placed:?}");
    // The agent still reports the old fault; that does not take it out again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gpu0_health(fleet.clone(), get.clone()).await?,
        GpuHealth::Healthy
    );

    // A new XID does.
    write_fake_nvml_config(&nvml_dir, &machine(&[79, 79]))?;
    eventually("GPU 0 unhealthy again after a new XID", || {
        let (fleet, get) = (fleet.clone(), get.clone());
        async move { Ok((gpu0_health(fleet, get).await? == GpuHealth::Unhealthy).then_some(())) }
    })
    .await?;
    // The job running on it is told.
    let told = cluster
        .wait_job(&job.id, "a history line about the GPU", |j| {
            j.history.iter().any(|h| h.contains("became unhealthy"))
        })
        .await?;
    assert!(
        told.history
            .iter()
            .any(|h| h.contains(&uuid) && h.contains("79")),
        "{:?}",
        told.history
    );
    let err = fleet
        .clone()
        .uncordon_gpu(gpufleet_proto::v1::UncordonGpuRequest {
            node_id: "nvml-node".into(),
            gpu_uuid: "GPU-nope".into(),
        })
        .await
        .expect_err("unknown GPU");
    assert_eq!(err.code(), tonic::Code::NotFound);
    cluster.shutdown().await
}
