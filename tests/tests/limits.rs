//! Hostile input through real gRPC: oversized and control-character fields
//! are refused with an error naming the field and the limit, and listings
//! of many large-but-valid jobs come in pages under what a gRPC client
//! accepts by default (4 MiB). Limits: docs/limits.md.

use std::collections::BTreeSet;

use gpufleet_proto::v1::{
    CancelJobRequest, CordonNodeRequest, JobConstraints, JobSpec, JobState, ListJobsRequest,
    SubmitJobRequest, WorkloadSpec,
};
use gpufleet_tests::Cluster;
use prost::Message;
use tonic::Code;

/// A job no node can run (no node is in its region): it stays pending.
fn pending_spec(name: &str, argv: Vec<String>) -> JobSpec {
    JobSpec {
        name: name.to_string(),
        gpus_per_task: 1,
        constraints: Some(JobConstraints {
            regions: vec!["nowhere-1".into()],
            ..Default::default()
        }),
        workload: Some(WorkloadSpec {
            argv,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_control_character_fields_are_refused_naming_the_field() -> anyhow::Result<()>
{
    let cluster = Cluster::start(&[]).await?;
    let mut jobs = cluster.jobs().await?;
    let client = jobs.clone();
    let submit = |spec: JobSpec| {
        let mut jobs = client.clone();
        async move { jobs.submit_job(SubmitJobRequest { spec: Some(spec) }).await }
    };

    let cases: Vec<(JobSpec, &str)> = vec![
        (
            pending_spec(&"n".repeat(300), vec!["true".into()]),
            "spec.name: 300 bytes; at most 128",
        ),
        (
            pending_spec("evil\x1b]0;owned\x07", vec!["true".into()]),
            "spec.name",
        ),
        (pending_spec("two\nlines", vec!["true".into()]), "spec.name"),
        (pending_spec("nul\0", vec!["true".into()]), "spec.name"),
        (
            pending_spec("ok", vec!["true".into(), "a".repeat(40 * 1024)]),
            "spec.workload.argv[1]: 40960 bytes; at most 32768",
        ),
        (
            pending_spec("ok", vec!["x".into(); 5000]),
            "spec.workload.argv: 5000 entries; at most 4096",
        ),
        (
            JobSpec {
                queue: "q".repeat(100),
                ..pending_spec("ok", vec!["true".into()])
            },
            "spec.queue",
        ),
        (
            JobSpec {
                constraints: Some(JobConstraints {
                    exclude_regions: vec!["r".into(); 65],
                    ..Default::default()
                }),
                ..pending_spec("ok", vec!["true".into()])
            },
            "spec.constraints.exclude_regions: 65 entries; at most 64",
        ),
    ];
    for (spec, expected) in cases {
        let err = submit(spec).await.expect_err(expected);
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err:?}");
        assert!(
            err.message().starts_with(expected),
            "{expected:?} in {:?}",
            err.message()
        );
        assert!(err.message().len() < 1024, "the value is not echoed back");
    }
    let mut env_spec = pending_spec("ok", vec!["true".into()]);
    if let Some(w) = env_spec.workload.as_mut() {
        w.env.insert("BIG".into(), "v".repeat(33 * 1024));
    }
    let err = submit(env_spec).await.expect_err("a 33 KiB variable");
    assert!(
        err.message().starts_with("spec.workload.env[\"BIG\"]"),
        "{}",
        err.message()
    );

    // A valid job, then reasons: too long, or with control characters.
    let job = submit(pending_spec("printable — ok", vec!["true".into()]))
        .await?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("no job"))?;
    for (reason, expected) in [
        ("r".repeat(2000), "reason: 2000 bytes; at most 1024"),
        ("line\nbreak".to_string(), "reason"),
        ("\x1b[2J".to_string(), "reason"),
    ] {
        let err = jobs
            .cancel_job(CancelJobRequest {
                job_id: job.id.clone(),
                reason,
            })
            .await
            .expect_err(expected);
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(expected), "{}", err.message());
    }
    let mut fleet = cluster.fleet().await?;
    let err = fleet
        .cordon_node(CordonNodeRequest {
            node_id: "n1".into(),
            reason: "x\x07".into(),
        })
        .await
        .expect_err("a bell in a cordon reason");
    assert!(err.message().starts_with("reason"), "{}", err.message());
    let err = jobs
        .list_jobs(ListJobsRequest {
            page_token: "9".repeat(1000),
            ..Default::default()
        })
        .await
        .expect_err("a 1000-byte page token");
    assert!(err.message().starts_with("page_token"), "{}", err.message());

    // The job is untouched, and cancels with a valid reason.
    let cancelled = jobs
        .cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
            reason: "superseded".into(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_of_large_jobs_are_paged_under_four_mebibytes() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[]).await?;
    let mut jobs = cluster.jobs().await?;
    // 70 jobs of about 60 KiB each: 4.2 MB in all, within every limit.
    let count = 70;
    let mut submitted = BTreeSet::new();
    for i in 0..count {
        let argv = vec![
            "true".to_string(),
            "a".repeat(30 * 1024),
            "b".repeat(30 * 1024),
        ];
        let job = jobs
            .submit_job(SubmitJobRequest {
                spec: Some(pending_spec(&format!("big-{i}"), argv)),
            })
            .await?
            .into_inner()
            .job
            .ok_or_else(|| anyhow::anyhow!("no job"))?;
        submitted.insert(job.id);
    }
    // Some finished, so that the store walk is paged as well as memory.
    for id in submitted.iter().take(10) {
        jobs.cancel_job(CancelJobRequest {
            job_id: id.clone(),
            reason: "r".repeat(1024),
        })
        .await?;
    }

    for states in [vec![], vec![JobState::Pending as i32]] {
        let wanted = if states.is_empty() { count } else { count - 10 };
        let mut seen = BTreeSet::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            // The client's default decode limit (4 MiB) is in force: a
            // larger page would fail here.
            let page = jobs
                .list_jobs(ListJobsRequest {
                    states: states.clone(),
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            assert!(
                page.encoded_len() <= 3 * 1024 * 1024 + 64 * 1024,
                "a page of {} bytes",
                page.encoded_len()
            );
            pages += 1;
            for job in page.jobs {
                assert!(seen.insert(job.id.clone()), "{} listed twice", job.id);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
            assert!(pages < 100, "paging does not end");
        }
        assert_eq!(seen.len(), wanted, "states {states:?}");
        assert!(pages >= 2, "4.2 MB of jobs cannot fit one page");
    }
    cluster.shutdown().await
}
