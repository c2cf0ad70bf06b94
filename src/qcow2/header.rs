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
/// `Fault::Short` asks for a longer buffer. The field groups are checked
/// in a fixed order: the first failing check names the fault.
fn parse_header(buf: &[u8]) -> Result<Header, Fault> {
    let b = Bytes(buf);
    let version = parse_version(&b)?;
    let cluster_bits = parse_cluster_bits(&b)?;
    let cluster = 1u64 << cluster_bits;
    let layout = parse_layout(&b, version, cluster)?;
    let backing = parse_backing_location(&b, cluster)?;
    check_features(&b, &layout, cluster)?;
    let extended_l2 = layout.incompatible & INCOMPAT_EXTL2 != 0;
    check_tables(&b, cluster)?;
    let virtual_size = check_virtual_size(&b, cluster_bits, extended_l2)?;
    let mut header = Header {
        version,
        cluster_bits,
        virtual_size,
        incompatible: layout.incompatible,
        backing_raw: None,
        backing_format: None,
        data_file: None,
        bitmaps: None,
    };
    let area = ExtensionArea {
        start: layout.length,
        end: if backing.offset != 0 {
            backing.offset
        } else {
            cluster
        },
        cluster,
        autoclear: layout.autoclear,
        crypt_method: b.u32(32)?,
    };
    read_extensions(&b, &area, &mut header)?;
    header.backing_raw = read_backing_name(&b, backing, cluster)?;
    Ok(header)
}

/// The magic and the version; the version-2 fields must all be there.
fn parse_version(b: &Bytes<'_>) -> Result<u32, Fault> {
    if b.0.get(..4) != Some(&MAGIC[..]) {
        return Err(Fault::NotQcow2);
    }
    let version = b.u32(4)?;
    if !(2..=3).contains(&version) {
        return Err(Fault::Version(version));
    }
    b.slice(0, u64::from(V2_HEADER_LENGTH))?;
    Ok(version)
}

fn parse_cluster_bits(b: &Bytes<'_>) -> Result<u32, Fault> {
    let cluster_bits = b.u32(20)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return invalid(format!("unsupported cluster size: 2^{cluster_bits}"));
    }
    Ok(cluster_bits)
}

/// The fields version 3 added (fixed for version 2), and the header length.
struct Layout {
    incompatible: u64,
    autoclear: u64,
    refcount_order: u32,
    /// Bytes of header before the extensions; the whole of it was read.
    length: u64,
}

fn parse_layout(b: &Bytes<'_>, version: u32, cluster: u64) -> Result<Layout, Fault> {
    let layout = if version == 2 {
        Layout {
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            length: V2_HEADER_LENGTH.into(),
        }
    } else {
        let header_length = b.u32(100)?;
        if header_length < V3_MIN_HEADER_LENGTH {
            return invalid(format!("header too short ({header_length} bytes)"));
        }
        Layout {
            incompatible: b.u64(72)?,
            autoclear: b.u64(88)?,
            refcount_order: b.u32(96)?,
            length: header_length.into(),
        }
    };
    if layout.length > cluster {
        return invalid(format!(
            "header ({} bytes) exceeds the cluster size",
            layout.length
        ));
    }
    b.slice(0, layout.length)?;
    Ok(layout)
}

/// Where the backing file name is stored; offset 0 is no backing file.
#[derive(Debug, Clone, Copy)]
struct BackingName {
    offset: u64,
    size: u32,
}

fn parse_backing_location(b: &Bytes<'_>, cluster: u64) -> Result<BackingName, Fault> {
    let backing = BackingName {
        offset: b.u64(8)?,
        size: b.u32(16)?,
    };
    if backing.offset > cluster {
        return invalid(format!(
            "backing file name offset {:#x} outside cluster 0",
            backing.offset
        ));
    }
    Ok(backing)
}

/// The compression type, the incompatible feature bits, subclusters and
/// the refcount width: what QEMU must support to open the image.
fn check_features(b: &Bytes<'_>, layout: &Layout, cluster: u64) -> Result<(), Fault> {
    check_compression(b, layout)?;
    let incompatible = layout.incompatible;
    if incompatible & !INCOMPAT_KNOWN != 0 {
        return Err(Fault::Unsupported(format!(
            "unknown incompatible feature bits {:#x}",
            incompatible & !INCOMPAT_KNOWN
        )));
    }
    if incompatible & INCOMPAT_EXTL2 != 0 && cluster / 32 < 512 {
        return invalid(format!("subcluster size {} below 512 bytes", cluster / 32));
    }
    if layout.refcount_order > 6 {
        return invalid(format!("refcount order {} above 6", layout.refcount_order));
    }
    Ok(())
}

