//! A read-only reader of qcow2 headers and persistent-bitmap directories.
//!
//! Validation needs to know which bitmaps each layer of a disk really holds,
//! with their flags, without starting QEMU and without ever writing to an
//! image: a writable open by a program that does not know the bitmaps
//! extension clears autoclear bit 0, and then QEMU considers every bitmap of
//! the image inconsistent. This module therefore only ever opens files
//! read-only, reads the header, the header extensions and the bitmap
//! directory with positioned reads, and never looks at bitmap data.
//!
//! It applies QEMU's own open-time checks (`qcow2_do_open`,
//! `qcow2_read_extensions`, `bitmap_list_load` and `check_dir_entry` in
//! QEMU's `block/qcow2.c` and `block/qcow2-bitmap.c`), so an image this
//! reader accepts is one whose bitmaps QEMU would load, and an image it
//! refuses is one QEMU would refuse to open (or whose bitmaps it would refuse
//! to load). A few checks are stricter than QEMU's and say so below.
//!
//! Images may be in use by a running QEMU: after reading the directory the
//! reader reads cluster 0 again and starts over if it changed. When QEMU
//! rewrites the directory in place (as it opens an image writable and as it
//! closes it) it clears autoclear bit 0 for a few milliseconds; a read that
//! lands in that window sees [`Image::bitmaps_consistent`] `false`, and a
//! read a moment later sees the settled state.
//!
//! ```no_run
//! use std::path::Path;
//! use ckptstore::{read_qcow2_chain, Qcow2ChainEnd as ChainEnd};
//!
//! # fn main() -> Result<(), ckptstore::Qcow2Error> {
//! let chain = read_qcow2_chain(Path::new("/var/lib/libvirt/images/vm.qcow2"))?;
//! for layer in &chain.layers {
//!     for bitmap in &layer.bitmaps {
//!         println!("{}: {} in_use={}", layer.path.display(), bitmap.name, bitmap.in_use);
//!     }
//! }
//! if let ChainEnd::Unreadable(name) = &chain.end {
//!     println!("backing file {name} was not followed");
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Most layers [`read_chain`] follows before giving up with
/// [`Qcow2Error::TooDeep`].
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How many times a reader starts over when the header changes under it.
const MAX_ATTEMPTS: u32 = 5;

const MAGIC: &[u8; 4] = b"QFI\xfb";
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const V2_HEADER_LENGTH: u32 = 72;
const V3_MIN_HEADER_LENGTH: u32 = 104;
/// The first read covers the header and, in practice, every extension.
const FIRST_READ: u64 = 4096;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
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
const DIR_ENTRY_FIXED: u64 = 24;
const MAX_TABLE_SIZE: u32 = 0x0800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME_SIZE: u16 = 1023;
const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const TYPE_DIRTY_TRACKING: u8 = 1;

/// Why an image (or a chain) could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file does not start with the qcow2 magic `QFI\xfb`.
    #[error("{} is not a qcow2 image", path.display())]
    NotQcow2 {
        /// The file.
        path: PathBuf,
    },
    /// The qcow2 version is neither 2 nor 3.
    #[error("{}: unsupported qcow2 version {version}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found in the header.
        version: u32,
    },
    /// The image uses a feature QEMU does not know (an unknown incompatible
    /// feature bit or compression type), so QEMU refuses to open it.
    #[error("{}: unsupported qcow2 feature: {detail}", path.display())]
    UnsupportedFeature {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        detail: String,
    },
    /// The image fails one of QEMU's validity checks, or ends too early.
    #[error("{}: invalid qcow2 image: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        detail: String,
    },
    /// The header kept changing while the image was read (a running QEMU
    /// rewrote its bitmap directory every time); reading again may work.
    #[error("{}: the image changed during each of {attempts} reads", path.display())]
    Unstable {
        /// The file.
        path: PathBuf,
        /// How many reads were tried.
        attempts: u32,
    },
    /// A backing chain leads back to a file already in it.
    #[error("backing chain loops: {} is already in the chain", path.display())]
    Loop {
        /// The file met twice.
        path: PathBuf,
    },
    /// A backing chain has more than [`MAX_CHAIN_DEPTH`] qcow2 layers.
    #[error("backing chain deeper than {limit} layers at {}", path.display())]
    TooDeep {
        /// The first file not read.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
}

