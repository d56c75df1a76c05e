//! Telemetry rollups in append-only segment files, the way time-series
//! databases keep samples: `<data dir>/rollups/<id>.seg` holds the
//! node-minute records written during about an hour, one frame each, and
//! `<id>.idx` (written when the segment is sealed) finds a node's records
//! in it without reading the rest.
//!
//! Why not sled: every minute the fleet adds ~1,000 new keys of ~700
//! bytes. sled rebuilds the leaves they land on and frees the old
//! versions, and although its live heap stays level the controller's
//! resident memory climbed by 1–1.8 MiB a minute under `gpufleet-bench
//! load` (flat with telemetry off: BENCHMARKS.md). Here a write is one
//! reused buffer and one `pwrite` + `fdatasync`; nothing allocated per
//! record outlives it except a 24-byte index entry of the open segment.
//! Retention deletes whole files.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::store::StoreError;
use crate::telemetry::{
    NodeMinute, Rollup, RollupDiskUsage, RollupStore, SledRollupStore, decode_node_minute,
    merge_minute, place_gpus,
};

/// The directory under the controller's data dir.
pub const ROLLUP_DIR: &str = "rollups";
/// A segment takes the records of this many minutes (by the minute of the
/// records, counted from the first one it took) before it is sealed and
/// the next begins. Retention deletes at this granularity.
pub const SEGMENT_MINUTES: u64 = 60;
/// A segment is also sealed at this size (10,000 nodes write ~450 MB an hour).
const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Frame: record length (u32), CRC-32 of the rest (u32), minute (u64),
/// node id length (u16), node id, record. Little-endian.
const FRAME_HEADER: usize = 4 + 4 + 8 + 2;
/// Larger lengths in a frame header are damage, not a record (a node of
/// 64 GPUs writes ~6 KiB).
const MAX_RECORD_BYTES: u32 = 16 << 20;

const INDEX_MAGIC: &[u8; 8] = b"GFRIDX01";
/// Magic, min minute, max minute, records, node count, name bytes.
const INDEX_HEADER: usize = 8 + 8 + 8 + 8 + 4 + 4;
/// Per node: name offset, name length, first entry, entry count (u32 each).
const INDEX_NODE: usize = 16;
/// Per record: minute (u64), frame offset (u64), frame length (u32).
const INDEX_ENTRY: usize = 20;

/// Where one frame is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    minute: u64,
    offset: u64,
    len: u32,
}

/// A sealed segment: its `.seg` and `.idx` files are complete.
#[derive(Debug, Clone)]
struct Sealed {
    id: u64,
    min_minute: u64,
    max_minute: u64,
    records: u64,
    /// Of the segment and its index, on disk.
    bytes: u64,
}

/// The segment being written.
struct Open {
    id: u64,
    file: Arc<File>,
    len: u64,
    /// The first minute it took: it takes minutes up to `SEGMENT_MINUTES`
    /// later.
    first_minute: Option<u64>,
    min_minute: u64,
    max_minute: u64,
    records: u64,
    nodes: HashMap<Arc<str>, Vec<Entry>>,
}

struct Segments {
    open: Open,
    sealed: Vec<Sealed>,
    /// Minutes below it were pruned: reads skip what partly pruned
    /// segments still hold.
    floor: u64,
    /// Frames of one `merge`, reused.
    buf: Vec<u8>,
    segment_minutes: u64,
}

/// Rollups in segment files, plus the sled trees older controllers wrote
/// (read and pruned, never written).
pub struct SegmentRollupStore {
    dir: PathBuf,
    segments: Mutex<Segments>,
    older: Option<SledRollupStore>,
}

fn io_error(path: &Path, what: &str, source: std::io::Error) -> StoreError {
    StoreError::File {
        path: path.display().to_string(),
        what: what.to_string(),
        source,
    }
}

fn corrupt_file(path: &Path, message: String) -> StoreError {
    StoreError::CorruptRecord {
        key: path.display().to_string(),
        message,
    }
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

fn idx_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.idx"))
}

