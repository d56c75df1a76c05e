use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use gpufleet_core::{generation_names, parse_generation};
use gpufleet_proto::v1::{
    CancelJobRequest, ExplainJobRequest, GetJobRequest, Job, JobConstraints, JobSpec, JobState,
    ListJobsRequest, Locality, PlacementPolicy, RetryPolicy, SpotPolicy, StreamJobLogsRequest,
    SubmitJobRequest, WatchJobRequest, WorkloadSpec,
};
use tokio_stream::StreamExt;

use crate::client;
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Submit a job; prints its id (`-o json`: the whole job).
    Submit(Box<SubmitArgs>),
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (pending, scheduled, running, succeeded, failed, cancelled, lost).
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Only this tenant's jobs.
        #[arg(long)]
        tenant: Option<String>,
        /// Jobs per page.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Fetch every page.
        #[arg(long)]
        all: bool,
    },
    /// Show one job: state, placement, tasks, and why it is pending.
    Get { job_id: String },
    /// Why a job is pending: capacity excluded per constraint and per region.
    Explain { job_id: String },
    /// Cancel a job; running tasks get SIGTERM, then SIGKILL after their grace period.
    Cancel {
        job_id: String,
        /// Recorded in the job's message.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print every state change until the job ends; exits with the job's outcome.
    Watch { job_id: String },
    /// Print a task's combined stdout/stderr.
    Logs {
        job_id: String,
        /// Task index.
        #[arg(long, default_value_t = 0)]
        task: u32,
        /// Keep printing new output until the task ends.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Args)]
struct SubmitArgs {
    /// GPUs per task (all on one node). Required unless --gpu-share,
    /// --gpu-memory or --mig asks for part of one GPU per task.
    #[arg(long)]
    gpus: Option<u32>,
    /// A share of one GPU per task, in thousandths (1-999), e.g. 470; packed
    /// beside other shares, never beside whole-GPU work.
    #[arg(long, value_name = "MILLI")]
    gpu_share: Option<u32>,
    /// GPU memory per task, e.g. 12GiB: alone or with --gpu-share a share of
    /// one GPU with this much memory; with --mig any the least instance memory.
    #[arg(long, value_name = "SIZE")]
    gpu_memory: Option<String>,
    /// One MIG instance per task: a profile such as 1g.10gb, or "any" for the
    /// smallest instance with at least --gpu-memory and --gpu-share of the SMs.
    #[arg(long, value_name = "PROFILE")]
    mig: Option<String>,
    /// Tasks; all are placed at once or none.
    #[arg(long, default_value_t = 1)]
    tasks: u32,
    /// Allowed GPU generations (repeat or comma-separate), e.g. hopper,ampere.
    #[arg(long, value_delimiter = ',')]
    generation: Vec<String>,
    /// Allowed GPU models (repeat or comma-separate), e.g. H100-SXM-80GB.
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// Minimum memory per GPU, in GiB.
    #[arg(long, value_name = "GIB")]
    min_memory: Option<u64>,
    /// Allowed providers (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    provider: Vec<String>,
    /// Allowed regions (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    region: Vec<String>,
    /// Highest price per GPU-hour in USD the job will pay, e.g. 3.00.
    #[arg(long, value_name = "USD", allow_hyphen_values = true)]
    max_price: Option<String>,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Tenant to account the job to.
    #[arg(long)]
    tenant: Option<String>,
    /// Environment variable for the workload, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL when the job is stopped.
    #[arg(long, value_name = "SECONDS")]
    grace_period: Option<u32>,
    /// At least this generation, e.g. hopper (admits Hopper and newer).
    #[arg(long)]
    min_generation: Option<String>,
    /// Minimum CUDA compute capability, e.g. 8.0.
    #[arg(long, value_name = "MAJOR.MINOR")]
    min_compute_capability: Option<String>,
    /// Providers never to use (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    exclude_provider: Vec<String>,
    /// Regions never to use (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    exclude_region: Vec<String>,
    /// Regions to prefer when several fit (soft).
    #[arg(long, value_delimiter = ',')]
    prefer_region: Vec<String>,
    /// Spot capacity may be used (the same as --spot allowed).
    #[arg(long, conflicts_with = "spot")]
    allow_spot: bool,
    /// Spot capacity: never, allowed or required [default: never].
    #[arg(long, value_parser = ["never", "allowed", "required"])]
    spot: Option<String>,
    /// Skip spot capacity interrupted more often than this many times per
    /// node-hour (measured per provider, region and generation), e.g. 0.05.
    #[arg(long, value_name = "RATE")]
    max_interruptions_per_hour: Option<f64>,
    /// Where tasks may spread: any, region (default for several tasks) or provider.
    #[arg(long, value_parser = ["any", "region", "provider"])]
    locality: Option<String>,
    /// Multi-GPU tasks need NVLink-connected GPUs.
    #[arg(long)]
    nvlink: bool,
    /// Placement policy: cost, pack or spread (default: the controller's).
    #[arg(long, value_parser = ["cost", "pack", "spread"])]
    policy: Option<String>,
    /// 0..=1000; higher runs first.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// May be evicted for a higher-priority job.
    #[arg(long)]
    preemptible: bool,
    /// Queue name.
    #[arg(long)]
    queue: Option<String>,
    /// Workload class for usage reports, e.g. training, inference, batch.
    #[arg(long = "class")]
    workload_class: Option<String>,
    /// Stop the job after this long, e.g. 2h (also its backfill estimate).
    #[arg(long)]
    max_runtime: Option<String>,
    /// Times to queue the job again after a task fails.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Times to queue the job again after its node is lost.
    #[arg(long, default_value_t = 0)]
    retries_on_node_loss: u32,
    /// Wait before a retry, doubling each time, e.g. 30s.
    #[arg(long)]
    retry_backoff: Option<String>,
    /// Wait for the job to end and exit with its outcome.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    image: super::image::ImageArgs,
    /// The command and its arguments, after `--`. Run directly, not by a
    /// shell; with --image, the container's command (none: the image's).
    #[arg(last = true, required_unless_present = "image", value_name = "CMD")]
    command: Vec<String>,
}

pub async fn run(address: &str, format: Format, args: JobsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        JobsCommand::Submit(submit) => {
            let wait = submit.wait;
            let spec = build_spec(*submit)?;
            let mut jobs = client::jobs(address).await?;
            let job = jobs
                .submit_job(SubmitJobRequest { spec: Some(spec) })
                .await?
                .into_inner()
                .job
                .context("the controller answered without a job")?;
            if format == Format::Json {
                output::print_json(&job, !wait)?;
            } else {
                say!("{}", job.id);
            }
            if wait {
                return watch(address, format, &job.id, false).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::List {
            state,
            tenant,
            limit,
            all,
        } => {
            let states = state
                .iter()
                .map(|s| parse_job_state(s).map(|s| s as i32))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut jobs = client::jobs(address).await?;
            let mut collected = Vec::new();
            let mut page_token = String::new();
            loop {
                // A filter few jobs match can come back short (even empty)
                // with a token: the controller examines a bounded part of
                // its store per call. Without --all, fill one page of
                // `limit` jobs.
                let wanted = if all {
                    limit
                } else {
                    limit.saturating_sub(collected.len() as u32)
                };
                let page = jobs
                    .list_jobs(ListJobsRequest {
                        states: states.clone(),
                        tenant: tenant.clone().unwrap_or_default(),
                        page_size: wanted,
                        page_token: page_token.clone(),
                    })
                    .await?
                    .into_inner();
                collected.extend(page.jobs);
                page_token = page.next_page_token;
                if page_token.is_empty() || (!all && collected.len() >= limit as usize) {
                    break;
                }
            }
            if format == Format::Json {
                let response = gpufleet_proto::v1::ListJobsResponse {
                    jobs: collected,
                    next_page_token: page_token,
                };
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&[
                "JOB", "NAME", "TENANT", "STATE", "GPUS", "NODES", "AGE", "DETAIL",
            ]);
            for job in &collected {
                let spec = job.spec.clone().unwrap_or_default();
                let mut nodes: Vec<String> = job.tasks.iter().map(|t| t.node_id.clone()).collect();
                nodes.dedup();
                table.add_row(vec![
                    job.id.clone(),
                    if spec.name.is_empty() {
                        "-".into()
                    } else {
                        spec.name.clone()
                    },
                    spec.tenant.clone(),
                    state_label(job),
                    format!("{}x{}", spec.tasks.max(1), spec.gpus_per_task),
                    if nodes.is_empty() {
                        "-".into()
                    } else {
                        nodes.join(",")
                    },
                    output::age(job.created_at.as_ref()),
                    // The full reason is one `jobs get` or `jobs explain` away.
                    shorten(&detail(job), 90),
                ]);
            }
            output::print_table(&table);
            if !page_token.is_empty() {
                eprintln!("(more jobs: pass --all or a larger --limit)");
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Get { job_id } => {
            let mut jobs = client::jobs(address).await?;
            let job = jobs.get_job(GetJobRequest { job_id }).await?.into_inner();
            if format == Format::Json {
                output::print_json(&job, true)?;
            } else {
                print_job(&job);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Cancel { job_id, reason } => {
            let mut jobs = client::jobs(address).await?;
            let job = jobs
                .cancel_job(CancelJobRequest {
                    job_id,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&job, true)?;
            } else {
                say!("{} {}", job.id, state_label(&job));
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Watch { job_id } => watch(address, format, &job_id, true).await,
        JobsCommand::Explain { job_id } => {
            let mut jobs = client::jobs(address).await?;
            let explained = jobs
                .explain_job(ExplainJobRequest { job_id })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&explained, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let job = explained.job.clone().unwrap_or_default();
            say!("{} {}", job.id, state_label(&job));
            say!("{}", explained.summary);
            if let Some(reason) = &explained.reason
                && !reason.exclusions.is_empty()
            {
                say!();
                let mut table = output::table(&["CONSTRAINT", "NODES", "GPUS", "DETAIL"]);
                for e in &reason.exclusions {
                    table.add_row(vec![
                        e.constraint.clone(),
                        e.nodes_excluded.to_string(),
                        e.gpus_excluded.to_string(),
                        e.detail.clone(),
                    ]);
                }
                output::print_table(&table);
            }
            say!();
            let mut table = output::table(&[
                "PROVIDER", "REGION", "GPUS", "MATCHING", "FREE", "FROM", "VERDICT",
            ]);
            for r in &explained.regions {
                table.add_row(vec![
                    r.provider.clone(),
                    r.region.clone(),
                    r.total_gpus.to_string(),
                    r.matching_gpus.to_string(),
                    r.free_matching_gpus.to_string(),
                    if r.min_price_per_gpu_hour_micro_usd == 0 {
                        "-".to_string()
                    } else {
                        output::usd(r.min_price_per_gpu_hour_micro_usd)
                    },
                    r.verdict.clone(),
                ]);
            }
            output::print_table(&table);
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Logs {
            job_id,
            task,
            follow,
        } => {
            let mut jobs = client::jobs(address).await?;
            let mut stream = jobs
                .stream_job_logs(StreamJobLogsRequest {
                    job_id,
                    task_index: task,
                    offset: 0,
                    follow,
                })
                .await?
                .into_inner();
            let to_terminal = std::io::stdout().is_terminal();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if format == Format::Json {
                    output::print_json(&chunk, false)?;
                } else {
                    output::log_bytes(&chunk.data, to_terminal)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Follows a job to its end. Exit code: 0 succeeded, 1 otherwise.
async fn watch(
    address: &str,
    format: Format,
    job_id: &str,
    print_first: bool,
) -> anyhow::Result<ExitCode> {
    let mut jobs = client::jobs(address).await?;
    let mut stream = jobs
        .watch_job(WatchJobRequest {
            job_id: job_id.to_string(),
        })
        .await?
        .into_inner();
    let mut first = true;
    let mut last: Option<Job> = None;
    while let Some(job) = stream.next().await {
        let job = job?;
        if first && !print_first {
            first = false;
            last = Some(job);
            continue;
        }
        first = false;
        if format == Format::Json {
            output::print_json(&job, false)?;
        } else {
            say!(
                "{}  {:<10} {}",
                output::time(Some(&crate::now())),
                state_label(&job),
                detail(&job)
            );
        }
        last = Some(job);
    }
    match last.map(|j| j.state()) {
        Some(JobState::Succeeded) => Ok(ExitCode::SUCCESS),
        Some(_) => Ok(ExitCode::FAILURE),
        None => bail!("the watch ended without any update"),
    }
}

fn build_spec(args: SubmitArgs) -> anyhow::Result<JobSpec> {
    let generations = args
        .generation
        .iter()
        .map(|name| {
            parse_generation(name).map(|g| g as i32).with_context(|| {
                format!(
                    "--generation {name:?} is not a GPU generation; accepted: {}",
                    generation_names().join(", ")
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let max_price = args.max_price.as_deref().map(parse_usd).transpose()?;
    let min_generation = match &args.min_generation {
        Some(name) => parse_generation(name).map(|g| g as i32).with_context(|| {
            format!(
                "--min-generation {name:?} is not a GPU generation; accepted: {}",
                generation_names().join(", ")
            )
        })?,
        None => 0,
    };
    let (cc_major, cc_minor) = match &args.min_compute_capability {
        Some(text) => {
            let parsed = text
                .split_once('.')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
            parsed.with_context(|| {
                format!("--min-compute-capability {text:?} must look like 8.0 or 9.0")
            })?
        }
        None => (0, 0),
    };
    let duration = |flag: &str, text: &Option<String>| -> anyhow::Result<u32> {
        match text {
            None => Ok(0),
            Some(text) => {
                let d = humantime::parse_duration(text).with_context(|| {
                    format!("{flag} {text:?} is not a duration like 90s, 30m or 2h")
                })?;
                u32::try_from(d.as_secs()).with_context(|| format!("{flag} {text:?} is too long"))
            }
        }
    };
    let locality = match args.locality.as_deref() {
        Some("any") => Locality::Any,
        Some("region") => Locality::Region,
        Some("provider") => Locality::Provider,
        _ => Locality::Unspecified,
    };
    let policy = match args.policy.as_deref() {
        Some("cost") => PlacementPolicy::Cost,
        Some("pack") => PlacementPolicy::Pack,
        Some("spread") => PlacementPolicy::Spread,
        _ => PlacementPolicy::Unspecified,
    };
    let mut env = std::collections::HashMap::new();
    for pair in &args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair:?} must look like KEY=VALUE"))?;
        env.insert(key.to_string(), value.to_string());
    }
    let gpu_memory_bytes = match &args.gpu_memory {
        Some(text) => gpufleet_core::units::parse_size(text)
            .map_err(|e| anyhow::anyhow!("--gpu-memory {text:?}: {e}; e.g. 12GiB"))?,
        None => 0,
    };
    let (mig, mig_profile) = match args.mig.as_deref() {
        None => (false, String::new()),
        Some("any") => (true, String::new()),
        Some(profile) => (true, profile.to_string()),
    };
    let fraction = mig || args.gpu_share.is_some() || gpu_memory_bytes > 0;
    let gpus_per_task = match (args.gpus, fraction) {
        (Some(n), _) => n,
        (None, true) => 1,
        (None, false) => {
            bail!("--gpus N is required (or --gpu-share, --gpu-memory or --mig for part of a GPU)")
        }
    };
    Ok(JobSpec {
        name: args.name.unwrap_or_default(),
        tenant: args.tenant.unwrap_or_default(),
        tasks: args.tasks,
        gpus_per_task,
        gpu_share_milli: args.gpu_share.unwrap_or(0),
        gpu_memory_bytes,
        mig_profile,
        mig,
        constraints: Some(JobConstraints {
            generations,
            models: args.model,
            min_gpu_memory_bytes: args
                .min_memory
                .map(|gib| {
                    gib.checked_mul(1 << 30)
                        .context("--min-memory is too large")
                })
                .transpose()?
                .unwrap_or(0),
            providers: args.provider,
            regions: args.region,
            max_price_per_gpu_hour_micro_usd: max_price,
            min_generation,
            min_compute_capability_major: cc_major,
            min_compute_capability_minor: cc_minor,
            exclude_providers: args.exclude_provider,
            exclude_regions: args.exclude_region,
            preferred_regions: args.prefer_region,
            allow_spot: args.allow_spot,
            locality: locality as i32,
            require_nvlink: args.nvlink,
            spot: match args.spot.as_deref() {
                Some("never") => SpotPolicy::Never,
                Some("allowed") => SpotPolicy::Allowed,
                Some("required") => SpotPolicy::Required,
                _ => SpotPolicy::Unspecified,
            } as i32,
            max_interruptions_per_hour: match args.max_interruptions_per_hour {
                Some(rate) if !(rate.is_finite() && rate >= 0.0) => {
                    bail!(
                        "--max-interruptions-per-hour {rate} is not a rate of 0 or more, like 0.05"
                    )
                }
                rate => rate,
            },
        }),
        workload: Some(WorkloadSpec {
            argv: args.command,
            env,
            working_dir: String::new(),
            stop_grace_period_seconds: args.grace_period.unwrap_or(0),
            container: args.image.container()?,
        }),
        priority: args.priority,
        preemptible: args.preemptible,
        queue: args.queue.unwrap_or_default(),
        workload_class: args.workload_class.unwrap_or_default(),
        max_runtime_seconds: duration("--max-runtime", &args.max_runtime)?,
        retry: Some(RetryPolicy {
            max_retries_on_failure: args.retries,
            max_retries_on_node_loss: args.retries_on_node_loss,
            backoff_seconds: duration("--retry-backoff", &args.retry_backoff)?,
        }),
        placement_policy: policy as i32,
    })
}

/// `"3.5"` → 3 500 000 micro-USD.
fn parse_usd(text: &str) -> anyhow::Result<u64> {
    let value: f64 = text
        .trim()
        .trim_start_matches('$')
        .parse()
        .with_context(|| {
            format!("--max-price {text:?} is not a number of US dollars, e.g. 3.00")
        })?;
    if !value.is_finite() || value < 0.0 {
        bail!(
            "--max-price {text:?} must be a price of zero or more US dollars per GPU-hour, e.g. 3.00"
        );
    }
    if value > 1_000_000.0 {
        bail!("--max-price {text:?} is implausibly high (over $1,000,000 per GPU-hour)");
    }
    Ok((value * 1_000_000.0).round() as u64)
}

fn parse_job_state(text: &str) -> anyhow::Result<JobState> {
    let name = format!("JOB_STATE_{}", text.trim().to_ascii_uppercase());
    JobState::from_str_name(&name)
        .filter(|s| *s != JobState::Unspecified)
        .with_context(|| {
            format!("--state {text:?} is not a job state; accepted: pending, scheduled, running, succeeded, failed, cancelled, lost")
        })
}

fn state_label(job: &Job) -> String {
    output::enum_label(job.state().as_str_name(), "JOB_STATE_")
}

fn detail(job: &Job) -> String {
    match (&job.pending_reason, job.state()) {
        (Some(reason), JobState::Pending) => reason.message.clone(),
        // The pull's progress is in the pulling task's status.
        (_, JobState::Pulling) => job
            .tasks
            .iter()
            .find(|t| t.state() == gpufleet_proto::v1::WorkloadState::Pulling)
            .map(|t| format!("task {}: {}", t.index, t.message))
            .unwrap_or_else(|| "-".to_string()),
        _ if !job.message.is_empty() => job.message.clone(),
        _ => "-".to_string(),
    }
}

/// At most `max` characters, with an ellipsis when cut.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{}…", cut.trim_end())
}

fn print_job(job: &Job) {
    let spec = job.spec.clone().unwrap_or_default();
    let workload = spec.workload.clone().unwrap_or_default();
    let constraints = spec.constraints.clone().unwrap_or_default();
    say!("Job:       {}", job.id);
    if !spec.name.is_empty() {
        say!("Name:      {}", spec.name);
    }
    say!("Tenant:    {}", spec.tenant);
    say!("State:     {}", state_label(job));
    say!(
        "Request:   {} task(s) x {} GPU(s)",
        spec.tasks.max(1),
        spec.gpus_per_task
    );
    let mut limits = Vec::new();
    if !constraints.generations.is_empty() {
        let names: Vec<String> = constraints
            .generations
            .iter()
            .filter_map(|g| gpufleet_proto::v1::GpuGeneration::try_from(*g).ok())
            .map(|g| output::enum_label(g.as_str_name(), "GPU_GENERATION_"))
            .collect();
        limits.push(format!("generation in [{}]", names.join(", ")));
    }
    if !constraints.models.is_empty() {
        limits.push(format!("model in [{}]", constraints.models.join(", ")));
    }
    if constraints.min_gpu_memory_bytes > 0 {
        limits.push(format!(
            "memory >= {} GiB",
            constraints.min_gpu_memory_bytes >> 30
        ));
    }
    if !constraints.providers.is_empty() {
        limits.push(format!(
            "provider in [{}]",
            constraints.providers.join(", ")
        ));
    }
    if !constraints.regions.is_empty() {
        limits.push(format!("region in [{}]", constraints.regions.join(", ")));
    }
    if let Some(max) = constraints.max_price_per_gpu_hour_micro_usd {
        limits.push(format!("price <= {}/GPU-hour", output::usd(max)));
    }
    say!(
        "Limits:    {}",
        if limits.is_empty() {
            "none".to_string()
        } else {
            limits.join("; ")
        }
    );
    say!("Command:   {}", workload.argv.join(" "));
    say!("Created:   {}", output::time(job.created_at.as_ref()));
    if job.scheduled_at.is_some() {
        say!("Scheduled: {}", output::time(job.scheduled_at.as_ref()));
    }
    if job.started_at.is_some() {
        say!("Started:   {}", output::time(job.started_at.as_ref()));
    }
    if job.finished_at.is_some() {
        say!("Finished:  {}", output::time(job.finished_at.as_ref()));
    }
    if let Some(code) = job.exit_code {
        say!("Exit code: {code}");
    }
    if !job.message.is_empty() {
        say!("Message:   {}", job.message);
    }
    if !job.placement_note.is_empty() {
        say!("Placement: {}", job.placement_note);
    }
    if let (Some(reason), JobState::Pending) = (&job.pending_reason, job.state()) {
        say!("Pending:   {} — {}", reason.code, reason.message);
        for exclusion in &reason.exclusions {
            say!(
                "  {:<16} {:>4} nodes {:>5} GPUs  {}",
                exclusion.constraint,
                exclusion.nodes_excluded,
                exclusion.gpus_excluded,
                exclusion.detail
            );
        }
    }
    if !job.tasks.is_empty() {
        say!();
        let mut table = output::table(&[
            "TASK",
            "NODE",
            "PROVIDER/REGION",
            "PRICE/GPU-H",
            "STATE",
            "EXIT",
            "GPUS",
        ]);
        for task in &job.tasks {
            table.add_row(vec![
                task.index.to_string(),
                task.node_id.clone(),
                format!("{}/{}", task.provider, task.region),
                output::usd(task.price_per_gpu_hour_micro_usd),
                output::enum_label(task.state().as_str_name(), "WORKLOAD_STATE_"),
                match (task.exit_code, task.signal) {
                    (_, Some(signal)) => format!("signal {signal}"),
                    (Some(code), None) => code.to_string(),
                    _ => "-".to_string(),
                },
                task.gpu_uuids.join(","),
            ]);
        }
        output::print_table(&table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_exactly() {
        assert_eq!(parse_usd("3.00").unwrap(), 3_000_000);
        assert_eq!(parse_usd("$2.99").unwrap(), 2_990_000);
        assert!(
            parse_usd("-1")
                .unwrap_err()
                .to_string()
                .contains("zero or more")
        );
        assert!(parse_usd("NaN").is_err());
        assert!(
            parse_usd("cheap")
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
    }

    #[test]
    fn long_details_are_shortened() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(
            shorten("needs 2 tasks × 8 GPUs: no node", 12),
            "needs 2 tas…"
        );
    }

    #[test]
    fn states_parse() {
        assert_eq!(parse_job_state("Running").unwrap(), JobState::Running);
        assert!(
            parse_job_state("sleeping")
                .unwrap_err()
                .to_string()
                .contains("accepted")
        );
    }
}