impl Qcow2Error {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Qcow2Error::Io { path, .. }
            | Qcow2Error::NotQcow2 { path }
            | Qcow2Error::UnsupportedVersion { path, .. }
            | Qcow2Error::UnsupportedFeature { path, .. }
            | Qcow2Error::Invalid { path, .. }
            | Qcow2Error::Unstable { path, .. }
            | Qcow2Error::Loop { path }
            | Qcow2Error::TooDeep { path, .. } => path,
        }
    }

    /// The file (an image or a backing file) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Qcow2Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The file could not be opened or read.
    pub fn is_io(&self) -> bool {
        matches!(self, Qcow2Error::Io { .. })
    }

    /// The file is not a qcow2 image at all.
    pub fn is_not_qcow2(&self) -> bool {
        matches!(self, Qcow2Error::NotQcow2 { .. })
    }

    /// The image is qcow2 but uses a version or feature QEMU does not support.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Qcow2Error::UnsupportedVersion { .. } | Qcow2Error::UnsupportedFeature { .. }
        )
    }

    /// The image is damaged: QEMU would refuse it or its bitmaps.
    pub fn is_invalid(&self) -> bool {
        matches!(self, Qcow2Error::Invalid { .. })
    }

    /// The image was changing while read; reading again may succeed.
    pub fn is_unstable(&self) -> bool {
        matches!(self, Qcow2Error::Unstable { .. })
    }

    /// The backing chain itself is unusable (a loop, or too deep).
    pub fn is_bad_chain(&self) -> bool {
        matches!(self, Qcow2Error::Loop { .. } | Qcow2Error::TooDeep { .. })
    }
}

/// One persistent dirty bitmap, as its bitmap directory entry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// The name, decoded as UTF-8 with invalid bytes replaced. (QEMU cuts a
    /// name at its first NUL byte; this field keeps the whole name.)
    pub name: String,
    /// The name exactly as stored.
    pub raw_name: Vec<u8>,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// Flag `in_use`: the bitmap was not saved cleanly (the image is open in
    /// QEMU, or QEMU died), so its contents cannot be trusted.
    pub in_use: bool,
    /// Flag `auto`: the bitmap is enabled, QEMU records writes in it.
    pub auto: bool,
}

/// One qcow2 file: its header facts and its bitmaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The path the image was read from, as given.
    pub path: PathBuf,
    /// qcow2 version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// Cluster size in bytes (512 B to 2 MiB).
    pub cluster_size: u64,
    /// Guest-visible disk size in bytes.
    pub virtual_size: u64,
    /// The backing file name as stored (cut at a NUL byte, as QEMU does;
    /// decoded as UTF-8 with invalid bytes replaced). See [`Image::backing`].
    pub backing_file: Option<String>,
    /// The backing file's format, from the backing-format header extension.
    pub backing_format: Option<String>,
    /// The external data file name, from its header extension.
    pub data_file: Option<String>,
    /// `false` when the image has a bitmaps extension but autoclear bit 0 is
    /// clear (always so for version 2): a program without bitmap support
    /// wrote to the image, QEMU ignores the extension (`qemu-img info` lists
    /// no bitmaps) and drops it on its next writable open, so every bitmap is
    /// lost. `bitmaps` then lists what the stale directory still says (empty
    /// if it no longer passes the checks). `true` otherwise, also when the
    /// image has no bitmaps at all.
    pub bitmaps_consistent: bool,
    /// Incompatible feature bit 0: refcounts may be stale (lazy refcounts,
    /// or QEMU was killed).
    pub dirty: bool,
    /// Incompatible feature bit 1: QEMU found corruption and will not write.
    pub corrupt: bool,
    /// The bitmaps, in directory order.
    pub bitmaps: Vec<Bitmap>,
    /// The backing file name exactly as stored, up to its first NUL byte.
    backing_raw: Option<Vec<u8>>,
}

/// Where an image's backing file is, as QEMU would look for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// The image has no backing file.
    None,
    /// A local file: an absolute name, or a relative one joined to the
    /// folder of the image's path.
    File(PathBuf),
    /// A name this reader does not follow: `json:` specifications and
    /// protocol names (`nbd:…`, `host:port`, `file:…`), i.e. any name with a
    /// `:` before its first `/`, which QEMU treats as a protocol. The raw
    /// name is kept for the report.
    Unreadable(String),
}