fn crc_of(minute: u64, node: &[u8], record: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&minute.to_le_bytes());
    crc.update(&(node.len() as u16).to_le_bytes());
    crc.update(node);
    crc.update(record);
    crc.finalize()
}

/// Appends one frame; `None` when the node id is too long to frame (ids
/// are validated to far less at registration).
fn put_frame(out: &mut Vec<u8>, minute: u64, node: &[u8], record: &[u8]) -> Option<u32> {
    let node_len = u16::try_from(node.len()).ok()?;
    let record_len = u32::try_from(record.len()).ok()?;
    let start = out.len();
    out.extend_from_slice(&record_len.to_le_bytes());
    out.extend_from_slice(&crc_of(minute, node, record).to_le_bytes());
    out.extend_from_slice(&minute.to_le_bytes());
    out.extend_from_slice(&node_len.to_le_bytes());
    out.extend_from_slice(node);
    out.extend_from_slice(record);
    u32::try_from(out.len() - start).ok()
}

/// A frame's parts, checked against its CRC.
struct Frame<'a> {
    minute: u64,
    node: &'a [u8],
    record: &'a [u8],
}

/// Parses the frame at the start of `bytes`; `Ok(None)` when `bytes` ends
/// before the frame does, `Err` when the frame is damaged.
fn parse_frame(bytes: &[u8]) -> Result<Option<(Frame<'_>, usize)>, String> {
    let Some((header, rest)) = bytes.split_first_chunk::<FRAME_HEADER>() else {
        return Ok(None);
    };
    let record_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let mut minute = [0u8; 8];
    minute.copy_from_slice(&header[8..16]);
    let minute = u64::from_le_bytes(minute);
    let node_len = u16::from_le_bytes([header[16], header[17]]) as usize;
    if record_len > MAX_RECORD_BYTES {
        return Err(format!(
            "frame claims a {record_len}-byte record (at most {MAX_RECORD_BYTES})"
        ));
    }
    let body = node_len + record_len as usize;
    if rest.len() < body {
        return Ok(None);
    }
    let (node, record) = rest[..body].split_at(node_len);
    if crc_of(minute, node, record) != crc {
        return Err("frame checksum does not match its contents".into());
    }
    Ok(Some((
        Frame {
            minute,
            node,
            record,
        },
        FRAME_HEADER + body,
    )))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The `.idx` of a segment: header, node table sorted by node id, node
/// ids, then each node's entries in minute order.
fn encode_index(open: &Open) -> Vec<u8> {
    let mut nodes: Vec<(&Arc<str>, &Vec<Entry>)> = open.nodes.iter().collect();
    nodes.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let names_len: usize = nodes.iter().map(|(n, _)| n.len()).sum();
    let entries: usize = nodes.iter().map(|(_, e)| e.len()).sum();
    let mut out = Vec::with_capacity(
        INDEX_HEADER + nodes.len() * INDEX_NODE + names_len + entries * INDEX_ENTRY,
    );
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&open.min_minute.to_le_bytes());
    out.extend_from_slice(&open.max_minute.to_le_bytes());
    out.extend_from_slice(&(entries as u64).to_le_bytes());
    out.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
    out.extend_from_slice(&(names_len as u32).to_le_bytes());
    let (mut name_at, mut entry_at) = (0u32, 0u32);
    for (name, list) in &nodes {
        for v in [name_at, name.len() as u32, entry_at, list.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        name_at += name.len() as u32;
        entry_at += list.len() as u32;
    }
    for (name, _) in &nodes {
        out.extend_from_slice(name.as_bytes());
    }
    for (_, list) in &nodes {
        let mut list: Vec<Entry> = list.to_vec();
        // Stable: a minute written twice keeps its write order.
        list.sort_by_key(|e| e.minute);
        for e in list {
            out.extend_from_slice(&e.minute.to_le_bytes());
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
        }
    }
    out
}

/// What a sealed segment's `.idx` says of itself; checks that the file is
/// as long as its header says.
fn read_index_header(path: &Path) -> Result<Sealed, StoreError> {
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

struct IndexHeader {
    min_minute: u64,
    max_minute: u64,
    records: u64,
    nodes: u32,
    names_len: u32,
}

fn parse_index_header(header: &[u8]) -> Option<IndexHeader> {
    if header.get(..8)? != INDEX_MAGIC {
        return None;
    }
    Some(IndexHeader {
        min_minute: read_u64(header, 8)?,
        max_minute: read_u64(header, 16)?,
        records: read_u64(header, 24)?,
        nodes: read_u32(header, 32)?,
        names_len: read_u32(header, 36)?,
    })
}

/// The length an index with header `h` has; saturating, so a damaged
/// header cannot overflow it.
fn index_len(h: &IndexHeader) -> u64 {
    (INDEX_HEADER as u64)
        .saturating_add(h.nodes as u64 * INDEX_NODE as u64)
        .saturating_add(h.names_len as u64)
        .saturating_add(h.records.saturating_mul(INDEX_ENTRY as u64))
}

/// `node`'s entries in a sealed segment with `start <= minute < end`;
/// empty when the segment was pruned meanwhile.
fn sealed_entries(
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
fn fold_frames(
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
    fn create(dir: &Path, id: u64) -> Result<Self, StoreError> {
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
    fn empty(id: u64, file: File) -> Self {
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

    fn add(&mut self, node: &Arc<str>, entry: Entry) {
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
const FLOOR_FILE: &str = "pruned-before";

fn read_floor(dir: &Path) -> Result<u64, StoreError> {
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

fn write_floor(dir: &Path, minute: u64) -> Result<(), StoreError> {
    let path = dir.join(FLOOR_FILE);
    let tmp = dir.join(format!("{FLOOR_FILE}.tmp"));
    std::fs::write(&tmp, minute.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| io_error(&path, "write", e))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "sync the directory", e))
}

/// Reads a segment that has no index (the one being written when the
/// controller stopped): every whole, intact frame from the start; a torn
/// or damaged tail is cut off so the segment can be indexed.
fn recover(dir: &Path, id: u64) -> Result<Open, StoreError> {
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
fn seal(dir: &Path, open: &Open) -> Result<Sealed, StoreError> {
    let path = idx_path(dir, open.id);
    let tmp = path.with_extension("idx.tmp");
    let index = encode_index(open);
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

impl SegmentRollupStore {
    /// Opens (creating) the segments in `dir`: indexes what a stopped
    /// controller left unsealed, then begins a new segment. `older` is
    /// read alongside and pruned, never written.
    pub fn open(dir: &Path, older: Option<SledRollupStore>) -> Result<Self, StoreError> {
        Self::open_with_span(dir, older, SEGMENT_MINUTES)
    }

    /// [`Self::open`] with segments of `segment_minutes` (tests).
    pub fn open_with_span(
        dir: &Path,
        older: Option<SledRollupStore>,
        segment_minutes: u64,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "create", e))?;
        let mut segs = Vec::new();
        let mut indexes = Vec::new();
        let listing = std::fs::read_dir(dir).map_err(|e| io_error(dir, "list", e))?;
        for item in listing {
            let item = item.map_err(|e| io_error(dir, "list", e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".idx.tmp") {
                // A seal the stop interrupted; the segment is re-indexed.
                let _ = std::fs::remove_file(item.path());
                continue;
            }
            let Some((stem, ext)) = name.split_once('.') else {
                continue;
            };
            let Ok(id) = u64::from_str_radix(stem, 16) else {
                continue;
            };
            match ext {
                "seg" => segs.push(id),
                "idx" => indexes.push(id),
                _ => {}
            }
        }
        segs.sort_unstable();
        let mut sealed = Vec::new();
        for &id in &segs {
            if indexes.contains(&id) {
                let path = idx_path(dir, id);
                match read_index_header(&path) {
                    Ok(header) => {
                        let data = std::fs::metadata(seg_path(dir, id)).map_or(0, |m| m.len());
                        sealed.push(Sealed {
                            id,
                            bytes: header.bytes + data,
                            ..header
                        });
                        continue;
                    }
                    Err(e) => {
                        // The frames are the truth; the index is rebuilt.
                        tracing::warn!(index = %path.display(), error = %e, "rebuilding a damaged rollup index");
                    }
                }
            }
            let recovered = recover(dir, id)?;
            if recovered.records == 0 {
                // Begun but never written (a restart soon after a start).
                let path = seg_path(dir, id);
                std::fs::remove_file(&path).map_err(|e| io_error(&path, "delete", e))?;
                continue;
            }
            sealed.push(seal(dir, &recovered)?);
        }
        for id in indexes {
            if !segs.contains(&id) {
                // Retention removed the segment but stopped before its index.
                let _ = std::fs::remove_file(idx_path(dir, id));
            }
        }
        let next = segs.last().map_or(1, |last| last + 1);
        let floor = read_floor(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segments: Mutex::new(Segments {
                open: Open::create(dir, next)?,
                sealed,
                floor,
                buf: Vec::new(),
                segment_minutes: segment_minutes.max(1),
            }),
            older,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sealed segments and the records of the open one (tests).
    pub fn segment_counts(&self) -> (usize, u64) {
        let segments = self.lock();
        (segments.sealed.len(), segments.open.records)
    }

    /// Seals the open segment and begins the next. The next file is
    /// created first: if that fails the open segment is still writable.
    fn rotate(&self, segments: &mut Segments) -> Result<(), StoreError> {
        let next = Open::create(&self.dir, segments.open.id + 1)?;
        let sealed = seal(&self.dir, &segments.open)?;
        segments.sealed.push(sealed);
        segments.open = next;
        Ok(())
    }
}

impl RollupStore for SegmentRollupStore {
    fn disk_usage(&self) -> Option<RollupDiskUsage> {
        let segments = self.lock();
        Some(RollupDiskUsage {
            segments: segments.sealed.len() as u64 + 1,
            bytes: segments.sealed.iter().map(|s| s.bytes).sum::<u64>() + segments.open.len,
        })
    }

    fn merge(&self, records: &[NodeMinute]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut guard = self.lock();
        let segments = &mut *guard;
        let newest = records.iter().map(|r| r.minute).max().unwrap_or(0);
        let due = segments
            .open
            .first_minute
            .is_some_and(|first| newest >= first.saturating_add(segments.segment_minutes))
            || segments.open.len >= MAX_SEGMENT_BYTES;
        if due {
            self.rotate(segments)?;
        }
        let mut buf = std::mem::take(&mut segments.buf);
        buf.clear();
        let mut frames = Vec::with_capacity(records.len());
        for record in records {
            let offset = buf.len();
            let len = put_frame(
                &mut buf,
                record.minute,
                record.node_id.as_bytes(),
                &record.record,
            )
            .ok_or_else(|| StoreError::CorruptRecord {
                key: format!("queued rollups of node {}", record.node_id),
                message: "record or node id too large to store".into(),
            })?;
            frames.push((offset as u64, len));
        }
        let open = &mut segments.open;
        let written = open
            .file
            .write_all_at(&buf, open.len)
            .and_then(|()| open.file.sync_data());
        segments.buf = buf;
        if let Err(e) = written {
            // Nothing of this call counts: the hub keeps the records and
            // the retry writes at the same offset, over whatever part of
            // this call reached the file. Cutting the file back keeps a
            // restart from reading that part; if even that fails, the
            // index written at the seal still never names it.
            let _ = open.file.set_len(open.len);
            return Err(io_error(&seg_path(&self.dir, open.id), "append to", e));
        }
        let base = open.len;
        for (record, (offset, len)) in records.iter().zip(frames) {
            open.add(
                &record.node_id,
                Entry {
                    minute: record.minute,
                    offset: base + offset,
                    len,
                },
            );
        }
        open.len += segments.buf.len() as u64;
        Ok(())
    }

    fn range_gpus(
        &self,
        node_id: &str,
        uuids: &[&str],
        start: u64,
        end: u64,
    ) -> Result<Vec<Vec<Rollup>>, StoreError> {
        let mut by_gpu: Vec<BTreeMap<u64, Rollup>> = vec![BTreeMap::new(); uuids.len()];
        let (sealed, open_entries, open_file, open_id, start) = {
            let segments = self.lock();
            let start = start.max(segments.floor);
            let sealed: Vec<u64> = segments
                .sealed
                .iter()
                .filter(|s| s.records > 0 && s.max_minute >= start && s.min_minute < end)
                .map(|s| s.id)
                .collect();
            let open_entries: Vec<Entry> = segments
                .open
                .nodes
                .get(node_id)
                .map(|list| {
                    list.iter()
                        .filter(|e| e.minute >= start && e.minute < end)
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            (
                sealed,
                open_entries,
                segments.open.file.clone(),
                segments.open.id,
                start,
            )
        };
        if start < end && !uuids.is_empty() {
            let node = node_id.as_bytes();
            for id in sealed {
                let entries = sealed_entries(&self.dir, id, node, start, end)?;
                if entries.is_empty() {
                    continue;
                }
                let path = seg_path(&self.dir, id);
                let file = match File::open(&path) {
                    Ok(file) => file,
                    // Pruned since the listing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(&path, "open", e)),
                };
                fold_frames(&file, &path, node, &entries, uuids, &mut by_gpu)?;
            }
            fold_frames(
                &open_file,
                &seg_path(&self.dir, open_id),
                node,
                &open_entries,
                uuids,
                &mut by_gpu,
            )?;
            if let Some(older) = &self.older {
                for (gpu, rollups) in by_gpu
                    .iter_mut()
                    .zip(older.range_gpus(node_id, uuids, start, end)?)
                {
                    for rollup in rollups {
                        merge_minute(gpu, rollup);
                    }
                }
            }
        }
        Ok(by_gpu
            .into_iter()
            .map(|minutes| minutes.into_values().collect())
            .collect())
    }

    /// Deletes the segments whose every minute is older than `minute`;
    /// reads skip older minutes that partly expired segments still hold.
    fn prune_before(&self, minute: u64) -> Result<u64, StoreError> {
        let doomed: Vec<Sealed> = {
            let mut segments = self.lock();
            if minute > segments.floor {
                write_floor(&self.dir, minute)?;
                segments.floor = minute;
            }
            let (doomed, kept) = std::mem::take(&mut segments.sealed)
                .into_iter()
                .partition(|s| s.max_minute < minute || s.records == 0);
            segments.sealed = kept;
            doomed
        };
        let mut removed = 0;
        for segment in doomed {
            // The data first: an index left behind is removed at the next
            // start, a segment left without its index would be re-indexed.
            for path in [
                seg_path(&self.dir, segment.id),
                idx_path(&self.dir, segment.id),
            ] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(&path, "delete", e)),
                }
            }
            removed += segment.records;
        }
        if let Some(older) = &self.older {
            removed += older.prune_before(minute)?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{FinishedRollup, metric};
    use gpufleet_proto::v1::GpuSample;
    use proptest::prelude::*;

    fn rollup(minute: u64, util: u32) -> Rollup {
        let mut r = Rollup::new(minute);
        r.add(&GpuSample {
            uuid: "x".into(),
            gpu_utilization_percent: Some(util),
            ..Default::default()
        });
        r
    }

    fn records(rows: &[(&str, &str, u64, u32)]) -> Vec<NodeMinute> {
        let finished: Vec<FinishedRollup> = rows
            .iter()
            .map(|&(node, uuid, minute, util)| FinishedRollup {
                node_id: node.into(),
                uuid: uuid.into(),
                rollup: rollup(minute, util),
            })
            .collect();
        NodeMinute::group(&finished)
    }

    /// `(minute, samples, sum)` of one GPU's utilisation.
    fn series(
        store: &dyn RollupStore,
        node: &str,
        uuid: &str,
        start: u64,
        end: u64,
    ) -> Vec<(u64, u32, f64)> {
        let util = metric("util").unwrap();
        store
            .range(node, uuid, start, end)
            .unwrap()
            .iter()
            .map(|r| (r.minute, r.get(util).count, r.get(util).sum))
            .collect()
    }

    fn files(dir: &Path, ext: &str) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|f| {
                f.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .ends_with(ext)
            })
            .count()
    }

    #[test]
    fn records_read_back_across_rotations_restarts_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentRollupStore::open_with_span(dir.path(), None, 10).unwrap();
        store
            .merge(&records(&[
                ("n1", "GPU-a", 0, 10),
                ("n1", "GPU-b", 0, 20),
                ("n2", "GPU-a", 0, 5),
            ]))
            .unwrap();
        // Minute 12 rotates; minute 0 again (late samples) joins the new
        // segment and is merged on read.
        store
            .merge(&records(&[("n1", "GPU-a", 12, 30), ("n1", "GPU-a", 0, 40)]))
            .unwrap();
        assert_eq!(store.segment_counts(), (1, 2));
        assert_eq!(
            series(&store, "n1", "GPU-a", 0, 100),
            [(0, 2, 50.0), (12, 1, 30.0)]
        );
        drop(store);
        // The unsealed segment is indexed at the next start.
        let store = SegmentRollupStore::open_with_span(dir.path(), None, 10).unwrap();
        assert_eq!(store.segment_counts(), (2, 0));
        assert_eq!(
            series(&store, "n1", "GPU-a", 0, 100),
            [(0, 2, 50.0), (12, 1, 30.0)]
        );
        assert_eq!(series(&store, "n1", "GPU-a", 1, 12), []);
        assert_eq!(series(&store, "n1", "GPU-b", 0, 1), [(0, 1, 20.0)]);
        // Another node's GPU of the same name is another series.
        assert_eq!(series(&store, "n2", "GPU-a", 0, 100), [(0, 1, 5.0)]);
        assert_eq!(series(&store, "n3", "GPU-a", 0, 100), []);
        let both = store.range_gpus("n1", &["GPU-b", "GPU-a"], 0, 100).unwrap();
        assert_eq!(both.iter().map(Vec::len).collect::<Vec<_>>(), [1, 2]);
        // A restart with nothing written leaves no empty segment behind.
        drop(store);
        let store = SegmentRollupStore::open_with_span(dir.path(), None, 10).unwrap();
        drop(store);
        assert_eq!(files(dir.path(), ".seg"), 3);
        assert_eq!(files(dir.path(), ".idx"), 2);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentRollupStore::open(dir.path(), None).unwrap();
        store.merge(&records(&[("n1", "GPU-a", 0, 10)])).unwrap();
        store.merge(&records(&[("n1", "GPU-a", 1, 20)])).unwrap();
        let path = seg_path(dir.path(), store.lock().open.id);
        let whole = std::fs::metadata(&path).unwrap().len();
        drop(store);
        // A write the stop cut short: half of a third frame.
        let mut third = Vec::new();
        put_frame(
            &mut third,
            2,
            b"n1",
            &records(&[("n1", "GPU-a", 2, 30)])[0].record,
        )
        .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&third[..third.len() / 2]);
        std::fs::write(&path, bytes).unwrap();
        let store = SegmentRollupStore::open(dir.path(), None).unwrap();
        assert_eq!(
            series(&store, "n1", "GPU-a", 0, 10),
            [(0, 1, 10.0), (1, 1, 20.0)]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    }

    #[test]
    fn a_damaged_frame_ends_recovery_and_is_an_error_once_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentRollupStore::open(dir.path(), None).unwrap();
        store.merge(&records(&[("n1", "GPU-a", 0, 10)])).unwrap();
        let first_len = store.lock().open.len;
        store.merge(&records(&[("n1", "GPU-a", 1, 20)])).unwrap();
        let path = seg_path(dir.path(), store.lock().open.id);
        drop(store);
        // Unsealed: recovery keeps the frames before the damaged one.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let store = SegmentRollupStore::open(dir.path(), None).unwrap();
        assert_eq!(series(&store, "n1", "GPU-a", 0, 10), [(0, 1, 10.0)]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), first_len);
        drop(store);
        // Sealed: a damaged frame is reported with its file, not skipped.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[FRAME_HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let store = SegmentRollupStore::open(dir.path(), None).unwrap();
        let err = store.range("n1", "GPU-a", 0, 10).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn retention_deletes_whole_segments_and_hides_the_rest_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentRollupStore::open_with_span(dir.path(), None, 10).unwrap();
        for minute in 0..30 {
            store
                .merge(&records(&[("n1", "GPU-a", minute, 1)]))
                .unwrap();
        }
        // Segments: 0..=9, 10..=19; 20..=29 is open.
        assert_eq!(store.segment_counts(), (2, 10));
        assert_eq!(store.prune_before(15).unwrap(), 10);
        assert_eq!(files(dir.path(), ".seg"), 2);
        assert_eq!(
            series(&store, "n1", "GPU-a", 0, 100).first().map(|r| r.0),
            Some(15)
        );
        drop(store);
        let store = SegmentRollupStore::open_with_span(dir.path(), None, 10).unwrap();
        assert_eq!(series(&store, "n1", "GPU-a", 0, 100).len(), 15);
        let before = store.disk_usage().unwrap();
        assert_eq!(before.segments, 3, "two sealed and the open one");
        assert_eq!(store.prune_before(30).unwrap(), 20);
        assert_eq!(series(&store, "n1", "GPU-a", 0, 100), []);
        assert_eq!(files(dir.path(), ".idx"), 0);
        // What the metrics report is what is on disk.
        let after = store.disk_usage().unwrap();
        assert_eq!(after.segments, 1);
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|f| f.unwrap())
            .filter(|f| f.file_name().to_str().unwrap().ends_with(".seg"))
            .map(|f| f.metadata().unwrap().len())
            .sum();
        assert_eq!(after.bytes, on_disk);
        assert!(before.bytes > after.bytes);
    }

    #[test]
    fn rollups_in_the_older_sled_tree_are_read_merged_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let tree = db.open_tree(crate::telemetry::ROLLUP_TREE).unwrap();
        let older = SledRollupStore::new(tree.clone());
        older
            .merge(&records(&[("n1", "GPU-a", 4, 10), ("n1", "GPU-a", 5, 20)]))
            .unwrap();
        let store = SegmentRollupStore::open(
            &dir.path().join("rollups"),
            Some(SledRollupStore::new(tree.clone())),
        )
        .unwrap();
        // The upgrade minute gets more samples in the new store.
        store
            .merge(&records(&[("n1", "GPU-a", 5, 30), ("n1", "GPU-a", 6, 40)]))
            .unwrap();
        assert_eq!(
            series(&store, "n1", "GPU-a", 0, 100),
            [(4, 1, 10.0), (5, 2, 50.0), (6, 1, 40.0)]
        );
        assert_eq!(store.prune_before(5).unwrap(), 1);
        assert_eq!(tree.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Damaged segment and index files (flipped bytes, cut files) are
        /// recovered or reported as errors, never a panic or a huge
        /// allocation.
        #[test]
        fn damaged_files_are_errors_not_panics(
            damage in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in proptest::option::of((any::<bool>(), any::<prop::sample::Index>())),
        ) {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = SegmentRollupStore::open_with_span(dir.path(), None, 5).unwrap();
                for minute in 0..12 {
                    store
                        .merge(&records(&[("n1", "GPU-a", minute, 10), ("n2", "GPU-b", minute, 20)]))
                        .unwrap();
                }
            }
            // Sealed at the restart: segments 1..=3, each with an index.
            drop(SegmentRollupStore::open_with_span(dir.path(), None, 5).unwrap());
            let pick = |index: bool| if index { idx_path(dir.path(), 2) } else { seg_path(dir.path(), 2) };
            for (index, at, xor) in damage {
                let path = pick(index);
                let mut bytes = std::fs::read(&path).unwrap();
                let i = at.index(bytes.len());
                bytes[i] ^= xor.max(1);
                std::fs::write(&path, bytes).unwrap();
            }
            if let Some((index, at)) = cut {
                let path = pick(index);
                let len = std::fs::metadata(&path).unwrap().len() as usize;
                std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(at.index(len) as u64).unwrap();
            }
            if let Ok(store) = SegmentRollupStore::open_with_span(dir.path(), None, 5) {
                for node in ["n1", "n2", "n3"] {
                    let _ = store.range_gpus(node, &["GPU-a", "GPU-b"], 0, 100);
                }
                // The segments nobody damaged still read.
                let util = metric("util").unwrap();
                let rows = store.range("n1", "GPU-a", 0, 5);
                if let Ok(rows) = rows {
                    prop_assert!(rows.iter().all(|r| r.get(util).sum == 10.0));
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(Vec<(usize, usize, u64, u32)>),
        Restart,
        Prune(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => proptest::collection::vec((0..3usize, 0..3usize, 0..60u64, 0..100u32), 1..6).prop_map(Op::Write),
            1 => Just(Op::Restart),
            1 => (0..60u64).prop_map(Op::Prune),
        ]
    }

    const NODES: [&str; 3] = ["n1", "n2", "n1/x"];
    const GPUS: [&str; 3] = ["GPU-a", "GPU-b", "GPU-c"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever is written, restarted and pruned, every range of every
        /// GPU reads what a plain map of the same writes holds.
        #[test]
        fn reads_match_a_model_of_the_writes(ops in proptest::collection::vec(op(), 1..25), start in 0..60u64, len in 1..70u64) {
            let dir = tempfile::tempdir().unwrap();
            let open = || SegmentRollupStore::open_with_span(dir.path(), None, 7).unwrap();
            let mut store = open();
            let mut model: BTreeMap<(usize, usize, u64), (u32, f64)> = BTreeMap::new();
            let mut floor = 0;
            for op in ops {
                match op {
                    Op::Write(rows) => {
                        let named: Vec<_> = rows.iter().map(|&(n, g, m, u)| (NODES[n], GPUS[g], m, u)).collect();
                        store.merge(&records(&named)).unwrap();
                        for (n, g, m, u) in rows {
                            if m >= floor {
                                let e = model.entry((n, g, m)).or_default();
                                e.0 += 1;
                                e.1 += u as f64;
                            }
                        }
                    }
                    Op::Restart => {
                        drop(store);
                        store = open();
                    }
                    Op::Prune(m) => {
                        store.prune_before(m).unwrap();
                        floor = floor.max(m);
                        model.retain(|k, _| k.2 >= floor);
                    }
                }
                for (n, node) in NODES.iter().enumerate() {
                    let read = store.range_gpus(node, &GPUS, start, start + len).unwrap();
                    for (g, gpu) in read.iter().enumerate() {
                        let util = metric("util").unwrap();
                        let got: Vec<_> = gpu.iter().map(|r| (r.minute, r.get(util).count, r.get(util).sum)).collect();
                        let want: Vec<_> = model
                            .range((n, g, start)..(n, g, start + len))
                            .map(|(k, v)| (k.2, v.0, v.1))
                            .collect();
                        prop_assert_eq!(got, want);
                    }
                }
            }
        }
    }
}
