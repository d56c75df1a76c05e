//! Rendering: tables for people, the protobuf JSON mapping for scripts.
//!
//! Everything the server sent is untrusted text: a job name may hold an
//! escape sequence that clears the screen or a newline that splits a row.
//! Every line goes out through [`line`], and every table cell through
//! [`Table::add_row`], both of which show control characters as escapes
//! ([`safe`]); JSON stays valid JSON with them escaped by the JSON rules.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;
use std::sync::OnceLock;
use std::time::SystemTime;

use anyhow::Context;
use comfy_table::presets::NOTHING;
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

/// Text for a terminal: control and bidirectional-format characters shown
/// as escapes (`\x1b`, `\n`, `\u{202e}`). The one helper for everything
/// the server sent.
pub fn safe(text: &str) -> Cow<'_, str> {
    gpufleet_core::limits::escape_unsafe(text)
}

/// Stdout was closed (`gpufleet … | head`): reported once, with exit
/// status 141 as a shell reports a process ended by SIGPIPE, so that
/// `set -o pipefail` scripts see the usual status. Distinct from a
/// connection's broken pipe, which is an error about the controller.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed before all output was written")
    }
}

impl std::error::Error for StdoutClosed {}

/// An error writing to stdout, with a closed pipe as [`StdoutClosed`].
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// Ends the process for a failed write to stdout: one line on stderr.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        eprintln!("gpufleet: {StdoutClosed}");
        std::process::exit(141);
    }
    eprintln!("error: cannot write to stdout: {e}");
    std::process::exit(1);
}

/// Prints one line to stdout, with control characters escaped ([`safe`]):
/// a line never holds a newline of its own. A closed pipe ends the process
/// with one message (see [`StdoutClosed`]) instead of a panic.
pub fn line(text: &str) {
    raw_line(&safe(text));
}

/// Writes a line as it is: only for text this process made safe.
fn raw_line(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|_| stdout.flush()) {
        stdout_failed(e);
    }
}

/// Writes bytes of a workload's log. Logs are the workload's own output
/// and go to a file or pipe untouched; to a terminal, control characters
/// other than newline and tab are shown as escapes, so a log cannot drive
/// the operator's terminal.
pub fn log_bytes(data: &[u8], to_terminal: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let written = if to_terminal {
        stdout.write_all(&escape_log(data))
    } else {
        stdout.write_all(data)
    };
    written.and_then(|_| stdout.flush()).map_err(stdout_error)
}

/// C0 controls (but newline and tab), DEL and C1 controls in UTF-8 shown
/// as `\xNN`; everything else as it is.
fn escape_log(data: &[u8]) -> Cow<'_, [u8]> {
    let is_c1 =
        |i: usize| data[i] == 0xc2 && data.get(i + 1).is_some_and(|b| (0x80..0xa0).contains(b));
    let unsafe_at = |i: usize| {
        let b = data[i];
        (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f || is_c1(i)
    };
    if !(0..data.len()).any(unsafe_at) {
        return Cow::Borrowed(data);
    }
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut i = 0;
    while i < data.len() {
        if is_c1(i) {
            out.extend_from_slice(format!("\\u{{{:x}}}", data[i + 1]).as_bytes());
            i += 2;
            continue;
        }
        if unsafe_at(i) {
            out.extend_from_slice(format!("\\x{:02x}", data[i]).as_bytes());
        } else {
            out.push(data[i]);
        }
        i += 1;
    }
    Cow::Owned(out)
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

/// One message as one line of JSON (the protobuf JSON mapping), with every
/// character a terminal acts on escaped: a JSON Lines record.
pub fn json_line<M: prost::Message + prost::Name>(message: &M) -> anyhow::Result<String> {
    let text = serde_json::to_string(&to_json(message)?)?;
    Ok(json_safe(&text).into_owned())
}

/// Reads a message from its protobuf JSON mapping (what [`to_json`] and
/// `-o json` write); unknown fields are errors.
pub fn from_json<M: prost::Message + prost::Name + Default>(text: &str) -> anyhow::Result<M> {
    let descriptor = pool()?
        .get_message_by_name(&M::full_name())
        .with_context(|| format!("no descriptor for {}", M::full_name()))?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let dynamic = DynamicMessage::deserialize(descriptor, &mut deserializer)?;
    deserializer.end()?;
    Ok(dynamic.transcode_to::<M>()?)
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
    // serde escapes C0 controls; the rest a terminal acts on (DEL, C1,
    // bidirectional formats) can only be inside strings, where `\uXXXX`
    // is the same text.
    for line in json_safe(&text).lines() {
        raw_line(line);
    }
    Ok(())
}

/// JSON text with every unsafe character escaped as `\uXXXX`.
fn json_safe(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c != '\n' && gpufleet_core::limits::is_unsafe_char(c);
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A table whose every cell is made safe ([`safe`]) as it is added, so a
/// newline cannot split a row nor an escape sequence reach the terminal.
pub struct Table(comfy_table::Table);

impl Table {
    pub fn add_row<I, T>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        self.0
            .add_row(cells.into_iter().map(|c| safe(c.as_ref()).into_owned()));
        self
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

pub fn table(headers: &[&str]) -> Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(NOTHING);
    table.set_header(headers.iter().map(|h| h.to_string()));
    Table(table)
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
    fn server_text_is_escaped_in_lines_tables_and_logs() {
        assert_eq!(
            safe("evil\x1b]0;owned\x07\nrow"),
            "evil\\x1b]0;owned\\x07\\nrow"
        );
        let mut t = table(&["NAME", "STATE"]);
        t.add_row(["a\nb\x1b[2J", "Running"]);
        let text = t.to_string();
        assert_eq!(text.lines().count(), 2, "one header, one row: {text}");
        assert!(text.contains("a\\nb\\x1b[2J"), "{text}");
        assert!(!text.contains('\x1b'));
        assert_eq!(
            escape_log(b"ok\n\tcol\x1b[31m\xc2\x9b"),
            &b"ok\n\tcol\\x1b[31m\\u{9b}"[..]
        );
        assert_eq!(escape_log("plain é\n".as_bytes()), "plain é\n".as_bytes());
    }

    #[test]
    fn json_stays_valid_with_every_unsafe_character_escaped() {
        let job = Job {
            id: "job-0123456789ab".into(),
            message: "a\x1b[2J\u{9b}\u{202e}\nb".into(),
            ..Default::default()
        };
        let text = serde_json::to_string_pretty(&to_json(&job).unwrap()).unwrap();
        let safe_text = json_safe(&text);
        assert!(
            !safe_text
                .chars()
                .any(|c| c != '\n' && gpufleet_core::limits::is_unsafe_char(c)),
            "{safe_text}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe_text).unwrap();
        assert_eq!(back["message"], "a\x1b[2J\u{9b}\u{202e}\nb");
    }

    #[test]
    fn labels() {
        assert_eq!(enum_label("JOB_STATE_NOT_READY", "JOB_STATE_"), "NotReady");
        assert_eq!(usd(2_990_000), "$2.99");
    }
}
