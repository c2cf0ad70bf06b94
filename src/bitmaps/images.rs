//! Where the bitmap checks (validation's, and a sync's before its intent)
//! get each disk's qcow2 layers and their bitmaps from:
//! the [`ImageReader`] trait, the in-process [`Qcow2Reader`], the layer
//! types, and a per-layer name index of the bitmaps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::qcow2::{self, ChainEnd};

/// One bitmap of one image layer, as validation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBitmap {
    /// The bitmap's name.
    pub name: String,
    /// Flag `in_use`: not saved cleanly.
    pub in_use: bool,
    /// Flag `auto`: records writes.
    pub auto: bool,
}

/// One qcow2 file of a disk's backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The file.
    pub path: PathBuf,
    /// `false` when the bitmaps extension is marked inconsistent (autoclear
    /// bit 0 clear): QEMU ignores every bitmap of the file.
    pub bitmaps_consistent: bool,
    /// Its bitmaps.
    pub bitmaps: Vec<LayerBitmap>,
}

/// A disk's qcow2 layers, top first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskChain {
    /// The qcow2 layers; empty when the disk's image is not qcow2.
    pub layers: Vec<Layer>,
    /// Set when the chain goes on below the last layer in a form that was
    /// not followed (a `json:` or protocol backing name): what it says.
    pub unfollowed: Option<String>,
}

/// Why a disk's chain could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageError {
    /// The disk's image itself is not qcow2: it holds no bitmaps.
    NotQcow2 {
        /// The image.
        path: PathBuf,
    },
    /// The image or a backing file could not be read.
    Unreadable {
        /// The file that failed.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where validation gets a disk's layers from. [`Qcow2Reader`] reads the
/// files in-process; a test or a bench may supply another.
pub trait ImageReader {
    /// The layers of the image at `path` and of its backing files, top first.
    ///
    /// # Errors
    ///
    /// [`ImageError::NotQcow2`] when the image at `path` is not qcow2,
    /// [`ImageError::Unreadable`] when it or a backing file cannot be read.
    fn read_chain(&self, path: &Path) -> std::result::Result<DiskChain, ImageError>;
}

/// The in-process reader: [`crate::qcow2::read_chain`], read-only, one read
/// of each file's header and bitmap directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Reader;

impl ImageReader for Qcow2Reader {
    fn read_chain(&self, path: &Path) -> std::result::Result<DiskChain, ImageError> {
        match qcow2::read_chain(path) {
            Ok(chain) => Ok(DiskChain {
                unfollowed: match chain.end {
                    ChainEnd::Unreadable(name) => Some(name),
                    _ => None,
                },
                layers: chain
                    .layers
                    .into_iter()
                    .map(|image| Layer {
                        bitmaps_consistent: image.bitmaps_consistent,
                        bitmaps: image
                            .bitmaps
                            .into_iter()
                            .map(|b| LayerBitmap {
                                name: b.name,
                                in_use: b.in_use,
                                auto: b.auto,
                            })
                            .collect(),
                        path: image.path,
                    })
                    .collect(),
            }),
            Err(e) if e.is_not_qcow2() && e.path() == path => Err(ImageError::NotQcow2 {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(ImageError::Unreadable {
                path: e.path().to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }
}

/// A disk's layers with a name index per layer.
pub(crate) struct Indexed<'a> {
    pub(crate) chain: &'a DiskChain,
    pub(crate) by_name: Vec<HashMap<&'a str, &'a LayerBitmap>>,
}

impl<'a> Indexed<'a> {
    pub(crate) fn new(chain: &'a DiskChain) -> Self {
        let by_name = chain
            .layers
            .iter()
            .map(|l| l.bitmaps.iter().map(|b| (b.name.as_str(), b)).collect())
            .collect();
        Indexed { chain, by_name }
    }
}
