//! XIDs from the kernel log (`/dev/kmsg`), a second source next to NVML's
//! event set: the driver logs every XID there, including ones NVML misses
//! when it cannot talk to the GPU any more.
//!
//! A record looks like
//! `3,1234,5678,-;NVRM: Xid (PCI:0000:18:00): 79, pid=1234, name=python, GPU has fallen off the bus.`
//! Reading needs root (or CAP_SYSLOG) and a kernel log the container can
//! see; when it is not readable the agent says so once and relies on NVML.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use gpufleet_proto::v1::GpuInfo;
use tracing::{info, warn};

use crate::health::RawXid;

const KMSG: &str = "/dev/kmsg";

/// (domain, bus, device) of a PCI address such as `00000000:18:00.0`
/// (NVML) or `0000:18:00` (kernel log).
pub fn pci_key(address: &str) -> Option<(u32, u32, u32)> {
    let address = address.trim();
    let without_function = address.split('.').next()?;
    let mut parts = without_function.rsplit(':');
    let device = u32::from_str_radix(parts.next()?, 16).ok()?;
    let bus = u32::from_str_radix(parts.next()?, 16).ok()?;
    let domain = match parts.next() {
        Some(d) => u32::from_str_radix(d, 16).ok()?,
        None => 0,
    };
    Some((domain, bus, device))
}

/// The PCI address and XID of an `NVRM: Xid` kernel record.
pub fn parse_xid_record(record: &str) -> Option<(String, u32)> {
    // The message follows the first ';' of a /dev/kmsg record; dmesg-style
    // lines have none, so take the whole line then.
    let message = record.split_once(';').map_or(record, |(_, m)| m);
    let rest = message.split("NVRM: Xid (").nth(1)?;
    let (address, rest) = rest.split_once(')')?;
    let address = address
        .trim()
        .strip_prefix("PCI:")
        .unwrap_or(address.trim());
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((address.to_string(), digits.parse().ok()?))
}

/// Starts a thread that follows the kernel log from now on and queues the
/// XIDs of this host's GPUs. The thread blocks in `read` and ends with the
/// process (a kernel-log read cannot be interrupted portably).
pub(crate) fn spawn_reader(gpus: &[GpuInfo], out: Arc<Mutex<Vec<RawXid>>>) {
    let by_pci: HashMap<(u32, u32, u32), String> = gpus
        .iter()
        .filter_map(|g| Some((pci_key(&g.pci_bus_id)?, g.uuid.clone())))
        .collect();
    if by_pci.is_empty() {
        return;
    }
    let mut file = match std::fs::File::open(KMSG) {
        Ok(f) => f,
        Err(e) => {
            info!(error = %e, "kernel log {KMSG} not readable; XIDs come from NVML events only");
            return;
        }
    };
    // Only new records: old XIDs were handled by whoever ran then.
    if let Err(e) = file.seek(SeekFrom::End(0)) {
        warn!(error = %e, "cannot seek to the end of {KMSG}; not reading it");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("kmsg-xids".into())
        .spawn(move || {
            // One read returns one record (at most ~8 KiB).
            let mut buf = vec![0u8; 8192];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let record = String::from_utf8_lossy(&buf[..n]);
                        let Some((address, xid)) = parse_xid_record(&record) else {
                            continue;
                        };
                        let Some(uuid) = pci_key(&address).and_then(|k| by_pci.get(&k)) else {
                            continue;
                        };
                        warn!(gpu_uuid = %uuid, xid, "XID error in the kernel log");
                        out.lock().unwrap_or_else(|e| e.into_inner()).push(RawXid {
                            gpu_uuid: uuid.clone(),
                            xid,
                            at: SystemTime::now(),
                            source: "kmsg",
                        });
                    }
                    // EPIPE: records were overwritten before we read them.
                    Err(e) if e.raw_os_error() == Some(32) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!(error = %e, "reading {KMSG} failed; XIDs come from NVML events only");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the kernel log reader");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvrm_xid_records() {
        let r = "3,1234,5678,-;NVRM: Xid (PCI:0000:18:00): 79, pid=1234, name=python, GPU has fallen off the bus.";
        assert_eq!(parse_xid_record(r), Some(("0000:18:00".into(), 79)));
        let dmesg = "[ 12.3] NVRM: Xid (PCI:0000:ab:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable double bit error";
        assert_eq!(parse_xid_record(dmesg), Some(("0000:ab:00".into(), 48)));
        assert_eq!(parse_xid_record("6,1,2,-;usb 1-1: new device"), None);
        assert_eq!(parse_xid_record("NVRM: Xid (PCI:0000:18:00): x"), None);
    }

    #[test]
    fn pci_addresses_match_across_formats() {
        assert_eq!(pci_key("00000000:18:00.0"), pci_key("0000:18:00"));
        assert_eq!(pci_key("00000000:AB:00.0"), Some((0, 0xab, 0)));
        assert_ne!(pci_key("0000:18:00"), pci_key("0000:19:00"));
        assert_eq!(pci_key("garbage"), None);
    }
}
