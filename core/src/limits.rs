//! Limits that the controller, the agent and the CLI share: the size of a
//! workload (argv, env, working dir), the byte budget of one response, the
//! character rules for names and free text, and the one escaping of
//! control characters the CLI applies to everything a server sent.
//! `docs/limits.md` lists every limit with its reason; the controller's own
//! limits are in `controller/src/limits.rs`.

use std::borrow::Cow;
use std::fmt;

use gpufleet_proto::v1::WorkloadSpec;

/// Arguments in a workload's argv. Linux accepts more, but no real command
/// line needs thousands of separate arguments.
pub const ARGV_COUNT: usize = 4096;
/// One argument: Linux's own limit on one argument string is 128 KiB
/// (`MAX_ARG_STRLEN`); a job spec is not the place for data.
pub const ARG_BYTES: usize = 32 * 1024;
/// All of argv together: the job is stored, listed and sent to an agent.
pub const ARGV_BYTES: usize = 64 * 1024;
/// Environment variables one workload sets.
pub const ENV_COUNT: usize = 256;
/// One variable's name.
pub const ENV_KEY_BYTES: usize = 256;
/// One variable's value.
pub const ENV_VALUE_BYTES: usize = 32 * 1024;
/// All names and values together.
pub const ENV_BYTES: usize = 128 * 1024;
/// A working directory: Linux's `PATH_MAX`.
pub const WORKING_DIR_BYTES: usize = 4096;

/// gRPC clients refuse a message over 4 MiB by default; every list stops
/// adding entries before its encoded size passes this budget, which
/// leaves room for the envelope and a last entry.
pub const RESPONSE_BUDGET_BYTES: usize = 3 * 1024 * 1024;

/// A value that broke a limit: the field and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for Violation {}

impl Violation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `value` is at most `max` bytes.
pub fn check_bytes(field: &str, value: &str, max: usize) -> Result<(), Violation> {
    if value.len() > max {
        return Err(Violation::new(
            field,
            format!("{} bytes; at most {max}", value.len()),
        ));
    }
    Ok(())
}

/// A repeated field has at most `max` entries.
pub fn check_count(field: &str, count: usize, max: usize) -> Result<(), Violation> {
    if count > max {
        return Err(Violation::new(
            field,
            format!("{count} entries; at most {max}"),
        ));
    }
    Ok(())
}

/// Characters a terminal acts on rather than shows: the C0 and C1 control
/// characters, DEL, and the bidirectional-format characters that reorder
/// what follows them on screen.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Names (job names, token names): printable Unicode, that is, no
/// character for which [`is_unsafe_char`] holds; at most `max` bytes.
pub fn check_name(field: &str, value: &str, max: usize) -> Result<(), Violation> {
    check_bytes(field, value, max)?;
    check_no_unsafe_chars(field, value, "names")
}

/// Free text (cancel and cordon reasons): one line of printable Unicode —
/// no control character at all, newline and tab included, so a reason can
/// neither split a table row nor drive a terminal; at most `max` bytes.
pub fn check_free_text(field: &str, value: &str, max: usize) -> Result<(), Violation> {
    check_bytes(field, value, max)?;
    check_no_unsafe_chars(field, value, "free text")
}

fn check_no_unsafe_chars(field: &str, value: &str, what: &str) -> Result<(), Violation> {
    match value.char_indices().find(|(_, c)| is_unsafe_char(*c)) {
        None => Ok(()),
        Some((at, c)) => Err(Violation::new(
            field,
            format!(
                "has the control character {} at byte {at}; {what} must be printable (no control or bidirectional-format characters, newline and tab included)",
                c.escape_unicode()
            ),
        )),
    }
}

/// The limits of a workload spec (`prefix` is its field path, e.g.
/// `spec.workload`). Meaning (an empty argv, reserved variables) is the
/// caller's to check.
pub fn check_workload(prefix: &str, workload: &WorkloadSpec) -> Result<(), Violation> {
    let argv = format!("{prefix}.argv");
    check_count(&argv, workload.argv.len(), ARGV_COUNT)?;
    let mut total = 0;
    for (i, arg) in workload.argv.iter().enumerate() {
        check_bytes(&format!("{argv}[{i}]"), arg, ARG_BYTES)?;
        if arg.contains('\0') {
            return Err(Violation::new(
                format!("{argv}[{i}]"),
                "contains a NUL byte, which no argument can hold",
            ));
        }
        total += arg.len();
    }
    if total > ARGV_BYTES {
        return Err(Violation::new(
            argv,
            format!("{total} bytes in all; at most {ARGV_BYTES}"),
        ));
    }
    let env = format!("{prefix}.env");
    check_count(&env, workload.env.len(), ENV_COUNT)?;
    let mut total = 0;
    for (key, value) in &workload.env {
        let shown: String = key.chars().take(64).collect();
        check_bytes(&format!("{env}[{shown:?}] (name)"), key, ENV_KEY_BYTES)?;
        check_bytes(&format!("{env}[{shown:?}]"), value, ENV_VALUE_BYTES)?;
        if value.contains('\0') {
            return Err(Violation::new(
                format!("{env}[{shown:?}]"),
                "values must not contain NUL bytes",
            ));
        }
        total += key.len() + value.len();
    }
    if total > ENV_BYTES {
        return Err(Violation::new(
            env,
            format!("{total} bytes in all; at most {ENV_BYTES}"),
        ));
    }
    let working_dir = format!("{prefix}.working_dir");
    check_bytes(&working_dir, &workload.working_dir, WORKING_DIR_BYTES)?;
    if workload.working_dir.contains('\0') {
        return Err(Violation::new(working_dir, "contains a NUL byte"));
    }
    if let Some(container) = &workload.container {
        crate::container::check_container(&format!("{prefix}.container"), container)?;
    }
    Ok(())
}

