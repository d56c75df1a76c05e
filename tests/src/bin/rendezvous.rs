//! A gang rendezvous the way distributed frameworks do one, for the
//! end-to-end tests: rank 0 listens on `MASTER_PORT`, every other rank
//! connects to `MASTER_ADDR:MASTER_PORT` and sends its `RANK`; rank 0
//! checks that it heard from `WORLD_SIZE - 1` distinct ranks and answers
//! each. Every rank prints its variables, so the tests (and
//! docs/workloads.md) show what a task sees.
//!
//! `rendezvous --fail-once MARKER`: rank `WORLD_SIZE - 1` exits 1 if
//! `MARKER` does not exist yet (creating it), to test that a gang fails
//! and restarts as one.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn number(name: &str) -> Result<u32, String> {
    var(name)?
        .parse()
        .map_err(|e| format!("{name} is not a number: {e}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rendezvous failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let rank = number("RANK")?;
    let world_size = number("WORLD_SIZE")?;
    let master = format!("{}:{}", var("MASTER_ADDR")?, number("MASTER_PORT")?);
    for name in [
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "NODE_RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GPUFLEET_PEERS",
    ] {
        println!("{name}={}", var(name)?);
    }
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, marker] = args.as_slice()
        && flag == "--fail-once"
        && rank + 1 == world_size
        && !std::path::Path::new(marker).exists()
    {
        std::fs::write(marker, b"failed once\n").map_err(|e| format!("{marker}: {e}"))?;
        return Err(format!("rank {rank} fails once, as asked"));
    }
    if rank == 0 {
        serve(&master, world_size)
    } else {
        join(&master, rank)
    }
}

/// Rank 0: hears from every other rank once.
fn serve(master: &str, world_size: u32) -> Result<(), String> {
    let port = master.rsplit(':').next().unwrap_or_default();
    let listener =
        TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| format!("bind :{port}: {e}"))?;
    let mut ranks = BTreeSet::new();
    let mut peers = Vec::new();
    while ranks.len() + 1 < world_size as usize {
        let (stream, from) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        stream.set_read_timeout(Some(WAIT)).ok();
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(|e| format!("read from {from}: {e}"))?;
        let rank: u32 = line
            .trim()
            .strip_prefix("rank ")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| format!("{from} sent {line:?}, not `rank N`"))?;
        if rank == 0 || rank >= world_size || !ranks.insert(rank) {
            return Err(format!(
                "rank {rank} from {from} is out of range or repeated"
            ));
        }
        peers.push(stream);
    }
    for mut peer in peers {
        peer.write_all(b"ok\n")
            .map_err(|e| format!("answer: {e}"))?;
    }
    println!("rendezvous complete: world_size={world_size}, ranks heard={ranks:?}");
    Ok(())
}

/// Every other rank: registers with rank 0, retrying while it starts.
fn join(master: &str, rank: u32) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    let mut stream = loop {
        match TcpStream::connect(master) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("connect {master}: {e}")),
        }
    };
    stream
        .write_all(format!("rank {rank}\n").as_bytes())
        .map_err(|e| format!("send to {master}: {e}"))?;
    stream.set_read_timeout(Some(WAIT)).ok();
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| format!("read from {master}: {e}"))?;
    if answer.trim() != "ok" {
        return Err(format!("rank 0 answered {answer:?}"));
    }
    println!("rank {rank} registered with {master}");
    Ok(())
}
