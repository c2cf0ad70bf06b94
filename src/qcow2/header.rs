//! The header and its extensions: QEMU's open-time checks of
//! `qcow2_do_open` and `qcow2_read_extensions`, on the file's first bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::bytes::{c_bytes, c_string, read_at, Bytes};
use super::error::{invalid, io_error, Fault, Qcow2Error};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const V2_HEADER_LENGTH: u32 = 72;
const V3_MIN_HEADER_LENGTH: u32 = 104;
/// The first read covers the header and, in practice, every extension.
const FIRST_READ: u64 = 4096;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// The incompatible features QEMU knows; any other bit makes it refuse the image.
const INCOMPAT_KNOWN: u64 = 0x1f;
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// `sizeof(bs->backing_format)` in QEMU: longer names are refused.
const BACKING_FORMAT_BUF: u32 = 16;
/// `sizeof(bs->backing_file)` in QEMU.
const BACKING_FILE_BUF: u32 = 4096;
const MAX_BACKING_NAME: u64 = 1023;
const CRYPT_LUKS: u32 = 2;
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

/// Does the file start with the qcow2 magic? (A file shorter than it does
/// not.)
pub(super) fn starts_with_magic(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(&magic == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy)]
pub(super) struct BitmapsExt {
    pub(super) nb_bitmaps: u32,
    pub(super) directory_size: u64,
    pub(super) directory_offset: u64,
}

/// What the header and its extensions say.
#[derive(Debug)]
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) cluster_bits: u32,
    pub(super) virtual_size: u64,
    pub(super) incompatible: u64,
    pub(super) backing_raw: Option<Vec<u8>>,
    pub(super) backing_format: Option<String>,
    pub(super) data_file: Option<String>,
    /// The extension, and whether autoclear bit 0 vouches for it.
    pub(super) bitmaps: Option<(BitmapsExt, bool)>,
}

/// `qcow2_validate_table`: a table of `entries` entries at `offset`.
fn check_table(
    name: &str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster: u64,
) -> Result<(), Fault> {
    if entries > max_bytes / entry_len {
        return invalid(format!("{name} too large ({entries} entries)"));
    }
    let bytes = entries * entry_len;
    if (i64::MAX as u64 - bytes) < offset || !offset.is_multiple_of(cluster) {
        return invalid(format!("{name} offset {offset:#x} invalid"));
    }
    Ok(())
}

