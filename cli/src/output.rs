//! Rendering: tables for people, the protobuf JSON mapping for scripts.

use std::io::Write;
use std::sync::OnceLock;
use std::time::SystemTime;

use anyhow::Context;
use comfy_table::{Table, presets::NOTHING};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    /// Comma-separated values (usage and market reports).
    Csv,
}

fn pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(gpufleet_proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("the built-in API descriptors are unreadable: {e}"))
}

/// Prints one line to stdout. A closed pipe (`gpufleet … | head`) ends the
/// process quietly, as it would for any Unix tool, instead of panicking.
pub fn line(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|_| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` that survives a closed pipe.
#[macro_export]
macro_rules! say {
    () => { $crate::output::line("") };
    ($($arg:tt)*) => { $crate::output::line(&format!($($arg)*)) };
}

/// Serialises any API message with the protobuf JSON mapping.
pub fn to_json<M: prost::Message + prost::Name>(message: &M) -> anyhow::Result<serde_json::Value> {
    let descriptor = pool()?
        .get_message_by_name(&M::full_name())
        .with_context(|| format!("no descriptor for {}", M::full_name()))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())?;
    let options = SerializeOptions::new().skip_default_fields(true);
    Ok(dynamic.serialize_with_options(serde_json::value::Serializer, &options)?)
}

/// One JSON object per line (streams) or the whole object (single answers).
pub fn print_json<M: prost::Message + prost::Name>(
    message: &M,
    pretty: bool,
) -> anyhow::Result<()> {
    let value = to_json(message)?;
    let text = if pretty {
        serde_json::to_string_pretty(&value)?
    } else {
        serde_json::to_string(&value)?
    };
    line(&text);
    Ok(())
}

pub fn table(headers: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    table.set_header(headers.iter().map(|h| h.to_string()));
    table
}

pub fn print_table(table: &Table) {
    // comfy-table pads the left edge with one space; trim it per line.
    for line in table.to_string().lines() {
        self::line(line.strip_prefix(' ').unwrap_or(line).trim_end());
    }
}

/// `3930000` micro-USD → `$3.93`.
pub fn usd(micro_usd: u64) -> String {
    gpufleet_scheduler::format_usd(micro_usd)
}

/// Age like `5s`, `3m`, `2h`, `4d` since a timestamp.
pub fn age(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "-".to_string() };
    let Ok(then) = SystemTime::try_from(*ts) else {
        return "-".to_string();
    };
    let secs = SystemTime::now()
        .duration_since(then)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// RFC 3339 time, seconds precision.
pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|ts| SystemTime::try_from(*ts).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".to_string())
}

/// `JOB_STATE_RUNNING` → `Running`.
pub fn enum_label(name: &str, prefix: &str) -> String {
    let rest = name
        .strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase();
    rest.split('_')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("")
}

/// A one-line chart of values, with Unicode blocks.
pub fn sparkline(values: &[f64]) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().fold(0.0f64, f64::max);
    values
        .iter()
        .map(|v| {
            if max <= 0.0 || *v <= 0.0 {
                ' '
            } else {
                BLOCKS[(((v / max) * 7.0).round() as usize).min(7)]
            }
        })
        .collect()
}

/// A horizontal bar `width` cells long for `value` of `max`.
pub fn bar(value: f64, max: f64, width: usize) -> String {
    if max <= 0.0 {
        return String::new();
    }
    let cells = ((value / max) * width as f64).round() as usize;
    "█".repeat(cells.min(width))
}

/// Quotes a CSV field when needed.
pub fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{Job, JobState};

    #[test]
    fn json_uses_the_protobuf_mapping() {
        let job = Job {
            id: "job-0123456789ab".into(),
            state: JobState::Running as i32,
            version: 3,
            ..Default::default()
        };
        let value = to_json(&job).unwrap();
        assert_eq!(value["id"], "job-0123456789ab");
        assert_eq!(value["state"], "JOB_STATE_RUNNING");
        // uint64 is a string in the protobuf JSON mapping.
        assert_eq!(value["version"], "3");
    }

    #[test]
    fn charts_and_csv() {
        assert_eq!(sparkline(&[0.0, 1.0, 8.0]), " ▂█");
        assert_eq!(bar(5.0, 10.0, 4), "██");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn labels() {
        assert_eq!(enum_label("JOB_STATE_NOT_READY", "JOB_STATE_"), "NotReady");
        assert_eq!(usd(2_990_000), "$2.99");
    }
}
