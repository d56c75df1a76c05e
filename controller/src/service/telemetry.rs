//! The `Telemetry` service: finds the nodes and GPUs a query names in the
//! controller's registry, then answers it with the telemetry hub and the
//! pure queries of [`crate::telemetry`].

use gpufleet_proto::v1::telemetry_server::Telemetry;
use gpufleet_proto::v1::{
    CapacityDimension, GetAggregatesRequest, GetAggregatesResponse, GetHistoryRequest,
    GetHistoryResponse, GetLatestRequest, GetLatestResponse,
};
use tonic::{Request, Response, Status};

use super::{caller, to_status};
use crate::auth::Action;
use crate::error::{ControllerError, Result as ControllerResult};
use crate::limits;
use crate::state::Controller;
use crate::telemetry;
use crate::validate;

pub struct TelemetryService {
    controller: Controller,
}

impl TelemetryService {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    async fn get_latest(
        &self,
        request: Request<GetLatestRequest>,
    ) -> Result<Response<GetLatestResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        get_latest(&self.controller, request.into_inner())
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_history(
        &self,
        request: Request<GetHistoryRequest>,
    ) -> Result<Response<GetHistoryResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let controller = self.controller.clone();
        // Reading rollups is disk I/O: keep it off the async workers.
        tokio::task::spawn_blocking(move || get_history(&controller, request.into_inner()))
            .await
            .map_err(|e| Status::internal(format!("history query failed: {e}")))?
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_aggregates(
        &self,
        request: Request<GetAggregatesRequest>,
    ) -> Result<Response<GetAggregatesResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let group_by = request.into_inner().group_by;
        validate::filter_list("group_by", group_by.len()).map_err(to_status)?;
        let dims = group_by
            .iter()
            .map(|d| {
                CapacityDimension::try_from(*d).map_err(|_| {
                    Status::invalid_argument(format!(
                        "group_by: {d} is not a dimension; accepted: provider, region, generation, model"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        get_aggregates(&self.controller, &dims)
            .map(Response::new)
            .map_err(to_status)
    }
}

/// `Telemetry.GetLatest`.
fn get_latest(
    controller: &Controller,
    filter: GetLatestRequest,
) -> ControllerResult<GetLatestResponse> {
    if !filter.node_id.is_empty() {
        validate::node_id("node_id", &filter.node_id)?;
    }
    validate::id_filter("gpu_uuid", &filter.gpu_uuid)?;
    validate::label_filter("provider", &filter.provider)?;
    validate::label_filter("region", &filter.region)?;
    validate::label_filter("model", &filter.model)?;
    let nodes = controller.list_nodes(&filter.provider, &filter.region, &[]);
    let hub = controller.telemetry();
    let response = telemetry::latest(&nodes, &filter, |id| hub.stats(id), controller.now());
    limits::check_response(
        "the latest samples of every matching GPU",
        prost::Message::encoded_len(&response),
        "filter by node_id, provider, region, generation or model",
    )?;
    Ok(response)
}

/// `Telemetry.GetHistory`: one metric of one GPU, or of each GPU of a node.
fn get_history(
    controller: &Controller,
    request: GetHistoryRequest,
) -> ControllerResult<GetHistoryResponse> {
    limits::check_filter("metric", &request.metric, limits::METRIC_BYTES)?;
    validate::id_filter("gpu_uuid", &request.gpu_uuid)?;
    validate::id_filter("node_id", &request.node_id)?;
    let metric = telemetry::metric(&request.metric)?;
    let plan = telemetry::plan_history(
        request.start.as_ref(),
        request.end.as_ref(),
        request.step_seconds,
        controller.now(),
    )?;
    let gpus = history_gpus(controller, request)?;
    let response = controller.telemetry().history(&gpus, metric, &plan)?;
    limits::check_response(
        "the history",
        prost::Message::encoded_len(&response),
        "ask for one GPU (gpu_uuid), a shorter range or a longer step",
    )?;
    Ok(response)
}

/// The GPUs (node id, uuid) a history request names: the one GPU, found
/// on the node that registered it, or every GPU of the node.
fn history_gpus(
    controller: &Controller,
    request: GetHistoryRequest,
) -> ControllerResult<Vec<(String, String)>> {
    match (request.gpu_uuid.is_empty(), request.node_id.is_empty()) {
        (false, true) => {
            let node = controller
                .list_nodes("", "", &[])
                .into_iter()
                .find(|n| {
                    n.gpus
                        .iter()
                        .any(|g| g.info.as_ref().is_some_and(|i| i.uuid == request.gpu_uuid))
                })
                .ok_or_else(|| {
                    ControllerError::NotFound(format!(
                        "no registered node has GPU {}; list GPUs with `gpufleet top --once`",
                        request.gpu_uuid
                    ))
                })?;
            let node_id = node.identity.map(|i| i.node_id).unwrap_or_default();
            Ok(vec![(node_id, request.gpu_uuid)])
        }
        (true, false) => {
            let node = controller.get_node(&request.node_id)?;
            Ok(node
                .gpus
                .iter()
                .filter_map(|g| g.info.as_ref())
                .map(|i| (request.node_id.clone(), i.uuid.clone()))
                .collect())
        }
        _ => Err(ControllerError::invalid(
            "gpu_uuid",
            "set exactly one of gpu_uuid and node_id",
        )),
    }
}

/// `Telemetry.GetAggregates`.
fn get_aggregates(
    controller: &Controller,
    group_by: &[CapacityDimension],
) -> ControllerResult<GetAggregatesResponse> {
    telemetry::aggregates(
        &controller.list_nodes("", "", &[]),
        group_by,
        controller.now(),
    )
}