impl Image {
    /// The backing file, resolved the way QEMU resolves it: relative names
    /// against the folder of [`Image::path`], protocol names not at all.
    pub fn backing(&self) -> Backing {
        let Some(raw) = &self.backing_raw else {
            return Backing::None;
        };
        if has_protocol(raw) {
            return Backing::Unreadable(String::from_utf8_lossy(raw).into_owned());
        }
        let name = Path::new(OsStr::from_bytes(raw));
        if name.is_absolute() {
            Backing::File(name.to_path_buf())
        } else {
            Backing::File(self.path.parent().unwrap_or(Path::new("")).join(name))
        }
    }

    /// The bitmap with this exact name, if any.
    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.raw_name == name.as_bytes())
    }
}

/// QEMU's `path_has_protocol`: a `:` before any `/`.
fn has_protocol(name: &[u8]) -> bool {
    name.iter().find(|&&b| b == b':' || b == b'/') == Some(&b':')
}

/// A backing chain, top layer first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingChain {
    /// The qcow2 layers, the given image first, each with its own bitmaps.
    pub layers: Vec<Image>,
    /// What comes after the last layer.
    pub end: ChainEnd,
}

/// How a backing chain ends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainEnd {
    /// The last layer has no backing file.
    NoBacking,
    /// The last layer's backing file exists but is not qcow2 (raw, or
    /// another format). It has no bitmaps, and is not followed further.
    NotQcow2 {
        /// The backing file.
        path: PathBuf,
        /// Its format as recorded by the layer above; `None` when none was
        /// recorded and the file does not start with the qcow2 magic.
        format: Option<String>,
    },
    /// The last layer names its backing file in a form not followed here;
    /// see [`Backing::Unreadable`].
    Unreadable(String),
}

/// Reads one qcow2 image's header and bitmap directory, read-only.
///
/// # Errors
///
/// [`Qcow2Error::Io`] when the file cannot be opened or read,
/// [`Qcow2Error::NotQcow2`] when it lacks the qcow2 magic,
/// [`Qcow2Error::UnsupportedVersion`] and [`Qcow2Error::UnsupportedFeature`]
/// when QEMU would refuse it as unsupported, [`Qcow2Error::Invalid`] when it
/// fails one of QEMU's validity checks (or is truncated), and
/// [`Qcow2Error::Unstable`] when it changed during every attempt.
pub fn read_image(path: &Path) -> Result<Image, Qcow2Error> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    read_file(&file, path)
}

/// Reads an image and its backing files, top first, read-only.
///
/// The chain is followed while the backing file is qcow2: a backing file
/// whose recorded format is not `qcow2`, or (with no recorded format) that
/// does not start with the qcow2 magic, ends the chain as
/// [`ChainEnd::NotQcow2`]. A backing name given as `json:` or a protocol
/// ends it as [`ChainEnd::Unreadable`]; nothing is guessed.
///
/// # Errors
///
/// Any error of [`read_image`] for any layer (a missing backing file is
/// [`Qcow2Error::Io`] with `is_not_found()`), [`Qcow2Error::NotQcow2`] for
/// a backing file recorded as `qcow2` that is not, [`Qcow2Error::Loop`] when
/// a file comes back (compared by device and inode), and
/// [`Qcow2Error::TooDeep`] past [`MAX_CHAIN_DEPTH`] layers.
pub fn read_chain(path: &Path) -> Result<BackingChain, Qcow2Error> {
    let mut seen = HashSet::new();
    let mut layers: Vec<Image> = Vec::new();
    let mut next = path.to_path_buf();
    loop {
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Qcow2Error::TooDeep {
                path: next,
                limit: MAX_CHAIN_DEPTH,
            });
        }
        let file = File::open(&next).map_err(|e| io_error(&next, e))?;
        let meta = file.metadata().map_err(|e| io_error(&next, e))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            return Err(Qcow2Error::Loop { path: next });
        }
        if let Some(above) = layers.last() {
            match above.backing_format.as_deref() {
                Some("qcow2") => {}
                Some(other) => {
                    let end = ChainEnd::NotQcow2 {
                        path: next,
                        format: Some(other.to_owned()),
                    };
                    return Ok(BackingChain { layers, end });
                }
                None => {
                    if !starts_with_magic(&file).map_err(|e| io_error(&next, e))? {
                        return Ok(BackingChain {
                            layers,
                            end: ChainEnd::NotQcow2 {
                                path: next,
                                format: None,
                            },
                        });
                    }
                }
            }
        }
        let image = read_file(&file, &next)?;
        let backing = image.backing();
        layers.push(image);
        match backing {
            Backing::None => {
                return Ok(BackingChain {
                    layers,
                    end: ChainEnd::NoBacking,
                })
            }
            Backing::Unreadable(name) => {
                return Ok(BackingChain {
                    layers,
                    end: ChainEnd::Unreadable(name),
                })
            }
            Backing::File(path) => next = path,
        }
    }
}

