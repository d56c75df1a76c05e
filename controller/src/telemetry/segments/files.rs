//! Segment files on disk: the open segment and the sealed ones, reading
//! a node's frames through an index, recovering a segment a stop left
//! without one, sealing, and the retention floor file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{
    Entry, FRAME_HEADER, INDEX_ENTRY, INDEX_HEADER, INDEX_NODE, MAX_RECORD_BYTES, encode_index,
    index_len, parse_frame, parse_index_header, read_u32, read_u64,
};
use crate::store::StoreError;
use crate::telemetry::codec::decode_node_minute;
use crate::telemetry::rollup::Rollup;
use crate::telemetry::store::place_gpus;

/// A sealed segment: its `.seg` and `.idx` files are complete.
#[derive(Debug, Clone)]
pub(super) struct Sealed {
    pub(super) id: u64,
    pub(super) min_minute: u64,
    pub(super) max_minute: u64,
    pub(super) records: u64,
    /// Of the segment and its index, on disk.
    pub(super) bytes: u64,
}

/// The segment being written.
pub(super) struct Open {
    pub(super) id: u64,
    pub(super) file: Arc<File>,
    pub(super) len: u64,
    /// The first minute it took: it takes minutes up to `SEGMENT_MINUTES`
    /// later.
    pub(super) first_minute: Option<u64>,
    pub(super) min_minute: u64,
    pub(super) max_minute: u64,
    pub(super) records: u64,
    pub(super) nodes: HashMap<Arc<str>, Vec<Entry>>,
}

pub(super) fn io_error(path: &Path, what: &str, source: std::io::Error) -> StoreError {
    StoreError::File {
        path: path.display().to_string(),
        what: what.to_string(),
        source,
    }
}

pub(super) fn corrupt_file(path: &Path, message: String) -> StoreError {
    StoreError::CorruptRecord {
        key: path.display().to_string(),
        message,
    }
}

pub(super) fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

pub(super) fn idx_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.idx"))
}

/// What a sealed segment's `.idx` says of itself; checks that the file is
/// as long as its header says.
pub(super) fn read_index_header(path: &Path) -> Result<Sealed, StoreError> {
    let file = File::open(path).map_err(|e| io_error(path, "open", e))?;
    let size = file
        .metadata()
        .map_err(|e| io_error(path, "stat", e))?
        .len();
    let mut header = [0u8; INDEX_HEADER];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| corrupt_file(path, format!("index header unreadable: {e}")))?;
    let parsed = parse_index_header(&header).ok_or_else(|| {
        corrupt_file(
            path,
            "index header is not a gpufleet rollup index (wrong magic)".into(),
        )
    })?;
    let expected = index_len(&parsed);
    if size != expected {
        return Err(corrupt_file(
            path,
            format!("index is {size} bytes, its header says {expected}"),
        ));
    }
    Ok(Sealed {
        id: 0,
        min_minute: parsed.min_minute,
        max_minute: parsed.max_minute,
        records: parsed.records,
        bytes: size,
    })
}

