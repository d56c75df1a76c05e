//! The stored form of rollups: a node-minute record holds every GPU of
//! one node that reported in one minute, compactly (varints, GPU UUIDs in
//! 16 bytes). Segment files and the sled store keep these records as
//! they are; this is the only place that reads or writes their bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::catalogue::METRICS;
use super::rollup::{Acc, FinishedRollup, Rollup};

/// Format byte of a node-minute record.
const NODE_MINUTE_FORMAT: u8 = 2;

impl Rollup {
    /// Compact form inside a node-minute record: the number of metrics
    /// present, then per metric its id, count, sum and max as varints
    /// ([`put_number`]). Every metric today comes from an integer field,
    /// so a typical GPU-minute takes about 80 bytes instead of 190.
    fn encode_compact(&self, out: &mut Vec<u8>) {
        let present = self.metrics.iter().filter(|a| a.count > 0).count();
        // METRIC_COUNT is far below 256 (ids are one byte).
        out.push(present as u8);
        for (acc, m) in self.metrics.iter().zip(METRICS) {
            if acc.count == 0 {
                continue;
            }
            out.push(m.id);
            put_varint(out, u64::from(acc.count));
            put_number(out, acc.sum);
            put_number(out, acc.max);
        }
    }

    /// Reads what `encode_compact` wrote from the front of `bytes`,
    /// advancing it. Unknown metric ids are skipped.
    fn decode_compact(minute: u64, bytes: &mut &[u8]) -> Option<Self> {
        let (&present, rest) = bytes.split_first()?;
        *bytes = rest;
        let mut rollup = Rollup::new(minute);
        for _ in 0..present {
            let (&id, rest) = bytes.split_first()?;
            *bytes = rest;
            let count = u32::try_from(get_varint(bytes)?).ok()?;
            let sum = get_number(bytes)?;
            let max = get_number(bytes)?;
            if let Some(i) = METRICS.iter().position(|m| m.id == id) {
                rollup.metrics[i] = Acc { count, sum, max };
            }
        }
        Some(rollup)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Integers below 2^53 are exact in an f64 and are what every metric's
/// sum and max are today.
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// Lossless and short for integers: an exact non-negative integer `n` is
/// the varint `2n`; anything else is the varint `1` followed by the eight
/// bytes of the f64.
fn put_number(out: &mut Vec<u8>, v: f64) {
    if (0.0..EXACT_INTEGER_LIMIT).contains(&v) && v.fract() == 0.0 {
        put_varint(out, (v as u64) << 1);
    } else {
        put_varint(out, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_number(bytes: &mut &[u8]) -> Option<f64> {
    match get_varint(bytes)? {
        1 => {
            let (raw, rest) = bytes.split_first_chunk::<8>()?;
            *bytes = rest;
            Some(f64::from_le_bytes(*raw))
        }
        tag if tag & 1 == 0 => Some((tag >> 1) as f64),
        _ => None,
    }
}

/// One node-minute record: every GPU of the node that reported in that
/// minute. Format byte, then per GPU: UUID length (varint), UUID, rollup.
pub(crate) fn encode_node_minute(gpus: &[(String, Rollup)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + gpus.len() * 128);
    out.push(NODE_MINUTE_FORMAT);
    for (uuid, rollup) in gpus {
        put_uuid(&mut out, uuid);
        rollup.encode_compact(&mut out);
    }
    out
}

/// NVML's GPU UUID: "GPU-" and 32 lowercase hex digits in 8-4-4-4-12 groups.
const GPU_UUID_PREFIX: &str = "GPU-";
const GPU_UUID_GROUPS: [usize; 5] = [8, 4, 4, 4, 12];

/// The 16 bytes of a GPU UUID in NVML's canonical spelling; `None` for
/// any other spelling (MIG devices, upper case, a test's short name).
fn gpu_uuid_bytes(uuid: &str) -> Option<[u8; 16]> {
    let mut groups = uuid.strip_prefix(GPU_UUID_PREFIX)?.split('-');
    let mut hex = String::with_capacity(32);
    for want in GPU_UUID_GROUPS {
        let group = groups.next()?;
        if group.len() != want
            || !group
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        hex.push_str(group);
    }
    if groups.next().is_some() {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

fn gpu_uuid_string(bytes: &[u8; 16]) -> String {
    let mut out = String::with_capacity(40);
    out.push_str(GPU_UUID_PREFIX);
    let mut at = 0;
    for (i, len) in GPU_UUID_GROUPS.into_iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for byte in &bytes[at..at + len / 2] {
            out.push_str(&format!("{byte:02x}"));
        }
        at += len / 2;
    }
    out
}

/// A canonical GPU UUID as a 0 length and its 16 bytes (17 bytes instead
/// of 41: a quarter of a GPU-minute); anything else as length + bytes
/// (never empty: the controller rejects empty UUIDs at registration).
fn put_uuid(out: &mut Vec<u8>, uuid: &str) {
    match gpu_uuid_bytes(uuid) {
        Some(bytes) => {
            out.push(0);
            out.extend_from_slice(&bytes);
        }
        None => {
            put_varint(out, uuid.len() as u64);
            out.extend_from_slice(uuid.as_bytes());
        }
    }
}

fn get_uuid(bytes: &mut &[u8]) -> std::result::Result<String, String> {
    let truncated = || "node-minute record is truncated".to_string();
    let len = get_varint(bytes).ok_or_else(truncated)? as usize;
    if len == 0 {
        let (raw, rest) = bytes.split_first_chunk::<16>().ok_or_else(truncated)?;
        *bytes = rest;
        return Ok(gpu_uuid_string(raw));
    }
    if bytes.len() < len {
        return Err(truncated());
    }
    let (uuid, rest) = bytes.split_at(len);
    *bytes = rest;
    String::from_utf8(uuid.to_vec())
        .map_err(|_| "node-minute record holds a GPU UUID that is not UTF-8".to_string())
}

pub(crate) fn decode_node_minute(
    minute: u64,
    bytes: &[u8],
) -> std::result::Result<Vec<(String, Rollup)>, String> {
    let Some((&format, mut rest)) = bytes.split_first() else {
        return Err("empty rollup record".into());
    };
    if format != NODE_MINUTE_FORMAT {
        return Err(format!(
            "node-minute record format {format} is not supported"
        ));
    }
    let truncated = || "node-minute record is truncated".to_string();
    let mut gpus = Vec::new();
    while !rest.is_empty() {
        let uuid = get_uuid(&mut rest)?;
        let rollup = Rollup::decode_compact(minute, &mut rest).ok_or_else(truncated)?;
        gpus.push((uuid, rollup));
    }
    Ok(gpus)
}

/// store merges. Kept encoded so that the queue between flushes costs ~90
/// bytes per GPU-minute instead of a ~260-byte struct.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeMinute {
    pub node_id: Arc<str>,
    pub minute: u64,
    /// GPU-minutes in `record` (a GPU may appear more than once: late
    /// samples of a minute already queued; readers merge them).
    pub gpu_minutes: usize,
    /// Format byte, then per GPU: UUID length, UUID, compact rollup.
    pub record: Vec<u8>,
}

impl NodeMinute {
    fn new(node_id: Arc<str>, minute: u64) -> Self {
        Self {
            node_id,
            minute,
            gpu_minutes: 0,
            record: vec![NODE_MINUTE_FORMAT],
        }
    }

    fn push(&mut self, uuid: &str, rollup: &Rollup) {
        put_uuid(&mut self.record, uuid);
        rollup.encode_compact(&mut self.record);
        self.gpu_minutes += 1;
    }

    /// Appends another record of the same node-minute.
    pub(crate) fn append(&mut self, other: &NodeMinute) {
        self.record.extend_from_slice(&other.record[1..]);
        self.gpu_minutes += other.gpu_minutes;
    }

    /// The GPUs of the record, a GPU that appears twice merged into one.
    pub fn gpus(&self) -> std::result::Result<Vec<(String, Rollup)>, String> {
        let mut merged: Vec<(String, Rollup)> = Vec::new();
        for (uuid, rollup) in decode_node_minute(self.minute, &self.record)? {
            match merged.iter_mut().find(|(u, _)| *u == uuid) {
                Some((_, existing)) => existing.merge(&rollup),
                None => merged.push((uuid, rollup)),
            }
        }
        Ok(merged)
    }

    /// Groups finished GPU-minutes into node-minute records.
    pub fn group(finished: &[FinishedRollup]) -> Vec<NodeMinute> {
        let mut records: BTreeMap<(u64, Arc<str>), NodeMinute> = BTreeMap::new();
        for f in finished {
            records
                .entry((f.rollup.minute, f.node_id.clone()))
                .or_insert_with(|| NodeMinute::new(f.node_id.clone(), f.rollup.minute))
                .push(&f.uuid, &f.rollup);
        }
        records.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::test_support::{sample, t0};
    use gpufleet_proto::v1::GpuSample;

    #[test]
    fn node_minute_records_round_trip_losslessly_and_reject_garbage() {
        let mut a = Rollup::new(42);
        for util in [55, 0, 100] {
            a.add(&sample("GPU-a", t0(), util, 700_000));
        }
        // A non-integer sum and max (a future metric) survive exactly too.
        a.metrics[0].sum = 0.1;
        a.metrics[0].max = f64::MAX;
        let mut b = Rollup::new(42);
        b.add(&GpuSample {
            memory_used_bytes: Some(80 << 30),
            memory_total_bytes: Some(80 << 30),
            ..sample("GPU-b", t0(), 1, 1)
        });
        let gpus = vec![("GPU-a".to_string(), a), ("GPU-b".to_string(), b)];
        let bytes = encode_node_minute(&gpus);
        assert_eq!(decode_node_minute(42, &bytes).unwrap(), gpus);
        // Integers are short: a GPU-minute of the usual metrics is well
        // under the 190 bytes of the first format.
        let mut typical = Rollup::new(42);
        for i in 0..60 {
            typical.add(&GpuSample {
                memory_utilization_percent: Some(40),
                temperature_celsius: Some(60),
                power_limit_milliwatts: Some(700_000),
                sm_clock_mhz: Some(1980),
                memory_clock_mhz: Some(2619),
                ..sample("GPU-a", t0(), i, 500_000)
            });
        }
        let one = encode_node_minute(&[("GPU-a".to_string(), typical)]);
        assert!(one.len() < 100, "{} bytes", one.len());
        assert!(decode_node_minute(42, &[]).is_err());
        assert!(decode_node_minute(42, &[1]).is_err());
        // A cut record never decodes into wrong values: an error, or
        // (cut between two GPUs) the GPUs before the cut.
        for cut in 1..bytes.len() {
            match decode_node_minute(42, &bytes[..cut]) {
                Ok(some) => assert!(some.len() < gpus.len() && gpus.starts_with(&some)),
                Err(e) => assert!(e.contains("truncated"), "{e}"),
            }
        }
        assert!(decode_node_minute(42, &bytes[..10]).is_err());
    }

    #[test]
    fn gpu_uuids_are_stored_in_16_bytes_and_anything_else_verbatim() {
        let canonical = "GPU-5e9c6d95-1f3e-4a2b-8c7d-0123456789ab";
        let mut r = Rollup::new(1);
        r.add(&sample(canonical, t0(), 50, 1000));
        let uuids = [
            canonical,
            // Not NVML's canonical spelling: kept as they are.
            "GPU-5E9C6D95-1F3E-4A2B-8C7D-0123456789AB",
            "MIG-5e9c6d95-1f3e-4a2b-8c7d-0123456789ab",
            "GPU-5e9c6d95-1f3e-4a2b-8c7d-0123456789ab-",
            "GPU-5e9c6d95-1f3e-4a2b-8c7d0-123456789ab",
            "GPU-a",
        ];
        for uuid in uuids {
            let gpus = vec![(uuid.to_string(), r.clone())];
            let bytes = encode_node_minute(&gpus);
            assert_eq!(decode_node_minute(1, &bytes).unwrap(), gpus, "{uuid}");
        }
        let short = encode_node_minute(&[(canonical.to_string(), r.clone())]);
        let long = encode_node_minute(&[(uuids[1].to_string(), r)]);
        assert_eq!(long.len() - short.len(), 40 + 1 - 17);
    }
}
