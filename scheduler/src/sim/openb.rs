//! Reader for the Alibaba "openb" GPU-cluster trace (Weng et al., ATC'23):
//! a node list (`sn,cpu_milli,memory_mib,gpu,model`) and a pod list
//! (`name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,
//! creation_time,deletion_time,scheduled_time`). The files are plain CSV
//! without quoting, so a hand-written splitter is enough (the crate has no
//! dependencies). Columns are found by header name.
//!
//! Conversion rules (also in docs/simulate.md):
//! - the trace's GPU models map onto gpufleet catalogue names by
//!   [`MODEL_MAP`]; G2 and G3 are Alibaba-internal codes with documented
//!   stand-ins;
//! - pods with `num_gpu` = 0 are skipped and counted;
//! - `gpu_milli` < 1000 on a one-GPU pod (a shared fraction of one GPU) is
//!   replayed as a share of a GPU and counted; on a pod of several GPUs
//!   (none in the published trace) it becomes whole GPUs and is counted;
//! - duration = deletion − creation (at least 1 s); pods without a deletion
//!   time are skipped and counted;
//! - `cpu_milli`, `memory_mib`, `qos`, `pod_phase` and `scheduled_time` are
//!   read past: the scheduler places GPUs only.

use std::collections::HashMap;

use crate::domain::Generation;
use crate::sim::workload::{SimJob, SimNode, Workload, WorkloadNotes};

/// Trace model code → (catalogue model, generation, stand-in price in
/// micro-USD per GPU-hour). Prices are round public on-demand rates per GPU,
/// there only so that cost comparisons between policies mean something.
pub const MODEL_MAP: [(&str, &str, Generation, u64); 7] = [
    ("P100", "P100-PCIE-16GB", Generation::Pascal, 1_460_000),
    ("T4", "T4", Generation::Turing, 350_000),
    ("V100M16", "V100-SXM2-16GB", Generation::Volta, 2_480_000),
    ("V100M32", "V100-SXM2-32GB", Generation::Volta, 3_900_000),
    ("A10", "A10", Generation::Ampere, 1_100_000),
    // Internal codes: 8-GPU nodes of a newer generation than V100 in a 2023
    // cluster; A100 SXM is the documented stand-in.
    ("G2", "A100-SXM-40GB", Generation::Ampere, 4_100_000),
    ("G3", "A100-SXM-80GB", Generation::Ampere, 5_120_000),
];

/// The catalogue entry for a trace model code.
pub fn map_model(code: &str) -> Option<(&'static str, Generation, u64)> {
    MODEL_MAP
        .iter()
        .find(|(c, ..)| c.eq_ignore_ascii_case(code.trim()))
        .map(|&(_, model, generation, price)| (model, generation, price))
}

/// A CSV error: which file line and field, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// Rows of a header-first CSV, each with its 1-based line number.
struct Table<'a> {
    what: &'static str,
    columns: HashMap<&'a str, usize>,
    rows: Vec<(usize, Vec<&'a str>)>,
}

