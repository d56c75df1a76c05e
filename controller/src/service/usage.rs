use gpufleet_proto::v1::usage_server::Usage;
use gpufleet_proto::v1::{
    GpuGeneration, Granularity, ListUsageRecordsRequest, ListUsageRecordsResponse,
    MarketElasticityRequest, MarketElasticityResponse, MarketInterruptionsRequest,
    MarketInterruptionsResponse, MarketPricesRequest, MarketPricesResponse, MarketTightnessRequest,
    MarketTightnessResponse, TopUsageRequest, UsageByGenerationRequest, UsageDimension,
    UsageReportRequest, UsageReportResponse, UsageWasteRequest, UsageWasteResponse,
};
use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use super::{caller, to_status};
use crate::auth::{Action, Principal};
use crate::limits;
use crate::state::Controller;
use crate::usage::ReportQuery;
use crate::usage::rollup::{DAY, HOUR, MINUTE};
use crate::usage::waste::WasteQuery;
use crate::validate;

/// Reports may reach this far back.
const MAX_RANGE_SECS: u64 = 5 * 366 * DAY;
/// And have at most this many series points per row.
const MAX_SERIES_POINTS: u64 = 10_000;

pub struct UsageService {
    controller: Controller,
}

impl UsageService {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

fn secs(ts: Option<&Timestamp>) -> Option<u64> {
    ts.map(|t| t.seconds.max(0) as u64)
}

/// [since, until) with defaults, validated.
fn range(
    now: u64,
    since: Option<&Timestamp>,
    until: Option<&Timestamp>,
    default_back: u64,
) -> Result<(u64, u64), Status> {
    let until = secs(until).unwrap_or(now + 1);
    let since = secs(since).unwrap_or(until.saturating_sub(default_back));
    if since >= until {
        return Err(Status::invalid_argument("since: must be before until"));
    }
    if until - since > MAX_RANGE_SECS {
        return Err(Status::invalid_argument(format!(
            "since: the range is {} days; at most {} days are accepted",
            (until - since) / DAY,
            MAX_RANGE_SECS / DAY
        )));
    }
    Ok((since, until))
}

/// The tenant a report covers: the token's own when it is scoped to one.
fn report_tenant(who: &Principal, requested: &str) -> Result<Option<String>, Status> {
    validate::label_filter("tenant", requested).map_err(to_status)?;
    let tenant = who.tenant_filter(requested).map_err(to_status)?;
    Ok((!tenant.is_empty()).then_some(tenant))
}

/// A report, refused when it would pass the response budget.
fn bounded(report: UsageReportResponse) -> Result<Response<UsageReportResponse>, Status> {
    limits::check_response(
        "the report",
        prost::Message::encoded_len(&report),
        "ask for fewer rows (limit), fewer dimensions, a coarser series or a shorter range",
    )
    .map_err(to_status)?;
    Ok(Response::new(report))
}

/// An answer, refused when it would pass the response budget.
fn within_budget<M: prost::Message>(
    answer: M,
    what: &str,
    how_to_ask_less: &str,
) -> Result<Response<M>, Status> {
    limits::check_response(what, answer.encoded_len(), how_to_ask_less).map_err(to_status)?;
    Ok(Response::new(answer))
}

fn dimensions(values: &[i32]) -> Result<Vec<UsageDimension>, Status> {
    validate::filter_list("group_by", values.len()).map_err(to_status)?;
    values
        .iter()
        .map(|v| {
            UsageDimension::try_from(*v).ok().filter(|d| *d != UsageDimension::Unspecified).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "group_by: {v} is not a dimension; accepted: provider, region, generation, model, tenant, workload_class, job_name"
                ))
            })
        })
        .collect()
}

