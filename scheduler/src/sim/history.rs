//! A fleet's own history as a workload: the usage ledger's finished
//! allocations (`gpufleet usage export`) replayed on its node list, so an
//! operator can ask what last month would have looked like under another
//! policy, with more nodes, or at other prices.
//!
//! Conversion rules (also in docs/simulate.md):
//! - one simulated job per job: a gang (a job of several tasks) replays as
//!   a gang of that many tasks, placed all or none (counted), each task of
//!   the first record's size, for the longest of its tasks' run times;
//! - arrival = the job's submit time (the earliest of its records); records
//!   from controllers that did not export it arrive at their start (counted:
//!   their queue wait is lost);
//! - duration = the task's actual run time, summed over its attempts (a
//!   preempted or retried task ran several times; counted), at least 1 s;
//! - priority and preemptible are the job's (a preemptible job may be
//!   preempted again in the replay); max runtimes are not exported, so
//!   none is replayed;
//! - a share of a GPU replays as a share; a MIG instance as the share of
//!   its GPU it was billed (counted);
//! - model constraints are kept; generation constraints become the fleet's
//!   models of those generations; constraints the simulator does not model
//!   (provider, region, price, memory, spot) are dropped (counted).
//!
//! Times are virtual seconds from the earliest arrival.

use std::collections::BTreeMap;

use crate::domain::Generation;
use crate::sim::workload::{SimJob, SimNode, Workload};

/// Tasks a job may have: the controller's limit (`spec.tasks`,
/// docs/limits.md), so a record claiming more is not from a controller.
pub const MAX_TASKS: u32 = 4096;

/// One finished allocation, in the simulator's plain terms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryRecord {
    pub job_id: String,
    pub task_index: u32,
    pub tenant: String,
    pub priority: i32,
    /// Unix milliseconds; None in records written before submit times were
    /// exported.
    pub submitted_ms: Option<u64>,
    pub started_ms: u64,
    pub ended_ms: u64,
    /// Whole GPUs held (1 for a share).
    pub gpus: u32,
    /// 0: whole GPUs; else the thousandths of its one GPU.
    pub share_milli: u32,
    /// A MIG instance (replayed as its share).
    pub mig: bool,
    /// The job's tasks; 0 when unknown.
    pub tasks: u32,
    /// Allowed models; empty = any.
    pub models: Vec<String>,
    /// Allowed generations (an explicit list, or those at least a minimum);
    /// empty = any.
    pub generations: Vec<Generation>,
    /// The job asked for something the simulator does not model (provider,
    /// region, price, memory or spot constraints).
    pub unmodelled_constraints: bool,
    /// The job was preemptible.
    pub preemptible: bool,
}

/// What the conversion changed or dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryNotes {
    pub records: u64,
    pub jobs: u64,
    pub tasks: u64,
    /// Jobs of several tasks, replayed as gangs.
    pub gangs: u64,
    /// Their tasks.
    pub gang_tasks: u64,
    /// Tasks without a submit time: they arrive when they started.
    pub no_submit_time: u64,
    /// Tasks that ran more than once (preempted, retried): run times summed.
    pub multi_attempt: u64,
    pub mig_as_share: u64,
    /// Tasks whose constraints the simulator models only in part.
    pub unmodelled_constraints: u64,
    /// Tasks that the fleet cannot run at all (no node of an allowed model).
    pub unplaceable: u64,
    /// Unix milliseconds of virtual time 0 (the earliest arrival).
    pub start_unix_ms: u64,
}

/// A history file or fleet that cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryError(pub String);

impl std::fmt::Display for HistoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HistoryError {}

