//! The bitmap directory: one read of it, and QEMU's checks of each entry
//! (`bitmap_list_load` and `check_dir_entry`). Bitmap data is never read.

use std::collections::HashSet;
use std::fs::File;

use super::bytes::{read_at, Bytes};
use super::error::{invalid, Fault};
use super::header::BitmapsExt;
use super::Bitmap;

const DIR_ENTRY_FIXED: u64 = 24;
const MAX_TABLE_SIZE: u32 = 0x0800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME_SIZE: u16 = 1023;
const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const TYPE_DIRTY_TRACKING: u8 = 1;

/// Reads the bitmap directory in one read and checks it.
pub(super) fn read_directory(
    file: &File,
    ext: &BitmapsExt,
    cluster: u64,
    virtual_size: u64,
    file_len: u64,
) -> Result<Vec<Bitmap>, Fault> {
    if ext.directory_size == 0 {
        return invalid("bitmap directory size is zero");
    }
    // Stricter than QEMU, which would read the header as a directory.
    if ext.directory_offset == 0 {
        return invalid("bitmap directory at offset 0");
    }
    let end = ext.directory_offset.checked_add(ext.directory_size);
    if end.is_none_or(|end| end > file_len) {
        return invalid(format!(
            "bitmap directory ({} bytes at {:#x}) beyond the end of the file ({file_len} bytes)",
            ext.directory_size, ext.directory_offset
        ));
    }
    let buf = read_at(file, ext.directory_offset, ext.directory_size).map_err(Fault::Io)?;
    parse_directory(&buf, ext.nb_bitmaps, cluster, virtual_size, file_len)
}

