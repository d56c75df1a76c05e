//! Config layering both binaries share. Each binary declares its keys once,
//! in one struct that serde reads from the TOML file and clap reads from
//! flags; every argument's `env` name turns the `GPUFLEET_*` variables of
//! an environment map into flags, so the loader never reads the process
//! environment (tests inject theirs, never `set_var`). Layers apply in
//! rising precedence, file ← environment ← flags, and each sets only the
//! keys it names (clap's `update_from_arg_matches`).
//!
//! The argument id is the key's TOML path (`node.region`), so one list,
//! [`keys`], names every key with its flag and variable: for errors, for
//! the environment layer and for the test that keeps
//! docs/configuration.md in step.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgMatches, Command, FromArgMatches};
use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded. One line each, except
/// [`ConfigError::Usage`], which clap renders (help, version, a flag that
/// does not exist).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {key}: {message}")]
    Invalid { key: String, message: String },
    /// `--help`, `--version` or a command line clap refuses; `exit()` it.
    #[error("{0}")]
    Usage(clap::Error),
}

/// `ConfigError::Invalid` for `key`.
pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// One key as clap declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The argument id: the TOML path for file keys (`node.region`).
    pub name: String,
    /// `--region`, if the key has a flag.
    pub flag: Option<String>,
    /// `GPUFLEET_REGION`, if the key has an environment variable.
    pub env: Option<String>,
}

/// Every argument of `cmd` but clap's own (`--help`, `--version`).
pub fn keys(cmd: &Command) -> Vec<Key> {
    cmd.get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .map(|a| Key {
            name: a.get_id().to_string(),
            flag: a.get_long().map(|l| format!("--{l}")),
            env: a.get_env().map(|e| e.to_string_lossy().into_owned()),
        })
        .collect()
}

/// The environment and the command line, parsed against one command.
#[derive(Debug)]
pub struct Layers {
    pub env: ArgMatches,
    pub flags: ArgMatches,
}

impl Layers {
    /// Parses `argv` (program name first) and the `env` variables that
    /// `cmd`'s arguments name. clap never reads the process environment
    /// here: the variables become `--flag=value` arguments of their own
    /// parse, so a bad one is reported with its variable's name.
    pub fn parse<I, T>(
        cmd: &Command,
        env: &HashMap<String, String>,
        argv: I,
    ) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let bare = cmd.clone().mut_args(|a| a.env(None::<&'static str>));
        let mut from_env: Vec<OsString> = vec![cmd.get_name().into()];
        for arg in cmd.get_arguments() {
            let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            let Some(value) = env.get(var.to_string_lossy().as_ref()) else {
                continue;
            };
            if arg.get_action().takes_values() {
                from_env.push(format!("--{long}={value}").into());
            } else if matches!(value.trim(), "1" | "true" | "yes" | "on") {
                from_env.push(format!("--{long}").into());
            }
        }
        let env_matches = bare
            .clone()
            .try_get_matches_from(from_env)
            .map_err(|e| from_clap(cmd, e, Origin::Env))?;
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let flags = match bare.try_get_matches_from(&argv) {
            Ok(m) => m,
            // Help from the full command, so it names each variable.
            Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
                return Err(ConfigError::Usage(
                    cmd.clone().try_get_matches_from(&argv).err().unwrap_or(e),
                ));
            }
            Err(e) => return Err(from_clap(cmd, e, Origin::Flags)),
        };
        Ok(Self {
            env: env_matches,
            flags,
        })
    }

    /// The config file that `--config` (or, without it, `GPUFLEET_CONFIG`)
    /// names; an empty value names none. The argument's id is `config`.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.flags
            .get_one::<PathBuf>("config")
            .or(self.env.get_one::<PathBuf>("config"))
            .filter(|p| !p.as_os_str().is_empty())
            .cloned()
    }

    /// Layers the environment, then the flags, over `base` (the file).
    pub fn apply<T: FromArgMatches>(&self, cmd: &Command, base: &mut T) -> Result<(), ConfigError> {
        base.update_from_arg_matches(&self.env)
            .map_err(|e| from_clap(cmd, e, Origin::Env))?;
        base.update_from_arg_matches(&self.flags)
            .map_err(|e| from_clap(cmd, e, Origin::Flags))
    }
}

#[derive(Clone, Copy)]
enum Origin {
    Env,
    Flags,
}

/// A value clap refused becomes `invalid <key>: <reason> (<where from>)`.
fn from_clap(cmd: &Command, e: clap::Error, origin: Origin) -> ConfigError {
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return ConfigError::Usage(e);
    }
    let shown = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => return ConfigError::Usage(e),
    };
    let long = shown
        .split([' ', '='])
        .next()
        .unwrap_or_default()
        .trim_start_matches('-');
    let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(long)) else {
        return ConfigError::Usage(e);
    };
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    let reason = match std::error::Error::source(&e) {
        Some(inner) => inner.to_string(),
        None => {
            let accepted = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(v)) => v.join(", "),
                _ => String::new(),
            };
            format!("{value:?} is not accepted; use one of: {accepted}")
        }
    };
    let from = match (origin, arg.get_env()) {
        (Origin::Env, Some(var)) => var.to_string_lossy().into_owned(),
        _ => format!("--{long}"),
    };
    invalid(arg.get_id().as_str(), format!("{reason} (from {from})"))
}

