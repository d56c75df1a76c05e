//! The bytes of segment files: a frame per node-minute record in a
//! `.seg` (length, CRC-32, minute, node id, record), and the `.idx` that
//! lists each node's frames. No file access here; [`super::files`] reads
//! and writes them.

use std::collections::HashMap;
use std::sync::Arc;

/// Frame: record length (u32), CRC-32 of the rest (u32), minute (u64),
/// node id length (u16), node id, record. Little-endian.
pub(super) const FRAME_HEADER: usize = 4 + 4 + 8 + 2;
/// Larger lengths in a frame header are damage, not a record (a node of
/// 64 GPUs writes ~6 KiB).
pub(super) const MAX_RECORD_BYTES: u32 = 16 << 20;

pub(super) const INDEX_MAGIC: &[u8; 8] = b"GFRIDX01";
/// Magic, min minute, max minute, records, node count, name bytes.
pub(super) const INDEX_HEADER: usize = 8 + 8 + 8 + 8 + 4 + 4;
/// Per node: name offset, name length, first entry, entry count (u32 each).
pub(super) const INDEX_NODE: usize = 16;
/// Per record: minute (u64), frame offset (u64), frame length (u32).
pub(super) const INDEX_ENTRY: usize = 20;

/// Where one frame is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) minute: u64,
    pub(super) offset: u64,
    pub(super) len: u32,
}

pub(super) fn crc_of(minute: u64, node: &[u8], record: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&minute.to_le_bytes());
    crc.update(&(node.len() as u16).to_le_bytes());
    crc.update(node);
    crc.update(record);
    crc.finalize()
}

/// Appends one frame; `None` when the node id is too long to frame (ids
/// are validated to far less at registration).
pub(super) fn put_frame(out: &mut Vec<u8>, minute: u64, node: &[u8], record: &[u8]) -> Option<u32> {
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
#[derive(Debug)]
pub(super) struct Frame<'a> {
    pub(super) minute: u64,
    pub(super) node: &'a [u8],
    pub(super) record: &'a [u8],
}

/// Parses the frame at the start of `bytes`; `Ok(None)` when `bytes` ends
/// before the frame does, `Err` when the frame is damaged.
pub(super) fn parse_frame(bytes: &[u8]) -> Result<Option<(Frame<'_>, usize)>, String> {
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

pub(super) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

pub(super) fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The `.idx` of a segment whose records span `min_minute..=max_minute`:
/// header, node table sorted by node id, node ids, then each node's
/// entries in minute order.
pub(super) fn encode_index(
    by_node: &HashMap<Arc<str>, Vec<Entry>>,
    min_minute: u64,
    max_minute: u64,
) -> Vec<u8> {
    let mut nodes: Vec<(&Arc<str>, &Vec<Entry>)> = by_node.iter().collect();
    nodes.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let names_len: usize = nodes.iter().map(|(n, _)| n.len()).sum();
    let entries: usize = nodes.iter().map(|(_, e)| e.len()).sum();
    let mut out = Vec::with_capacity(
        INDEX_HEADER + nodes.len() * INDEX_NODE + names_len + entries * INDEX_ENTRY,
    );
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&min_minute.to_le_bytes());
    out.extend_from_slice(&max_minute.to_le_bytes());
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

pub(super) struct IndexHeader {
    pub(super) min_minute: u64,
    pub(super) max_minute: u64,
    pub(super) records: u64,
    pub(super) nodes: u32,
    pub(super) names_len: u32,
}

pub(super) fn parse_index_header(header: &[u8]) -> Option<IndexHeader> {
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
pub(super) fn index_len(h: &IndexHeader) -> u64 {
    (INDEX_HEADER as u64)
        .saturating_add(h.nodes as u64 * INDEX_NODE as u64)
        .saturating_add(h.names_len as u64)
        .saturating_add(h.records.saturating_mul(INDEX_ENTRY as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_told_from_a_short_read() {
        let mut bytes = Vec::new();
        let len = put_frame(&mut bytes, 42, b"n1", b"record").unwrap() as usize;
        assert_eq!(len, bytes.len());
        assert_eq!(len, FRAME_HEADER + 2 + 6);
        let (frame, used) = parse_frame(&bytes).unwrap().unwrap();
        assert_eq!(
            (frame.minute, frame.node, frame.record, used),
            (42, &b"n1"[..], &b"record"[..], len)
        );
        // Cut short: not yet a frame, not damage.
        assert!(parse_frame(&bytes[..len - 1]).unwrap().is_none());
        assert!(parse_frame(&bytes[..3]).unwrap().is_none());
        let mut flipped = bytes.clone();
        flipped[len - 1] ^= 1;
        assert!(parse_frame(&flipped).unwrap_err().contains("checksum"));
        let mut huge = bytes;
        huge[..4].copy_from_slice(&(MAX_RECORD_BYTES + 1).to_le_bytes());
        assert!(parse_frame(&huge).is_err());
    }

    #[test]
    fn an_index_header_says_how_long_its_index_is() {
        let entry = |minute| Entry {
            minute,
            offset: minute * 100,
            len: 50,
        };
        let mut by_node: HashMap<Arc<str>, Vec<Entry>> = HashMap::new();
        by_node.insert("n2".into(), vec![entry(3), entry(1)]);
        by_node.insert("n1".into(), vec![entry(2)]);
        let index = encode_index(&by_node, 1, 3);
        let header = parse_index_header(&index).unwrap();
        assert_eq!(
            (
                header.min_minute,
                header.max_minute,
                header.records,
                header.nodes,
                header.names_len
            ),
            (1, 3, 3, 2, 4)
        );
        assert_eq!(index_len(&header), index.len() as u64);
        assert!(parse_index_header(b"not an index header at all, no").is_none());
    }
}