/// `node`'s entries in a sealed segment with `start <= minute < end`;
/// empty when the segment was pruned meanwhile.
pub(super) fn sealed_entries(
    dir: &Path,
    id: u64,
    node: &[u8],
    start: u64,
    end: u64,
) -> Result<Vec<Entry>, StoreError> {
    let path = idx_path(dir, id);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&path, "open", e)),
    };
    let damaged = |what: &str| corrupt_file(&path, format!("index {what}"));
    let mut header = [0u8; INDEX_HEADER];
    file.read_exact_at(&mut header, 0)
        .map_err(|_| damaged("header is truncated"))?;
    let h = parse_index_header(&header).ok_or_else(|| damaged("header has the wrong magic"))?;
    // The counts size what is read next: they must fit the file.
    let size = file
        .metadata()
        .map_err(|e| io_error(&path, "stat", e))?
        .len();
    if index_len(&h) != size {
        return Err(damaged("is not as long as its header says"));
    }
    // Node table and names in one read; a fleet of 1,000 nodes is ~40 KB.
    let table_len = h.nodes as usize * INDEX_NODE + h.names_len as usize;
    let mut table = vec![0u8; table_len];
    file.read_exact_at(&mut table, INDEX_HEADER as u64)
        .map_err(|_| damaged("node table is truncated"))?;
    let (slots, names) = table.split_at(h.nodes as usize * INDEX_NODE);
    let slot = |i: usize| -> Option<(&[u8], u32, u32)> {
        let at = i * INDEX_NODE;
        let name_at = read_u32(slots, at)? as usize;
        let name_len = read_u32(slots, at + 4)? as usize;
        let name = names.get(name_at..name_at.checked_add(name_len)?)?;
        Some((name, read_u32(slots, at + 8)?, read_u32(slots, at + 12)?))
    };
    // Binary search of the sorted node table.
    let (mut lo, mut hi) = (0usize, h.nodes as usize);
    let mut found = None;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (name, first, count) = slot(mid).ok_or_else(|| damaged("node table is damaged"))?;
        match name.cmp(node) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => {
                found = Some((first, count));
                break;
            }
        }
    }
    let Some((first, count)) = found else {
        return Ok(Vec::new());
    };
    if first as u64 + count as u64 > h.records {
        return Err(damaged("node table points past its entries"));
    }
    let mut raw = vec![0u8; count as usize * INDEX_ENTRY];
    let at = INDEX_HEADER as u64 + table_len as u64 + first as u64 * INDEX_ENTRY as u64;
    file.read_exact_at(&mut raw, at)
        .map_err(|_| damaged("entries are truncated"))?;
    let mut entries = Vec::new();
    for chunk in raw.chunks_exact(INDEX_ENTRY) {
        let minute = read_u64(chunk, 0).unwrap_or(0);
        if minute >= start && minute < end {
            entries.push(Entry {
                minute,
                offset: read_u64(chunk, 8).unwrap_or(0),
                len: read_u32(chunk, 16).unwrap_or(0),
            });
        }
    }
    Ok(entries)
}

/// Reads the frames at `entries` of `file` (segment `path`), checks each
/// is `node`'s, and folds its GPUs into `by_gpu`.
pub(super) fn fold_frames(
    file: &File,
    path: &Path,
    node: &[u8],
    entries: &[Entry],
    uuids: &[&str],
    by_gpu: &mut [BTreeMap<u64, Rollup>],
) -> Result<(), StoreError> {
    let mut buf = Vec::new();
    for entry in entries {
        if entry.len as u64 > (FRAME_HEADER + u16::MAX as usize) as u64 + MAX_RECORD_BYTES as u64 {
            return Err(corrupt_file(
                path,
                format!(
                    "index names a {}-byte frame at byte {}, larger than any frame",
                    entry.len, entry.offset
                ),
            ));
        }
        buf.resize(entry.len as usize, 0);
        file.read_exact_at(&mut buf, entry.offset).map_err(|e| {
            corrupt_file(
                path,
                format!(
                    "frame at byte {} ({} bytes) unreadable: {e}",
                    entry.offset, entry.len
                ),
            )
        })?;
        let at = |m: String| corrupt_file(path, format!("frame at byte {}: {m}", entry.offset));
        let (frame, _) = parse_frame(&buf)
            .map_err(at)?
            .ok_or_else(|| at("frame is shorter than its index says".into()))?;
        if frame.node != node || frame.minute != entry.minute {
            return Err(at("frame is not the record its index names".into()));
        }
        let gpus = decode_node_minute(frame.minute, frame.record).map_err(at)?;
        place_gpus(uuids, by_gpu, frame.minute, gpus);
    }
    Ok(())
}

impl Open {
    pub(super) fn create(dir: &Path, id: u64) -> Result<Self, StoreError> {
        let path = seg_path(dir, id);
        // Ids above the open segment's are never in use: one left by a
        // rotation whose seal failed is empty and simply reused.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error(&path, "create", e))?;
        sync_dir(dir)?;
        Ok(Self::empty(id, file))
    }

    /// Segment `id` in `file`, before any record is added.
    pub(super) fn empty(id: u64, file: File) -> Self {
        Self {
            id,
            file: Arc::new(file),
            len: 0,
            first_minute: None,
            min_minute: u64::MAX,
            max_minute: 0,
            records: 0,
            nodes: HashMap::new(),
        }
    }

