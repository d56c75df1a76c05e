//! What the controller's store and the agent's outbox rely on from sled:
//! once `flush` returns, everything written before it survives the process
//! being killed. This kills a process that writes and flushes from several
//! threads at once — single inserts, batches and removes, the controller's
//! store and the agent's outbox patterns — and checks that everything a
//! `flush` returned for is there after reopening.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "GPUFLEET_SLED_FLUSH_CHILD";
const THREADS: usize = 6;
/// Long enough for many buffers to fill and roll over.
const RUN_FOR: Duration = Duration::from_millis(1500);

fn key(thread: usize, i: u64) -> Vec<u8> {
    format!("t{thread}/{i:010}").into_bytes()
}

/// Small, so the buffer a flush must write holds many of them.
fn value(thread: usize, i: u64) -> Vec<u8> {
    let mut v = format!("{thread}:{i}:").into_bytes();
    v.resize(64 + (i as usize % 300), b'x');
    v
}

/// Every third key of a thread is removed again two steps later.
fn removed(i: u64) -> bool {
    i.is_multiple_of(3)
}

/// Every this many steps a thread writes as a batch (a put and a removal,
/// like the controller's store). Not more often: a batch writes out
/// sled's current buffer, which would hide a flush that writes nothing.
const BATCH_EVERY: u64 = 97;

/// The writer: each thread inserts key i, removes key i-2 when that is one
/// of the removed ones (like the outbox's acks) — now and then both as one
/// batch — flushes, and only then reports i as durable.
fn write_until_killed(dir: &str) {
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .expect("open sled");
    let tree = db.open_tree("t").expect("open tree");
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (tree, out) = (tree.clone(), out.clone());
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let gone = i.checked_sub(2).filter(|&j| removed(j));
                    if (i + t as u64 * 13).is_multiple_of(BATCH_EVERY) {
                        let mut batch = sled::Batch::default();
                        batch.insert(key(t, i), value(t, i));
                        if let Some(j) = gone {
                            batch.remove(key(t, j));
                        }
                        tree.apply_batch(batch).expect("batch");
                    } else {
                        tree.insert(key(t, i), value(t, i)).expect("insert");
                        if let Some(j) = gone {
                            tree.remove(key(t, j)).expect("remove");
                        }
                    }
                    tree.flush().expect("flush");
                    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                    writeln!(out, "{t} {i}")
                        .and_then(|()| out.flush())
                        .expect("report");
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn what_a_flush_returned_for_survives_a_kill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        write_until_killed(&dir);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "what_a_flush_returned_for_survives_a_kill",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut parts = line.split(' ');
            let parsed = (|| {
                let t: usize = parts.next()?.parse().ok()?;
                let i: u64 = parts.next()?.parse().ok()?;
                Some((t, i))
            })();
            if let Some(report) = parsed
                && tx.send(report).is_err()
            {
                return;
            }
        }
    });
    let mut durable: [Option<u64>; THREADS] = [None; THREADS];
    let start = Instant::now();
    while start.elapsed() < RUN_FOR {
        if let Ok((t, i)) = rx.recv_timeout(Duration::from_millis(50)) {
            durable[t] = durable[t].max(Some(i));
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Reports written before the kill and read after it count too.
    while let Ok((t, i)) = rx.recv_timeout(Duration::from_millis(200)) {
        durable[t] = durable[t].max(Some(i));
    }

    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let tree = db.open_tree("t").unwrap();
    for (t, last) in durable.iter().enumerate() {
        let last = last.unwrap_or_else(|| panic!("thread {t} flushed nothing in {RUN_FOR:?}"));
        assert!(last > 20, "thread {t} flushed only {last} writes");
        for i in 0..=last {
            let got = tree.get(key(t, i)).unwrap();
            // Removed two steps after its insert, so gone for sure once
            // step i+2 is flushed; before that, another thread's flush may
            // or may not have written the removal.
            if removed(i) && i + 2 <= last {
                assert_eq!(got, None, "thread {t}: key {i} was removed and flushed");
            } else if removed(i) && got.is_none() {
                continue;
            } else {
                assert_eq!(
                    got.as_deref(),
                    Some(value(t, i).as_slice()),
                    "thread {t}: key {i} was flushed (last flushed: {last})"
                );
            }
        }
    }
}
