use gpufleet_proto::v1::telemetry_server::Telemetry;
use gpufleet_proto::v1::{
    CapacityDimension, GetAggregatesRequest, GetAggregatesResponse, GetHistoryRequest,
    GetHistoryResponse, GetLatestRequest, GetLatestResponse,
};
use tonic::{Request, Response, Status};

use super::{caller, to_status};
use crate::auth::Action;
use crate::state::Controller;
use crate::telemetry;

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
        telemetry::get_latest(&self.controller, request.into_inner())
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
        tokio::task::spawn_blocking(move || {
            telemetry::get_history(&controller, request.into_inner())
        })
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
        let dims = request
            .into_inner()
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
        telemetry::get_aggregates(&self.controller, &dims)
            .map(Response::new)
            .map_err(to_status)
    }
}