impl<'a> Table<'a> {
    fn parse(what: &'static str, text: &'a str, required: &[&str]) -> Result<Self, ParseError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            return Err(ParseError(format!(
                "{what}: the file is empty; expected a header line"
            )));
        };
        let columns: HashMap<&str, usize> = header
            .split(',')
            .enumerate()
            .map(|(i, name)| (name.trim(), i))
            .collect();
        for name in required {
            if !columns.contains_key(name) {
                return Err(ParseError(format!(
                    "{what}: the header has no `{name}` column; expected {}",
                    required.join(",")
                )));
            }
        }
        let rows = lines
            .map(|(i, l)| (i + 1, l.split(',').map(str::trim).collect()))
            .collect();
        Ok(Table {
            what,
            columns,
            rows,
        })
    }

    fn field(&self, row: &[&'a str], name: &str) -> &'a str {
        self.columns
            .get(name)
            .and_then(|&i| row.get(i))
            .copied()
            .unwrap_or("")
    }

    fn number(&self, line: usize, row: &[&'a str], name: &str) -> Result<Option<u64>, ParseError> {
        let value = self.field(row, name);
        if value.is_empty() {
            return Ok(None);
        }
        value.parse::<u64>().map(Some).map_err(|_| {
            ParseError(format!(
                "{} line {line}: `{name}` is `{value}`; expected a whole number",
                self.what
            ))
        })
    }
}

/// Reads the node list.
pub fn parse_nodes(text: &str) -> Result<Vec<SimNode>, ParseError> {
    let table = Table::parse("node list", text, &["sn", "gpu", "model"])?;
    let mut nodes = Vec::with_capacity(table.rows.len());
    for (line, row) in &table.rows {
        let id = table.field(row, "sn");
        if id.is_empty() {
            return Err(ParseError(format!(
                "node list line {line}: `sn` is empty; every node needs a name"
            )));
        }
        let gpus = table.number(*line, row, "gpu")?.unwrap_or(0);
        let code = table.field(row, "model");
        let Some((model, generation, price)) = map_model(code) else {
            return Err(ParseError(format!(
                "node list line {line}: `model` is `{code}`; expected one of {}",
                known_codes()
            )));
        };
        nodes.push(SimNode {
            id: id.to_string(),
            model: model.to_string(),
            generation,
            gpus: u32::try_from(gpus.min(32)).unwrap_or(32),
            price_per_gpu_hour_micro_usd: price,
            provider: "alibaba".to_string(),
            region: "openb".to_string(),
        });
    }
    Ok(nodes)
}

/// Reads the pod list into jobs (sorted by creation time) and what was
/// skipped or rounded.
pub fn parse_pods(text: &str) -> Result<(Vec<SimJob>, WorkloadNotes), ParseError> {
    let table = Table::parse(
        "pod list",
        text,
        &[
            "name",
            "num_gpu",
            "gpu_milli",
            "creation_time",
            "deletion_time",
        ],
    )?;
    let mut notes = WorkloadNotes::default();
    let mut jobs = Vec::new();
    for (line, row) in &table.rows {
        let line = *line;
        let gpus = table.number(line, row, "num_gpu")?.unwrap_or(0);
        if gpus == 0 {
            notes.skipped_no_gpu += 1;
            continue;
        }
        let Some(created) = table.number(line, row, "creation_time")? else {
            return Err(ParseError(format!(
                "pod list line {line}: `creation_time` is empty; every pod needs one"
            )));
        };
        let Some(deleted) = table.number(line, row, "deletion_time")? else {
            notes.skipped_no_deletion += 1;
            continue;
        };
        let milli = table.number(line, row, "gpu_milli")?.unwrap_or(1000);
        let share = if milli >= 1000 || milli == 0 {
            0
        } else if gpus == 1 {
            notes.fractional_shares += 1;
            milli as u32
        } else {
            notes.fractional_rounded_up += 1;
            0
        };
        if deleted <= created {
            notes.zero_duration += 1;
        }
        let spec = table.field(row, "gpu_spec");
        let mut models = Vec::new();
        for code in spec.split('|').filter(|c| !c.trim().is_empty()) {
            let Some((model, ..)) = map_model(code) else {
                return Err(ParseError(format!(
                    "pod list line {line}: `gpu_spec` names `{code}`; expected models from {}",
                    known_codes()
                )));
            };
            models.push(model.to_string());
        }
        jobs.push(SimJob {
            id: table.field(row, "name").to_string(),
            tenant: "openb".to_string(),
            priority: 0,
            arrival: created,
            duration: deleted.saturating_sub(created).max(1),
            gpus: u32::try_from(gpus).unwrap_or(u32::MAX),
            gpu_milli: share,
            models,
            ..Default::default()
        });
    }
    jobs.sort_by_key(|j| j.arrival);
    Ok((jobs, notes))
}

/// Both files into one workload.
pub fn parse(nodes: &str, pods: &str) -> Result<Workload, ParseError> {
    let nodes = parse_nodes(nodes)?;
    let (jobs, notes) = parse_pods(pods)?;
    Ok(Workload { nodes, jobs, notes })
}

fn known_codes() -> String {
    MODEL_MAP
        .iter()
        .map(|(code, ..)| *code)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nodes_and_pods_with_the_documented_rules() {
        let nodes =
            "sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\nn1,96000,393216,8,G2\n";
        let pods = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n\
                    p0,1000,1024,1,460,,LS,Running,10,100,10\n\
                    p1,1000,1024,0,0,,BE,Running,5,50,5\n\
                    p2,1000,1024,2,1000,V100M32|G3,LS,Running,3,3,3\n\
                    p3,1000,1024,1,1000,,LS,Pending,7,,\n";
        let w = parse(nodes, pods).expect("valid");
        assert_eq!(w.nodes[1].model, "A100-SXM-40GB");
        assert_eq!(w.nodes[1].gpus, 8);
        assert_eq!(w.jobs.len(), 2);
        assert_eq!(w.jobs[0].id, "p2", "sorted by creation");
        assert_eq!(w.jobs[0].duration, 1);
        assert_eq!(w.jobs[0].models, vec!["V100-SXM2-32GB", "A100-SXM-80GB"]);
        assert_eq!(w.jobs[1].duration, 90);
        assert_eq!(
            w.notes,
            WorkloadNotes {
                skipped_no_gpu: 1,
                skipped_no_deletion: 1,
                fractional_rounded_up: 0,
                fractional_shares: 1,
                zero_duration: 1,
            }
        );
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let err = parse_nodes("sn,gpu,model\nn0,2,H9000\n").expect_err("unknown model");
        assert!(
            err.0.contains("line 2") && err.0.contains("`model`"),
            "{err}"
        );
        let err = parse_pods("name,num_gpu,gpu_milli,creation_time,deletion_time\np,x,0,1,2\n")
            .expect_err("bad number");
        assert!(err.0.contains("`num_gpu`"), "{err}");
        let err = parse_pods("name,num_gpu\n").expect_err("missing column");
        assert!(err.0.contains("gpu_milli"), "{err}");
    }
}