/// The workload `records` make on `nodes`.
pub fn workload(
    nodes: Vec<SimNode>,
    records: &[HistoryRecord],
) -> Result<(Workload, HistoryNotes), HistoryError> {
    if nodes.is_empty() {
        return Err(HistoryError(
            "the fleet has no node with GPUs; give --fleet the output of `gpufleet -o json nodes list`".into(),
        ));
    }
    if records.is_empty() {
        return Err(HistoryError(
            "the history has no finished allocation; export a longer range with `gpufleet usage export --since 30d`".into(),
        ));
    }
    let mut notes = HistoryNotes {
        records: records.len() as u64,
        ..Default::default()
    };
    // Per job, per task: its records in a fixed order.
    let mut jobs: BTreeMap<&str, BTreeMap<u32, Vec<&HistoryRecord>>> = BTreeMap::new();
    for r in records {
        if r.ended_ms < r.started_ms {
            return Err(HistoryError(format!(
                "record of {} task {}: ended before it started",
                r.job_id, r.task_index
            )));
        }
        if r.tasks > MAX_TASKS || r.task_index >= MAX_TASKS {
            return Err(HistoryError(format!(
                "record of {} task {}: job_tasks is {}; a job has at most {MAX_TASKS} tasks \
                 (the controller's limit): export the history again from the controller",
                r.job_id, r.task_index, r.tasks
            )));
        }
        jobs.entry(&r.job_id)
            .or_default()
            .entry(r.task_index)
            .or_default()
            .push(r);
    }
    let jobs_seen = jobs.len() as u64;
    let mut built: Vec<(u64, SimJob)> = Vec::with_capacity(jobs.len());
    for (job_id, tasks) in &jobs {
        // A gang: the tasks it asked for, or those recorded if more.
        let Some((&first_task, first_runs)) = tasks.iter().next() else {
            continue;
        };
        let first = first_runs[0];
        let count = (first.tasks as usize).max(tasks.len()).max(1) as u32;
        // Per task: run time summed over attempts; the gang holds its
        // GPUs as long as its longest task ran.
        let ran_ms: u64 = tasks
            .values()
            .map(|runs| runs.iter().map(|r| r.ended_ms - r.started_ms).sum::<u64>())
            .max()
            .unwrap_or(0);
        let all = || tasks.values().flatten();
        let submitted = all().filter_map(|r| r.submitted_ms).min();
        let started = all().map(|r| r.started_ms).min().unwrap_or(0);
        let arrival_ms = match submitted {
            Some(s) => s.min(started),
            None => {
                notes.no_submit_time += tasks.len() as u64;
                started
            }
        };
        let per_task = |count: fn(&HistoryRecord) -> bool| {
            tasks.values().filter(|runs| count(runs[0])).count() as u64
        };
        notes.multi_attempt += tasks.values().filter(|runs| runs.len() > 1).count() as u64;
        notes.mig_as_share += per_task(|r| r.mig);
        notes.unmodelled_constraints += per_task(|r| r.unmodelled_constraints);
        if count > 1 {
            notes.gangs += 1;
            notes.gang_tasks += u64::from(count);
        }
        let models = allowed_models(&nodes, first);
        if let Some(models) = &models
            && !nodes
                .iter()
                .any(|n| models.iter().any(|m| m.eq_ignore_ascii_case(&n.model)))
        {
            notes.unplaceable += u64::from(count);
        }
        notes.tasks += u64::from(count);
        let share = first.share_milli.min(999);
        built.push((
            arrival_ms,
            SimJob {
                // One task keeps its task's name; a gang is its job.
                id: if count > 1 {
                    job_id.to_string()
                } else {
                    format!("{job_id}/{first_task}")
                },
                tenant: first.tenant.clone(),
                priority: first.priority,
                arrival: 0,
                duration: ran_ms.div_ceil(1000).max(1),
                gpus: if share > 0 { 1 } else { first.gpus.max(1) },
                gpu_milli: share,
                // None: any model. An empty allowed set cannot be "any":
                // it stays a name no node has, so the job never runs.
                models: models.map_or_else(Vec::new, |m| {
                    if m.is_empty() {
                        vec!["(no model of the fleet)".to_string()]
                    } else {
                        m
                    }
                }),
                tasks: count,
                preemptible: first.preemptible,
                max_runtime: None,
            },
        ));
    }
    notes.jobs = jobs_seen;
    let t0 = built.iter().map(|(a, _)| *a).min().unwrap_or(0);
    notes.start_unix_ms = t0;
    for (arrival_ms, job) in &mut built {
        job.arrival = (*arrival_ms - t0) / 1000;
    }
    // Arrival, then job id and task: the same file always gives the same order.
    built.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.id.cmp(&y.id)));
    let mut workload = Workload {
        nodes,
        jobs: built.into_iter().map(|(_, j)| j).collect(),
        notes: Default::default(),
    };
    workload.sort_jobs();
    Ok((workload, notes))
}