/// `text` cut to at most `max` bytes on a character boundary, with a note
/// of how long it was. For text stored before its limit existed: it is
/// served clipped rather than refused, so one old record cannot break a
/// listing.
pub fn clip(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let original = text.len();
    let mut end = max.saturating_sub(40).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("… [clipped from {original} bytes]"));
}

/// Server-provided text made safe for a terminal: every character for
/// which [`is_unsafe_char`] holds is shown as an escape (`\n`, `\t`, `\r`,
/// `\x1b`, `\u{202e}`) instead of being written. Text without one is
/// returned as it is.
pub fn escape_unsafe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && is_unsafe_char(c) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if is_unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_counts_name_the_field_and_the_limit() {
        let err = check_bytes("spec.name", &"x".repeat(300), 128).unwrap_err();
        assert_eq!(err.to_string(), "spec.name: 300 bytes; at most 128");
        assert!(check_bytes("spec.name", &"x".repeat(128), 128).is_ok());
        let err = check_count("spec.workload.env", 300, 256).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.workload.env: 300 entries; at most 256"
        );
    }

    #[test]
    fn names_and_free_text_refuse_control_characters() {
        assert!(check_name("spec.name", "train llama — run 3", 128).is_ok());
        for bad in [
            "a\x1b[2Jb",
            "a\nb",
            "nul\0",
            "del\x7f",
            "c1\u{9b}",
            "rtl\u{202e}",
        ] {
            let err = check_name("spec.name", bad, 128).unwrap_err();
            assert_eq!(err.field, "spec.name", "{bad:?}");
        }
        let err = check_free_text("reason", "disk\tfull", 1024).unwrap_err();
        assert!(err.message.contains("\\u{9}"), "{err}");
        assert!(check_free_text("reason", "maintenance window", 1024).is_ok());
    }

    #[test]
    fn workloads_are_bounded_per_argument_in_all_and_per_variable() {
        let spec = |argv: Vec<String>| WorkloadSpec {
            argv,
            ..Default::default()
        };
        assert!(check_workload("w", &spec(vec!["python".into(), "train.py".into()])).is_ok());
        let err = check_workload("w", &spec(vec!["x".into(); ARGV_COUNT + 1])).unwrap_err();
        assert_eq!(err.field, "w.argv");
        let err =
            check_workload("w", &spec(vec!["a".into(), "b".repeat(ARG_BYTES + 1)])).unwrap_err();
        assert_eq!(err.field, "w.argv[1]");
        let err = check_workload("w", &spec(vec!["c".repeat(ARG_BYTES); 3])).unwrap_err();
        assert!(err.message.contains("in all"), "{err}");
        let err = check_workload("w", &spec(vec!["a\0b".into()])).unwrap_err();
        assert_eq!(err.field, "w.argv[0]");

        let mut w = spec(vec!["x".into()]);
        w.env.insert("K".into(), "v".repeat(ENV_VALUE_BYTES + 1));
        assert_eq!(check_workload("w", &w).unwrap_err().field, "w.env[\"K\"]");
        let mut w = spec(vec!["x".into()]);
        w.env.insert("K".repeat(ENV_KEY_BYTES + 1), "v".into());
        assert!(
            check_workload("w", &w)
                .unwrap_err()
                .field
                .ends_with("(name)")
        );
        let mut w = spec(vec!["x".into()]);
        for i in 0..8 {
            w.env.insert(format!("K{i}"), "v".repeat(ENV_VALUE_BYTES));
        }
        assert_eq!(check_workload("w", &w).unwrap_err().field, "w.env");
        let mut w = spec(vec!["x".into()]);
        for i in 0..=ENV_COUNT {
            w.env.insert(format!("K{i}"), String::new());
        }
        assert_eq!(check_workload("w", &w).unwrap_err().field, "w.env");
        let mut w = spec(vec!["x".into()]);
        w.working_dir = "/".repeat(WORKING_DIR_BYTES + 1);
        assert_eq!(check_workload("w", &w).unwrap_err().field, "w.working_dir");
    }

    #[test]
    fn clipping_keeps_a_character_boundary_and_says_so() {
        let mut text = "é".repeat(1000);
        clip(&mut text, 100);
        assert!(text.len() <= 100, "{}", text.len());
        assert!(text.ends_with("[clipped from 2000 bytes]"), "{text}");
        let mut short = "fine".to_string();
        clip(&mut short, 100);
        assert_eq!(short, "fine");
    }

    #[test]
    fn escaping_shows_control_characters_as_text() {
        assert_eq!(escape_unsafe("plain"), "plain");
        assert_eq!(escape_unsafe("a\x1b[2Jb\nc"), "a\\x1b[2Jb\\nc");
        assert_eq!(escape_unsafe("\0\t\r\x7f"), "\\x00\\t\\r\\x7f");
        assert_eq!(escape_unsafe("x\u{9b}y\u{202e}"), "x\\u{9b}y\\u{202e}");
        assert!(!escape_unsafe("a\x1bb").chars().any(is_unsafe_char));
    }
}
