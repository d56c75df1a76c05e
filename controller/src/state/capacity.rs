//! Capacity: GPUs by provider, region, generation and model, as pure
//! arithmetic over node records (the caller supplies which GPUs are held).

use std::collections::{BTreeMap, BTreeSet};

use gpufleet_proto::v1::{
    CapacityDimension, CapacityGroup, GetCapacityResponse, GpuHealth, Node, NodeState,
};

use crate::error::{ControllerError, Result};

/// Totals and, per `group_by` key, groups; Lost nodes are not counted.
/// `as_of` is left for the caller to stamp.
pub(crate) fn summarize<'a>(
    nodes: impl Iterator<Item = (&'a str, &'a Node)>,
    allocated: &dyn Fn(&str) -> bool,
    group_by: &[CapacityDimension],
) -> Result<GetCapacityResponse> {
    for (i, dim) in group_by.iter().enumerate() {
        if *dim == CapacityDimension::Unspecified {
            return Err(ControllerError::invalid(
                format!("group_by[{i}]"),
                "accepted dimensions: provider, region, generation, model",
            ));
        }
    }
    // Group key (provider, region, generation, model) → totals and the nodes counted.
    type GroupKey = (String, String, i32, String);
    let mut groups: BTreeMap<GroupKey, (CapacityGroup, BTreeSet<String>)> = BTreeMap::new();
    let mut total = (CapacityGroup::default(), BTreeSet::new());
    for (node_id, record) in nodes {
        if record.state() == NodeState::Lost {
            continue;
        }
        let identity = record.identity.clone().unwrap_or_default();
        let ready = record.state() == NodeState::Ready;
        for gpu in &record.gpus {
            let info = gpu.info.clone().unwrap_or_default();
            let key = (
                if group_by.contains(&CapacityDimension::Provider) {
                    identity.provider.clone()
                } else {
                    String::new()
                },
                if group_by.contains(&CapacityDimension::Region) {
                    identity.region.clone()
                } else {
                    String::new()
                },
                if group_by.contains(&CapacityDimension::Generation) {
                    info.generation
                } else {
                    0
                },
                if group_by.contains(&CapacityDimension::Model) {
                    info.model.clone()
                } else {
                    String::new()
                },
            );
            let healthy = ready && gpu.health() != GpuHealth::Unhealthy;
            let allocated = allocated(&info.uuid);
            let price = identity.price_per_gpu_hour_micro_usd;
            let group = groups.entry(key.clone()).or_insert_with(|| {
                (
                    CapacityGroup {
                        provider: key.0.clone(),
                        region: key.1.clone(),
                        generation: key.2,
                        model: key.3.clone(),
                        min_price_per_gpu_hour_micro_usd: u64::MAX,
                        ..Default::default()
                    },
                    BTreeSet::new(),
                )
            });
            if total.1.is_empty() && total.0.total_gpus == 0 {
                total.0.min_price_per_gpu_hour_micro_usd = u64::MAX;
            }
            for (g, nodes) in [(&mut group.0, &mut group.1), (&mut total.0, &mut total.1)] {
                nodes.insert(node_id.to_string());
                g.nodes = nodes.len() as u32;
                g.total_gpus += 1;
                g.healthy_gpus += healthy as u32;
                g.allocated_gpus += allocated as u32;
                g.free_gpus += (healthy && !allocated) as u32;
                g.min_price_per_gpu_hour_micro_usd = g.min_price_per_gpu_hour_micro_usd.min(price);
                g.max_price_per_gpu_hour_micro_usd = g.max_price_per_gpu_hour_micro_usd.max(price);
            }
        }
    }
    let fix = |mut g: CapacityGroup| {
        if g.min_price_per_gpu_hour_micro_usd == u64::MAX {
            g.min_price_per_gpu_hour_micro_usd = 0;
        }
        g
    };
    Ok(GetCapacityResponse {
        groups: if group_by.is_empty() {
            Vec::new()
        } else {
            groups.into_values().map(|(g, _)| fix(g)).collect()
        },
        total: Some(fix(total.0)),
        as_of: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuInfo, GpuStatus, NodeIdentity};

    fn node(id: &str, region: &str, state: NodeState, price: u64, gpus: &[(&str, bool)]) -> Node {
        Node {
            identity: Some(NodeIdentity {
                node_id: id.into(),
                provider: "aws".into(),
                region: region.into(),
                price_per_gpu_hour_micro_usd: price,
                ..Default::default()
            }),
            state: state as i32,
            gpus: gpus
                .iter()
                .map(|(uuid, healthy)| GpuStatus {
                    info: Some(GpuInfo {
                        uuid: (*uuid).into(),
                        model: "H100-SXM-80GB".into(),
                        ..Default::default()
                    }),
                    health: if *healthy {
                        GpuHealth::Healthy
                    } else {
                        GpuHealth::Unhealthy
                    } as i32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn totals_and_groups_count_free_held_and_unhealthy_gpus() {
        let nodes = [
            node(
                "a",
                "us-east-1",
                NodeState::Ready,
                2_000_000,
                &[("a0", true), ("a1", true)],
            ),
            node(
                "b",
                "eu-north-1",
                NodeState::Ready,
                3_000_000,
                &[("b0", false)],
            ),
            node(
                "c",
                "eu-north-1",
                NodeState::NotReady,
                1_000_000,
                &[("c0", true)],
            ),
            node("d", "eu-north-1", NodeState::Lost, 500_000, &[("d0", true)]),
        ];
        let held = |uuid: &str| uuid == "a1";
        let response = summarize(
            nodes
                .iter()
                .map(|n| (n.identity.as_ref().map_or("", |i| i.node_id.as_str()), n)),
            &held,
            &[CapacityDimension::Region],
        )
        .unwrap();
        let total = response.total.unwrap();
        assert_eq!(
            (
                total.nodes,
                total.total_gpus,
                total.healthy_gpus,
                total.allocated_gpus,
                total.free_gpus
            ),
            (3, 4, 2, 1, 1),
            "the lost node is not counted; NotReady GPUs are not healthy"
        );
        assert_eq!(
            (
                total.min_price_per_gpu_hour_micro_usd,
                total.max_price_per_gpu_hour_micro_usd
            ),
            (1_000_000, 3_000_000)
        );
        let regions: Vec<(&str, u32, u32)> = response
            .groups
            .iter()
            .map(|g| (g.region.as_str(), g.total_gpus, g.free_gpus))
            .collect();
        assert_eq!(regions, [("eu-north-1", 2, 0), ("us-east-1", 2, 1)]);
    }

    #[test]
    fn an_empty_fleet_has_zero_prices_and_no_groups_unless_asked() {
        let response = summarize(std::iter::empty(), &|_| false, &[]).unwrap();
        let total = response.total.unwrap();
        assert_eq!(total.total_gpus, 0);
        assert_eq!(total.min_price_per_gpu_hour_micro_usd, 0);
        assert!(response.groups.is_empty());
        let err = summarize(
            std::iter::empty(),
            &|_| false,
            &[CapacityDimension::Unspecified],
        )
        .unwrap_err();
        assert!(err.to_string().contains("group_by[0]"), "{err}");
    }
}