/// The compression type field (byte 104, when the header is that long)
/// must agree with the compression type feature bit.
fn check_compression(b: &Bytes<'_>, layout: &Layout) -> Result<(), Fault> {
    let compression = if layout.length > u64::from(V3_MIN_HEADER_LENGTH) {
        b.u8(104)?
    } else {
        0
    };
    let bit = layout.incompatible & INCOMPAT_COMPRESSION != 0;
    match compression {
        0 if bit => invalid("compression type bit set with the default compression type"),
        1 if !bit => invalid("compression type bit clear with a non-default compression type"),
        0 | 1 => Ok(()),
        other => Err(Fault::Unsupported(format!("compression type {other}"))),
    }
}

/// The refcount table, the snapshot table and the L1 table.
fn check_tables(b: &Bytes<'_>, cluster: u64) -> Result<(), Fault> {
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
    check_table("L1 table", b.u64(40)?, l1_size.into(), 8, 32 << 20, cluster)
}

/// The virtual size, which the L1 table must be large enough to map.
fn check_virtual_size(b: &Bytes<'_>, cluster_bits: u32, extended_l2: bool) -> Result<u64, Fault> {
    let l1_size = b.u32(36)?;
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
    Ok(virtual_size)
}

/// Where the header extensions lie, and what their checks need.
struct ExtensionArea {
    /// The end of the header.
    start: u64,
    /// The backing file name's offset, or the end of cluster 0.
    end: u64,
    cluster: u64,
    autoclear: u64,
    crypt_method: u32,
}

/// `qcow2_read_extensions`: each extension is a type, a length and data
/// padded to 8 bytes, up to the end-of-extensions marker. Unknown types are
/// skipped, as QEMU skips them.
fn read_extensions(b: &Bytes<'_>, area: &ExtensionArea, header: &mut Header) -> Result<(), Fault> {
    let mut offset = area.start;
    while offset < area.end {
        let data = offset + 8;
        if data > area.end {
            return invalid(format!("header extension at {offset:#x} too large"));
        }
        let (kind, len) = (b.u32(offset)?, b.u32(offset + 4)?);
        let len64 = u64::from(len);
        if len64 > area.end - data {
            return invalid(format!(
                "header extension {kind:#010x} too large ({len} bytes)"
            ));
        }
        match kind {
            EXT_END => break,
            EXT_BACKING_FORMAT => header.backing_format = Some(backing_format_ext(b, data, len)?),
            EXT_CRYPTO_HEADER => check_crypto_ext(b, data, len, area)?,
            EXT_BITMAPS => header.bitmaps = Some(bitmaps_ext(b, data, len, area)?),
            EXT_DATA_FILE => header.data_file = Some(c_string(b.slice(data, len64)?)),
            _ => {}
        }
        offset = data + len64.next_multiple_of(8);
    }
    Ok(())
}

fn backing_format_ext(b: &Bytes<'_>, data: u64, len: u32) -> Result<String, Fault> {
    if len >= BACKING_FORMAT_BUF {
        return invalid(format!("backing format name too long ({len} bytes)"));
    }
    Ok(c_string(b.slice(data, len.into())?))
}

fn check_crypto_ext(b: &Bytes<'_>, data: u64, len: u32, area: &ExtensionArea) -> Result<(), Fault> {
    if area.crypt_method != CRYPT_LUKS {
        return invalid("crypto header extension without LUKS encryption");
    }
    if len != 16 {
        return invalid(format!("crypto header extension of {len} bytes, not 16"));
    }
    if b.u64(data)? % area.cluster != 0 {
        return invalid("crypto header offset not cluster-aligned");
    }
    Ok(())
}

/// The bitmaps extension, and whether autoclear bit 0 vouches for it (it is
/// checked only then: QEMU ignores a stale one).
fn bitmaps_ext(
    b: &Bytes<'_>,
    data: u64,
    len: u32,
    area: &ExtensionArea,
) -> Result<(BitmapsExt, bool), Fault> {
    if len != 24 {
        return invalid(format!("bitmaps extension of {len} bytes, not 24"));
    }
    let ext = BitmapsExt {
        nb_bitmaps: b.u32(data)?,
        directory_size: b.u64(data + 8)?,
        directory_offset: b.u64(data + 16)?,
    };
    let consistent = area.autoclear & AUTOCLEAR_BITMAPS != 0;
    if consistent {
        check_bitmaps_ext(&ext, b.u32(data + 4)?, area.cluster)?;
    }
    Ok((ext, consistent))
}

/// The backing file name, cut at its first NUL (none when empty).
fn read_backing_name(
    b: &Bytes<'_>,
    backing: BackingName,
    cluster: u64,
) -> Result<Option<Vec<u8>>, Fault> {
    if backing.offset == 0 {
        return Ok(None);
    }
    let len = u64::from(backing.size);
    if len > MAX_BACKING_NAME.min(cluster - backing.offset) || backing.size >= BACKING_FILE_BUF {
        return invalid(format!(
            "backing file name too long ({} bytes)",
            backing.size
        ));
    }
    let name = c_bytes(b.slice(backing.offset, len)?);
    Ok((!name.is_empty()).then(|| name.to_vec()))
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
