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

mod files;
mod format;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use self::files::{
    Open, Sealed, fold_frames, idx_path, io_error, read_floor, read_index_header, recover, seal,
    sealed_entries, seg_path, write_floor,
};
use self::format::{Entry, put_frame};
use super::codec::NodeMinute;
use super::rollup::Rollup;
use super::store::{RollupDiskUsage, RollupStore};
use crate::store::StoreError;

/// The directory under the controller's data dir.
pub const ROLLUP_DIR: &str = "rollups";
/// A segment takes the records of this many minutes (by the minute of the
/// records, counted from the first one it took) before it is sealed and
/// the next begins. Retention deletes at this granularity.
pub const SEGMENT_MINUTES: u64 = 60;
/// A segment is also sealed at this size (10,000 nodes write ~450 MB an hour).
const MAX_SEGMENT_BYTES: u64 = 1 << 30;

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

/// Rollups in segment files.
pub struct SegmentRollupStore {
    dir: PathBuf,
    segments: Mutex<Segments>,
}

impl SegmentRollupStore {
    /// Opens (creating) the segments in `dir`: indexes what a stopped
    /// controller left unsealed, then begins a new segment.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_span(dir, SEGMENT_MINUTES)
    }

    /// [`Self::open`] with segments of `segment_minutes` (tests).
    pub fn open_with_span(dir: &Path, segment_minutes: u64) -> Result<Self, StoreError> {
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
        })
    }

    fn lock(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sealed segments and the records of the open one.
    #[cfg(test)]
    fn segment_counts(&self) -> (usize, u64) {
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
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::format::FRAME_HEADER;
    use super::*;
    use crate::telemetry::catalogue::metric;
    use crate::telemetry::rollup::FinishedRollup;
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
        let store = SegmentRollupStore::open_with_span(dir.path(), 10).unwrap();
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
        let store = SegmentRollupStore::open_with_span(dir.path(), 10).unwrap();
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
        let store = SegmentRollupStore::open_with_span(dir.path(), 10).unwrap();
        drop(store);
        assert_eq!(files(dir.path(), ".seg"), 3);
        assert_eq!(files(dir.path(), ".idx"), 2);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentRollupStore::open(dir.path()).unwrap();
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
        let store = SegmentRollupStore::open(dir.path()).unwrap();
        assert_eq!(
            series(&store, "n1", "GPU-a", 0, 10),
            [(0, 1, 10.0), (1, 1, 20.0)]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    }

    #[test]
    fn a_damaged_frame_ends_recovery_and_is_an_error_once_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentRollupStore::open(dir.path()).unwrap();
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
        let store = SegmentRollupStore::open(dir.path()).unwrap();
        assert_eq!(series(&store, "n1", "GPU-a", 0, 10), [(0, 1, 10.0)]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), first_len);
        drop(store);
        // Sealed: a damaged frame is reported with its file, not skipped.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[FRAME_HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let store = SegmentRollupStore::open(dir.path()).unwrap();
        let err = store.range("n1", "GPU-a", 0, 10).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn retention_deletes_whole_segments_and_hides_the_rest_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentRollupStore::open_with_span(dir.path(), 10).unwrap();
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
        let store = SegmentRollupStore::open_with_span(dir.path(), 10).unwrap();
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
                let store = SegmentRollupStore::open_with_span(dir.path(), 5).unwrap();
                for minute in 0..12 {
                    store
                        .merge(&records(&[("n1", "GPU-a", minute, 10), ("n2", "GPU-b", minute, 20)]))
                        .unwrap();
                }
            }
            // Sealed at the restart: segments 1..=3, each with an index.
            drop(SegmentRollupStore::open_with_span(dir.path(), 5).unwrap());
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
            if let Ok(store) = SegmentRollupStore::open_with_span(dir.path(), 5) {
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
            let open = || SegmentRollupStore::open_with_span(dir.path(), 7).unwrap();
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
