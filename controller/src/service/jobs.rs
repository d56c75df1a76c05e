use std::time::Duration;

use gpufleet_proto::v1::jobs_server::Jobs;
use gpufleet_proto::v1::{
    CancelJobRequest, ExplainJobRequest, ExplainJobResponse, GetJobRequest, Job, JobState,
    ListJobsRequest, ListJobsResponse, LogChunk, StreamJobLogsRequest, SubmitJobRequest,
    SubmitJobResponse, WatchJobRequest, WorkloadState,
};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::streams::{self, BoxStream, Ended, StreamSink};
use super::{caller, to_status};
use crate::auth::{Action, Principal};
use crate::error::ControllerError;
use crate::state::{Controller, is_terminal_job};
use crate::validate;

/// Bytes asked of an agent per log request: also the most a log stream
/// holds per message queued behind its client (docs/grpc.md, "Limits on
/// streams").
const LOG_CHUNK_BYTES: u32 = 64 * 1024;
/// Pause between polls of a followed log that had nothing new.
const LOG_POLL: Duration = Duration::from_millis(250);

pub struct JobsService {
    controller: Controller,
}

impl JobsService {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

/// The tenant a job is accounted to.
fn job_tenant(job: &Job) -> &str {
    job.spec
        .as_ref()
        .map(|s| s.tenant.as_str())
        .filter(|t| !t.is_empty())
        .unwrap_or("default")
}

/// The job, if the caller may see its tenant's data.
fn visible_job(controller: &Controller, who: &Principal, id: &str) -> Result<Job, Status> {
    let job = controller.get_job(id).map_err(to_status)?;
    who.check_tenant(job_tenant(&job), &format!("job {id}"))
        .map_err(to_status)?;
    Ok(job)
}

#[tonic::async_trait]
impl Jobs for JobsService {
    type WatchJobStream = BoxStream<Job>;
    type StreamJobLogsStream = BoxStream<LogChunk>;

    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let who = caller(&self.controller, &request, Action::SubmitJobs)?;
        let mut spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        validate::label_filter("spec.tenant", &spec.tenant).map_err(to_status)?;
        spec.tenant = who.submit_tenant(&spec.tenant).map_err(to_status)?;
        let job = self.controller.submit_job(spec).map_err(to_status)?;
        Ok(Response::new(SubmitJobResponse { job: Some(job) }))
    }