#[tonic::async_trait]
impl Usage for UsageService {
    async fn list_usage_records(
        &self,
        request: Request<ListUsageRecordsRequest>,
    ) -> Result<Response<ListUsageRecordsResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadUsage)?;
        let mut r = request.into_inner();
        validate::label_filter("tenant", &r.tenant).map_err(to_status)?;
        if !r.job_id.is_empty() {
            validate::job_id("job_id", &r.job_id).map_err(to_status)?;
        }
        validate::page_token(&r.page_token).map_err(to_status)?;
        r.tenant = who.tenant_filter(&r.tenant).map_err(to_status)?;
        let (since, until) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            r.until.as_ref(),
            30 * DAY,
        )?;
        let page_size = match r.page_size {
            0 => 100,
            n if n > 1000 => return Err(Status::invalid_argument("page_size: at most 1000")),
            n => n as usize,
        };
        let offset = if r.page_token.is_empty() {
            0
        } else {
            r.page_token.parse::<usize>().map_err(|_| {
                Status::invalid_argument("page_token: pass next_page_token unchanged")
            })?
        };
        let filter = crate::usage::RecordFilter {
            since_ms: since * 1000,
            until_ms: until * 1000,
            tenant: r.tenant,
            job_id: r.job_id,
            include_running: r.include_running,
        };
        let (mut records, more) = self
            .controller
            .list_usage(&filter, page_size, offset)
            .map_err(super::to_status)?;
        // Records are small and bounded; the budget still ends a page.
        let fit = limits::fitting(&records);
        let cut = fit < records.len();
        records.truncate(fit);
        Ok(Response::new(ListUsageRecordsResponse {
            next_page_token: if more || cut {
                (offset + records.len()).to_string()
            } else {
                String::new()
            },
            records,
        }))
    }

    async fn get_usage_report(
        &self,
        request: Request<UsageReportRequest>,
    ) -> Result<Response<UsageReportResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadUsage)?;
        let r = request.into_inner();
        let tenant = report_tenant(&who, &r.tenant)?;
        let (since, until) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            r.until.as_ref(),
            7 * DAY,
        )?;
        let series = match Granularity::try_from(r.series).unwrap_or(Granularity::Unspecified) {
            Granularity::Unspecified => None,
            Granularity::Minute => Some(MINUTE),
            Granularity::Hour => Some(HOUR),
            Granularity::Day => Some(DAY),
        };
        if let Some(step) = series
            && (until - since) / step > MAX_SERIES_POINTS
        {
            return Err(Status::invalid_argument(format!(
                "series: {} points per row; at most {MAX_SERIES_POINTS}: use a coarser granularity or a shorter range",
                (until - since) / step
            )));
        }
        let query = ReportQuery {
            group_by: dimensions(&r.group_by)?,
            since_secs: since,
            until_secs: until,
            series_secs: series,
            limit: r.limit as usize,
            tenant,
            by_used: false,
        };
        bounded(self.controller.usage_report(&query, r.include_running))
    }

    async fn top_usage(
        &self,
        request: Request<TopUsageRequest>,
    ) -> Result<Response<UsageReportResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadUsage)?;
        let r = request.into_inner();
        let tenant = report_tenant(&who, &r.tenant)?;
        let by = ranking_dimension(r.by)?;
        let (since, until) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            None,
            7 * DAY,
        )?;
        let query = ReportQuery {
            group_by: vec![by],
            since_secs: since,
            until_secs: until,
            series_secs: None,
            limit: if r.limit == 0 { 10 } else { r.limit as usize },
            tenant,
            by_used: r.by_used,
        };
        bounded(self.controller.usage_report(&query, true))
    }

    async fn usage_waste(
        &self,
        request: Request<UsageWasteRequest>,
    ) -> Result<Response<UsageWasteResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadUsage)?;
        let r = request.into_inner();
        let tenant = report_tenant(&who, &r.tenant)?;
        let by = ranking_dimension(r.by)?;
        let limit = match r.limit {
            0 => 20,
            n if n > 1000 => return Err(Status::invalid_argument("limit: at most 1000")),
            n => n as usize,
        };
        let (since, until) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            r.until.as_ref(),
            7 * DAY,
        )?;
        let query = WasteQuery {
            by,
            since_secs: since,
            until_secs: until,
            limit,
            tenant,
        };
        let answer = self.controller.usage_waste(&query);
        limits::check_response(
            "the waste report",
            prost::Message::encoded_len(&answer),
            "ask for fewer rows (limit) or a shorter range",
        )
        .map_err(to_status)?;
        Ok(Response::new(answer))
    }

    async fn usage_by_generation(
        &self,
        request: Request<UsageByGenerationRequest>,
    ) -> Result<Response<UsageReportResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadUsage)?;
        let r = request.into_inner();
        let tenant = report_tenant(&who, &r.tenant)?;
        let (since, until) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            None,
            30 * DAY,
        )?;
        let step = if until - since <= 2 * DAY { HOUR } else { DAY };
        let query = ReportQuery {
            group_by: vec![UsageDimension::Generation],
            since_secs: since,
            until_secs: until,
            series_secs: Some(step),
            limit: 0,
            tenant,
            by_used: false,
        };
        bounded(self.controller.usage_report(&query, true))
    }

    async fn market_tightness(
        &self,
        request: Request<MarketTightnessRequest>,
    ) -> Result<Response<MarketTightnessResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let r = request.into_inner();
        let (since, _) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            None,
            DAY,
        )?;
        let answer = self.controller.market_tightness(since);
        within_budget(
            answer,
            "the tightness report",
            "ask for a shorter range (since)",
        )
    }

    async fn market_elasticity(
        &self,
        request: Request<MarketElasticityRequest>,
    ) -> Result<Response<MarketElasticityResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let r = request.into_inner();
        validate::label_filter("region", &r.region).map_err(to_status)?;
        if r.region.is_empty() {
            return Err(Status::invalid_argument(
                "region: is required, e.g. us-east-1",
            ));
        }
        if GpuGeneration::try_from(r.generation)
            .ok()
            .filter(|g| *g != GpuGeneration::Unspecified)
            .is_none()
        {
            return Err(Status::invalid_argument(format!(
                "generation: {} is not a GPU generation; accepted: {}",
                r.generation,
                gpufleet_core::generation_names().join(", ")
            )));
        }
        let (since, _) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            None,
            7 * DAY,
        )?;
        let bucket = match u64::from(r.bucket_seconds) {
            0 => HOUR,
            b if b < MINUTE => {
                return Err(Status::invalid_argument(
                    "bucket_seconds: at least 60 (market signals are per minute)",
                ));
            }
            b => b,
        };
        let answer = self
            .controller
            .market_elasticity(&r.region, r.generation, since, bucket);
        within_budget(
            answer,
            "the elasticity report",
            "ask for a shorter range (since)",
        )
    }

    async fn market_prices(
        &self,
        request: Request<MarketPricesRequest>,
    ) -> Result<Response<MarketPricesResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let r = request.into_inner();
        for (field, value) in [
            ("provider", &r.provider),
            ("region", &r.region),
            ("model", &r.model),
        ] {
            validate::label_filter(field, value).map_err(to_status)?;
        }
        let (since, _) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            None,
            30 * DAY,
        )?;
        let any = |v: &str| {
            if v == "*" {
                String::new()
            } else {
                v.to_string()
            }
        };
        let answer = self
            .controller
            .market_prices(&crate::state::prices::PriceQuery {
                provider: any(&r.provider),
                region: any(&r.region),
                model: any(&r.model),
                since_ms: since * 1000,
                limit: r.limit as usize,
            });
        within_budget(
            answer,
            "the price report",
            "ask for fewer changes (limit), a filter or a shorter range (since)",
        )
    }

    async fn market_interruptions(
        &self,
        request: Request<MarketInterruptionsRequest>,
    ) -> Result<Response<MarketInterruptionsResponse>, Status> {
        caller(&self.controller, &request, Action::ReadFleet)?;
        let r = request.into_inner();
        let (since, _) = range(
            self.controller.clock().unix_secs(),
            r.since.as_ref(),
            None,
            7 * DAY,
        )?;
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        let answer = self.controller.market_interruptions(since, limit);
        within_budget(
            answer,
            "the interruption report",
            "ask for fewer interruptions (limit) or a shorter range (since)",
        )
    }
}

/// The dimensions a ranking (`top`, `waste`) groups by.
fn ranking_dimension(by: i32) -> Result<UsageDimension, Status> {
    match UsageDimension::try_from(by) {
        Ok(
            d @ (UsageDimension::WorkloadClass | UsageDimension::JobName | UsageDimension::Tenant),
        ) => Ok(d),
        _ => Err(Status::invalid_argument(
            "by: accepted: workload_class, job_name, tenant",
        )),
    }
}
