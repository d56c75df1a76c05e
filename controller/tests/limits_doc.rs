//! docs/limits.md states each limit the code enforces: a changed constant
//! fails here until its row says the new value.

use gpufleet_controller::limits as controller;
use gpufleet_core::limits as core;

/// `4096` → `4,096`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: usize) -> String {
    format!("{} bytes", thousands(n))
}

fn kib(n: usize) -> String {
    assert!(n.is_multiple_of(1024), "{n} is not whole KiB");
    format!("{} KiB", n / 1024)
}

#[test]
fn every_limit_row_states_the_enforced_value() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/limits.md"))
        .expect("docs/limits.md");
    let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with("| ")).collect();
    // (text that identifies the row, what its maximum must say)
    let expected = [
        (
            "| `spec.name`, token `name` |",
            bytes(controller::NAME_BYTES),
        ),
        (
            "| `spec.tenant`, `spec.queue`",
            bytes(controller::LABEL_BYTES),
        ),
        (
            "| `spec.constraints.{",
            format!("{} entries each", controller::CONSTRAINT_LIST_COUNT),
        ),
        (
            "| `spec.workload.argv` |",
            format!("{} arguments", thousands(core::ARGV_COUNT)),
        ),
        ("| each argument |", kib(core::ARG_BYTES)),
        ("| all of argv |", kib(core::ARGV_BYTES)),
        (
            "| `spec.workload.env` |",
            format!("{} variables", core::ENV_COUNT),
        ),
        ("| each variable's name |", bytes(core::ENV_KEY_BYTES)),
        ("| each variable's value |", kib(core::ENV_VALUE_BYTES)),
        ("| all names and values |", kib(core::ENV_BYTES)),
        (
            "| `spec.workload.working_dir` |",
            bytes(core::WORKING_DIR_BYTES),
        ),
        ("| `CancelJob.reason`", bytes(controller::REASON_BYTES)),
        ("| `page_token`", bytes(controller::PAGE_TOKEN_BYTES)),
        (
            "| `states`, `group_by` lists |",
            format!("{} entries", controller::FILTER_COUNT),
        ),
        ("| `GetHistory.metric` |", bytes(controller::METRIC_BYTES)),
        (
            "| `hello.identity.provider`",
            bytes(controller::LABEL_BYTES),
        ),
        (
            "| `hello.identity.zone`",
            bytes(controller::AGENT_TEXT_BYTES),
        ),
        (
            "| `hello.identity.labels` |",
            format!(
                "{} labels; keys {}, values {}",
                controller::NODE_LABEL_COUNT,
                bytes(controller::NODE_LABEL_KEY_BYTES),
                bytes(controller::NODE_LABEL_VALUE_BYTES)
            ),
        ),
        ("| `hello.gpus` |", thousands(controller::HELLO_GPUS)),
        (
            "| each GPU's `mig_instances` |",
            format!(
                "{}; each instance's `uuid` and `profile` {}",
                controller::HELLO_MIG_INSTANCES,
                bytes(controller::AGENT_TEXT_BYTES)
            ),
        ),
        (
            "| `spec.mig_profile` |",
            bytes(controller::MIG_PROFILE_BYTES),
        ),
        (
            "| `hello.workloads` |",
            thousands(controller::HELLO_WORKLOADS),
        ),
        (
            "| a workload status `message` |",
            bytes(controller::STATUS_MESSAGE_BYTES),
        ),
    ];
    let mut wrong = Vec::new();
    for (key, want) in &expected {
        match rows.iter().find(|row| row.starts_with(key)) {
            None => wrong.push(format!("no row starts with {key:?}")),
            Some(row) if !row.contains(want.as_str()) => {
                wrong.push(format!("the row {key:?} should say {want:?}: {row}"))
            }
            Some(_) => {}
        }
    }
    let budget = format!("{} MiB budget", core::RESPONSE_BUDGET_BYTES >> 20);
    if !doc.contains(&budget) {
        wrong.push(format!("the Responses section should say {budget:?}"));
    }
    let clipped = format!("clipped to {}", bytes(controller::SERVED_TEXT_BYTES));
    if !doc.contains(&clipped) {
        wrong.push(format!("the clipping paragraph should say {clipped:?}"));
    }
    assert!(wrong.is_empty(), "docs/limits.md:\n{}", wrong.join("\n"));
}