    async fn explain_job(
        &self,
        request: Request<ExplainJobRequest>,
    ) -> Result<Response<ExplainJobResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadJobs)?;
        let id = request.into_inner().job_id;
        visible_job(&self.controller, &who, &id)?;
        self.controller
            .explain_job(&id)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let who = caller(&self.controller, &request, Action::ReadJobs)?;
        let id = request.into_inner().job_id;
        visible_job(&self.controller, &who, &id).map(Response::new)
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let who = caller(&self.controller, &request, Action::ReadJobs)?;
        let mut request = request.into_inner();
        validate::label_filter("tenant", &request.tenant).map_err(to_status)?;
        request.tenant = who.tenant_filter(&request.tenant).map_err(to_status)?;
        let states = request
            .states
            .iter()
            .map(|s| {
                JobState::try_from(*s).map_err(|_| {
                    Status::invalid_argument(format!("states: {s} is not a job state"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.controller
            .list_jobs(
                &states,
                &request.tenant,
                request.page_size,
                &request.page_token,
            )
            .map(Response::new)
            .map_err(to_status)
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let who = caller(&self.controller, &request, Action::SubmitJobs)?;
        let request = request.into_inner();
        visible_job(&self.controller, &who, &request.job_id)?;
        self.controller
            .cancel_job(&request.job_id, &request.reason)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let who = caller(&self.controller, &request, Action::ReadJobs)?;
        let id = request.into_inner().job_id;
        // Subscribe before the first read so that no change falls between.
        let events = self.controller.subscribe_jobs();
        let current = visible_job(&self.controller, &who, &id)?;
        let (sink, stream) = streams::open(&self.controller, &who)?;
        tokio::spawn(pump_job_changes(
            self.controller.clone(),
            id,
            current,
            events,
            sink,
        ));
        Ok(Response::new(stream))
    }

    async fn stream_job_logs(
        &self,
        request: Request<StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        let who = caller(&self.controller, &request, Action::ReadJobs)?;
        let request = request.into_inner();
        let job = visible_job(&self.controller, &who, &request.job_id)?;
        let tasks = job.spec.as_ref().map_or(1, |s| s.tasks.max(1));
        if request.task_index >= tasks {
            return Err(to_status(ControllerError::invalid(
                "task_index",
                format!(
                    "is {}, but job {} has {tasks} task(s) (0..{})",
                    request.task_index,
                    job.id,
                    tasks - 1
                ),
            )));
        }
        if job.tasks.is_empty() && !request.follow {
            let detail = if is_terminal_job(job.state()) {
                "it ended before it was placed on a node"
            } else {
                "it is still pending; pass --follow to wait for its output"
            };
            return Err(Status::failed_precondition(format!(
                "job {} has no logs: {detail}",
                job.id
            )));
        }
        let (mut sink, stream) = streams::open(&self.controller, &who)?;
        let controller = self.controller.clone();
        tokio::spawn(async move {
            match pump_logs(&controller, request, &mut sink).await {
                Ok(()) | Err(Stop::Ended(Ended)) => {}
                Err(Stop::Failed(status)) => sink.fail(status).await,
            }
        });
        Ok(Response::new(stream))
    }
}

/// Sends `current`, then each new version of job `id` until it ends.
async fn pump_job_changes(
    controller: Controller,
    id: String,
    current: Job,
    mut events: broadcast::Receiver<Job>,
    mut sink: StreamSink<Job>,
) {
    let mut last_version = current.version;
    let mut done = is_terminal_job(current.state());
    if sink.send(current).await.is_err() {
        return;
    }
    while !done {
        let Ok(event) = sink.guard(events.recv()).await else {
            return;
        };
        let job = match event {
            Ok(job) if job.id == id => job,
            Ok(_) => continue,
            // Read from memory: sent only once durable, like the events.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                match (controller.get_job(&id), controller.settled().await) {
                    (Ok(job), Ok(())) => job,
                    _ => return,
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if job.version <= last_version {
            continue;
        }
        last_version = job.version;
        done = is_terminal_job(job.state());
        if sink.send(job).await.is_err() {
            return;
        }
    }
}

/// Why a log pump stopped early.
enum Stop {
    /// The stream's end is already decided (client gone, token revoked,
    /// client stalled).
    Ended(Ended),
    /// A failure to show the client after what it already has.
    Failed(Status),
}

impl From<Ended> for Stop {
    fn from(ended: Ended) -> Self {
        Stop::Ended(ended)
    }
}

impl From<Status> for Stop {
    fn from(status: Status) -> Self {
        Stop::Failed(status)
    }
}

/// Sends a task's log, a chunk at a time: the next chunk is read from the
/// agent only once the client has taken room for it.
async fn pump_logs(
    controller: &Controller,
    request: StreamJobLogsRequest,
    sink: &mut StreamSink<LogChunk>,
) -> Result<(), Stop> {
    validate::job_id("job_id", &request.job_id).map_err(to_status)?;
    let mut offset = request.offset;
    let mut events = controller.subscribe_jobs();
    loop {
        let job = controller.get_job(&request.job_id).map_err(to_status)?;
        // What it decides from the job (end the stream, which task to
        // read) leaves the controller: only once durable.
        sink.guard(controller.settled()).await?.map_err(to_status)?;
        let Some(task) = job
            .tasks
            .iter()
            .find(|t| t.index == request.task_index)
            .cloned()
        else {
            if is_terminal_job(job.state()) {
                return Ok(());
            }
            // Pending and following: wait for the placement.
            sink.guard(next_change(&mut events)).await?;
            continue;
        };
        if task.state() == WorkloadState::Unspecified {
            // Placed but not started yet: there is no log file so far.
            if !request.follow {
                return Ok(());
            }
            sink.guard(next_change(&mut events)).await?;
            continue;
        }
        let chunk = sink
            .guard(controller.fetch_log(
                &task.node_id,
                &task.allocation_id,
                offset,
                LOG_CHUNK_BYTES,
            ))
            .await?
            .map_err(to_status)?;
        let eof = chunk.eof;
        let got = chunk.data.len() as u64;
        if got > 0 {
            offset = chunk.offset + got;
            sink.send(LogChunk {
                task_index: task.index,
                ..chunk
            })
            .await?;
        }
        if eof || (got == 0 && !request.follow) {
            return Ok(());
        }
        if got == 0 {
            sink.guard(tokio::time::sleep(LOG_POLL)).await?;
        }
    }
}

/// A job changed, or a second passed.
async fn next_change(events: &mut broadcast::Receiver<Job>) {
    tokio::select! {
        _ = events.recv() => {},
        _ = tokio::time::sleep(Duration::from_secs(1)) => {},
    }
}
