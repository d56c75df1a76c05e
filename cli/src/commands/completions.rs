//! `gpufleet completions SHELL`: a completion script generated from the
//! same clap definition that parses the command line, so it never drifts.
//!
//! Install (the shell loads it from these places):
//! - bash: `gpufleet completions bash > /etc/bash_completion.d/gpufleet`
//! - zsh:  `gpufleet completions zsh > "${fpath[1]}/_gpufleet"`
//! - fish: `gpufleet completions fish > ~/.config/fish/completions/gpufleet.fish`

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, CommandFactory, ValueEnum};
use clap_complete::Shell;

use crate::Cli;
use crate::output;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Shell to generate the script for.
    #[arg(value_enum)]
    shell: CompletionShell,
}

/// The shells we document and test; clap_complete knows more, but these are
/// the ones an operator's GPU hosts and laptops run.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl From<CompletionShell> for Shell {
    fn from(shell: CompletionShell) -> Self {
        match shell {
            CompletionShell::Bash => Shell::Bash,
            CompletionShell::Zsh => Shell::Zsh,
            CompletionShell::Fish => Shell::Fish,
        }
    }
}

pub fn run(args: &CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    write_script(args.shell.into(), &mut script);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|_| stdout.flush())
        .map_err(output::stdout_error)?;
    Ok(ExitCode::SUCCESS)
}

fn write_script(shell: Shell, out: &mut Vec<u8>) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "gpufleet", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        write_script(shell, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_shell_completes_subcommands_and_flags() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            for word in [
                "capacity",
                "jobs",
                "nodes",
                "dev",
                "completions",
                "controller",
            ] {
                assert!(text.contains(word), "{shell}: {word} missing");
            }
        }
        // Nested subcommands are there too, e.g. `gpufleet jobs submit`.
        assert!(script(Shell::Fish).contains("submit"));
    }
}