/// Parses the header and the extensions from the file's first bytes.
/// `Fault::Short` asks for a longer buffer.
fn parse_header(buf: &[u8]) -> Result<Header, Fault> {
    let b = Bytes(buf);
    if buf.get(..4) != Some(&MAGIC[..]) {
        return Err(Fault::NotQcow2);
    }
    let version = b.u32(4)?;
    if !(2..=3).contains(&version) {
        return Err(Fault::Version(version));
    }
    b.slice(0, u64::from(V2_HEADER_LENGTH))?;
    let cluster_bits = b.u32(20)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return invalid(format!("unsupported cluster size: 2^{cluster_bits}"));
    }
    let cluster = 1u64 << cluster_bits;
    let (incompatible, autoclear, refcount_order, header_length) = if version == 2 {
        (0, 0, 4, V2_HEADER_LENGTH)
    } else {
        let header_length = b.u32(100)?;
        if header_length < V3_MIN_HEADER_LENGTH {
            return invalid(format!("header too short ({header_length} bytes)"));
        }
        (b.u64(72)?, b.u64(88)?, b.u32(96)?, header_length)
    };
    let header_length = u64::from(header_length);
    if header_length > cluster {
        return invalid(format!(
            "header ({header_length} bytes) exceeds the cluster size"
        ));
    }
    b.slice(0, header_length)?;
    let backing_offset = b.u64(8)?;
    let backing_size = b.u32(16)?;
    if backing_offset > cluster {
        return invalid(format!(
            "backing file name offset {backing_offset:#x} outside cluster 0"
        ));
    }
    let extensions_end = if backing_offset != 0 {
        backing_offset
    } else {
        cluster
    };

    let compression = if header_length > u64::from(V3_MIN_HEADER_LENGTH) {
        b.u8(104)?
    } else {
        0
    };
    match compression {
        0 if incompatible & INCOMPAT_COMPRESSION != 0 => {
            return invalid("compression type bit set with the default compression type")
        }
        1 if incompatible & INCOMPAT_COMPRESSION == 0 => {
            return invalid("compression type bit clear with a non-default compression type")
        }
        0 | 1 => {}
        other => return Err(Fault::Unsupported(format!("compression type {other}"))),
    }
    if incompatible & !INCOMPAT_KNOWN != 0 {
        return Err(Fault::Unsupported(format!(
            "unknown incompatible feature bits {:#x}",
            incompatible & !INCOMPAT_KNOWN
        )));
    }
    let extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;
    if extended_l2 && cluster / 32 < 512 {
        return invalid(format!("subcluster size {} below 512 bytes", cluster / 32));
    }
    if refcount_order > 6 {
        return invalid(format!("refcount order {refcount_order} above 6"));
    }
    let refcount_clusters = b.u32(56)?;
    if refcount_clusters == 0 {
        return invalid("no reference count table");
    }
    check_table(
        "refcount table",
        b.u64(48)?,
        refcount_clusters.into(),
        cluster,
        8 << 20,
        cluster,
    )?;
    check_table(
        "snapshot table",
        b.u64(64)?,
        b.u32(60)?.into(),
        40,
        40 * 65536,
        cluster,
    )?;
    let l1_size = b.u32(36)?;
    check_table("L1 table", b.u64(40)?, l1_size.into(), 8, 32 << 20, cluster)?;
    let virtual_size = b.u64(24)?;
    let l2_bits = cluster_bits - if extended_l2 { 4 } else { 3 };
    let l1_needed = virtual_size.div_ceil(1u64 << (cluster_bits + l2_bits));
    if l1_needed > i32::MAX as u64 {
        return invalid(format!("virtual size {virtual_size} too big"));
    }
    if u64::from(l1_size) < l1_needed {
        return invalid(format!(
            "L1 table too small ({l1_size} entries, {l1_needed} needed)"
        ));
    }

    let mut header = Header {
        version,
        cluster_bits,
        virtual_size,
        incompatible,
        backing_raw: None,
        backing_format: None,
        data_file: None,
        bitmaps: None,
    };
    let crypt_method = b.u32(32)?;
    let mut offset = header_length;
    while offset < extensions_end {
        let data = offset + 8;
        if data > extensions_end {
            return invalid(format!("header extension at {offset:#x} too large"));
        }
        let (kind, len) = (b.u32(offset)?, b.u32(offset + 4)?);
        let len64 = u64::from(len);
        if len64 > extensions_end - data {
            return invalid(format!(
                "header extension {kind:#010x} too large ({len} bytes)"
            ));
        }
        match kind {
            EXT_END => break,
            EXT_BACKING_FORMAT => {
                if len >= BACKING_FORMAT_BUF {
                    return invalid(format!("backing format name too long ({len} bytes)"));
                }
                header.backing_format = Some(c_string(b.slice(data, len64)?));
            }
            EXT_CRYPTO_HEADER => {
                if crypt_method != CRYPT_LUKS {
                    return invalid("crypto header extension without LUKS encryption");
                }
                if len != 16 {
                    return invalid(format!("crypto header extension of {len} bytes, not 16"));
                }
                if b.u64(data)? % cluster != 0 {
                    return invalid("crypto header offset not cluster-aligned");
                }
            }
            EXT_BITMAPS => {
                if len != 24 {
                    return invalid(format!("bitmaps extension of {len} bytes, not 24"));
                }
                let ext = BitmapsExt {
                    nb_bitmaps: b.u32(data)?,
                    directory_size: b.u64(data + 8)?,
                    directory_offset: b.u64(data + 16)?,
                };
                let consistent = autoclear & AUTOCLEAR_BITMAPS != 0;
                if consistent {
                    check_bitmaps_ext(&ext, b.u32(data + 4)?, cluster)?;
                }
                header.bitmaps = Some((ext, consistent));
            }
            EXT_DATA_FILE => header.data_file = Some(c_string(b.slice(data, len64)?)),
            _ => {}
        }
        offset = data + len64.next_multiple_of(8);
    }

    if backing_offset != 0 {
        let len = u64::from(backing_size);
        if len > MAX_BACKING_NAME.min(cluster - backing_offset) || backing_size >= BACKING_FILE_BUF
        {
            return invalid(format!("backing file name too long ({backing_size} bytes)"));
        }
        let name = c_bytes(b.slice(backing_offset, len)?);
        if !name.is_empty() {
            header.backing_raw = Some(name.to_vec());
        }
    }
    Ok(header)
}

/// The bitmaps extension checks of `qcow2_read_extensions`.
pub(super) fn check_bitmaps_ext(
    ext: &BitmapsExt,
    reserved: u32,
    cluster: u64,
) -> Result<(), Fault> {
    if reserved != 0 {
        return invalid("bitmaps extension: reserved field is not zero");
    }
    if ext.nb_bitmaps > MAX_BITMAPS {
        return invalid(format!(
            "bitmaps extension: {} bitmaps, more than {MAX_BITMAPS}",
            ext.nb_bitmaps
        ));
    }
    if ext.nb_bitmaps == 0 {
        return invalid("bitmaps extension with zero bitmaps");
    }
    if !ext.directory_offset.is_multiple_of(cluster) {
        return invalid(format!(
            "bitmap directory offset {:#x} not cluster-aligned",
            ext.directory_offset
        ));
    }
    if ext.directory_size > MAX_DIRECTORY_SIZE {
        return invalid(format!(
            "bitmap directory size {} above {MAX_DIRECTORY_SIZE}",
            ext.directory_size
        ));
    }
    Ok(())
}

/// Reads the header and extensions: a first read of 4 KiB, and one longer
/// read (up to cluster 0's end) if they go past it. Returns the bytes read,
/// for the caller to compare with a later read.
pub(super) fn read_header(
    file: &File,
    path: &Path,
    file_len: u64,
) -> Result<(Vec<u8>, Header), Qcow2Error> {
    let mut want = file_len.min(FIRST_READ);
    loop {
        let buf = read_at(file, 0, want).map_err(|e| io_error(path, e))?;
        match parse_header(&buf) {
            Ok(header) => return Ok((buf, header)),
            Err(Fault::Short(end))
                if want < end && end <= file_len && end <= 1 << MAX_CLUSTER_BITS =>
            {
                want = file_len.min(1 << MAX_CLUSTER_BITS);
            }
            Err(fault) => return Err(fault.into_error(path)),
        }
    }
}