    pub(super) fn add(&mut self, node: &Arc<str>, entry: Entry) {
        self.first_minute.get_or_insert(entry.minute);
        self.min_minute = self.min_minute.min(entry.minute);
        self.max_minute = self.max_minute.max(entry.minute);
        self.records += 1;
        match self.nodes.get_mut(node) {
            Some(list) => list.push(entry),
            None => {
                self.nodes.insert(node.clone(), vec![entry]);
            }
        }
    }
}

/// The file that keeps the retention floor across restarts: a partly
/// expired segment must not show its pruned minutes again.
pub(super) const FLOOR_FILE: &str = "pruned-before";

pub(super) fn read_floor(dir: &Path) -> Result<u64, StoreError> {
    let path = dir.join(FLOOR_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            corrupt_file(
                &path,
                format!(
                    "holds {text:?}, not a minute; delete it to show every stored minute again"
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_error(&path, "read", e)),
    }
}

pub(super) fn write_floor(dir: &Path, minute: u64) -> Result<(), StoreError> {
    let path = dir.join(FLOOR_FILE);
    let tmp = dir.join(format!("{FLOOR_FILE}.tmp"));
    std::fs::write(&tmp, minute.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| io_error(&path, "write", e))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "sync the directory", e))
}

/// Reads a segment that has no index (the one being written when the
/// controller stopped): every whole, intact frame from the start; a torn
/// or damaged tail is cut off so the segment can be indexed.
pub(super) fn recover(dir: &Path, id: u64) -> Result<Open, StoreError> {
    use std::io::Read;
    let path = seg_path(dir, id);
    let file = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io_error(&path, "open", e))?;
    let size = file
        .metadata()
        .map_err(|e| io_error(&path, "stat", e))?
        .len();
    // Streamed: a segment may be up to 1 GiB.
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &file);
    let mut open = Open::empty(
        id,
        file.try_clone().map_err(|e| io_error(&path, "open", e))?,
    );
    let mut at = 0u64;
    let mut frame = Vec::new();
    let mut names: HashMap<Vec<u8>, Arc<str>> = HashMap::new();
    let cut_short = || "a frame cut short (the write the stop interrupted)".to_string();
    let damage = loop {
        if at == size {
            break None;
        }
        frame.resize(FRAME_HEADER, 0);
        if reader.read_exact(&mut frame).is_err() {
            break Some(cut_short());
        }
        let record_len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let node_len = u16::from_le_bytes([frame[16], frame[17]]) as usize;
        if record_len > MAX_RECORD_BYTES {
            break Some(format!("a frame that claims a {record_len}-byte record"));
        }
        frame.resize(FRAME_HEADER + node_len + record_len as usize, 0);
        if reader.read_exact(&mut frame[FRAME_HEADER..]).is_err() {
            break Some(cut_short());
        }
        let (parsed, len) = match parse_frame(&frame) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => break Some(cut_short()),
            Err(why) => break Some(why),
        };
        let Ok(name) = std::str::from_utf8(parsed.node) else {
            break Some("a node id that is not UTF-8".to_string());
        };
        let node = names
            .entry(parsed.node.to_vec())
            .or_insert_with(|| Arc::from(name))
            .clone();
        open.add(
            &node,
            Entry {
                minute: parsed.minute,
                offset: at,
                len: len as u32,
            },
        );
        at += len as u64;
    };
    if let Some(why) = damage {
        tracing::warn!(
            segment = %path.display(),
            kept_bytes = at,
            dropped_bytes = size - at,
            "rollup segment ends in {why}; the rest after byte {at} is dropped"
        );
        open.file
            .set_len(at)
            .map_err(|e| io_error(&path, "truncate", e))?;
        open.file
            .sync_all()
            .map_err(|e| io_error(&path, "sync", e))?;
    }
    open.len = at;
    Ok(open)
}

/// Writes `open`'s index (atomically: a temporary file renamed) and
/// returns it as sealed.
pub(super) fn seal(dir: &Path, open: &Open) -> Result<Sealed, StoreError> {
    let path = idx_path(dir, open.id);
    let tmp = path.with_extension("idx.tmp");
    let index = encode_index(&open.nodes, open.min_minute, open.max_minute);
    let write = || -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        file.write_all_at(&index, 0)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| io_error(&path, "write the index", e))?;
    sync_dir(dir)?;
    Ok(Sealed {
        id: open.id,
        min_minute: open.min_minute,
        max_minute: open.max_minute,
        records: open.records,
        bytes: open.len + index.len() as u64,
    })
}
