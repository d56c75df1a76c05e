//! The `gpufleet` binary against a hostile server: text with escape
//! sequences and newlines is printed escaped, JSON stays valid, and a
//! server that dies mid-stream gives an error naming its address.
//!
//! A fake `Jobs` service stands in for the controller: the real one
//! refuses such names at submit (docs/limits.md), but records stored
//! before that, or a compromised server, may still send them.

use std::io::{BufRead, BufReader};
use std::pin::Pin;
use std::process::{Command, Output, Stdio};

use gpufleet_proto::v1::jobs_server::{Jobs, JobsServer};
use gpufleet_proto::v1::{
    CancelJobRequest, ExplainJobRequest, ExplainJobResponse, GetJobRequest, Job, JobSpec, JobState,
    ListJobsRequest, ListJobsResponse, LogChunk, StreamJobLogsRequest, SubmitJobRequest,
    SubmitJobResponse, WatchJobRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const HOSTILE_NAME: &str = "evil\x1b]0;owned\x07\x1b[2J\nsecond line";
const JOB_ID: &str = "job-06b0bdffc3f2a9c0";

fn hostile_job() -> Job {
    Job {
        id: JOB_ID.into(),
        spec: Some(JobSpec {
            name: HOSTILE_NAME.into(),
            tenant: "default".into(),
            ..Default::default()
        }),
        state: JobState::Running as i32,
        message: "cancelled: \x1b[31mred\r\x00".into(),
        version: 1,
        ..Default::default()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct Hostile;

#[tonic::async_trait]
impl Jobs for Hostile {
    type WatchJobStream = BoxStream<Job>;
    type StreamJobLogsStream = BoxStream<LogChunk>;

    async fn submit_job(
        &self,
        _: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(hostile_job()))
    }
    async fn list_jobs(
        &self,
        _: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(ListJobsResponse {
            jobs: vec![hostile_job()],
            next_page_token: String::new(),
        }))
    }
    async fn cancel_job(&self, _: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn watch_job(
        &self,
        _: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        // The first event, then nothing until the server dies.
        let first = tokio_stream::once(Ok(hostile_job()));
        let stream = tokio_stream::StreamExt::chain(first, tokio_stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }
    async fn stream_job_logs(
        &self,
        _: Request<StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn explain_job(
        &self,
        _: Request<ExplainJobRequest>,
    ) -> Result<Response<ExplainJobResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// The fake server on its own runtime and thread: dropping the returned
/// sender kills it, connections and all, as a controller's death would.
fn start_hostile() -> anyhow::Result<(String, std::sync::mpsc::Sender<()>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let address = format!("http://{}", listener.local_addr()?);
    let (kill, killed) = std::sync::mpsc::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(JobsServer::new(Hostile))
                .serve_with_incoming(incoming)
                .await;
        });
        // Blocks until the sender is dropped, then kills every task.
        let _ = killed.recv();
        runtime.shutdown_background();
    });
    Ok((address, kill))
}

fn gpufleet(address: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpufleet"));
    command
        .env("GPUFLEET_CONTROLLER", address)
        .env("GPUFLEET_TOKEN", "t")
        .args(args);
    command
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("gpufleet runs"))
        .await
        .expect("join")
}

fn has_control_chars(bytes: &[u8]) -> bool {
    // Newlines end lines; nothing else below 0x20 (or DEL) may appear.
    bytes
        .iter()
        .any(|b| (*b < 0x20 && *b != b'\n') || *b == 0x7f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_text_is_printed_escaped_and_json_stays_valid() -> anyhow::Result<()> {
    let (address, _kill) = start_hostile()?;

    let listed = run(gpufleet(&address, &["jobs", "list"])).await;
    assert!(listed.status.success(), "{listed:?}");
    assert!(!has_control_chars(&listed.stdout), "{listed:?}");
    let text = String::from_utf8(listed.stdout)?;
    assert_eq!(text.lines().count(), 2, "a header and one row: {text}");
    assert!(
        text.contains("evil\\x1b]0;owned\\x07\\x1b[2J\\nsecond line"),
        "{text}"
    );

    let got = run(gpufleet(&address, &["jobs", "get", JOB_ID])).await;
    assert!(got.status.success(), "{got:?}");
    assert!(!has_control_chars(&got.stdout), "{got:?}");
    let text = String::from_utf8(got.stdout)?;
    assert!(text.contains("\\x1b[31mred\\r\\x00"), "{text}");

    let json = run(gpufleet(&address, &["-o", "json", "jobs", "get", JOB_ID])).await;
    assert!(json.status.success(), "{json:?}");
    assert!(!has_control_chars(&json.stdout), "{json:?}");
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(value["spec"]["name"], HOSTILE_NAME);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_stream_is_an_error_naming_it() -> anyhow::Result<()> {
    let (address, kill) = start_hostile()?;
    let mut command = gpufleet(&address, &["jobs", "watch", JOB_ID]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || -> anyhow::Result<Output> {
        let mut child = command.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut reader = BufReader::new(stdout);
        // The first event arrived: the stream is open. Now the server dies.
        let mut first = String::new();
        reader.read_line(&mut first)?;
        anyhow::ensure!(!first.is_empty(), "no first line");
        drop(kill);
        let mut output = child.wait_with_output()?;
        output.stdout = first.into_bytes();
        Ok(output)
    })
    .await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        stderr.contains(&format!("controller at {address}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    Ok(())
}
