//! Fleet views over the nodes' latest samples: the GPUs matching a
//! `GetLatest` filter, and utilisation, power and memory summed and
//! averaged per group (provider, region, generation, model).

use std::collections::BTreeMap;
use std::time::SystemTime;

use gpufleet_proto::v1::{
    CapacityDimension, GetAggregatesResponse, GetLatestRequest, GetLatestResponse, GpuHealth,
    GpuLatest, Node, NodeState, NodeTelemetryStats, TelemetryGroup,
};
use prost_types::Timestamp;

use crate::error::{ControllerError, Result};

/// Flattens nodes (with their GPUs' latest samples) into the GPUs matching
/// the filter, with the counters of the nodes that appear.
pub fn latest(
    nodes: &[Node],
    filter: &GetLatestRequest,
    stats: impl Fn(&str) -> NodeTelemetryStats,
    now: SystemTime,
) -> GetLatestResponse {
    let mut response = GetLatestResponse {
        as_of: Some(Timestamp::from(now)),
        ..Default::default()
    };
    for node in nodes {
        let identity = node.identity.clone().unwrap_or_default();
        if (!filter.node_id.is_empty() && identity.node_id != filter.node_id)
            || (!filter.provider.is_empty() && identity.provider != filter.provider)
            || (!filter.region.is_empty() && identity.region != filter.region)
        {
            continue;
        }
        let before = response.gpus.len();
        for gpu in &node.gpus {
            let info = gpu.info.clone().unwrap_or_default();
            if (!filter.gpu_uuid.is_empty() && info.uuid != filter.gpu_uuid)
                || (filter.generation != 0 && info.generation != filter.generation)
                || (!filter.model.is_empty() && info.model != filter.model)
            {
                continue;
            }
            response.gpus.push(GpuLatest {
                node_id: identity.node_id.clone(),
                provider: identity.provider.clone(),
                region: identity.region.clone(),
                node_state: node.state,
                info: Some(info),
                health: gpu.health,
                job_id: gpu.job_id.clone(),
                allocation_id: gpu.allocation_id.clone(),
                sample: gpu.latest.as_deref().cloned(),
            });
        }
        if response.gpus.len() > before {
            response.nodes.push(stats(&identity.node_id));
        }
    }
    response
}

/// Sums of one group before the means are taken.
#[derive(Default)]
struct GroupSums {
    group: TelemetryGroup,
    util_sum: f64,
    util_count: u32,
    power_sum_mw: f64,
    power_count: u32,
}

impl GroupSums {
    fn finish(mut self) -> TelemetryGroup {
        if self.util_count > 0 {
            self.group.mean_gpu_utilization_percent = self.util_sum / f64::from(self.util_count);
        }
        if self.power_count > 0 {
            self.group.mean_power_watts = self.power_sum_mw / 1000.0 / f64::from(self.power_count);
        }
        self.group.total_power_watts = self.power_sum_mw / 1000.0;
        self.group
    }
}

