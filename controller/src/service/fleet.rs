use gpufleet_proto::v1::fleet_server::Fleet;
use gpufleet_proto::v1::{
    CapacityDimension, CordonNodeRequest, DrainNodeRequest, GetCapacityRequest,
    GetCapacityResponse, GetNodeRequest, ListNodesRequest, ListNodesResponse, Node, NodeState,
    UncordonNodeRequest,
};
use tonic::{Request, Response, Status};

use super::{caller, to_status};
use crate::auth::Action;
use crate::limits;
use crate::state::Controller;
use crate::validate;

/// Most nodes one `ListNodes` page may ask for.
const MAX_NODE_PAGE: u32 = 1000;

/// One page of nodes (sorted by id, as `list_nodes` returns them): those
/// after `page_token` (the last id of the previous page), at most
/// `page_size` (0 = no count limit) and at most the response budget.
fn node_page(nodes: Vec<Node>, page_size: u32, page_token: &str) -> ListNodesResponse {
    let id = |node: &Node| {
        node.identity
            .as_ref()
            .map(|i| i.node_id.clone())
            .unwrap_or_default()
    };
    let mut nodes: Vec<Node> = nodes
        .into_iter()
        .filter(|node| page_token.is_empty() || id(node).as_str() > page_token)
        .collect();
    let wanted = match page_size {
        0 => nodes.len(),
        n => (n as usize).min(nodes.len()),
    };
    let fit = limits::fitting(&nodes[..wanted]);
    let more = fit < nodes.len();
    nodes.truncate(fit);
    let next_page_token = match (more, nodes.last()) {
        (true, Some(last)) => id(last),
        _ => String::new(),
    };
    ListNodesResponse {
        nodes,
        next_page_token,
    }
}

pub struct FleetService {
    controller: Controller,
}

impl FleetService {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let request = request.into_inner();
        validate::label_filter("provider", &request.provider).map_err(to_status)?;
        validate::label_filter("region", &request.region).map_err(to_status)?;
        validate::filter_list("states", request.states.len()).map_err(to_status)?;
        validate::page_token(&request.page_token).map_err(to_status)?;
        if request.page_size > MAX_NODE_PAGE {
            return Err(Status::invalid_argument(format!(
                "page_size: {}; at most {MAX_NODE_PAGE}",
                request.page_size
            )));
        }
        let states = request
            .states
            .iter()
            .map(|s| {
                NodeState::try_from(*s).map_err(|_| {
                    Status::invalid_argument(format!("states: {s} is not a node state"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let nodes = self
            .controller
            .list_nodes(&request.provider, &request.region, &states);
        Ok(Response::new(node_page(
            nodes,
            request.page_size,
            &request.page_token,
        )))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let request = request.into_inner();
        validate::id_filter("node_id", &request.node_id).map_err(to_status)?;
        self.controller
            .get_node(&request.node_id)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let request = request.into_inner();
        validate::filter_list("group_by", request.group_by.len()).map_err(to_status)?;
        let dims = request
            .group_by
            .iter()
            .map(|d| {
                CapacityDimension::try_from(*d).map_err(|_| {
                    Status::invalid_argument(format!(
                        "group_by: {d} is not a dimension; accepted: provider, region, generation, model"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.controller
            .capacity(&dims)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn cordon_node(
        &self,
        request: Request<CordonNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        caller(&self.controller, &request, Action::OperateFleet)?;
        let request = request.into_inner();
        self.controller
            .cordon_node(&request.node_id, &request.reason)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn uncordon_node(
        &self,
        request: Request<UncordonNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        caller(&self.controller, &request, Action::OperateFleet)?;
        let request = request.into_inner();
        self.controller
            .uncordon_node(&request.node_id)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        caller(&self.controller, &request, Action::OperateFleet)?;
        let request = request.into_inner();
        if request.deadline_seconds > 7 * 24 * 3600 {
            return Err(Status::invalid_argument(
                "deadline_seconds: at most 604800 (7 days)",
            ));
        }
        self.controller
            .drain_node(
                &request.node_id,
                std::time::Duration::from_secs(request.deadline_seconds as u64),
            )
            .map(Response::new)
            .map_err(to_status)
    }

    async fn set_mig_layout(
        &self,
        request: Request<gpufleet_proto::v1::SetMigLayoutRequest>,
    ) -> Result<Response<Node>, Status> {
        caller(&self.controller, &request, Action::OperateFleet)?;
        let request = request.into_inner();
        self.controller
            .set_mig_layout(&request.node_id, &request.gpu_uuid, &request.profiles)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn uncordon_gpu(
        &self,
        request: Request<gpufleet_proto::v1::UncordonGpuRequest>,
    ) -> Result<Response<Node>, Status> {
        caller(&self.controller, &request, Action::OperateFleet)?;
        let request = request.into_inner();
        validate::id_filter("gpu_uuid", &request.gpu_uuid).map_err(to_status)?;
        self.controller
            .uncordon_gpu(&request.node_id, &request.gpu_uuid)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn reset_node_identity(
        &self,
        request: Request<gpufleet_proto::v1::ResetNodeIdentityRequest>,
    ) -> Result<Response<gpufleet_proto::v1::ResetNodeIdentityResponse>, Status> {
        let who = caller(&self.controller, &request, Action::Administer)?;
        // Node identities belong to the whole fleet, not to one tenant.
        if !who.all_tenants() {
            return Err(Status::permission_denied(format!(
                "token {} ({}) is scoped to tenant {:?}; resetting a node identity needs an admin token for every tenant (\"*\")",
                who.token_id, who.name, who.tenant
            )));
        }
        let request = request.into_inner();
        let was_bound = self
            .controller
            .reset_node_identity(&request.node_id)
            .map_err(to_status)?;
        Ok(Response::new(
            gpufleet_proto::v1::ResetNodeIdentityResponse { was_bound },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::NodeIdentity;

    fn node(id: &str, cordon_reason_bytes: usize) -> Node {
        Node {
            identity: Some(NodeIdentity {
                node_id: id.into(),
                ..Default::default()
            }),
            cordon_reason: "r".repeat(cordon_reason_bytes),
            ..Default::default()
        }
    }

    #[test]
    fn node_pages_end_at_the_count_or_the_byte_budget() {
        let nodes: Vec<Node> = ["a", "b", "c", "d"].iter().map(|id| node(id, 10)).collect();
        let page = node_page(nodes.clone(), 0, "");
        assert_eq!(page.nodes.len(), 4);
        assert!(page.next_page_token.is_empty());
        let page = node_page(nodes.clone(), 3, "");
        assert_eq!(page.nodes.len(), 3);
        assert_eq!(page.next_page_token, "c");
        let page = node_page(nodes, 3, "c");
        assert_eq!(page.nodes.len(), 1);
        assert!(page.next_page_token.is_empty());

        // Four nodes of 1 MiB each: three pass the budget.
        let big: Vec<Node> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| node(id, 1 << 20))
            .collect();
        let page = node_page(big.clone(), 0, "");
        assert_eq!(page.nodes.len(), 2);
        assert_eq!(page.next_page_token, "b");
        let page = node_page(big, 0, "b");
        assert_eq!(page.nodes.len(), 2);
        assert!(page.next_page_token.is_empty());
    }
}