/// The models a record may run on: None = any; Some(empty) = none of the
/// fleet's.
fn allowed_models(nodes: &[SimNode], r: &HistoryRecord) -> Option<Vec<String>> {
    if r.models.is_empty() && r.generations.is_empty() {
        return None;
    }
    if r.generations.is_empty() {
        return Some(r.models.clone());
    }
    let mut models: Vec<String> = Vec::new();
    for node in nodes {
        let named =
            r.models.is_empty() || r.models.iter().any(|m| m.eq_ignore_ascii_case(&node.model));
        if named && r.generations.contains(&node.generation) && !models.contains(&node.model) {
            models.push(node.model.clone());
        }
    }
    Some(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, model: &str, generation: Generation) -> SimNode {
        SimNode {
            id: id.into(),
            model: model.into(),
            generation,
            gpus: 8,
            price_per_gpu_hour_micro_usd: 1_000_000,
            provider: "aws".into(),
            region: "r".into(),
        }
    }

    fn rec(
        job: &str,
        task: u32,
        submitted: Option<u64>,
        started: u64,
        ended: u64,
    ) -> HistoryRecord {
        HistoryRecord {
            job_id: job.into(),
            task_index: task,
            tenant: "t".into(),
            submitted_ms: submitted,
            started_ms: started,
            ended_ms: ended,
            gpus: 2,
            tasks: 1,
            ..Default::default()
        }
    }

    #[test]
    fn records_become_jobs_with_submit_times_and_actual_run_times() {
        let nodes = vec![
            node("n", "H100-SXM-80GB", Generation::Hopper),
            node("m", "T4", Generation::Turing),
        ];
        let records = vec![
            // Submitted at 100 s, ran 50 s from 130 s.
            rec("job-b", 0, Some(100_000), 130_000, 180_000),
            // Two attempts: 10 s and 20.5 s → 31 s; submitted at 90 s.
            rec("job-a", 0, Some(90_000), 95_000, 105_000),
            rec("job-a", 0, Some(90_000), 200_000, 220_500),
            // No submit time: arrives when it started.
            HistoryRecord {
                gpus: 1,
                share_milli: 250,
                ..rec("job-c", 0, None, 150_000, 150_000)
            },
            // A gang of two, generation-constrained.
            HistoryRecord {
                tasks: 2,
                generations: vec![Generation::Hopper, Generation::Blackwell],
                ..rec("job-d", 0, Some(120_000), 125_000, 135_000)
            },
            HistoryRecord {
                tasks: 2,
                generations: vec![Generation::Hopper, Generation::Blackwell],
                ..rec("job-d", 1, Some(120_000), 125_000, 133_000)
            },
            HistoryRecord {
                models: vec!["A100-SXM-80GB".into()],
                unmodelled_constraints: true,
                ..rec("job-e", 0, Some(95_000), 96_000, 97_000)
            },
        ];
        let (w, notes) = workload(nodes, &records).unwrap();
        type Row<'a> = (&'a str, u64, u64, u32, u32, u32, Vec<String>);
        let got: Vec<Row<'_>> = w
            .jobs
            .iter()
            .map(|j| {
                (
                    j.id.as_str(),
                    j.arrival,
                    j.duration,
                    j.gpus,
                    j.gpu_milli,
                    j.tasks,
                    j.models.clone(),
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                ("job-a/0", 0, 31, 2, 0, 1, s(&[])),
                ("job-e/0", 5, 1, 2, 0, 1, s(&["A100-SXM-80GB"])),
                ("job-b/0", 10, 50, 2, 0, 1, s(&[])),
                // The gang replays as one gang of two 2-GPU tasks, for its
                // longest task's 10 s.
                ("job-d", 30, 10, 2, 0, 2, s(&["H100-SXM-80GB"])),
                ("job-c/0", 60, 1, 1, 250, 1, s(&[])),
            ]
        );
        assert_eq!(
            notes,
            HistoryNotes {
                records: 7,
                jobs: 5,
                tasks: 6,
                gangs: 1,
                gang_tasks: 2,
                no_submit_time: 1,
                multi_attempt: 1,
                mig_as_share: 0,
                unmodelled_constraints: 1,
                unplaceable: 1,
                start_unix_ms: 90_000,
            }
        );
    }

    #[test]
    fn a_generation_the_fleet_lacks_never_runs() {
        let nodes = vec![node("m", "T4", Generation::Turing)];
        let records = vec![HistoryRecord {
            generations: vec![Generation::Hopper],
            ..rec("job-a", 0, Some(0), 0, 1000)
        }];
        let (w, notes) = workload(nodes, &records).unwrap();
        assert_eq!(w.jobs[0].models, ["(no model of the fleet)"]);
        assert_eq!(notes.unplaceable, 1);
    }

    #[test]
    fn empty_or_inconsistent_inputs_are_errors() {
        let nodes = vec![node("m", "T4", Generation::Turing)];
        let err = workload(Vec::new(), &[rec("j", 0, None, 0, 1)])
            .unwrap_err()
            .0;
        assert!(err.contains("--fleet"), "{err}");
        let err = workload(nodes.clone(), &[]).unwrap_err().0;
        assert!(err.contains("gpufleet usage export"), "{err}");
        let err = workload(nodes.clone(), &[rec("j", 3, None, 10, 5)])
            .unwrap_err()
            .0;
        assert_eq!(err, "record of j task 3: ended before it started");
        // A gang larger than any controller accepts is refused, not
        // allocated for.
        let huge = HistoryRecord {
            tasks: u32::MAX,
            ..rec("j", 0, None, 0, 5)
        };
        let err = workload(nodes, &[huge]).unwrap_err().0;
        assert!(err.contains("job_tasks is 4294967295"), "{err}");
    }
}
