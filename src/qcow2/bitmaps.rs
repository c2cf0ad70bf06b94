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
    let limits = Limits {
        cluster,
        // QEMU measures the disk in whole sectors.
        disk_len: virtual_size / 512 * 512,
        file_len,
    };
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
        let (bitmap, len) = read_entry(&b, at, bitmaps.len(), &limits)?;
        if !names.insert(bitmap.raw_name.clone()) {
            return invalid(format!("bitmap '{}' appears twice", bitmap.name));
        }
        bitmaps.push(bitmap);
        at += len;
    }
    if bitmaps.len() as u64 != u64::from(nb_bitmaps) {
        return invalid(format!(
            "{} bitmaps in the directory, fewer than the {nb_bitmaps} of the extension",
            bitmaps.len()
        ));
    }
    Ok(bitmaps)
}

/// Reads and checks the entry at `at`, the directory's `index`th; returns
/// its bitmap and the entry's length.
fn read_entry(
    b: &Bytes<'_>,
    at: u64,
    index: usize,
    limits: &Limits,
) -> Result<(Bitmap, u64), Fault> {
    let entry = Entry::read(b, at)?;
    if entry.size() > b.0.len() as u64 - at {
        return invalid("broken bitmap directory: an entry runs past its end");
    }
    if entry.extra_size != 0 {
        return invalid(format!(
            "bitmap {index} has extra data, which QEMU does not support"
        ));
    }
    let raw_name = b.slice(at + DIR_ENTRY_FIXED, entry.name_size.into())?;
    let bitmap = entry_bitmap(&entry, raw_name.to_vec(), index, limits)?;
    Ok((bitmap, entry.size()))
}

/// The fixed fields of one directory entry (its name follows them).
struct Entry {
    table_offset: u64,
    table_size: u32,
    flags: u32,
    kind: u8,
    granularity_bits: u8,
    name_size: u16,
    extra_size: u32,
}

impl Entry {
    fn read(b: &Bytes<'_>, at: u64) -> Result<Entry, Fault> {
        Ok(Entry {
            table_offset: b.u64(at)?,
            table_size: b.u32(at + 8)?,
            flags: b.u32(at + 12)?,
            kind: b.u8(at + 16)?,
            granularity_bits: b.u8(at + 17)?,
            name_size: b.u16(at + 18)?,
            extra_size: b.u32(at + 20)?,
        })
    }

    /// The entry's length in the directory, padded to 8 bytes.
    fn size(&self) -> u64 {
        (DIR_ENTRY_FIXED + u64::from(self.name_size) + u64::from(self.extra_size))
            .next_multiple_of(8)
    }

    fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
}

/// What an entry is checked against.
struct Limits {
    cluster: u64,
    /// The disk's size in whole sectors.
    disk_len: u64,
    file_len: u64,
}

/// Checks entry number `index`, named `raw_name`, and makes its bitmap:
/// QEMU's `check_dir_entry`, then this reader's own checks (a name, a
/// table inside the file).
fn entry_bitmap(
    entry: &Entry,
    raw_name: Vec<u8>,
    index: usize,
    limits: &Limits,
) -> Result<Bitmap, Fault> {
    let name = String::from_utf8_lossy(&raw_name).into_owned();
    let fail = |why: String| invalid(format!("bitmap '{name}' {why}"));
    if let Err(why) = check_dir_entry(entry, limits) {
        return fail(why);
    }
    if entry.name_size == 0 {
        return invalid(format!("bitmap {index} has an empty name"));
    }
    let table_end = entry
        .table_offset
        .checked_add(u64::from(entry.table_size) * 8);
    if table_end.is_none_or(|end| end > limits.file_len) {
        return fail("has its bitmap table beyond the end of the file".into());
    }
    Ok(Bitmap {
        name,
        raw_name,
        granularity: 1 << entry.granularity_bits,
        in_use: entry.in_use(),
        auto: entry.flags & FLAG_AUTO != 0,
    })
}

/// QEMU's `check_dir_entry`: what is wrong with the entry, after the
/// bitmap's name, for the first constraint it breaks.
fn check_dir_entry(e: &Entry, limits: &Limits) -> Result<(), String> {
    let cluster = limits.cluster;
    if e.table_size == 0 || e.table_offset == 0 {
        return Err("has no bitmap table".into());
    }
    if !e.table_offset.is_multiple_of(cluster) {
        return Err(format!(
            "has a bitmap table offset {:#x} not cluster-aligned",
            e.table_offset
        ));
    }
    if e.table_size > MAX_TABLE_SIZE {
        return Err(format!(
            "has a bitmap table of {} entries, above {MAX_TABLE_SIZE}",
            e.table_size
        ));
    }
    let granularity_bits = e.granularity_bits;
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
        return Err(format!(
            "has granularity 2^{granularity_bits}, outside 2^9..2^31"
        ));
    }
    if e.flags & !(FLAG_IN_USE | FLAG_AUTO) != 0 {
        return Err(format!("has unknown flags {:#x}", e.flags));
    }
    if e.name_size > MAX_NAME_SIZE {
        return Err(format!(
            "has a {}-byte name, above {MAX_NAME_SIZE}",
            e.name_size
        ));
    }
    if e.kind != TYPE_DIRTY_TRACKING {
        return Err(format!("has type {}, not 1 (dirty tracking)", e.kind));
    }
    let phys_bytes = u64::from(e.table_size) * cluster;
    if phys_bytes > MAX_PHYS_SIZE {
        return Err(format!(
            "has a bitmap table for {phys_bytes} bytes, above {MAX_PHYS_SIZE}"
        ));
    }
    let covered = (u128::from(phys_bytes) * 8) << granularity_bits;
    if !e.in_use() && u128::from(limits.disk_len) > covered {
        return Err(format!(
            "is too small for the {}-byte disk",
            limits.disk_len
        ));
    }
    Ok(())
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
