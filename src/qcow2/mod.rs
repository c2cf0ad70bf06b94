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
//! The code map: `header.rs` (the header and its extensions, with the
//! checks of `qcow2_do_open` and `qcow2_read_extensions`), `bitmaps.rs` (the
//! bitmap directory and its entries' checks), `bytes.rs` (bounds-checked
//! big-endian fields, C strings, positioned reads), `error.rs`
//! ([`Qcow2Error`] and its predicates, and the path-less `Fault` of a failed
//! check); this file holds the public types, [`read_image`] with its retry
//! on a changing header, and the backing-chain walk of [`read_chain`].
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

mod bitmaps;
mod bytes;
mod error;
mod header;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bitmaps::read_directory;
use bytes::{file_len, read_at};
use error::{io_error, Fault};
use header::{
    check_bitmaps_ext, read_header, starts_with_magic, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};

pub use error::Qcow2Error;

/// Most layers [`read_chain`] follows before giving up with
/// [`Qcow2Error::TooDeep`].
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How many times a reader starts over when the header changes under it.
const MAX_ATTEMPTS: u32 = 5;

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
        let file = open_layer(&next, &mut seen)?;
        if let Some(end) = not_qcow2_end(layers.last(), &file, &next)? {
            return Ok(BackingChain { layers, end });
        }
        let image = read_file(&file, &next)?;
        let backing = image.backing();
        layers.push(image);
        let end = match backing {
            Backing::None => ChainEnd::NoBacking,
            Backing::Unreadable(name) => ChainEnd::Unreadable(name),
            Backing::File(path) => {
                next = path;
                continue;
            }
        };
        return Ok(BackingChain { layers, end });
    }
}

/// Opens a layer of a chain, unless it is a file already in the chain
/// (compared by device and inode: `seen`).
fn open_layer(path: &Path, seen: &mut HashSet<(u64, u64)>) -> Result<File, Qcow2Error> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if !seen.insert((meta.dev(), meta.ino())) {
        return Err(Qcow2Error::Loop {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// The chain's end when `file` (at `path`), the backing file of the layer
/// `above`, is not qcow2: the format `above` records says so, or, with none
/// recorded, the file lacks the magic. `None` when it is to be read as
/// qcow2, as the top image always is.
fn not_qcow2_end(
    above: Option<&Image>,
    file: &File,
    path: &Path,
) -> Result<Option<ChainEnd>, Qcow2Error> {
    let Some(above) = above else {
        return Ok(None);
    };
    let format = match above.backing_format.as_deref() {
        Some("qcow2") => return Ok(None),
        Some(other) => Some(other.to_owned()),
        None if starts_with_magic(file).map_err(|e| io_error(path, e))? => return Ok(None),
        None => None,
    };
    Ok(Some(ChainEnd::NotQcow2 {
        path: path.to_path_buf(),
        format,
    }))
}

/// Reads one open image: the header, the bitmap directory, then cluster 0
/// again; starts over (at most [`MAX_ATTEMPTS`] times) when it changed.
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
}