fn io_error(path: &Path, source: io::Error) -> Qcow2Error {
    Qcow2Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn starts_with_magic(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(&magic == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The length of a regular file or a block device (whose metadata says 0).
fn file_len(file: &File) -> io::Result<u64> {
    let mut handle = file;
    handle.seek(SeekFrom::End(0))
}

fn read_at(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "read too large"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// A check failed; the caller adds the path.
#[derive(Debug)]
enum Fault {
    NotQcow2,
    Version(u32),
    Unsupported(String),
    Invalid(String),
    /// The buffer ends before this offset.
    Short(u64),
    Io(io::Error),
}

impl Fault {
    fn into_error(self, path: &Path) -> Qcow2Error {
        let path = path.to_path_buf();
        match self {
            Fault::NotQcow2 => Qcow2Error::NotQcow2 { path },
            Fault::Version(version) => Qcow2Error::UnsupportedVersion { path, version },
            Fault::Unsupported(detail) => Qcow2Error::UnsupportedFeature { path, detail },
            Fault::Invalid(detail) => Qcow2Error::Invalid { path, detail },
            Fault::Short(end) => Qcow2Error::Invalid {
                path,
                detail: format!("file ends before byte {end}"),
            },
            Fault::Io(source) => Qcow2Error::Io { path, source },
        }
    }
}

fn invalid<T>(detail: impl Into<String>) -> Result<T, Fault> {
    Err(Fault::Invalid(detail.into()))
}

/// Big-endian fields of a byte buffer, bounds-checked.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn slice(&self, at: u64, len: u64) -> Result<&[u8], Fault> {
        let end = at.checked_add(len).ok_or(Fault::Short(u64::MAX))?;
        let range = usize::try_from(at).ok().zip(usize::try_from(end).ok());
        range
            .and_then(|(a, e)| self.0.get(a..e))
            .ok_or(Fault::Short(end))
    }

    fn array<const N: usize>(&self, at: u64) -> Result<[u8; N], Fault> {
        let s = self.slice(at, N as u64)?;
        <[u8; N]>::try_from(s).map_err(|_| Fault::Short(at))
    }

    fn u8(&self, at: u64) -> Result<u8, Fault> {
        Ok(self.array::<1>(at)?[0])
    }

    fn u16(&self, at: u64) -> Result<u16, Fault> {
        self.array(at).map(u16::from_be_bytes)
    }

    fn u32(&self, at: u64) -> Result<u32, Fault> {
        self.array(at).map(u32::from_be_bytes)
    }

    fn u64(&self, at: u64) -> Result<u64, Fault> {
        self.array(at).map(u64::from_be_bytes)
    }
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy)]
struct BitmapsExt {
    nb_bitmaps: u32,
    directory_size: u64,
    directory_offset: u64,
}

/// What the header and its extensions say.
#[derive(Debug)]
struct Header {
    version: u32,
    cluster_bits: u32,
    virtual_size: u64,
    incompatible: u64,
    backing_raw: Option<Vec<u8>>,
    backing_format: Option<String>,
    data_file: Option<String>,
    /// The extension, and whether autoclear bit 0 vouches for it.
    bitmaps: Option<(BitmapsExt, bool)>,
}

/// A string as QEMU reads it into a C buffer: cut at the first NUL.
fn c_bytes(raw: &[u8]) -> &[u8] {
    raw.iter().position(|&b| b == 0).map_or(raw, |n| &raw[..n])
}

fn c_string(raw: &[u8]) -> String {
    String::from_utf8_lossy(c_bytes(raw)).into_owned()
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
fn check_bitmaps_ext(ext: &BitmapsExt, reserved: u32, cluster: u64) -> Result<(), Fault> {
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
fn read_header(file: &File, path: &Path, file_len: u64) -> Result<(Vec<u8>, Header), Qcow2Error> {
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

fn read_file(file: &File, path: &Path) -> Result<Image, Qcow2Error> {
    for _ in 0..MAX_ATTEMPTS {
        let file_len = file_len(file).map_err(|e| io_error(path, e))?;
        let (first, header) = read_header(file, path, file_len)?;
        let cluster = 1u64 << header.cluster_bits;
        let (bitmaps, consistent) = match header.bitmaps {
            None => return Ok(image(path, header, Vec::new(), true)),
            Some((ext, true)) => (
                read_directory(file, &ext, cluster, header.virtual_size, file_len),
                true,
            ),
            Some((ext, false)) => {
                // QEMU ignores a stale extension: list what it says if it still
                // passes the checks, and nothing otherwise.
                let stale = check_bitmaps_ext(&ext, 0, cluster).and_then(|()| {
                    read_directory(file, &ext, cluster, header.virtual_size, file_len)
                });
                match stale {
                    Err(Fault::Io(e)) => (Err(Fault::Io(e)), false),
                    stale => (Ok(stale.unwrap_or_default()), false),
                }
            }
        };
        // Only cluster 0 holds header data; with small clusters the first
        // read also covers tables a running guest keeps changing.
        let header_bytes = &first[..first.len().min(1 << header.cluster_bits)];
        let again = read_at(file, 0, header_bytes.len() as u64).map_err(|e| io_error(path, e))?;
        if again != header_bytes {
            continue;
        }
        return match bitmaps {
            Ok(bitmaps) => Ok(image(path, header, bitmaps, consistent)),
            Err(fault) => Err(fault.into_error(path)),
        };
    }
    Err(Qcow2Error::Unstable {
        path: path.to_path_buf(),
        attempts: MAX_ATTEMPTS,
    })
}

fn image(path: &Path, header: Header, bitmaps: Vec<Bitmap>, bitmaps_consistent: bool) -> Image {
    Image {
        path: path.to_path_buf(),
        version: header.version,
        cluster_size: 1 << header.cluster_bits,
        virtual_size: header.virtual_size,
        backing_file: header
            .backing_raw
            .as_deref()
            .map(|raw| String::from_utf8_lossy(raw).into_owned()),
        backing_format: header.backing_format,
        data_file: header.data_file,
        bitmaps_consistent,
        dirty: header.incompatible & INCOMPAT_DIRTY != 0,
        corrupt: header.incompatible & INCOMPAT_CORRUPT != 0,
        bitmaps,
        backing_raw: header.backing_raw,
    }
}

/// Reads the bitmap directory in one read and checks it.
fn read_directory(
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

    fn with_backing(path: &str, name: &[u8]) -> Image {
        Image {
            path: PathBuf::from(path),
            version: 3,
            cluster_size: 65536,
            virtual_size: 0,
            backing_file: Some(String::from_utf8_lossy(name).into_owned()),
            backing_format: None,
            data_file: None,
            bitmaps_consistent: true,
            dirty: false,
            corrupt: false,
            bitmaps: Vec::new(),
            backing_raw: Some(name.to_vec()),
        }
    }

    #[test]
    fn backing_names_resolve_like_qemu() {
        let cases: &[(&str, &[u8], Backing)] = &[
            (
                "/a/top.qcow2",
                b"base.qcow2",
                Backing::File("/a/base.qcow2".into()),
            ),
            (
                "/a/top.qcow2",
                b"../b/base",
                Backing::File("/a/../b/base".into()),
            ),
            (
                "/a/top.qcow2",
                b"/abs/base",
                Backing::File("/abs/base".into()),
            ),
            ("top.qcow2", b"base", Backing::File("base".into())),
            (
                "/a/top",
                b"nbd://host:10809/x",
                Backing::Unreadable("nbd://host:10809/x".into()),
            ),
            (
                "/a/top",
                b"host:1234",
                Backing::Unreadable("host:1234".into()),
            ),
            (
                "/a/top",
                b"json:{\"file\":{}}",
                Backing::Unreadable("json:{\"file\":{}}".into()),
            ),
            (
                "/a/top",
                b"dir/with:colon",
                Backing::File("/a/dir/with:colon".into()),
            ),
        ];
        for (path, name, want) in cases {
            assert_eq!(
                &with_backing(path, name).backing(),
                want,
                "{path} + {}",
                String::from_utf8_lossy(name)
            );
        }
    }

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