/// Largest config file read: far above any real one, and read up to this
/// whatever size the file reports (a pipe or a device reports none).
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 << 20;

/// Reads a TOML file into `T`; unknown keys are errors when `T` says
/// `deny_unknown_fields`.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    use std::io::Read as _;
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| {
            file.take(MAX_CONFIG_FILE_BYTES + 1)
                .read_to_string(&mut text)
        })
        .map_err(read_error)?;
    if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigError::Parse {
            path: path.to_path_buf(),
            message: format!(
                "over {MAX_CONFIG_FILE_BYTES} bytes; a configuration file is a few kilobytes"
            ),
        });
    }
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message spans several lines (it quotes the source); keep
        // the first line, which names the key, plus the position.
        message: {
            let msg = e.message().trim().replace('\n', " ");
            match e.span() {
                Some(span) => format!("{msg} (at byte {})", span.start),
                None => msg,
            }
        },
    })
}

/// Parses trimmed text with `FromStr`, for numbers given as flags or
/// variables (`" 2 "` is 2), with an error that says what was expected.
pub fn trimmed<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| {
        let what = std::any::type_name::<T>();
        if what.starts_with('f') {
            format!("{s:?} is not a number")
        } else {
            format!("{s:?} is not a whole number (or too large)")
        }
    })
}

/// `true`/`false`, also `1`/`0`, `yes`/`no`, `on`/`off`; empty is false.
pub fn boolean(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{s:?} is not true or false")),
    }
}

/// The keys serde accepts at the top of `T` (a struct): what a TOML file
/// may hold, including keys that have no flag.
pub fn file_keys<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Checks the rows of docs/configuration.md's table for `binary` against
/// `cli` (the binary's whole command line), `settings` (the arguments that
/// are also file keys) and `file_only` (file keys without a flag). A file
/// key's row names it in the key column; a flag-only argument's row
/// (`--config`) has `—` there. Returns one line per difference.
pub fn check_docs(
    doc: &str,
    binary: &str,
    cli: &Command,
    settings: &Command,
    file_only: &[&str],
) -> Vec<String> {
    let code = |c: &str| -> Option<String> {
        let start = c.find('`')? + 1;
        let len = c[start..].find('`')?;
        Some(c[start..start + len].split_whitespace().next()?.to_string())
    };
    let mut documented: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
    let mut problems = Vec::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 7 || cells[1] != binary {
            continue;
        }
        let name = code(cells[2])
            .or_else(|| code(cells[3]))
            .unwrap_or_default();
        let row = (code(cells[3]), code(cells[4]));
        if documented.insert(name.clone(), row).is_some() {
            problems.push(format!("{name} is documented twice"));
        }
    }
    let file_keys: Vec<String> = keys(settings).into_iter().map(|k| k.name).collect();
    let mut expected: Vec<Key> = keys(cli)
        .into_iter()
        .map(|mut k| {
            if !file_keys.contains(&k.name) {
                k.name = k.flag.clone().unwrap_or_default();
            }
            k
        })
        .collect();
    expected.extend(file_only.iter().map(|k| Key {
        name: (*k).to_string(),
        flag: None,
        env: None,
    }));
    for key in &expected {
        let Some((flag, env)) = documented.remove(&key.name) else {
            problems.push(format!("{} is not documented", key.name));
            continue;
        };
        if flag != key.flag {
            problems.push(format!(
                "{}: its flag is {:?}, documented as {flag:?}",
                key.name, key.flag
            ));
        }
        if env != key.env {
            problems.push(format!(
                "{}: its variable is {:?}, documented as {env:?}",
                key.name, key.env
            ));
        }
    }
    problems.extend(
        documented
            .keys()
            .map(|k| format!("{k} is documented but is not a key")),
    );
    problems.sort();
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Doc {
        #[allow(dead_code)]
        key: Option<String>,
    }

    /// A config file is believed only up to the limit, whatever size it
    /// reports; what fits is parsed as before.
    #[test]
    fn a_config_file_is_read_up_to_its_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("big.toml");
        let mut text = " ".repeat(MAX_CONFIG_FILE_BYTES as usize);
        text.push_str("key = \"x\"\n");
        std::fs::write(&path, &text).expect("write");
        let err = read_file::<Doc>(&path).expect_err("too large");
        assert!(err.to_string().contains("over 16777216 bytes"), "{err}");
        std::fs::write(&path, "key = \"x\"\n").expect("write");
        assert!(read_file::<Doc>(&path).is_ok());
    }
}
