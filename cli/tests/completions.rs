//! `gpufleet completions`: the scripts the binary prints really complete
//! in the shell they are for.

use std::process::Command;

fn completions(shell: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args(["completions", shell])
        .output()
        .expect("gpufleet runs")
}

/// Loads the bash script into a real bash and asks it to complete
/// `gpufleet jo` and `gpufleet jobs su`, as bash's completion would.
#[test]
fn bash_script_completes_subcommands() {
    let script = completions("bash");
    assert!(script.status.success());
    let script = String::from_utf8(script.stdout).expect("utf-8 script");
    let probe = format!(
        "{script}\n\
         COMP_WORDS=(gpufleet jo); COMP_CWORD=1; COMP_LINE='gpufleet jo'; COMP_POINT=11\n\
         _gpufleet gpufleet jo gpufleet; echo \"first: ${{COMPREPLY[*]}}\"\n\
         COMP_WORDS=(gpufleet jobs su); COMP_CWORD=2; COMP_LINE='gpufleet jobs su'; COMP_POINT=16\n\
         _gpufleet gpufleet su jobs; echo \"second: ${{COMPREPLY[*]}}\"\n"
    );
    // On stdin, not `-c`: the script passed 128 KiB, Linux's limit on one
    // argument (MAX_ARG_STRLEN).
    let Ok(mut bash) = Command::new("bash")
        .arg("--norc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        // bash is part of every CI image we use; say so if it ever is not.
        panic!("bash is needed to test the bash completion script");
    };
    {
        use std::io::Write;
        let mut stdin = bash.stdin.take().expect("piped stdin");
        stdin
            .write_all(probe.as_bytes())
            .expect("bash reads the probe");
    }
    let out = bash.wait_with_output().expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("first: jobs"), "{stdout}");
    assert!(stdout.contains("second: submit"), "{stdout}");
}

#[test]
fn zsh_and_fish_scripts_name_the_commands() {
    let zsh = completions("zsh");
    assert!(zsh.status.success());
    assert!(String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef gpufleet"));
    let fish = completions("fish");
    assert!(fish.status.success());
    let fish = String::from_utf8_lossy(&fish.stdout);
    assert!(fish.contains("complete -c gpufleet"), "{fish}");
    assert!(fish.contains("-a \"submit\""), "{fish}");
}

#[test]
fn unknown_shell_is_rejected_with_the_choices() {
    let out = completions("tcsh");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bash, zsh, fish"), "{stderr}");
}