/// `bitmap_list_load` and `check_dir_entry`: the entries must exactly fill
/// the directory, their count must match the extension, and each must pass
/// QEMU's constraints. Also checked, beyond QEMU's open-time checks: names
/// are not empty and unique (as the specification requires), and bitmap
/// tables lie inside the file.
fn parse_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster: u64,
    virtual_size: u64,
    file_len: u64,
) -> Result<Vec<Bitmap>, Fault> {
    let b = Bytes(dir);
    let size = dir.len() as u64;
    // QEMU measures the disk in whole sectors.
    let disk_len = virtual_size / 512 * 512;
    let mut bitmaps: Vec<Bitmap> = Vec::new();
    let mut names = HashSet::new();
    let mut at = 0u64;
    while at < size {
        if size - at < DIR_ENTRY_FIXED {
            return invalid("broken bitmap directory: an entry runs past its end");
        }
        if bitmaps.len() as u64 >= u64::from(nb_bitmaps) {
            return invalid(format!(
                "more bitmaps in the directory than the {nb_bitmaps} of the extension"
            ));
        }
        let table_offset = b.u64(at)?;
        let table_size = b.u32(at + 8)?;
        let flags = b.u32(at + 12)?;
        let kind = b.u8(at + 16)?;
        let granularity_bits = b.u8(at + 17)?;
        let name_size = b.u16(at + 18)?;
        let extra_size = b.u32(at + 20)?;
        let entry_size =
            (DIR_ENTRY_FIXED + u64::from(name_size) + u64::from(extra_size)).next_multiple_of(8);
        if entry_size > size - at {
            return invalid("broken bitmap directory: an entry runs past its end");
        }
        if extra_size != 0 {
            return invalid(format!(
                "bitmap {} has extra data, which QEMU does not support",
                bitmaps.len()
            ));
        }
        let raw_name = b.slice(at + DIR_ENTRY_FIXED, name_size.into())?.to_vec();
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        let fail = |why: String| invalid(format!("bitmap '{name}' {why}"));
        if table_size == 0 || table_offset == 0 {
            return fail("has no bitmap table".into());
        }
        if !table_offset.is_multiple_of(cluster) {
            return fail(format!(
                "has a bitmap table offset {table_offset:#x} not cluster-aligned"
            ));
        }
        if table_size > MAX_TABLE_SIZE {
            return fail(format!(
                "has a bitmap table of {table_size} entries, above {MAX_TABLE_SIZE}"
            ));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return fail(format!(
                "has granularity 2^{granularity_bits}, outside 2^9..2^31"
            ));
        }
        if flags & !(FLAG_IN_USE | FLAG_AUTO) != 0 {
            return fail(format!("has unknown flags {flags:#x}"));
        }
        if name_size > MAX_NAME_SIZE {
            return fail(format!(
                "has a {name_size}-byte name, above {MAX_NAME_SIZE}"
            ));
        }
        if kind != TYPE_DIRTY_TRACKING {
            return fail(format!("has type {kind}, not 1 (dirty tracking)"));
        }
        let phys_bytes = u64::from(table_size) * cluster;
        if phys_bytes > MAX_PHYS_SIZE {
            return fail(format!(
                "has a bitmap table for {phys_bytes} bytes, above {MAX_PHYS_SIZE}"
            ));
        }
        let in_use = flags & FLAG_IN_USE != 0;
        let covered = (u128::from(phys_bytes) * 8) << granularity_bits;
        if !in_use && u128::from(disk_len) > covered {
            return fail(format!("is too small for the {disk_len}-byte disk"));
        }
        if name_size == 0 {
            return invalid(format!("bitmap {} has an empty name", bitmaps.len()));
        }
        let table_end = table_offset.checked_add(u64::from(table_size) * 8);
        if table_end.is_none_or(|end| end > file_len) {
            return fail("has its bitmap table beyond the end of the file".into());
        }
        if !names.insert(raw_name.clone()) {
            return fail("appears twice".into());
        }
        bitmaps.push(Bitmap {
            name,
            raw_name,
            granularity: 1 << granularity_bits,
            in_use,
            auto: flags & FLAG_AUTO != 0,
        });
        at += entry_size;
    }
    if bitmaps.len() as u64 != u64::from(nb_bitmaps) {
        return invalid(format!(
            "{} bitmaps in the directory, fewer than the {nb_bitmaps} of the extension",
            bitmaps.len()
        ));
    }
    Ok(bitmaps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &[u8], flags: u32, granularity_bits: u8) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&0x10000u64.to_be_bytes());
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&flags.to_be_bytes());
        e.push(1);
        e.push(granularity_bits);
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.extend_from_slice(name);
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    fn check(dir: &[u8], nb: u32) -> Result<Vec<Bitmap>, String> {
        parse_directory(dir, nb, 65536, 1 << 30, 1 << 20).map_err(|f| format!("{f:?}"))
    }

    #[test]
    fn directory_checks() {
        let good = [entry(b"a", 2, 16), entry(b"bb", 1, 20)].concat();
        let bitmaps = check(&good, 2).unwrap();
        assert_eq!(bitmaps.len(), 2);
        assert!(bitmaps[0].auto && !bitmaps[0].in_use && bitmaps[0].granularity == 65536);
        assert!(bitmaps[1].in_use && !bitmaps[1].auto);

        assert!(check(&good, 1).unwrap_err().contains("more bitmaps"));
        assert!(check(&good, 3).unwrap_err().contains("fewer"));
        assert!(check(&good[..good.len() - 8], 2)
            .unwrap_err()
            .contains("broken"));
        assert!(check(&[good.clone(), vec![0; 8]].concat(), 2)
            .unwrap_err()
            .contains("broken"));
        assert!(check(&entry(b"a", 4, 16), 1)
            .unwrap_err()
            .contains("unknown flags"));
        assert!(check(&entry(b"a", 0, 8), 1)
            .unwrap_err()
            .contains("granularity"));
        assert!(check(&entry(b"a", 0, 32), 1)
            .unwrap_err()
            .contains("granularity"));
        assert!(check(&entry(b"", 0, 16), 1)
            .unwrap_err()
            .contains("empty name"));
        assert!(check(&[entry(b"a", 0, 16), entry(b"a", 0, 16)].concat(), 2)
            .unwrap_err()
            .contains("twice"));
        // One table entry of a 64 KiB cluster covers 2^19 bits: a 1 GiB disk
        // needs granularity 2^11 at least unless the bitmap is in use.
        assert!(check(&entry(b"a", 0, 10), 1)
            .unwrap_err()
            .contains("too small"));
        assert!(check(&entry(b"a", 1, 10), 1).is_ok());
    }
}
