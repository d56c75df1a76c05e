//! Capacity: GPUs by provider, region, generation and model, as pure
//! arithmetic over node records (the caller supplies which GPUs are held).
//! Whole GPUs, MIG instances and shares are counted apart (docs/gpus.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gpufleet_proto::v1::{
    CapacityDimension, CapacityGroup, GetCapacityResponse, GpuHealth, Job, Node, NodeState,
};

use crate::error::{ControllerError, Result};
use crate::lifecycle::task_holds_gpus;

/// What running work holds of one GPU or MIG instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Held {
    /// Held whole (a whole GPU, or a MIG instance).
    pub(crate) exclusive: bool,
    /// Thousandths held by shares.
    pub(crate) share_milli: u64,
}

/// What running tasks hold, by GPU or MIG-instance uuid.
pub(crate) fn held_units<'a>(jobs: impl Iterator<Item = &'a Job>) -> HashMap<String, Held> {
    let mut held: HashMap<String, Held> = HashMap::new();
    for job in jobs {
        for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
            let share = task.mig_profile.is_empty() && task.gpu_share_milli > 0;
            for uuid in &task.gpu_uuids {
                let entry = held.entry(uuid.clone()).or_default();
                if share {
                    entry.share_milli += task.gpu_share_milli as u64;
                } else {
                    entry.exclusive = true;
                }
            }
        }
    }
    held
}

/// Totals and, per `group_by` key, groups; Lost nodes are not counted.
/// `as_of` is left for the caller to stamp.
pub(crate) fn summarize<'a>(
    nodes: impl Iterator<Item = (&'a str, &'a Node)>,
    held: &dyn Fn(&str) -> Held,
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
            let whole = held(&info.uuid);
            // A MIG GPU is held when any instance is; a shared one when any
            // share is; neither is ever free as a whole GPU.
            let mut units = CapacityGroup::default();
            let allocated = if info.mig_enabled {
                units.mig_gpus = 1;
                units.mig_instances = info.mig_instances.len() as u32;
                let mut any = false;
                for instance in &info.mig_instances {
                    if held(&instance.uuid).exclusive {
                        any = true;
                        units.allocated_milli += instance.sm_share_milli as u64;
                    } else if healthy {
                        units.free_mig_instances += 1;
                    }
                }
                any
            } else if whole.share_milli > 0 && !whole.exclusive {
                units.shared_gpus = 1;
                units.allocated_milli = whole.share_milli.min(1000);
                if healthy {
                    units.shared_free_milli = 1000u64.saturating_sub(whole.share_milli);
                }
                true
            } else {
                units.allocated_milli = if whole.exclusive { 1000 } else { 0 };
                whole.exclusive
            };
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
                g.free_gpus += (healthy && !allocated && !info.mig_enabled) as u32;
                g.mig_gpus += units.mig_gpus;
                g.mig_instances += units.mig_instances;
                g.free_mig_instances += units.free_mig_instances;
                g.shared_gpus += units.shared_gpus;
                g.shared_free_milli += units.shared_free_milli;
                g.allocated_milli += units.allocated_milli;
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
        let held = |uuid: &str| Held {
            exclusive: uuid == "a1",
            share_milli: 0,
        };
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
    fn whole_mig_and_shared_units_are_counted_apart() {
        use gpufleet_proto::v1::MigInstance;
        let mut n = node(
            "a",
            "r",
            NodeState::Ready,
            1_000_000,
            &[("g0", true), ("g1", true), ("g2", true)],
        );
        if let Some(info) = n.gpus[0].info.as_mut() {
            info.mig_enabled = true;
            info.mig_instances = (0..3)
                .map(|i| MigInstance {
                    uuid: format!("MIG-{i}"),
                    profile: "1g.10gb".into(),
                    sm_share_milli: 143,
                    ..Default::default()
                })
                .collect();
        }
        let held = |uuid: &str| match uuid {
            "MIG-0" => Held {
                exclusive: true,
                share_milli: 0,
            },
            "g1" => Held {
                exclusive: false,
                share_milli: 700,
            },
            _ => Held::default(),
        };
        let total = summarize(std::iter::once(("a", &n)), &held, &[])
            .unwrap()
            .total
            .unwrap();
        assert_eq!(
            (total.total_gpus, total.allocated_gpus, total.free_gpus),
            (3, 2, 1),
            "the MIG GPU and the shared GPU are not free whole GPUs"
        );
        assert_eq!(
            (
                total.mig_gpus,
                total.mig_instances,
                total.free_mig_instances
            ),
            (1, 3, 2)
        );
        assert_eq!((total.shared_gpus, total.shared_free_milli), (1, 300));
        assert_eq!(total.allocated_milli, 143 + 700);
    }

    #[test]
    fn an_empty_fleet_has_zero_prices_and_no_groups_unless_asked() {
        let response = summarize(std::iter::empty(), &|_| Held::default(), &[]).unwrap();
        let total = response.total.unwrap();
        assert_eq!(total.total_gpus, 0);
        assert_eq!(total.min_price_per_gpu_hour_micro_usd, 0);
        assert!(response.groups.is_empty());
        let err = summarize(
            std::iter::empty(),
            &|_| Held::default(),
            &[CapacityDimension::Unspecified],
        )
        .unwrap_err();
        assert!(err.to_string().contains("group_by[0]"), "{err}");
    }
}