/// Groups every GPU of non-Lost nodes. Samples count only from Ready nodes:
/// a silent node's last sample says nothing about now.
pub fn aggregates(
    nodes: &[Node],
    group_by: &[CapacityDimension],
    now: SystemTime,
) -> Result<GetAggregatesResponse> {
    for (i, dim) in group_by.iter().enumerate() {
        if *dim == CapacityDimension::Unspecified {
            return Err(ControllerError::invalid(
                format!("group_by[{i}]"),
                "accepted dimensions: provider, region, generation, model",
            ));
        }
    }
    let has = |d: CapacityDimension| group_by.contains(&d);
    let mut groups: BTreeMap<(String, String, i32, String), GroupSums> = BTreeMap::new();
    let mut total = GroupSums::default();
    for node in nodes {
        if node.state() == NodeState::Lost {
            continue;
        }
        let identity = node.identity.clone().unwrap_or_default();
        let ready = node.state() == NodeState::Ready;
        for gpu in &node.gpus {
            let info = gpu.info.clone().unwrap_or_default();
            let key = (
                if has(CapacityDimension::Provider) {
                    identity.provider.clone()
                } else {
                    String::new()
                },
                if has(CapacityDimension::Region) {
                    identity.region.clone()
                } else {
                    String::new()
                },
                if has(CapacityDimension::Generation) {
                    info.generation
                } else {
                    0
                },
                if has(CapacityDimension::Model) {
                    info.model.clone()
                } else {
                    String::new()
                },
            );
            let group = groups.entry(key.clone()).or_insert_with(|| GroupSums {
                group: TelemetryGroup {
                    provider: key.0.clone(),
                    region: key.1.clone(),
                    generation: key.2,
                    model: key.3.clone(),
                    ..Default::default()
                },
                ..Default::default()
            });
            for sums in [&mut *group, &mut total] {
                sums.group.gpus += 1;
                sums.group.unhealthy_gpus += u32::from(gpu.health() == GpuHealth::Unhealthy);
                let Some(sample) = gpu.latest.as_ref().filter(|_| ready) else {
                    continue;
                };
                sums.group.reporting_gpus += 1;
                if let Some(util) = sample.gpu_utilization_percent {
                    sums.util_sum += f64::from(util);
                    sums.util_count += 1;
                }
                if let Some(power) = sample.power_usage_milliwatts {
                    sums.power_sum_mw += f64::from(power);
                    sums.power_count += 1;
                }
                sums.group.memory_used_bytes += sample.memory_used_bytes.unwrap_or(0);
                sums.group.memory_total_bytes +=
                    sample.memory_total_bytes.unwrap_or(info.memory_bytes);
            }
        }
    }
    Ok(GetAggregatesResponse {
        groups: if group_by.is_empty() {
            Vec::new()
        } else {
            groups.into_values().map(GroupSums::finish).collect()
        },
        total: Some(total.finish()),
        as_of: Some(Timestamp::from(now)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::test_support::t0;
    use gpufleet_proto::v1::{GpuGeneration, GpuInfo, GpuSample, GpuStatus, NodeIdentity};

    /// (model, generation, (utilisation, milliwatts) if reporting, health).
    type TestGpu = (&'static str, GpuGeneration, Option<(u32, u32)>, GpuHealth);

    fn node(id: &str, provider: &str, state: NodeState, gpus: &[TestGpu]) -> Node {
        Node {
            identity: Some(NodeIdentity {
                node_id: id.into(),
                provider: provider.into(),
                region: "r1".into(),
                ..Default::default()
            }),
            state: state as i32,
            gpus: gpus
                .iter()
                .map(|(model, generation, reading, health)| GpuStatus {
                    info: Some(GpuInfo {
                        uuid: format!("{id}-{model}"),
                        model: (*model).into(),
                        generation: *generation as i32,
                        memory_bytes: 80,
                        ..Default::default()
                    }),
                    health: *health as i32,
                    latest: reading.map(|(util, mw)| {
                        Box::new(GpuSample {
                            gpu_utilization_percent: Some(util),
                            power_usage_milliwatts: Some(mw),
                            memory_used_bytes: Some(8),
                            ..Default::default()
                        })
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn aggregates_group_and_average_over_reporting_gpus() {
        use GpuGeneration::{Ampere, Hopper};
        let nodes = vec![
            node(
                "a",
                "aws",
                NodeState::Ready,
                &[
                    ("H100", Hopper, Some((80, 700_000)), GpuHealth::Healthy),
                    ("H100b", Hopper, Some((40, 500_000)), GpuHealth::Unhealthy),
                ],
            ),
            node(
                "b",
                "gcp",
                NodeState::Ready,
                &[
                    ("A100", Ampere, Some((10, 300_000)), GpuHealth::Healthy),
                    ("A100b", Ampere, None, GpuHealth::Healthy),
                ],
            ),
            // NotReady: counted, but its stale samples are not.
            node(
                "c",
                "gcp",
                NodeState::NotReady,
                &[("A100", Ampere, Some((100, 400_000)), GpuHealth::Healthy)],
            ),
            // Lost: not counted at all.
            node(
                "d",
                "aws",
                NodeState::Lost,
                &[("H100", Hopper, Some((100, 1)), GpuHealth::Healthy)],
            ),
        ];
        let response = aggregates(&nodes, &[CapacityDimension::Provider], t0()).unwrap();
        let aws = &response.groups[0];
        assert_eq!(
            (
                aws.provider.as_str(),
                aws.gpus,
                aws.unhealthy_gpus,
                aws.reporting_gpus
            ),
            ("aws", 2, 1, 2)
        );
        assert_eq!(aws.mean_gpu_utilization_percent, 60.0);
        assert_eq!(aws.total_power_watts, 1200.0);
        assert_eq!(aws.mean_power_watts, 600.0);
        assert_eq!(aws.memory_used_bytes, 16);
        let gcp = &response.groups[1];
        assert_eq!((gcp.gpus, gcp.reporting_gpus), (3, 1));
        assert_eq!(gcp.mean_gpu_utilization_percent, 10.0);
        assert!(
            gcp.region.is_empty() && gcp.generation == 0,
            "only grouped-by fields are set"
        );
        let total = response.total.unwrap();
        assert_eq!((total.gpus, total.reporting_gpus), (5, 3));
        assert_eq!(total.total_power_watts, 1500.0);
        let by_gen = aggregates(&nodes, &[CapacityDimension::Generation], t0()).unwrap();
        assert_eq!(by_gen.groups.len(), 2);
        assert!(aggregates(&nodes, &[CapacityDimension::Unspecified], t0()).is_err());

        let filter = GetLatestRequest {
            provider: "gcp".into(),
            model: "A100".into(),
            ..Default::default()
        };
        let latest = latest(
            &nodes,
            &filter,
            |id| NodeTelemetryStats {
                node_id: id.into(),
                ..Default::default()
            },
            t0(),
        );
        let ids: Vec<&str> = latest.gpus.iter().map(|g| g.node_id.as_str()).collect();
        assert_eq!(ids, vec!["b", "c"]);
        assert_eq!(latest.nodes.len(), 2);
    }
}
